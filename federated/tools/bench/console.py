"""The table printed at the end of a run: one line per results.json key, then the rows of the figures that
are tables of their own."""

import json
from collections.abc import Callable

from federated.tools.bench import page


def print_table(results: dict) -> None:
    """Print a run's results (results.json's keys and values) as bench.py always has."""
    print(f"\n{'figure':28} {'value':>10}  details")
    for name, result in results.items():
        value = result["value"]
        shown = f"{value:10.3f}" if isinstance(value, float) else f"{'see json':>10}"
        details = {k: v for k, v in result.items() if k != "value" and not isinstance(v, dict)}
        print(f"{name:28} {shown}  {json.dumps(details)[:160]}")
    for name, print_rows in ROWS.items():
        if name in results and results[name]["value"] is not None:
            print_rows(results[name])


def shown(value: float | None, form: str) -> str:
    """A figure that may be missing (None: "-")."""
    return format(value, form) if value is not None else "-"


def _scale_rows(result: dict) -> None:
    for count, row in result["value"].items():
        print(
            f"  {count:>3} learners: {row['rounds_per_s']:7.2f} rounds/s; leader peak RSS "
            f"{row['leader_peak_rss_mb']:7.1f} MB,"
            f" peak anonymous {row['leader_peak_anon_mb']:7.1f} MB, of which the rounds added "
            f"{row['anon_growth_in_rounds_mb']:5.1f} MB"
        )


def _strategy_rows(result: dict) -> None:
    print(
        f"  {'strategy':10} {'rounds':>6} {'MB':>9} {'seconds':>8} to {result['target']:.0%}; "
        "final accuracy; bytes and time against FedSGD"
    )
    for name, row in result["value"].items():
        print(
            f"  {name:10} {shown(row['rounds_to_target'], '6d'):>6} {shown(row['mb_to_target'], '9.1f'):>9} "
            f"{shown(row['seconds_to_target'], '8.1f'):>8}    {row['final_accuracy']:.4f}   "
            f"{shown(row['bytes_vs_fedsgd'], '.3f')} {shown(row['seconds_vs_fedsgd'], '.3f')}"
        )


def _non_iid_rows(result: dict) -> None:
    strategies = [name for name in next(iter(result["value"].values())) if name != "budget_mb"]
    print(
        f"  non_iid: test accuracy (round to {result['target']:.0%}), {result['learners']} learners, "
        f"{result['epochs']:g} epochs of {result['dataset']}, then at the MB of each partition's cheapest run"
    )
    print(f"  {'partition':27}" + "".join(f"{name:>16}" for name in strategies))
    for partition, row in result["value"].items():
        for label, reading in ((f"{result['epochs']:g} epochs", "at_end"), (f"{row['budget_mb']:.1f} MB", "at_budget")):
            cells = [row[name][reading] for name in strategies]
            print(
                f"  {partition + ', ' + label:27}"
                + "".join(
                    f"{shown(cell['accuracy'], '9.4f'):>9} ({shown(cell['rounds_to_target'], '4'):>4})"
                    for cell in cells
                )
            )


def _serialization_rows(result: dict) -> None:
    for codec, row in result["value"].items():
        print(f"  {codec:12} encode {row['encode_gbps']:6.2f} GB/s, decode {row['decode_gbps']:8.2f} GB/s")


def _page_rows(name: str) -> Callable[[dict], None]:
    """A figure's rows as the results page shows them (a Markdown table), for the figures too wide for a line."""

    def print_rows(result: dict) -> None:
        print(page.markdown(page.HEADERS[name], page.RENDER[name]({name: result}).rows))

    return print_rows


ROWS: dict[str, Callable[[dict], None]] = {  # in the order they print
    "leader_scale": _scale_rows,
    "strategies": _strategy_rows,
    "non_iid": _non_iid_rows,
    "serialization_gbps": _serialization_rows,
    "compression": _page_rows("compression"),
    "compression_links": _page_rows("compression_links"),
}
