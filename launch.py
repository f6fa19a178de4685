"""Run a leader and N learners as local processes, e.g. for the demo, or the learners on a Ray cluster
(python launch.py --help)."""

import sys

from federated.tools.launch import main

if __name__ == "__main__":
    sys.exit(main())
