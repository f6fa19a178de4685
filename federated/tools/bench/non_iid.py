"""Non-IID: FedSGD, FedAvg, FedProx and SCAFFOLD on each partition of a dataset among ten learners, read the way
the papers read it: (a) at equal epochs (the local strategies one local epoch a round), the final test accuracy
and the rounds to a target; (b) at equal megabytes on the wire, the same runs' curves cut at the bytes the
cheapest run of the partition used; with a plot of test accuracy against MB per partition."""

from pathlib import Path

from federated.tools.bench.federations import federation_run
from federated.tools.bench.strategies import accuracy_by_bytes

PARTITIONS = {
    "iid": ["--partition", "iid"],
    "dirichlet 0.5": ["--partition", "dirichlet", "--alpha", "0.5"],
    "dirichlet 0.1": ["--partition", "dirichlet", "--alpha", "0.1"],
    "2 classes each": ["--partition", "classes", "--classes-per-learner", "2"],
}
NON_IID_STRATEGIES = ("fedsgd", "fedavg", "fedprox", "scaffold")
IMAGE_SIZE = 8  # the digits' own size: larger only upsamples them, for 4 to 16 times the compute
# Every flag that other defaults could move, stated, so that the table means the same after they change
TABLE_FLAGS = ["--model", "resnet20", "--norm", "batch", "--batch-size", "32", "--image-size", str(IMAGE_SIZE)]

Point = tuple[int, float, float, float]  # accuracy_by_bytes's: (round, bytes both ways, seconds, test accuracy)


def non_iid_runs(work: Path, dataset: str, epochs: float, learners: int = 10, target: float = 0.80) -> dict:
    """Each strategy on each partition of the dataset among `learners` learners for `epochs` passes over their
    shards (FedSGD one batch a round, the others one local epoch a round), evaluated at every epoch's end: the
    table at equal epochs and at equal MB, and the plot (OUT/non_iid.png)."""
    curves: dict[str, dict[str, list[Point]]] = {}
    for partition in PARTITIONS:
        for strategy in NON_IID_STRATEGIES:
            records = federation_run(
                work / run_name(partition, strategy), learners, run_flags(dataset, epochs, partition, strategy)
            )[0]
            curves.setdefault(partition, {})[strategy] = accuracy_by_bytes(records)
            final = curves[partition][strategy][-1]
            print(
                f"  {partition:15} {strategy:9} final accuracy {final[3]:.4f} after {final[1] / 1e6:.1f} MB", flush=True
            )
    plot = work.parent / "non_iid.png"
    title = f"{dataset}, {IMAGE_SIZE} px, {learners} learners, {epochs:g} epochs"
    plot_curves(curves, plot, dict.fromkeys(curves, target), title)
    table = {partition: partition_table(runs, target) for partition, runs in curves.items()}
    return {
        "value": table,
        "target": target,
        "learners": learners,
        "epochs": epochs,
        "dataset": dataset,
        "flags": " ".join(TABLE_FLAGS),
        "plot": str(plot),
    }


def run_name(partition: str, strategy: str) -> str:
    return f"non-iid-{partition.replace(' ', '-')}-{strategy}"


def run_flags(dataset: str, epochs: float, partition: str, strategy: str) -> list[str]:
    """The leader's flags for one cell: FedSGD for `epochs` epochs, the others `epochs` rounds of one local epoch."""
    if strategy == "fedsgd":
        length = ["--epochs", f"{epochs:g}"]
    else:
        length = ["--rounds", str(round(epochs)), "--local-epochs", "1"]
    every = ["--eval-every", "0"]  # at each epoch's end: every round of the local strategies
    return ["--dataset", dataset, *TABLE_FLAGS, "--strategy", strategy, *length, *every, *PARTITIONS[partition]]


def partition_table(runs: dict[str, list[Point]], target: float) -> dict:
    """One partition's row: each strategy's curve read at its end (equal epochs) and cut at the megabytes of the
    partition's cheapest run (equal MB)."""
    budget = min(points[-1][1] for points in runs.values()) / 1e6
    return {
        strategy: {"at_end": read_curve(points, target), "at_budget": read_curve(points, target, budget)}
        for strategy, points in runs.items()
    } | {"budget_mb": budget}


def read_curve(points: list[Point], target: float, megabytes: float | None = None) -> dict:
    """A run's curve up to a budget of megabytes on the wire (None: all of it): its last evaluation within the
    budget (accuracy, round, MB) and the round and MB at which it first reached target within it (None: never)."""
    within = [point for point in points if megabytes is None or point[1] / 1e6 <= megabytes * (1 + 1e-9)]
    if not within:
        return {"accuracy": None, "rounds": 0, "mb": 0.0, "rounds_to_target": None, "mb_to_target": None}
    last = within[-1]
    reached = next((point for point in within if point[3] >= target), None)
    return {
        "accuracy": last[3],
        "rounds": last[0],
        "mb": last[1] / 1e6,
        "rounds_to_target": reached and reached[0],
        "mb_to_target": reached and reached[1] / 1e6,
    }


def plot_curves(curves: dict[str, dict[str, list[Point]]], path: Path, targets: dict[str, float], title: str) -> None:
    """Test accuracy against MB on the wire, up to four panels (a partition's, a codec table's group) with one line
    per run and a dotted line at the panel's target, into path. Each row of panels has its legend at its left."""
    import matplotlib  # only the figures that plot need matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True, sharey=True)
    for axis, (panel, runs) in zip(axes.flat, curves.items()):
        for label, points in runs.items():
            axis.plot([point[1] / 1e6 for point in points], [point[3] for point in points], label=label)
        axis.axhline(targets[panel], color="grey", linestyle=":", linewidth=1)
        axis.set(xscale="log", title=panel, ylim=(0, 1))
    for axis in axes[1]:
        axis.set_xlabel("MB on the wire (both ways, all learners)")
    for axis in axes[:, 0]:
        axis.set_ylabel("test accuracy")
        axis.legend(fontsize="x-small", ncol=2)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
