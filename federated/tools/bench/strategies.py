"""Strategies: each strategy with its defaults on the synthetic set and the same compute, to a test accuracy
(rounds, bytes on the wire, seconds), with a plot of accuracy against bytes; and a FedAvg round against the
bare compute of its local epoch."""

import statistics
from pathlib import Path

import utils
from federated.tools.bench.baselines import coscheduled_step_seconds
from federated.tools.bench.federations import federation_run

BENCH_STRATEGIES = ("fedsgd", "fedavg", "fedavgm", "fedprox", "fedadam", "scaffold")


def strategy_runs(work: Path, epochs: float, target: float = 0.90) -> dict:
    """Each strategy on the synthetic set with 2 learners of batch 32 for `epochs` passes over their shards (the
    same compute for all; the local strategies train one local epoch per round): rounds, bytes on the wire
    (both ways) and wall time until test accuracy first reaches target, and the final accuracy."""
    runs = {}
    for name in BENCH_STRATEGIES:
        every = "10" if name == "fedsgd" else "1"  # FedSGD's rounds are single steps: evaluating each would dominate
        flags = [
            "--dataset",
            "synthetic",
            "--batch-size",
            "32",
            "--epochs",
            str(epochs),
            "--eval-every",
            every,
            "--strategy",
            name,
        ]
        runs[name] = federation_run(work / f"strategy-{name}", 2, flags)[0]
    # A FedAvg round of one local epoch against that epoch's bare compute: two plain processes stepping at once
    epoch_compute = statistics.median(coscheduled_step_seconds(2, 1, 40, batch=32)) * (
        utils.SYNTHETIC_SIZES[True] // 2 // 32
    )
    fedavg_round = statistics.median([record["seconds"] for record in runs["fedavg"] if "train_loss" in record])
    return {
        **strategy_table(runs, target, work.parent / "strategies.png"),
        "epochs": epochs,
        "fedavg_round_s": fedavg_round,
        "local_epoch_compute_s": epoch_compute,
        "fedavg_round_vs_compute": fedavg_round / epoch_compute,
    }


def strategy_table(runs: dict[str, list[dict]], target: float, plot: Path) -> dict:
    """The strategies table and plot from each strategy's metrics records."""
    table: dict[str, dict] = {}
    curves = {name: accuracy_by_bytes(records) for name, records in runs.items()}
    for name, points in curves.items():
        reached = next(
            ((rounds, sent, seconds) for rounds, sent, seconds, accuracy in points if accuracy >= target), None
        )
        table[name] = {
            "rounds_to_target": reached and reached[0],
            "mb_to_target": reached and reached[1] / 1e6,
            "seconds_to_target": reached and reached[2],
            "final_accuracy": points[-1][3],
            "rounds": points[-1][0],
        }
    base: dict = table["fedsgd"]
    for row in table.values():  # how many times fewer bytes and how much faster than FedSGD
        reached = row["mb_to_target"] and base["mb_to_target"]
        row["bytes_vs_fedsgd"] = row["mb_to_target"] / base["mb_to_target"] if reached else None
        row["seconds_vs_fedsgd"] = row["seconds_to_target"] / base["seconds_to_target"] if reached else None
    plot_strategies(curves, plot, target)
    return {"value": table, "target": target, "plot": str(plot)}


def accuracy_by_bytes(records: list[dict]) -> list[tuple[int, float, float, float]]:
    """(rounds, bytes sent both ways, seconds of rounds, test accuracy) at each evaluation of a run (an
    evaluation's record comes before its round's)."""
    sent, seconds, upto = 0.0, 0.0, {0: (0.0, 0.0)}
    for record in records:
        if "train_loss" in record:
            sent, seconds = sent + record["bytes_in"] + record["bytes_out"], seconds + record["seconds"]
            upto[record["round"]] = (sent, seconds)
    return [
        (record["round"], *upto[record["round"]], record["test_accuracy"])
        for record in records
        if "test_accuracy" in record
    ]


def plot_strategies(curves: dict, path: Path, target: float) -> None:
    """Test accuracy against MB on the wire, one line per strategy, into path (a PNG)."""
    import matplotlib  # only this figure plots: the others need no matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        axis.plot(
            [sent / 1e6 for _, sent, _, _ in points], [accuracy for *_, accuracy in points], marker=".", label=name
        )
    axis.axhline(target, color="grey", linestyle=":", linewidth=1)
    axis.set(
        xscale="log",
        xlabel="MB on the wire (both ways, 2 learners)",
        ylabel="test accuracy",
        title="Synthetic set, ResNet-20, same compute per strategy",
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
