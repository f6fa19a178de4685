"""Writes the command-line reference (docs/reference/cli.md) from the flag tables; tests fail when it is stale.

    python -m federated.tools.reference          rewrite docs/reference/cli.md
"""

import sys
from pathlib import Path

from federated.common.flags import reference
from federated.leader import config as leader_flags
from federated.learner import config as learner_flags

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "cli.md"

HEADER = """# Command-line reference

Every flag of every entry point, generated from the flag tables (`federated/leader/config.py`,
`federated/learner/config.py`) by `python -m federated.tools.reference`; a test fails when this page is stale.
`python leader.py --help` says the same. A flag that applies only to some strategies, aggregators or partitions
is refused when given for another; a flag marked *kept on resume* shapes the training trajectory: a resumed run
takes it from its checkpoint and refuses another value.
"""


def page() -> str:
    """The reference page's Markdown."""
    return "\n".join([HEADER,
                      reference(leader_flags.LeaderConfig, "leader.py", leader_flags.GROUPS, "leader",
                                leader_flags.LISTINGS),
                      reference(learner_flags.LearnerConfig, "learner.py", learner_flags.GROUPS, "learner")])


def main() -> int:
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page(), encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
