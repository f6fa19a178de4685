"""The run's record: metrics.jsonl (one JSON object per line) and its plot, metrics.png."""

import json
from pathlib import Path


class MetricsLog:
    """Appends records to metrics.jsonl, flushed line by line so a crashed run keeps its history."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = path
        self._file = path.open("a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(records: list[dict], path: Path) -> None:
    """Training and test loss, and test accuracy, against round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "test_accuracy" in r]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot([r["round"] for r in train], [r["train_loss"] for r in train], label="train (learners' batches)")
    loss_axis.plot([r["round"] for r in evals], [r["test_loss"] for r in evals], "o-", label="test")
    loss_axis.set(xlabel="round", ylabel="cross-entropy loss", title="Loss")
    loss_axis.legend()
    accuracy_axis.plot([r["round"] for r in evals], [r["test_accuracy"] for r in evals], "o-", color="tab:green")
    accuracy_axis.set(xlabel="round", ylabel="test accuracy", title="Global model on the test split", ylim=(0, 1))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
