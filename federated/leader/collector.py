"""The open round's updates, combined as they arrive: who has reported, who is missing, who missed a deadline.

Thread-safe: gRPC handler threads submit, the leader's main loop waits. Every wait takes a timeout.
"""

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from federated.core.aggregation import Aggregator, DecodeAdd, Mean, RoundUpdates
from federated.leader.secure import SecureOutcome
from federated.privacy.dp import CentralMechanism
from federated.privacy.secagg import Refused


@dataclass(frozen=True)
class RoundSummary:
    round: int
    learners: int
    samples: int
    loss: float
    bytes_in: int
    missed: tuple[int, ...] = ()  # learners expected that did not report, and were not charged at a deadline
    per_learner: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)  # samples, loss
    discarded: str | None = None  # a secure round that gave no sum: why (the model stays as it was)
    bytes_out: int = 0  # the round's own calls to its learners (a secure round's phases), not the state pushed
    released: bool = True  # whether the leader saw an aggregate (a secure round discarded after unmasking did)


class RoundCollector:
    """Updates of the open round, combined as they arrive; each learner counts once per round. The round is
    complete when every expected learner has reported and there are as many updates as the rule needs; at each
    deadline the missing are named once (overdue), and close() names the others that never reported."""

    def __init__(
        self,
        size: int,
        first_round: int = 0,
        rule: Aggregator = Mean(),
        clip_norm: float = 0.0,
        model_size: int | None = None,
        controls: bool = False,
        privacy: CentralMechanism | None = None,
        add_masked: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    ) -> None:
        """privacy: --dp central's clip and noise; add_masked: with secure aggregation, where a committed learner's
        masked input goes (SecureRounds); raises Refused."""
        self.rule, self.add_masked = rule, add_masked
        self._updates = RoundUpdates(
            size, size if model_size is None else model_size, rule, clip_norm, controls, privacy
        )
        self._sampled: set[int] | None = None  # with sampled participation, only they may send
        self._expected: set[int] = set()
        self._reported: dict[
            int, tuple[int, float]
        ] = {}  # by learner: the samples it weighs (its claim, as checked) and its loss
        self._overdue: set[int] = set()  # expected learners named missing at a deadline of the open round
        self._round = first_round
        self._bytes_in = 0
        self._sealed = False  # a secure round closing: its survivors are fixed, no masked input counts any more
        self._void = False  # a secure round whose setup committed too few learners: nothing to wait for
        self._changed = threading.Condition()

    @property
    def round(self) -> int:
        with self._changed:
            return self._round

    def expect(self, learner_ids: list[int], sampled: list[int] | None = None, widen: bool = False) -> None:
        """The learners whose updates complete the open round; with sampled participation, only the sampled
        learners' updates count (those of them in learner_ids are expected). widen: a second draw for the same
        round, whose earlier participants' updates still count."""
        with self._changed:
            earlier = self._sampled if widen and self._sampled is not None else set()
            self._sampled = None if sampled is None else earlier | set(sampled)
            self._expected = {
                learner for learner in learner_ids if sampled is None or learner in sampled
            }  # the round waits for the new draw

    def stop_waiting_for(self, learner_ids: list[int]) -> None:
        """The open round no longer waits for these learners (given up on); their updates still count."""
        with self._changed:
            self._expected -= set(learner_ids)

    def overdue(self, spared: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """A deadline of the open round passed: the expected learners that have not reported, but the spared, each
        of which has missed it (close() does not name them again)."""
        with self._changed:
            missing = self._expected - self._reported.keys() - spared
            self._overdue |= missing
            return sorted(missing)

    def submit(
        self,
        learner_id: int,
        round_index: int,
        gradient: list[torch.Tensor] | DecodeAdd,
        samples: int,
        loss: float,
        wire_bytes: int,
    ) -> str | None:
        """Add a learner's gradient (pieces as codec.flat_runs gives them, or a compressed one's DecodeAdd) to the
        open round; the reason it was ignored, or None if counted. A compressed update's entries are checked
        before (servicer.checked_update): decoding them under the lock only adds."""
        with self._changed:
            if round_index != self._round:
                return f"gradient for round {round_index} ignored: round {self._round} is open"
            if learner_id in self._reported:
                return f"learner {learner_id} already reported for round {round_index}; duplicate ignored"
            if self._sampled is not None and learner_id not in self._sampled:
                return f"learner {learner_id} was not sampled for round {round_index}; update ignored"
            if callable(gradient):
                self._updates.add_decoded(gradient, samples, loss)
            else:
                self._updates.add(gradient, samples, loss)
            self._reported[learner_id] = (samples, loss)
            self._bytes_in += wire_bytes
            self._changed.notify_all()
            return None

    def submit_masked(
        self, learner_id: int, round_index: int, masked: dict[str, torch.Tensor], wire_bytes: int
    ) -> str | None:
        """Add a secure round's masked input to the open round's sum (add_masked); the reason it was ignored, or
        None if counted. Its samples and loss are in it, masked: the collector never knows them."""
        with self._changed:
            if round_index != self._round or self._sealed:
                return f"masked input for round {round_index} ignored: round {self._round} is open" + (
                    " and closing" if self._sealed else ""
                )
            if learner_id in self._reported:
                return f"learner {learner_id} already sent its masked input for round {round_index}; ignored"
            assert self.add_masked is not None  # (the servicer takes masked inputs only with secure aggregation)
            try:
                self.add_masked(learner_id, masked)
            except Refused as refused:
                return f"masked input of learner {learner_id} refused: {refused}"
            self._reported[learner_id] = (0, 0.0)  # (nobody's samples or loss: they are in the sum)
            self._bytes_in += wire_bytes
            self._changed.notify_all()
            return None

    def commit(self, learner_ids: list[int]) -> None:
        """A secure round's setup committed these learners: only their masked inputs can count, so the round waits
        for no other; none (too few committed, or the round given up) completes the round at once, to be unmasked
        from what arrived or discarded."""
        with self._changed:
            self._expected &= set(learner_ids)
            self._void = not learner_ids
            self._changed.notify_all()

    def seal(self) -> list[int]:
        """A secure round closes: the learners whose masked inputs arrived (its survivors); no more count."""
        with self._changed:
            self._sealed = True
            return sorted(self._reported)

    def wait_complete(self, timeout: float) -> bool:
        """Whether every expected learner has reported, and at least as many updates as the rule needs to
        outvote a hostile one (one for the mean) are in, waiting at most timeout seconds. Short of that the
        round is not complete, whoever is expected: a round closed with it would only be discarded."""
        with self._changed:
            return self._changed.wait_for(
                lambda: (
                    self._void
                    or (len(self._reported) >= self.rule.minimum_updates() and self._expected <= self._reported.keys())
                ),
                timeout,
            )

    def missing(self) -> list[int]:
        with self._changed:
            return sorted(self._expected - self._reported.keys())

    def reported(self) -> int:
        with self._changed:
            return len(self._reported)

    def close(self, mean_out: torch.Tensor, secure: SecureOutcome | None = None) -> RoundSummary:
        """Write the round's aggregate update into mean_out, then open the next round; needs an update. A secure
        round's aggregate is already there (secure: what its unmasked sum gave), and nobody's own samples or loss
        are known."""
        with self._changed:
            if not self._reported and secure is None:
                raise RuntimeError(f"round {self._round} has no gradient to average")
            if secure is None:
                self._updates.combine_into(mean_out)
            summary = RoundSummary(
                self._round,
                len(self._reported),
                self._updates.samples if secure is None else secure.samples,
                self._updates.mean_loss if secure is None else secure.loss,
                self._bytes_in,
                tuple(sorted(self._expected - self._reported.keys() - self._overdue)),
                dict(self._reported) if secure is None else {},
                None if secure is None else secure.discarded,
                released=secure is None or secure.revealed,
            )
            self._updates.reset()
            self._reported.clear()
            self._overdue.clear()
            self._round += 1
            self._bytes_in = 0
            self._sealed = self._void = False
            return summary
