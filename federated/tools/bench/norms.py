"""Normalisation under label skew: FedSGD on the digits among 4 learners with each norm of the CIFAR ResNets, IID
and Dirichlet 0.1, at equal epochs: the final test accuracy of each and what the skew costs."""

from pathlib import Path

from federated.tools.bench.federations import federation_run
from federated.tools.bench.non_iid import PARTITIONS
from model import NORMS

NORM_PARTITIONS = ("iid", "dirichlet 0.1")


def norm_runs(work: Path, epochs: float, image_size: int, learners: int = 4) -> dict:
    """Each norm's FedSGD run on each of NORM_PARTITIONS: final accuracies and the skew's cost (IID minus skewed)."""
    table: dict[str, dict[str, float]] = {}
    for norm in NORMS:
        for partition in NORM_PARTITIONS:
            table.setdefault(norm, {})[partition] = norm_run(work, epochs, image_size, learners, norm, partition)
        row = table[norm]
        row["skew_cost"] = round(row["iid"] - row["dirichlet 0.1"], 4)
        print(f"  {norm:9} iid {row['iid']:.4f}, dirichlet 0.1 {row['dirichlet 0.1']:.4f}", flush=True)
    return {"value": table, "learners": learners, "epochs": epochs, "image_size": image_size, "dataset": "digits"}


def norm_run(work: Path, epochs: float, image_size: int, learners: int, norm: str, partition: str) -> float:
    """The final test accuracy of one FedSGD run of the digits with norm on partition."""
    flags = ["--dataset", "digits", "--image-size", str(image_size), "--epochs", str(epochs), "--norm", norm]
    records, _ = federation_run(
        work / f"norms-{norm}-{partition.replace(' ', '-')}", learners, [*flags, *PARTITIONS[partition]]
    )
    return [record for record in records if "test_accuracy" in record][-1]["test_accuracy"]
