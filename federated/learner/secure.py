"""A learner's side of secure aggregation through the rounds: the leader's phases answered on gRPC's threads, and
the masked input made on the training thread once the round is committed (privacy/secagg.py holds the protocol;
this module only hands it between the threads).

Thread-safe: one lock around the protocol's state, one condition for the commit the training thread waits for.
"""

import dataclasses
import math
import threading
import time
from collections.abc import Callable

import torch

from federated.core.plan import SecureRound
from federated.net.rpc import learner_pb2
from federated.privacy import dp, secagg

STOP_CHECK_S = 0.5  # how often a wait for the commit looks whether the run ended


class SecureParty:
    """This learner's LearnerRound (one epoch at a time, a phase 1 opens the next; one round of it at a time, a
    commit opens it), bound to its slot."""

    def __init__(self) -> None:
        self._round: secagg.LearnerRound | None = None  # none before registering
        self._committed = -1  # the round whose commit this learner answered
        self._latest = -1  # the newest round the leader started with it (phase 1 or a commit)
        self._changed = threading.Condition()

    def bind(self, learner_id: int) -> None:
        """Registered (again) in this slot: its rounds start afresh, its epoch forgotten (a resumed leader may go
        back in rounds, which a learner's protocol state would refuse; a leader still in the old epoch is refused
        at commit, and opens a new one)."""
        with self._changed:
            self._round, self._committed, self._latest = secagg.LearnerRound(learner_id), -1, -1

    def answer(self, request: learner_pb2.SecAggRequest) -> learner_pb2.SecAggReply:
        """The reply to one of the leader's phases; raises secagg.Refused (before registering, too)."""
        with self._changed:
            if self._round is None:
                raise secagg.Refused("this learner has not registered yet")
            reply = self._round.answer(request)
            if request.phase in (secagg.KEYS, secagg.COMMIT):  # a later round started: the last one's commit is over
                self._latest = max(self._latest, request.round)
                self._committed = request.round if request.phase == secagg.COMMIT else -1
            self._changed.notify_all()
            return reply

    def wait_committed(self, round_index: int, timeout: float, stop: Callable[[], bool] = lambda: False) -> bool:
        """Whether the leader committed this learner to round_index, waiting at most timeout seconds (no longer
        once the leader started a later round with it, or stop() says there is no point: the leader ended the run
        mid-round, and no commit will come)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (self._committed == round_index or self._latest > round_index or stop()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, STOP_CHECK_S))
            return self._committed == round_index

    def masked_input(
        self,
        round_index: int,
        update: torch.Tensor,
        weight: float,
        loss: float,
        secure: SecureRound,
        noise: tuple[float, float] | None = None,
        wide: tuple[int, int] = (0, 0),
    ) -> dict[str, torch.Tensor] | None:
        """The round's masked input (its ring's tensors: secagg.Ring): the update (flat, float) clipped and
        quantised as the round asks (with levels, --compress int8/int4's: unbiased, so no residual is kept),
        weighing `weight` samples (clamped to the round's unit: the leader cannot cap a folded weight) with its
        mean loss, masked; None when the round is no longer committed (the leader started the next); raises
        secagg.Refused when the protocol refuses it (the unmasking already began, a quantisation for fewer inputs
        than committed). noise: distributed DP's (noise multiplier, clip): this learner adds its share of the
        noise, such that `threshold` survivors already add up to the whole (a sum the leader unmasks has more).
        wide: the values that keep the full scale with levels (Quantisation.wide: BatchNorm's statistics)."""
        with self._changed:
            if self._round is None or self._committed != round_index:
                return None
            share = dp.noise_share_std(*noise, self._round.threshold) if noise else 0.0
            quantisation = secagg.Quantisation(**dataclasses.asdict(secure), noise_std=share, wide=wide)
            # (an unknown loss, NaN, counts as 0: a sum cannot carry a NaN without losing every other value)
            return self._round.masked_input(
                update, min(weight, secure.weight_unit), 0.0 if math.isnan(loss) else loss, quantisation
            )
