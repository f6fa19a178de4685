"""The leader: owns the global model, registers learners, serves model and data, and runs the rounds
(python leader.py --help)."""

import sys

from federated.leader.cli import main

if __name__ == "__main__":
    sys.exit(main())
