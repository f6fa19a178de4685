"""Measure the project's performance figures (python bench.py --help)."""

import sys

from federated.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
