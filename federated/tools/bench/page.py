"""The results page (docs/performance/results.md), a function of results.json: per figure, dated rows with the
command, machine and load that produced them; figures the bench has not measured since it first wrote the
page keep the values hand-recorded in the README before (recorded.py), marked so."""

from collections.abc import Callable
from typing import NamedTuple

from federated.tools.bench import recorded
from federated.tools.bench.registry import FIGURES, Figure

HAND = "(hand-recorded before the bench wrote this page)"


class Table(NamedTuple):
    """A figure's rows under its headers, and notes printed below them."""

    rows: list[list[str]]
    notes: list[str]


def render(results: dict) -> str:
    """The whole page for results.json's contents."""
    parts = [
        INTRO,
        "## Headline figures (`make bench`)",
        headline_table(results),
        "## Every figure (`make bench-full`)",
        figures_table(),
    ]
    parts += [section(figure, results) for figure in FIGURES]
    return "\n\n".join(parts) + "\n"


INTRO = """# Performance results

Written by the bench after every run, from the figures' values in `docs/performance/results.json` (the same keys
and values as `bench/results.json`, each with when, by which command, on which machine and under what load it was
measured); do not edit by hand. How each figure is measured: [the method](index.md). These machines are shared
and noisy: read a ratio with the load beside it, and compare only figures measured in the same run."""


def headline_table(results: dict) -> str:
    rows = []
    for figure in FIGURES:
        for key in figure.result_keys if figure.headline else ():
            result = results.get(key, {})
            shown = summary(key, result) if result else "not measured by the bench yet"
            rows.append([f"`{key}`", shown, figure.target_of(key), when(result.get("measured"))])
    return markdown(["figure (`results.json` key)", "value", "target", "measured"], rows)


def summary(key: str, result: dict) -> str:
    """A key's value in one cell: the ratio, or for a table the line that says most."""
    if key == "serialization_gbps":
        ours = result["value"]["ours"]
        return f"ours: encode {ours['encode_gbps']:.2f} GB/s, decode {ours['decode_gbps']:.2f} GB/s"
    return number(result["value"], ".3f") if isinstance(result["value"], (float, type(None))) else "see below"


def figures_table() -> str:
    rows = [
        [
            f"`{figure.name}`",
            figure.group,
            "yes" if figure.headline else "",
            figure.measures,
            figure.target,
            f"`{rerun(figure)}`",
        ]
        for figure in FIGURES
    ]
    return markdown(["figure", "group", "in `make bench`", "what it compares", "target", "rerun"], rows)


def rerun(figure: Figure) -> str:
    """The command that measures this figure alone, with its settings' defaults spelt out."""
    settings = "".join(f" {setting.flag} {setting.default}" for setting in figure.settings)
    return f"python bench.py --only {figure.name}{settings}"


def section(figure: Figure, results: dict) -> str:
    """A figure's heading, where its rows came from, and its table."""
    present = {key: results[key] for key in figure.result_keys if key in results}
    if present:
        measured = next(iter(present.values())).get("measured")
        stamp, source, table = when(measured), provenance(measured), RENDER[figure.name](present)
    else:
        earlier = recorded.RECORDED[figure.name]
        stamp, table = f"{earlier.date} {HAND}", Table(earlier.rows, earlier.notes)
        source = f"Measured {earlier.date} by `{earlier.command}` on {earlier.machine} {HAND}."
    body = markdown(["measured", *HEADERS[figure.name]], [[stamp, *row] for row in table.rows])
    return "\n\n".join([f"## `{figure.name}`", source, body, *table.notes])


def when(measured: dict | None) -> str:
    """A measurement's date and time (UTC) as the page shows it."""
    if not measured:
        return "not recorded"
    return measured["date"].replace("T", " ")[:16] + " UTC"


def provenance(measured: dict | None) -> str:
    """One sentence: when, how long, by which command, on which machine, under what load."""
    if not measured:
        return "When and where this was measured was not recorded (a results.json from before the bench recorded it)."
    host = measured["machine"]
    cores = (
        f"{host['cores']} cores"
        if host["available_cores"] == host["cores"]
        else f"{host['available_cores']} of {host['cores']} cores"
    )
    return (
        f"Measured {when(measured)} in {measured['seconds']:.0f} s by `{measured['command']}` on {cores} "
        f"({host['cpu']}), Python {host['python']}, torch {host['torch']}, grpcio {host['grpcio']}; load average "
        f"(1, 5, 15 minutes) {loads(measured['load_at_start'])} at the start, {loads(measured['load_at_end'])} "
        "at the end."
    )


def loads(averages: list[float]) -> str:
    return " / ".join(f"{average:.2f}" for average in averages)


def number(value: float | None, form: str) -> str:
    """value formatted, or '-' where there is none (a target never reached, a step not measured)."""
    return "-" if value is None else format(value, form)


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ---- each figure's rows -----------------------------------------------------------------------


def transfer_rows(results: dict) -> Table:
    result = results["model_transfer_ratio"]
    steps = result["steps_median_s"]
    added = [
        steps["our_stream"] - steps["raw_grpc"],
        steps["plus_copy_into_place"] - steps["our_stream"],
        steps["plus_finite_check_and_load"] - steps["plus_copy_into_place"],
    ]
    row = [
        number(result["value"], ".3f"),
        number(result["ours_gbps"], ".2f"),
        number(result["raw_grpc_gbps"], ".2f"),
        chunk_size(result["raw_best_chunk"]),
        number(result["raw_tcp_gbps"], ".2f"),
        f"{result['bytes'] / 1e6:.1f}",
        " / ".join(f"{seconds * 1000:.1f}" for seconds in added),
    ]
    by_chunk = ", ".join(
        f"{chunk_size(int(size))} {gbps:.2f}" for size, gbps in result["raw_grpc_by_chunk_gbps"].items()
    )
    return Table([row], [f"Raw gRPC by chunk size (GB/s): {by_chunk}."])


def chunk_size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def round_rows(results: dict) -> Table:
    rows = [[f"`{key}`", number(result["value"], ".3f"), ROUND_DETAILS[key](result)] for key, result in results.items()]
    return Table(rows, [])


def _overhead_details(result: dict) -> str:
    where, rounds = result["where_the_round_goes"], result["round_s"]
    return (
        f"median round {rounds['median']:.3f} s ({rounds['min']:.3f}-{rounds['max']:.3f}, {rounds['n']} rounds of "
        f"{result['runs']} runs) against a plain step of {result['plain_step_s']['median']:.3f} s "
        f"({result['threads_per_learner']} thread); against two plain processes at once: "
        f"{result['vs_two_plain_processes_at_once']:.3f}. The leader waited "
        f"{where['leader_gradients_s'] * 1000:.0f} ms for the gradients, stepped in "
        f"{where['leader_step_s'] * 1000:.1f} ms and pushed in {where['leader_push_s'] * 1000:.1f} ms; a learner "
        f"spent {where['learner_sending_and_waiting_s'] * 1000:.0f} ms a round sending and waiting"
    )


def _wire_details(result: dict) -> str:
    return (
        f"{result['bytes_per_learner_round']:,.0f} bytes per learner-round (the kernel's loopback counter: "
        f"{result['os_loopback_bytes_per_learner_round']:,.0f}) against twice the {result['parameter_bytes']:,} "
        "fp32 parameter bytes"
    )


def _throughput_details(result: dict) -> str:
    rates = result["federated_images_per_s"]
    return (
        f"a learner computed {rates['median']:.0f} images/s ({rates['min']:.0f}-{rates['max']:.0f}) against "
        f"{result['plain_images_per_s']:.0f} in a plain process; against two plain processes at once: "
        f"{result['vs_two_plain_processes_at_once']:.3f}"
    )


ROUND_DETAILS: dict[str, Callable[[dict], str]] = {
    "round_overhead_ratio": _overhead_details,
    "wire_bytes_ratio": _wire_details,
    "learner_throughput_ratio": _throughput_details,
}


def scale_rows(results: dict) -> Table:
    result = results["leader_scale"]
    rows = [
        [
            count,
            f"{row['rounds_per_s']:.2f}",
            f"{row['round_s']['median']:.3f}",
            f"{row['leader_peak_rss_mb']:.0f}",
            f"{row['leader_peak_anon_mb']:.0f}",
            f"{row['anon_growth_in_rounds_mb']:.1f}",
        ]
        for count, row in result["value"].items()
    ]
    note = (
        f"Peak RSS growth from the fewest to the most learners: {result['rss_growth_mb']:.0f} MB (limit "
        f"{result['rss_growth_limit_mb']:.0f} MB); peak anonymous growth {result['anon_growth_mb']:.0f} MB; round time "
        f"×{result['round_time_growth']:.1f} for ×{result['learner_growth']:.0f} learners."
    )
    return Table(rows, [note])


def virtual_scale_rows(results: dict) -> Table:
    result = results["virtual_scale"]
    runs = [
        *(("virtual", row) for row in result["rows"].values()),
        ("goal: virtual, one process", result["goal"]),
        ("learner processes", result["processes"]),
        ("virtual, one process", result["pooled"]),
    ]
    rows = [
        [
            label,
            str(run["registered"]),
            str(run["per_round"]),
            str(run["processes"]),
            f"{run['registration_s']:.1f}",
            f"{run['rounds_per_s']:.2f}",
            f"{run['round_s']:.3f}",
            f"{run['compute_s']:.3f}",
            f"{run['round_s'] / run['compute_s']:.2f}",
            f"{run['bytes_per_round'] / 1e6:.1f}",
            f"{run['leader_peak_rss_mb']:.0f}",
            f"{run['learners_peak_rss_mb']:.0f}",
        ]
        for label, run in runs
    ]
    goal = result["goal"]
    note = (
        f"Goal (1,000 registered, 20 a round): a round {result['value']:.2f} × its drawn learners' compute (≤ 1.2), "
        f"leader peak RSS {goal['leader_peak_rss_mb']:.0f} MB (≤ 2,048). Images of {result['image_size']}x"
        f"{result['image_size']} pixels. The drawn learners' compute: as many updates of "
        f"{result['update_s'] * 1000:.0f} ms as a lone learner process reports it (its images/s "
        "computing), one after another, as a process's virtual learners train; rows of several processes train "
        "some at once, and can round faster. Registration: from starting the learner processes until the leader "
        "starts their learners (all registered)."
    )
    return Table(rows, [note])


def serialization_rows(results: dict) -> Table:
    result = results["serialization_gbps"]
    rows = [[name, f"{row['encode_gbps']:.2f}", f"{row['decode_gbps']:.2f}"] for name, row in result["value"].items()]
    return Table(rows, [f"A ResNet-18 state_dict of {result['bytes']:,} bytes."])


def accuracy_rows(results: dict) -> Table:
    result = results["time_to_accuracy"]
    return Table(
        [
            [
                number(result["value"], ".3f"),
                number(result["federated_s"], ".1f"),
                number(result["centralised_s"], ".1f"),
                f"{result['target']:.0%}",
            ]
        ],
        [],
    )


def strategy_rows(results: dict) -> Table:
    result = results["strategies"]
    rows = [
        [
            name,
            number(row["rounds_to_target"], "d"),
            number(row["mb_to_target"], ".1f"),
            number(row["seconds_to_target"], ".1f"),
            f"{row['final_accuracy']:.4f}",
            number(row["bytes_vs_fedsgd"], ".3f"),
            number(row["seconds_vs_fedsgd"], ".3f"),
        ]
        for name, row in result["value"].items()
    ]
    note = (
        f"Target {result['target']:.0%}, {result['epochs']:g} epochs for every strategy. A FedAvg round took "
        f"{result['fedavg_round_s']:.1f} s against {result['local_epoch_compute_s']:.1f} s for its local epoch in two "
        f"bare processes stepping at once (`fedavg_round_vs_compute` {result['fedavg_round_vs_compute']:.3f})."
    )
    return Table(rows, [note])


def non_iid_rows(results: dict) -> Table:
    result = results["non_iid"]
    strategies = HEADERS["non_iid"][1:]
    rows = []
    for partition, row in result["value"].items():
        rows.append(
            [f"{partition}: {result['epochs']:g} epochs", *(reading(row[name]["at_end"]) for name in strategies)]
        )
        budget = f"{partition}: at {row['budget_mb']:.1f} MB"
        rows.append([budget, *(reading(row[name]["at_budget"]) for name in strategies)])
    note = (
        f"Test accuracy at the end of the run ({result['epochs']:g} epochs: the local strategies as many rounds of one "
        f"local epoch), then at the MB on the wire of the partition's cheapest run; in brackets the round and the MB "
        f"at which it first reached {result['target']:.0%} (-: never). {result['learners']} learners, "
        f"{result['dataset']}, `{result['flags']}`."
    )
    return Table(rows, [note])


def reading(cell: dict) -> str:
    """One cell of the non_iid table: accuracy (round and MB to the target)."""
    if cell["accuracy"] is None:
        return "-"
    reached = f"{cell['rounds_to_target']}, {cell['mb_to_target']:.1f} MB" if cell["rounds_to_target"] else "-"
    return f"{cell['accuracy']:.4f} ({reached})"


def norm_rows(results: dict) -> Table:
    result = results["norms"]
    rows = [
        [f"`{norm}`", f"{row['iid']:.4f}", f"{row['dirichlet 0.1']:.4f}", f"{row['skew_cost']:+.4f}"]
        for norm, row in result["value"].items()
    ]
    note = (
        f"FedSGD, {result['learners']} learners, {result['epochs']:g} epochs of the {result['dataset']} at "
        f"{result['image_size']} px: final test accuracy; the skew's cost is IID minus Dirichlet 0.1."
    )
    return Table(rows, [note])


def defaults_rows(results: dict) -> Table:
    result = results["defaults"]
    rows = [
        [
            row["setting"],
            row["strategy"],
            f"`{row['flags']}`" if row["flags"] else "its defaults",
            f"{row['final_accuracy']:.4f}",
        ]
        for row in result["value"]
    ]
    note = (
        f"Final test accuracy, {result['learners']} learners; every synthetic run with `{result['synthetic_flags']}`, "
        f"every digits run with `{result['digits_flags']}`, each beside the row's flags."
    )
    return Table(rows, [note])


def link_rows(results: dict) -> Table:
    result = results["links"]
    if result["value"] is None:
        return Table([], [f"Skipped: {result.get('skipped')}."])
    rows = [
        [
            run,
            f"{row['round_s']['median']:.3f}",
            f"{row['bound_s']:.3f}",
            f"{row['ratio']:.3f}",
            f"{row['compute_s']['median']:.3f}",
            f"{row['transfer_s']:.3f}",
            f"{row['update_bytes'] / 1e6:.2f}",
            f"{row['states_bytes'] / 1e6:.2f}",
        ]
        for run, row in result["value"].items()
    ]
    return Table(rows, [])


def secagg_overhead_rows(results: dict) -> Table:
    result = results["secagg_overhead"]
    rows = [
        [
            str(count),
            f"{row['plain']['bytes_per_round'] / 1e6:.2f}",
            f"{row['secure']['bytes_per_round'] / 1e6:.2f}",
            f"{row['bytes_ratio']:.3f}",
            f"{row['plain']['round_s']['median']:.3f}",
            f"{row['secure']['round_s']['median']:.3f}",
            f"{row['seconds_ratio']:.3f}",
        ]
        for count, row in result["by_learners"].items()
    ]
    note = (
        f"FedSGD, ResNet-20, synthetic set at {result['image_size']} px, {result['rounds']} rounds a run: medians "
        "per round, the first rounds (connections, and key agreement) left out."
    )
    return Table(rows, [note])


def secagg_accuracy_rows(results: dict) -> Table:
    result = results["secagg_accuracy"]
    rows = [[f"{result['plain']:.4f}", f"{result['secure']:.4f}", f"{result['value']:+.4f}"]]
    note = (
        f"FedAvg, {result['learners']} learners, {result['epochs']:g} epochs of the digits at {result['image_size']} "
        "px: final test accuracy."
    )
    return Table(rows, [note])


def dp_accuracy_rows(results: dict) -> Table:
    result = results["dp_accuracy"]
    rows = [
        [
            dataset,
            f"`{mode}`",
            *(dp_cell(cells.get(epsilon)) for epsilon in ("1.0", "3.0", "8.0")),
            dp_cell(runs["none"]),
        ]
        for dataset, runs in result["value"].items()
        for mode, cells in runs.items()
        if mode != "none"
    ]
    note = (
        f"FedAvg with --norm group, {result['learners']} learners, {result['epochs']:g} epochs at "
        f"{result['image_size']} px, delta {result['delta']:g}, the noise multiplier that spends each epsilon over "
        "the run: final test accuracy (the epsilon the run reports spent; local: the most any learner logs)."
    )
    stopped = sorted(
        {
            cell["stopped"]
            for runs in result["value"].values()
            for mode, cells in runs.items()
            if mode != "none"
            for cell in cells.values()
            if "stopped" in cell
        }
    )
    return Table(rows, [note, *(f"Stopped: {reason}" for reason in stopped)])


def dp_cell(cell: dict | None) -> str:
    """One cell of the dp_accuracy table: accuracy (epsilon spent)."""
    if cell is None:
        return "-"
    if cell["accuracy"] is None:
        return "stopped"
    spent = "-" if cell["epsilon_spent"] is None else f"{cell['epsilon_spent']:.2f}"
    return f"{cell['accuracy']:.4f} ({spent})"


def codec_cost_rows(results: dict) -> Table:
    result = results["codec_costs"]
    rows = [
        [codec, f"{row['bytes']:,}", f"{row['ratio']:.1f}", f"{row['encode_ms']:.1f}", f"{row['decode_ms']:.1f}"]
        for codec, row in result["value"].items()
    ]
    note = (
        f"One ResNet-20 update of {result['values']:,} float32 values ({4 * result['values']:,} bytes); top-k and "
        f"random-k send {result['ratio']:.0%} of each compressed tensor; {result['threads']} thread."
    )
    return Table(rows, [note])


def compression_rows(results: dict) -> Table:
    result = results["compression"]
    rows = [
        [
            group,
            f"`{label}`",
            f"{row['up_bytes']:,.0f}",
            f"{row['down_bytes']:,.0f}",
            f"{row['up_fewer']:.1f}",
            f"{row['down_fewer']:.1f}",
            f"{row['accuracy']:.4f}" + (f" ± {row['accuracy_sd']:.3f}" if row.get("accuracy_sd") is not None else ""),
            f"{row['accuracy_change']:+.4f}",
            number(row["mb_to_share"], ".1f"),
            number(row["rounds_to_share"], "d"),
            f"{row['codec_ms']:.1f} ms, {row['codec_share']:.1%}",
            f"{row['round_s']:.3f}",
        ]
        for group, group_rows in result["value"].items()
        for label, row in group_rows.items()
    ]
    notes = [
        f"ResNet-20, {result['learners']} learners (`{result['learner_flags']}` each), `{result['flags']}`: FedSGD "
        f"{result['rounds']} rounds of one step, FedAvg {result['rounds'] // result['local_steps']} rounds of "
        f"{result['local_steps']} local steps; top-k and random-k send {result['ratio']:.0%} of each compressed "
        "tensor. Bytes a round per learner: the mean over the run's rounds of `bytes_in` (up) and `bytes_out` "
        "(down) in its `metrics.jsonl` over the round's learners; × fewer: the uncompressed row's over the row's. "
        "The accuracy is the final test accuracy and its change against the uncompressed row: for FedSGD the mean "
        f"(± the standard deviation) of runs with --seed {', '.join(map(str, result.get('seeds', [0])))}, which "
        "changes the model's start, the shards and every draw (the seeds alone move a run by a few hundredths on "
        "the digits' 359 test images); bytes, MB, rounds and round time are the first seed's run's. MB (both "
        f"ways, all learners) and rounds to {result['share']:.0%} of the uncompressed row's final accuracy (-: never): "
        "not to 90 % accuracy, which runs this short on a CPU do not reach. Codec CPU: each codec's compress plus "
        "decode and add on one ResNet-20 update (`codec_costs`, one thread, measured at the start of the same run; the "
        "down codec timed on an update of the same model), over the row's median round: one learner's and one "
        "decoding's share, an estimate rather than a measurement inside the run (the leader decodes every "
        "learner's update).",
        "![test accuracy against MB on the wire, one line per codec pair, one panel per strategy and dataset]"
        "(compression.png)",
    ]
    return Table(rows, notes)


def compression_link_rows(results: dict) -> Table:
    result = results["compression_links"]
    if result["value"] is None:
        return Table([], [f"Skipped: {result.get('skipped')}."])
    rows = [
        [
            run,
            f"{row['round_s']['median']:.3f}",
            f"{row['compute_s']['median']:.3f}",
            f"{row['round_vs_compute']:.2f}",
            f"{row['bound_s']:.3f}",
            f"{row['ratio']:.3f}",
            f"{row['update_bytes'] / 1e6:.2f}",
            f"{row['states_bytes'] / 1e6:.2f}",
        ]
        for run, row in result["value"].items()
    ]
    note = (
        "As the `links` figure measures them (its hosts, its bound, its bytes from `metrics.jsonl`): ResNet-18 "
        f"FedSGD, batch 32, synthetic set, 2 learners of one thread; top-k sends {result['ratio']:.0%}. Compute: "
        "the slower learner's, from its progress lines."
    )
    return Table(rows, [note])


RENDER: dict[str, Callable[[dict], Table]] = {
    "model_transfer_ratio": transfer_rows,
    "round_overhead": round_rows,
    "leader_scale": scale_rows,
    "scale": virtual_scale_rows,
    "serialization_gbps": serialization_rows,
    "time_to_accuracy": accuracy_rows,
    "strategies": strategy_rows,
    "non_iid": non_iid_rows,
    "norms": norm_rows,
    "defaults": defaults_rows,
    "links": link_rows,
    "secagg_overhead": secagg_overhead_rows,
    "secagg_accuracy": secagg_accuracy_rows,
    "dp_accuracy": dp_accuracy_rows,
    "codec_costs": codec_cost_rows,
    "compression": compression_rows,
    "compression_links": compression_link_rows,
}
HEADERS = {  # each figure's columns after "measured"; recorded.py's rows follow them
    "model_transfer_ratio": [
        "ratio",
        "ours (GB/s)",
        "raw gRPC (GB/s)",
        "raw gRPC's best chunk",
        "raw TCP (GB/s)",
        "MB",
        "added by our stream / copy into place / check and load (ms)",
    ],
    "round_overhead": ["figure", "value", "details"],
    "leader_scale": [
        "learners",
        "rounds/s",
        "round (s)",
        "leader peak RSS (MB)",
        "peak anonymous (MB)",
        "added by the rounds (MB)",
    ],
    "scale": [
        "run",
        "registered",
        "a round",
        "learner processes",
        "registration (s)",
        "rounds/s",
        "round (s)",
        "drawn learners' compute (s)",
        "round / compute",
        "MB a round",
        "leader peak RSS (MB)",
        "learners' peak RSS (MB)",
    ],
    "serialization_gbps": ["format", "encode (GB/s)", "decode (GB/s)"],
    "time_to_accuracy": ["ratio", "federated (s)", "centralised (s)", "target"],
    "strategies": [
        "strategy",
        "rounds to target",
        "MB to target",
        "seconds to target",
        "final accuracy",
        "bytes / FedSGD's",
        "time / FedSGD's",
    ],
    "non_iid": ["partition", "fedsgd", "fedavg", "fedprox", "scaffold"],
    "norms": ["--norm", "iid", "dirichlet 0.1", "skew's cost"],
    "defaults": ["setting", "strategy", "flags beside the setting's", "final accuracy"],
    "links": [
        "run",
        "round (s)",
        "bound (s)",
        "round / bound",
        "compute (s)",
        "transfer (s)",
        "update (MB)",
        "states to the learners (MB)",
    ],
    "secagg_overhead": [
        "learners",
        "plain (MB a round)",
        "secure (MB a round)",
        "bytes ratio",
        "plain round (s)",
        "secure round (s)",
        "time ratio",
    ],
    "secagg_accuracy": ["plain", "secure aggregation", "plain minus secure"],
    "dp_accuracy": ["dataset", "--dp", "ε 1", "ε 3", "ε 8", "no DP"],
    "codec_costs": ["codec", "upload (bytes)", "float32 / codec", "compress (ms)", "decode and add (ms)"],
    "compression": [
        "strategy, data",
        "codec up / down",
        "up (bytes a round)",
        "down (bytes a round)",
        "× fewer up",
        "× fewer down",
        "final accuracy",
        "against none",
        "MB to 90 % of none's",
        "rounds to it",
        "codec CPU a round",
        "round (s)",
    ],
    "compression_links": [
        "run",
        "round (s)",
        "compute (s)",
        "round / compute",
        "bound (s)",
        "round / bound",
        "update (MB)",
        "states to the learners (MB)",
    ],
}
