"""Compression's figures: the codecs' costs on one ResNet-20 update (the bytes each uploads against float32, the
CPU time of a learner's compression with error feedback and of the leader's checked decoding into its running
sum); whole federations with each codec, their bytes each way against their accuracy, with a plot; and
ResNet-18 rounds with codecs on limited links."""

import dataclasses
import math
import statistics
from pathlib import Path

import torch

from federated.core.compression import CODECS, Compressor, decode_add, expected
from federated.core.layout import GradientLayout
from federated.tools import hosts
from federated.tools.bench.common import COMPRESS_RATIO, compress_flags, spread, timed
from federated.tools.bench.federations import federation_run
from federated.tools.bench.links import LINK_LEARNERS, LinkRun, link_rounds, link_row
from federated.tools.bench.non_iid import plot_curves, read_curve
from federated.tools.bench.strategies import accuracy_by_bytes
from model import build_model

RATIO = COMPRESS_RATIO  # top-k's and random-k's share: the top-1 %
RANKS = (2, 4)  # PowerSGD's ranks the issue asks about


def codec_costs(repeats: int) -> dict:
    """Per codec (PowerSGD at each of RANKS): payload bytes, their ratio to float32, and the median of `repeats`
    timings (after a warm-up) of one update's compress() and decode_add(), on one thread."""
    layout = GradientLayout(build_model("resnet20"))
    flat = torch.randn(layout.size, generator=torch.Generator().manual_seed(0))
    flat[layout.parameter_count :].abs_()  # BatchNorm statistics: a running variance is never negative
    update = layout.views(flat)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one learner's core, or the leader's per-learner work, costs
    try:
        rows = {}
        for codec, rank in [(codec, RANKS[0]) for codec in CODECS] + [("powersgd", rank) for rank in RANKS[1:]]:
            label = f"{codec} rank {rank}" if codec == "powersgd" else codec
            rows[label] = codec_row(codec, rank, layout, update, repeats)
    finally:
        torch.set_num_threads(threads)
    return {"value": rows, "values": layout.size, "ratio": RATIO, "threads": 1}


def codec_row(
    codec: str, rank: int, layout: GradientLayout, update: dict[str, torch.Tensor], repeats: int
) -> dict[str, float]:
    """One codec's payload bytes and the median milliseconds of compress() and of decode_add()."""
    shapes = {name: shape for name, (_, shape) in layout.spec.items()}
    spec = expected(shapes, codec, RATIO, rank)
    payload = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for dtype, shape in spec.values())
    compressor = Compressor(codec, RATIO, rank, shapes, seed=0)
    entries = compressor.compress(update)
    total = layout.views(torch.zeros(layout.size))
    encode_s = timed(lambda: compressor.compress(update), repeats)
    decode_s = timed(lambda: decode_add(entries, total, 0.5, codec, RATIO, rank), repeats)
    return {
        "bytes": payload,
        "ratio": 4 * layout.size / payload,
        "encode_ms": 1000 * spread(encode_s)["median"],
        "decode_ms": 1000 * spread(decode_s)["median"],
    }


# ---- the compression table: whole federations with each codec ----------------------------------------------

TABLE_LEARNERS = LINK_LEARNERS  # the links figure's count, so that the two tables read together
# Every flag that other defaults could move, stated; --threads 1 for each learner: 2 learners on 2 cores
TABLE_FLAGS = ["--model", "resnet20", "--norm", "batch", "--batch-size", "32", "--image-size", "16"]
LEARNER_FLAGS = ["--threads", "1"]
DATASETS = {
    "synthetic iid": ["--dataset", "synthetic", "--partition", "iid"],
    "digits dirichlet 0.1": ["--dataset", "digits", "--partition", "dirichlet", "--alpha", "0.1"],
}
LOCAL_STEPS = 10  # FedAvg's local steps a round: its rounds do the compute of LOCAL_STEPS FedSGD rounds
EVALUATIONS = 10  # a run's evaluations besides those at its epochs' ends
SHARE = 0.9  # the rounds and MB columns: to this share of the uncompressed row's final accuracy
UP_CODECS = {  # codec_costs' names; in the order the table shows them
    "fedsgd": (
        "none",
        "int8",
        "int4",
        "topk",
        "randk",
        "sign",
        "powersgd rank 2",
        "powersgd rank 4",
    ),  # fp16: 2x, lossless
    "fedavg": ("none", "int8", "topk", "powersgd rank 2"),
}


def compression_table(work: Path, rounds: int, down: str, seeds: list[int], repeats: int) -> dict:
    """FedSGD for `rounds` rounds and FedAvg for as many steps (rounds of LOCAL_STEPS local steps), TABLE_LEARNERS
    learners, each with every codec of UP_CODECS up (and `down` down, for the compressed rows and one row of
    its own), on each of DATASETS: bytes each way, MB and rounds to SHARE of the uncompressed row's final test
    accuracy, final accuracy (FedSGD: the mean over runs with each of `seeds`, whose spread alone is about the
    differences the table reads), the codecs' CPU share of a round (from codec_costs, measured first), median
    round. The plot of accuracy against MB (the first seed's runs) goes to OUT/compression.png."""
    costs = codec_costs(repeats)["value"]
    table, curves = {}, {}
    for strategy, codecs in UP_CODECS.items():
        for dataset, dataset_flags in DATASETS.items():
            runs: dict[str, list[list[dict]]] = {}
            for up, row_down in codec_pairs(codecs, down, with_down_alone=strategy == "fedsgd"):
                label = pair_label(up, row_down)
                runs[label] = []
                for seed in seeds if strategy == "fedsgd" else seeds[:1]:
                    name = f"compression-{strategy}-{dataset}-{up}-{row_down}-seed{seed}".replace(" ", "-")
                    flags = [
                        *dataset_flags,
                        *TABLE_FLAGS,
                        *schedule_flags(strategy, rounds),
                        *compress_flags(up, row_down),
                        "--seed",
                        str(seed),
                    ]
                    runs[label].append(federation_run(work / name, TABLE_LEARNERS, flags, LEARNER_FLAGS)[0])
                    print(f"  {strategy} {dataset} {label} seed {seed}: {final_line(runs[label][-1])}", flush=True)
            group = f"{strategy}, {dataset}"
            table[group] = group_rows(runs, {label: pair_cpu_ms(costs, label) for label in runs})
            curves[group] = {label: accuracy_by_bytes(seeded[0]) for label, seeded in runs.items()}
    plot = work.parent / "compression.png"
    targets = {group: SHARE * rows[pair_label("none", "none")]["accuracy"] for group, rows in table.items()}
    title = f"ResNet-20, {TABLE_LEARNERS} learners, {rounds} steps each: test accuracy against MB, per codec up / down"
    plot_curves(curves, plot, targets, title)
    return {
        "value": table,
        "share": SHARE,
        "rounds": rounds,
        "local_steps": LOCAL_STEPS,
        "learners": TABLE_LEARNERS,
        "down": down,
        "seeds": seeds,
        "flags": " ".join(TABLE_FLAGS),
        "learner_flags": " ".join(LEARNER_FLAGS),
        "ratio": COMPRESS_RATIO,
        "codec_costs": costs,
        "plot": str(plot),
    }


def codec_pairs(codecs: tuple[str, ...], down: str, with_down_alone: bool) -> list[tuple[str, str]]:
    """(up, down) of each row: the uncompressed row, `down` alone (if asked), then each codec up with `down`."""
    alone = [("none", down)] if with_down_alone and down != "none" else []
    return [("none", "none"), *alone, *((up, down) for up in codecs if up != "none")]


def pair_label(up: str, down: str) -> str:
    return f"{up} / {down}"


def schedule_flags(strategy: str, rounds: int) -> list[str]:
    """FedSGD `rounds` rounds of one step; FedAvg the same steps in rounds of LOCAL_STEPS; evaluated EVALUATIONS
    times besides the epochs' ends."""
    if strategy == "fedsgd":
        length = ["--rounds", str(rounds)]
    else:
        length = ["--rounds", str(max(1, rounds // LOCAL_STEPS)), "--local-steps", str(LOCAL_STEPS)]
    every = max(1, int(length[1]) // EVALUATIONS)
    return ["--strategy", strategy, *length, "--eval-every", str(every)]


def final_line(records: list[dict]) -> str:
    """A run's last test accuracy and its bytes, for the progress lines."""
    points = accuracy_by_bytes(records)
    return f"final accuracy {points[-1][3]:.4f} after {points[-1][1] / 1e6:.1f} MB"


def pair_cpu_ms(costs: dict[str, dict], label: str) -> float:
    """Milliseconds of codec work a round costs one learner and the leader for a row 'UP / DOWN': each codec's
    compress plus decode-and-add on one ResNet-20 update (codec_costs, one thread); 'none' costs nothing. The
    down codec is timed on an update of the same model: a state's delta has the same tensors."""
    codecs = [codec for codec in label.split(" / ") if codec != "none"]
    return sum(costs[codec]["encode_ms"] + costs[codec]["decode_ms"] for codec in codecs)


def group_rows(runs: dict[str, list[list[dict]]], cpu_ms: dict[str, float]) -> dict[str, dict]:
    """The rows of one strategy and dataset from each row's metrics records (one list a seed), each against the
    uncompressed row ('none / none'): bytes a round each way and how many times fewer, MB and rounds to SHARE of
    the uncompressed row's final accuracy (None: never reached), final accuracy (the mean over seeds, with their
    standard deviation) and its change, the codecs' CPU share of the median round. Bytes, MB, rounds and round
    time are the first seed's run's."""
    base = round_bytes(runs[pair_label("none", "none")][0])
    base_accuracy = statistics.mean(final_accuracy(records) for records in runs[pair_label("none", "none")])
    rows = {}
    for label, seeded in runs.items():
        records = seeded[0]
        up, down = round_bytes(records)
        reading = read_curve(accuracy_by_bytes(records), SHARE * base_accuracy)
        accuracies = [final_accuracy(run) for run in seeded]
        round_s = statistics.median(record["seconds"] for record in records if "train_loss" in record)
        rows[label] = {
            "up_bytes": up,
            "down_bytes": down,
            "up_fewer": base[0] / up,
            "down_fewer": base[1] / down,
            "mb_to_share": reading["mb_to_target"],
            "rounds_to_share": reading["rounds_to_target"],
            "accuracy": statistics.mean(accuracies),
            "accuracy_sd": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "accuracies": accuracies,
            "accuracy_change": statistics.mean(accuracies) - base_accuracy,
            "codec_ms": cpu_ms[label],
            "codec_share": cpu_ms[label] / 1000 / round_s,
            "round_s": round_s,
            "rounds": reading["rounds"],
            "mb": reading["mb"],
        }
    return rows


def final_accuracy(records: list[dict]) -> float:
    """A run's last test accuracy."""
    return accuracy_by_bytes(records)[-1][3]


def round_bytes(records: list[dict]) -> tuple[float, float]:
    """A run's bytes a round per learner, up (bytes_in) and down (bytes_out), as metrics.jsonl counts them: the
    mean over its rounds, so that a first full state (before a compressed downlink has a reference) counts."""
    rounds = [record for record in records if "train_loss" in record]
    up = sum(record["bytes_in"] / record["learners"] for record in rounds) / len(rounds)
    down = sum(record["bytes_out"] / record["learners"] for record in rounds) / len(rounds)
    return up, down


# ---- ResNet-18 rounds with codecs on limited links ------------------------------------------------------------

COMPRESSED_LINK_RUNS = (
    LinkRun("resnet18", 32, 5, 2),
    LinkRun("resnet18", 32, 5, 2, codecs=("topk", "int4")),
    LinkRun("resnet18", 32, 5, 2, codecs=("powersgd rank 4", "int4")),
)


def compression_links(work: Path, down: str) -> dict:
    """The links figure's rounds (tools/hosts.py: each host's outgoing link limited to 100 Mbit/s or 1 Gbit/s) of
    ResNet-18 FedSGD, uncompressed and with codecs (`down` down; none: the rows' uplink codec alone), against
    their compute. Skipped, saying why, where network namespaces cannot be made."""
    reason = hosts.unavailable()
    if reason:
        print(f"compression_links: skipped: {reason}", flush=True)
        return {"value": None, "skipped": reason}
    table = {}
    for run in COMPRESSED_LINK_RUNS:
        if run.codecs[1] != "none":
            run = dataclasses.replace(run, codecs=(run.codecs[0], down))
        for rate in run.rates:
            records, compute = link_rounds(work / f"compression-links-{run.name.replace(' ', '-')}-{rate}", rate, run)
            row = link_row(records[run.skip :], compute, hosts.rate_bits(rate))
            against_compute = row["round_s"]["median"] / row["compute_s"]["median"]
            table[f"{run.name} @ {rate}"] = {**row, "round_vs_compute": against_compute}
    return {"value": table, "ratio": COMPRESS_RATIO}
