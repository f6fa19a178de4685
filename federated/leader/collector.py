"""The open round's updates, combined as they arrive: who has reported, who is missing, who keeps missing rounds.

Thread-safe: gRPC handler threads submit, the leader's main loop waits. Every wait takes a timeout.
"""

import dataclasses
import threading
from dataclasses import dataclass

import torch

from federated.core.aggregation import Aggregator, Mean, RoundUpdates

MAX_MISSED_ROUNDS = 3


@dataclass(frozen=True)
class RoundSummary:
    round: int
    learners: int
    samples: int
    loss: float
    bytes_in: int
    given_up: tuple[int, ...] = ()  # learners that have now missed MAX_MISSED_ROUNDS rounds in a row
    per_learner: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)  # samples, loss


class RoundCollector:
    """Updates of the open round, combined as they arrive; each learner counts once per round. A learner that
    misses MAX_MISSED_ROUNDS rounds in a row is not waited for until the leader hears from it again: a
    learner that answers everything but never sends a gradient cannot hold every round to its deadline."""

    def __init__(
        self,
        size: int,
        first_round: int = 0,
        rule: Aggregator = Mean(),
        clip_norm: float = 0.0,
        model_size: int | None = None,
    ) -> None:
        self.rule = rule
        self._updates = RoundUpdates(size, size if model_size is None else model_size, rule, clip_norm)
        self._sampled: set[int] | None = None  # with sampled participation, only they may send
        self._expected: set[int] = set()
        self._reported: dict[int, tuple[int, float]] = {}  # by learner: the samples and loss it claimed
        self._missed: dict[int, int] = {}  # rounds missed in a row, by learner
        self._round = first_round
        self._bytes_in = 0
        self._changed = threading.Condition()

    @property
    def round(self) -> int:
        with self._changed:
            return self._round

    def expect(self, learner_ids: list[int], sampled: list[int] | None = None, widen: bool = False) -> None:
        """The learners whose updates complete the open round (but those that keep missing rounds); with
        sampled participation, only the sampled learners' updates count (those of them ready are expected).
        widen: a second draw for the same round, whose earlier participants' updates still count."""
        with self._changed:
            earlier = self._sampled if widen and self._sampled is not None else set()
            self._sampled = None if sampled is None else earlier | set(sampled)
            self._expected = {
                learner
                for learner in learner_ids
                if self._missed.get(learner, 0) < MAX_MISSED_ROUNDS and (sampled is None or learner in sampled)
            }  # the round waits for the new draw

    def reliable(self, learner_ids: list[int]) -> list[int]:
        """Those of learner_ids that rounds still wait for (not given up on for missing rounds)."""
        with self._changed:
            return [learner for learner in learner_ids if self._missed.get(learner, 0) < MAX_MISSED_ROUNDS]

    def heard_from(self, learner_id: int) -> None:
        """The learner sent something (or registered again): wait for it again."""
        with self._changed:
            self._missed.pop(learner_id, None)

    def submit(
        self,
        learner_id: int,
        round_index: int,
        gradient: list[torch.Tensor],
        samples: int,
        loss: float,
        wire_bytes: int,
    ) -> str | None:
        """Add a learner's gradient (pieces as codec.flat_runs gives them) to the open round; the reason it
        was ignored, or None if counted."""
        with self._changed:
            if round_index != self._round:
                return f"gradient for round {round_index} ignored: round {self._round} is open"
            if learner_id in self._reported:
                return f"learner {learner_id} already reported for round {round_index}; duplicate ignored"
            if self._sampled is not None and learner_id not in self._sampled:
                return f"learner {learner_id} was not sampled for round {round_index}; update ignored"
            self._updates.add(gradient, samples, loss)
            self._reported[learner_id] = (samples, loss)
            self._bytes_in += wire_bytes
            self._changed.notify_all()
            return None

    def wait_complete(self, timeout: float) -> bool:
        """Whether every expected learner has reported (and at least one has), waiting at most timeout seconds."""
        with self._changed:
            return self._changed.wait_for(
                lambda: bool(self._reported) and self._expected <= self._reported.keys(), timeout
            )

    def missing(self) -> list[int]:
        with self._changed:
            return sorted(self._expected - self._reported.keys())

    def reported(self) -> int:
        with self._changed:
            return len(self._reported)

    def close(self, mean_out: torch.Tensor) -> RoundSummary:
        """Write the round's aggregate update into mean_out, then open the next round; needs an update."""
        with self._changed:
            if not self._reported:
                raise RuntimeError(f"round {self._round} has no gradient to average")
            self._updates.combine_into(mean_out)
            for learner in self._expected - self._reported.keys():
                self._missed[learner] = self._missed.get(learner, 0) + 1
            given_up = tuple(
                sorted(
                    learner
                    for learner in self._expected - self._reported.keys()
                    if self._missed[learner] == MAX_MISSED_ROUNDS
                )
            )
            summary = RoundSummary(
                self._round,
                len(self._reported),
                self._updates.samples,
                self._updates.mean_loss,
                self._bytes_in,
                given_up,
                dict(self._reported),
            )
            self._updates.reset()
            self._reported.clear()
            self._round += 1
            self._bytes_in = 0
            return summary
