"""A learner: registers with the leader, trains the global model on its own data, and sends updates back
(python learner.py --help)."""

import sys

from federated.learner.cli import main

if __name__ == "__main__":
    sys.exit(main())
