"""Writes the command-line reference (docs/reference/cli.md) from the flag tables; tests fail when it is stale.

    python -m federated.tools.reference          rewrite docs/reference/cli.md
"""

import sys
from pathlib import Path

from federated.common.flags import Field, Listings, fields, metavar, scope_text
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
                      flag_tables(leader_flags.LeaderConfig, "leader.py", leader_flags.GROUPS, "leader",
                                leader_flags.LISTINGS),
                      flag_tables(learner_flags.LearnerConfig, "learner.py", learner_flags.GROUPS, "learner")])


def flag_tables(config_type: type, title: str, groups: dict[str, str], role: str = "",
              listings: Listings | None = None) -> str:
    """The Markdown reference of a program's flags: one table per group, with default, bounds and scope."""
    lines = [f"## {title}", ""]
    if listings:
        lines += ["| flag | meaning |", "|---|---|", *(f"| `{name}` | {text} |" for name, (text, _) in listings.items()), ""]
    by_group: dict[str, list[Field]] = {}
    for field in fields(config_type):
        by_group.setdefault(field.flag.group, []).append(field)
    for group in [*groups, *(name for name in by_group if name not in groups)]:
        if group not in by_group:
            continue
        lines += [f"### {group}", "", *([groups[group], ""] if groups.get(group) else []),
                  "| flag | default | meaning |", "|---|---|---|"]
        lines += [_reference_row(field, fields(config_type), role) for field in by_group[group]]
        lines.append("")
    return "\n".join(lines)


def _reference_row(field: Field, others: list[Field], role: str) -> str:
    default = field.flag.default_text or ("off" if field.type is bool else "unset" if field.default is None
                                          else f"`{field.default_value()}`")
    notes = []
    choices = field.choices()
    if choices:
        notes.append("one of " + ", ".join(f"`{choice}`" for choice in choices))
    if (bounds := field.bounds()) is not None:
        notes.append(f"must be {bounds}")
    if field.flag.scope is not None:
        notes.append(scope_text(field, others))
    if field.flag.trajectory:
        notes.append("kept on resume")
    meaning = field.flag.help.replace("{role}", role) + (f" ({'; '.join(notes)})" if notes else "")
    value = "" if field.type is bool else f" {field.flag.metavar or metavar(field)}"
    return f"| `{field.option}{value}` | {default} | {meaning.replace('|', '&#124;')} |"


def main() -> int:
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page(), encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
