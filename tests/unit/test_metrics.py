"""metrics.jsonl as strict JSON readers take it, and its plot."""

import json
import math

from federated.leader.metrics import MetricsLog, plot_metrics, read_metrics


def test_a_loss_no_learner_gave_is_written_as_null_and_plotted_around(tmp_path):
    # a learner may send NaN as its loss (advisory: recorded, left out of the mean); bare NaN is not JSON, and
    # JavaScript's JSON.parse or jq refuse the whole line
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    metrics.write({"round": 1, "train_loss": math.nan, "per_learner": {"0": {"samples": 8, "loss": math.nan}}})
    metrics.write({"round": 2, "train_loss": 1.5, "per_learner": {"0": {"samples": 8, "loss": 1.5}}})
    metrics.close()

    def refused(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0], parse_constant=refused)
    assert first["train_loss"] is None and first["per_learner"]["0"]["loss"] is None
    plot_metrics(read_metrics(tmp_path / "metrics.jsonl"), tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").stat().st_size > 0
