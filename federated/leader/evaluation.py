"""Federated evaluation: the learners' reports on a global model state, checked, gathered by round and combined.

The leader opens a round's evaluation before it pushes the state that asks for it, says whom it expects once
the state is on its way (reports from anyone else are dropped), and writes a round's record when every
expected learner has reported, when a later evaluation has begun, or at the end. A learner can only report for
itself, once per round, on exactly as many held-out images as it declared when it took its slot: it weighs what
it declared then, and cannot change that later, but at most as many images as it trains on and as the typical
learner trains on (weight): a claim of billions of held-out images buys no more. What it says of its own accuracy
cannot be checked; each learner's values are in the record for that reason.
"""

import math
import threading
from dataclasses import dataclass

from federated.wire import codec
from federated.wire.messages import MAX_LOSS, DataSummary


@dataclass(frozen=True)
class Report:
    """One learner's evaluation of the state after a round."""

    learner_id: int
    samples: int
    correct: int
    loss: float
    weight: int  # the images it counts for in the combined figures (see weight)

    def check(self, declared_samples: int) -> None:
        """Raise PayloadError unless the report is possible for a learner that declared declared_samples."""
        if declared_samples <= 0:
            raise codec.PayloadError(f"learner {self.learner_id} registered without held-out images to evaluate on")
        if self.samples != declared_samples:
            raise codec.PayloadError(
                f"samples {self.samples} is not the {declared_samples} held-out images this learner registered with"
            )
        if not 0 <= self.correct <= self.samples:
            raise codec.PayloadError(f"correct {self.correct} must lie between 0 and samples {self.samples}")
        if not 0 <= self.loss <= MAX_LOSS:  # false for NaN
            raise codec.PayloadError(f"loss {self.loss!r} must be a number from 0 to {MAX_LOSS:g}")


def weight(declared: DataSummary, typical_shard: int) -> int:
    """The images a learner's evaluation counts for: its held-out images, but at most as many as it trains on
    and as the typical learner trains on (DataFacts.shard_size, which no single claim sets): a learner that says
    it holds one training image and 2**32 held-out ones weighs one image, and no claim weighs more than an epoch."""
    return min(declared.eval_samples, declared.train_samples, typical_shard)


def combine(round_index: int, reports: dict[int, Report], missing: list[int]) -> dict:
    """The metrics record of a round's evaluation: loss and accuracy weighted by each report's weight (its
    samples unless capped, then in the learner's values as weighed_as), and each learner's values."""
    weights = sum(report.weight for report in reports.values())
    return {
        "round": round_index,
        "source": "learners",
        "test_loss": sum(report.loss * report.weight for report in reports.values()) / weights,
        "test_accuracy": sum(report.correct / report.samples * report.weight for report in reports.values()) / weights,
        "test_samples": sum(report.samples for report in reports.values()),
        "per_learner": {
            str(learner): {
                "loss": report.loss,
                "accuracy": report.correct / report.samples,
                "samples": report.samples,
                **({"weighed_as": report.weight} if report.weight < report.samples else {}),
            }
            for learner, report in sorted(reports.items())
        },
        **({"missing": missing} if missing else {}),
    }


class Evaluations:
    """The open evaluations by round. Thread-safe: gRPC handler threads report, the round loop collects."""

    def __init__(self) -> None:
        self._reports: dict[int, dict[int, Report]] = {}
        self._expected: dict[int, set[int]] = {}
        self._changed = threading.Condition()

    def open(self, round_index: int) -> None:
        """Accept reports on the state after round_index from now on (before it is pushed: replies may be quick)."""
        with self._changed:
            self._reports.setdefault(round_index, {})

    def expect(self, round_index: int, learner_ids: list[int]) -> None:
        """The learners whose reports complete round_index's evaluation (those the state went to); a report that
        came first from anyone else is dropped."""
        with self._changed:
            self._expected[round_index] = set(learner_ids)
            reports = self._reports.get(round_index, {})
            for learner in set(reports) - set(learner_ids):
                del reports[learner]
            self._changed.notify_all()

    def submit(self, round_index: int, report: Report, declared_samples: int) -> str | None:
        """Count a learner's report; raises PayloadError if it is impossible, returns why it was ignored (or None)."""
        report.check(declared_samples)
        with self._changed:
            reports = self._reports.get(round_index)
            if reports is None:
                return f"no evaluation of round {round_index} is open; report ignored"
            if report.learner_id in reports:
                return f"learner {report.learner_id} already reported on round {round_index}; duplicate ignored"
            if round_index in self._expected and report.learner_id not in self._expected[round_index]:
                return f"learner {report.learner_id} was not asked to evaluate round {round_index}; report ignored"
            reports[report.learner_id] = report
            self._changed.notify_all()
            return None

    def _complete(self, round_index: int) -> bool:
        return round_index in self._expected and self._expected[round_index] <= set(self._reports[round_index])

    def wait(self, round_index: int, timeout: float) -> bool:
        """Whether every expected learner reported on round_index, waiting at most timeout seconds."""
        with self._changed:
            return self._changed.wait_for(
                lambda: round_index not in self._reports or self._complete(round_index), timeout
            )

    def records(self, final: bool = False) -> list[dict]:
        """Records of the evaluations that are over (complete, superseded by a later one, or all when final),
        each once; an evaluation nobody reported on leaves no record."""
        with self._changed:
            latest = max(self._reports, default=-math.inf)
            done = [r for r in sorted(self._reports) if final or r < latest or self._complete(r)]
            records = []
            for round_index in done:
                reports, expected = self._reports.pop(round_index), self._expected.pop(round_index, set())
                if reports:
                    records.append(combine(round_index, reports, sorted(expected - set(reports))))
            return records
