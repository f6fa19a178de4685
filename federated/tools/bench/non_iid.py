"""Non-IID: each strategy with its defaults on each partition of the dataset among ten learners, for the same
compute: the final test accuracy and the rounds until it first reached a target."""

from pathlib import Path

from federated.tools.bench.federations import federation_run

PARTITIONS = {
    "iid": [],
    "dirichlet 0.5": ["--partition", "dirichlet", "--alpha", "0.5"],
    "dirichlet 0.1": ["--partition", "dirichlet", "--alpha", "0.1"],
    "2 classes each": ["--partition", "classes", "--classes-per-learner", "2"],
}
NON_IID_STRATEGIES = ("fedsgd", "fedavg", "fedprox", "scaffold")


def non_iid_runs(work: Path, dataset: str, epochs: float, learners: int = 10, target: float = 0.80) -> dict:
    """Each strategy with its defaults on each partition of the dataset among `learners` learners of batch 32,
    for `epochs` passes over their shards: the final test accuracy and the rounds until it first reached target."""
    table: dict[str, dict[str, dict]] = {}
    for partition in PARTITIONS:
        for strategy in NON_IID_STRATEGIES:
            row = non_iid_run(work, dataset, epochs, learners, target, partition, strategy)
            table.setdefault(partition, {})[strategy] = row
            print(
                f"  {partition:15} {strategy:9} final accuracy {row['final_accuracy']:.4f}, "
                f"{row['rounds_to_target'] or '-'} rounds to {target:.0%}",
                flush=True,
            )
    return {"value": table, "target": target, "learners": learners, "epochs": epochs, "dataset": dataset}


def non_iid_run(
    work: Path, dataset: str, epochs: float, learners: int, target: float, partition: str, strategy: str
) -> dict:
    """One cell of the table: a federation of strategy on partition, to its end."""
    flags = [
        "--dataset",
        dataset,
        "--batch-size",
        "32",
        "--epochs",
        str(epochs),
        "--strategy",
        strategy,
        "--eval-every",
        "10" if strategy == "fedsgd" else "1",
        *PARTITIONS[partition],
    ]
    name = f"non-iid-{partition.replace(' ', '-')}-{strategy}"
    evaluations = [r for r in federation_run(work / name, learners, flags)[0] if "test_accuracy" in r]
    reached = next((r["round"] for r in evaluations if r["test_accuracy"] >= target), None)
    return {
        "final_accuracy": evaluations[-1]["test_accuracy"],
        "rounds_to_target": reached,
        "rounds": evaluations[-1]["round"],
    }
