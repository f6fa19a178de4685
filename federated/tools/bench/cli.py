"""bench.py's command line: parse, run the chosen figures, write results.json and the results page, print.

Also runs the helper subcommands (registry.HELPERS) that the figures start as processes of their own."""

import argparse
import json
import os
import sys
from pathlib import Path

from federated.common import runtime
from federated.tools.bench import page
from federated.tools.bench.common import ROOT
from federated.tools.bench.console import print_table
from federated.tools.bench.provenance import Stopwatch, command_line, machine
from federated.tools.bench.registry import (
    FIGURES,
    HELPERS,
    SETTINGS,
    Figure,
    figure_named,
    headline,
)

DESCRIPTION = (
    "Benchmarks: every figure a ratio against a baseline measured in the same run (make bench: the headline figures)."
)
PAGE = ROOT / "docs" / "performance" / "results.md"


def main(argv: list[str] | None = None) -> int:
    """A helper subcommand (`bench.py _NAME ARGS...`) or the figures."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        if argv[0] not in HELPERS:
            raise SystemExit(f"bench.py: no helper subcommand {argv[0]} (there are {', '.join(HELPERS)})")
        set_up_process()
        HELPERS[argv[0]].run(argv[1:])
        return 0
    return run_figures(argv)


def set_up_process() -> None:
    """As leader.py and learner.py do, so that the baselines get the same allocator as the project's processes."""
    runtime.tune_allocator()


def parser() -> argparse.ArgumentParser:
    """bench.py's flags: each registry setting once, then what to run and where to write."""
    made = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=runtime.HelpFormatter)
    for setting in SETTINGS:
        made.add_argument(
            setting.flag, type=setting.type, default=setting.default, help=setting.help, choices=setting.choices
        )
    made.add_argument("--out", default="bench", help="directory for results.json and the runs' logs")
    chosen = made.add_mutually_exclusive_group()
    chosen.add_argument(
        "--only",
        nargs="*",
        help="run only these figures (results.json keeps the earlier values of the others); --list names them",
    )
    chosen.add_argument("--headline", action="store_true", help="run only the headline figures (make bench)")
    made.add_argument("--list", action="store_true", help="list the figures, their groups and settings, and exit")
    made.add_argument(
        "--page",
        help="the results page to write from this run's figures and the earlier ones in the "
        ".json beside it ('none': write none; unset: the repository's "
        "docs/performance/results.md)",
    )
    return made


def run_figures(argv: list[str]) -> int:
    """Run the figures that argv chooses; write results.json after each, then the page; print the table."""
    made = parser()
    args = made.parse_args(argv)
    if args.list:
        print_figures()
        return 0
    figures = chosen_figures(args, made)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_up_process()
    runtime.set_threads(1)  # the bench's own work, beside the processes it starts: oversubscribed cores slow all
    path, results = out / "results.json", {}
    earlier = read_json(path) if len(figures) < len(FIGURES) else {}  # a subset updates those figures only
    for figure in figures:
        results.update(run_figure(figure, vars(args), out, argv))
        path.write_text(json.dumps({**earlier, **results}, indent=2))  # after each figure: a later failure keeps it
        write_page(args.page, results)
    print_table(results)
    print(f"load average (1, 5, 15 minutes): {page.loads(list(os.getloadavg()))}")
    return 0


def chosen_figures(args: argparse.Namespace, made: argparse.ArgumentParser) -> list[Figure]:
    """The figures to run, in the registry's order: --only's, the headline ones, or all (--only with no names)."""
    if args.headline:
        return list(headline())
    if not args.only:
        return list(FIGURES)
    unknown = [name for name in args.only if figure_named(name) is None]
    if unknown:
        made.error(f"no figure {', '.join(unknown)}; the figures: {', '.join(figure.name for figure in FIGURES)}")
    wanted = {figure.name for figure in FIGURES if any(figure_named(name) is figure for name in args.only)}
    return [figure for figure in FIGURES if figure.name in wanted]


def run_figure(figure: Figure, settings: dict, out: Path, argv: list[str]) -> dict[str, dict]:
    """One figure's results by results.json key, each with where it was measured ("measured")."""
    watch = Stopwatch()
    results = figure.measure(settings, out / "work")
    record = watch.record(command_line(argv), machine())
    print(f"{figure.name}: done in {record['seconds']:.0f} s", flush=True)
    return {key: {**value, "measured": record} for key, value in results.items()}


def write_page(page_path: str | None, results: dict[str, dict]) -> None:
    """Add this run's figures to the page's record (the .json beside it) and write the page from the record.
    A figure that was skipped (links without network namespaces) keeps its earlier measurement there."""
    if page_path == "none":
        return
    markdown = Path(page_path) if page_path else PAGE
    record_path = markdown.with_suffix(".json")
    measured = {key: value for key, value in results.items() if value["value"] is not None or "skipped" not in value}
    record = {**read_json(record_path), **measured}
    markdown.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    markdown.write_text(page.render(record))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def print_figures() -> None:
    """--list: each figure with its group, whether `make bench` runs it, its settings and what it compares."""
    for figure in FIGURES:
        settings = " ".join(f"{setting.flag} {setting.default}" for setting in figure.settings)
        keys = f" (keys {', '.join(figure.result_keys)})" if figure.keys else ""
        print(f"{figure.name:22} {figure.group:11} {'headline' if figure.headline else 'full':9} {settings}{keys}")
        print(f"{'':22} {figure.measures}")
