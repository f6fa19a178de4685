"""The run's record: metrics.jsonl (one JSON object per line), its plot metrics.png, and TensorBoard events."""

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import matplotlib.axes


class MetricsLog:
    """Appends records to metrics.jsonl, flushed line by line so a crashed run keeps its history; with a
    tensorboard directory, also writes every number of every record as a TensorBoard scalar."""

    def __init__(self, path: Path, append: bool = False, tensorboard: str | Path | None = None) -> None:
        self.path = path
        self._file = path.open("a" if append else "w", encoding="utf-8")
        self._events = None
        if tensorboard:
            from torch.utils.tensorboard import (
                SummaryWriter,  # needs the tensorboard package
            )

            self._events = SummaryWriter(str(tensorboard))

    def write(self, record: dict) -> None:
        """Append a record; a NaN (a loss no learner gave) is written as null: bare NaN is not JSON."""
        self._file.write(json.dumps(without_nan(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._events is not None:
            for tag, value in scalars(record):
                self._events.add_scalar(tag, value, record["round"])
            self._events.flush()

    def close(self) -> None:
        self._file.close()
        if self._events is not None:
            self._events.close()


def without_nan(value: object) -> object:
    """value with every NaN float in it (in dicts and lists, at any depth) replaced by None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(item) for item in value]
    return value


def scalars(record: dict) -> list[tuple[str, float]]:
    """A record's numbers as TensorBoard tags: train/... for a round, eval_leader/... and eval_learners/... for
    evaluations, with each learner's values under .../learner_N/..."""
    group = f"eval_{record.get('source', 'leader')}" if "test_accuracy" in record else "train"
    tags = []
    for key, value in record.items():
        if key == "per_learner":
            tags += [
                (f"{group}/learner_{learner}/{name}", number)
                for learner, values in value.items()
                for name, number in values.items()
            ]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
            tags.append((f"{group}/{key}", value))
    return tags


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


EVALUATION_LABELS = {"leader": "the leader's test split", "learners": "learners' held-out images"}


def plot_metrics(records: list[dict], path: Path, title: str = "") -> None:
    """Training and test loss, and test accuracy (the leader's and the learners' evaluations), against round,
    under a title that says what ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("train_loss") is not None]  # (null: no learner gave a loss)
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot([r["round"] for r in train], [r["train_loss"] for r in train], label="train (learners' batches)")
    for source, label in EVALUATION_LABELS.items():
        evals = [r for r in records if "test_accuracy" in r and r.get("source", "leader") == source]
        if evals:
            rounds = [r["round"] for r in evals]
            loss_axis.plot(rounds, [r["test_loss"] for r in evals], "o-", label=f"test: {label}")
            accuracy_axis.plot(rounds, [r["test_accuracy"] for r in evals], "o-", label=label)
            plot_each_learner(accuracy_axis, evals)
    loss_axis.set(xlabel="round", ylabel="cross-entropy loss", title="Loss")
    accuracy_axis.set(xlabel="round", ylabel="test accuracy", title="Global model's accuracy", ylim=(0, 1))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_each_learner(axis: "matplotlib.axes.Axes", evals: list[dict], most: int = 20) -> None:
    """Thin lines for each learner's own accuracy on its held-out images (a skewed learner shows below the
    mean), for up to `most` learners."""
    learners = sorted({learner for r in evals for learner in r.get("per_learner", {})}, key=int)[:most]
    for learner in learners:
        points = [(r["round"], r["per_learner"][learner]["accuracy"]) for r in evals if learner in r["per_learner"]]
        axis.plot(*zip(*points), "--", linewidth=0.8, alpha=0.6, label=f"learner {learner}")
