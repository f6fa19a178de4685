"""The leader's side of secure aggregation through the rounds: phase 4 (after phases 1-3 when the round opens an
epoch) fanned out to a round's learners as it opens (they train meanwhile), their masked inputs summed as they
arrive, and phase 5, the unmasking and the dequantised mean as it closes (privacy/secagg.py holds the protocol;
this module only drives it).

Thread-safe: the round loop begins and finishes rounds, gRPC handler threads add masked inputs; the open
round's LeaderRound is touched only under one lock, never across a call to a learner.
"""

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc
import torch

from federated.leader.dispatch import LearnerClient
from federated.leader.registry import Member
from federated.net.rpc import learner_pb2
from federated.privacy import dp, secagg

log = logging.getLogger("leader")

Unable = Callable[[Member, str], None]  # a learner that cannot take part in secure rounds, and why
UNIMPLEMENTED_WHY = "does not speak secure aggregation: built from the article's protos?"


@dataclass(frozen=True)
class SecureOutcome:
    """What the unmasked sum of a round gives: its total weight in samples, the weighted mean loss, or why the
    round is discarded (the model unchanged)."""

    samples: int = 0
    loss: float = math.nan
    discarded: str | None = None
    revealed: bool = True  # whether the leader saw the round's noised sum (False: discarded before unmasking)


def threshold_of(fraction: float, learners: int) -> int:
    """Shares that reconstruct a secret among `learners`: more than `fraction` (at least half) of them, and fewer
    than all (a round unmasks only with more than this many survivors)."""
    return min(math.floor(fraction * learners) + 1, learners - 1)


class SecureRounds:
    """One secure round at a time: begin (phases 1-3 when an epoch opens, then 4), add_masked (as inputs arrive),
    finish (phase 5, unmask). An epoch's keys and seeds serve its rounds while they go cleanly; any trouble (a
    learner failing or refused in any phase, one whose input did not arrive, a discarded round) opens a new one."""

    def __init__(
        self,
        client: LearnerClient,
        threshold: float,
        ring: secagg.Ring,
        timeout: float,
    ) -> None:
        """threshold: --secagg-threshold (a fraction); ring: the masked inputs' layout (Quantisation.ring), the
        run's (a quantisation's ring depends on its levels and summands only: distributed DP's noise, which varies
        by round, is refused with levels); timeout: of each phase's calls (--sync-timeout)."""
        self.client, self.threshold, self.ring, self.timeout = client, threshold, ring, timeout
        self._round: secagg.LeaderRound | None = None
        self._epoch: secagg.LeaderEpoch | None = None  # the last round's
        self._clean = False  # whether it went without trouble: else the next round opens a new epoch
        self._lock = threading.Lock()
        self.bytes_in = self.bytes_out = 0  # of the phases' replies and requests this round (not the masked inputs)
        self.epochs_opened = 0

    def begin(
        self, round_index: int, members: dict[int, Member], unable: Unable = lambda member, why: None
    ) -> list[int]:
        """Run phase 4 with these learners, after phases 1-3 if the round opens an epoch: those committed (U2),
        whose masked inputs the round takes; no more than the round's threshold (at least 2, so fewer than
        secagg.MIN_LEARNERS among them) leave it without any. unable(member,
        why): one that cannot take part in secure rounds at all (it answered UNIMPLEMENTED)."""
        participants = sorted(members)
        self.bytes_in = self.bytes_out = 0
        with self._lock:
            self._round = None
        if len(participants) < secagg.MIN_LEARNERS:
            self._troubled()
            return []
        try:
            epoch = self._serving(round_index, participants) or self._open_epoch(round_index, members, unable)
            verified = [learner for learner in participants if learner in epoch.verified]
            leader_round = epoch.open_round(round_index, verified, self.ring)
            with self._lock:
                self._round = leader_round
            started = time.perf_counter()
            committed = {learner: members[learner] for learner in leader_round.shared}
            answered = self.run_phase(leader_round, secagg.COMMIT, committed, unable)
            log.debug("secure round %d: phase 4 took %.3f s", round_index + 1, time.perf_counter() - started)
        except secagg.BelowThreshold as below:  # fewer answered than the threshold
            log.warning("secure round %d: %s", round_index + 1, below)
            self._troubled()
            return []
        # a round unmasks only with more than the threshold: with fewer commits it would only make learners train
        return answered if len(answered) > leader_round.threshold else []

    def _serving(self, round_index: int, participants: list[int]) -> secagg.LeaderEpoch | None:
        """The last round's epoch if it serves this round: the last round went cleanly, a slot is left, and the
        round's learners are all verified in it and more than its threshold; else None."""
        epoch = self._epoch
        serves = (
            self._clean
            and epoch is not None
            and epoch.has_slot(round_index)
            and set(participants) <= set(epoch.verified)
            and len(participants) > epoch.threshold
        )
        return epoch if serves else None

    def _open_epoch(self, round_index: int, members: dict[int, Member], unable: Unable) -> secagg.LeaderEpoch:
        """Phases 1-3 with these learners: an epoch named round_index, its V fixed (BelowThreshold if too few).
        Any learner left out makes this the epoch's only round."""
        participants = sorted(members)
        epoch = secagg.LeaderEpoch(round_index, participants, threshold_of(self.threshold, len(participants)))
        self._epoch, self._clean, answered, started = epoch, True, participants, time.perf_counter()
        for phase in secagg.SETUP:
            answered = self.run_phase(epoch, phase, {learner: members[learner] for learner in answered}, unable)
        verified = epoch.verified
        self.epochs_opened += 1
        log.debug("secure round %d: phases 1-3 took %.3f s", round_index + 1, time.perf_counter() - started)
        log.info(
            "secure aggregation: keys agreed with %d learners (threshold %d) for up to %d rounds (secure epoch %d)",
            len(verified),
            epoch.threshold,
            secagg.EPOCH_ROUNDS,
            self.epochs_opened,
        )
        if len(verified) < len(participants):
            self._troubled()
        return epoch

    def _troubled(self) -> None:
        """The round had trouble: the next one opens a new epoch (a clean slate)."""
        self._clean = False

    def run_phase(
        self,
        leader_round: secagg.LeaderEpoch | secagg.LeaderRound,
        phase: int,
        members: dict[int, Member],
        unable: Unable,
    ) -> list[int]:
        """One phase's calls to these learners at once: those whose reply the epoch or round took (any other makes
        the next round open a new epoch); raises secagg.BelowThreshold when the set of learners the phase names is
        below the threshold."""
        with self._lock:
            requests = {learner: leader_round.request(phase, learner) for learner in members}
        self.bytes_out += sum(request.ByteSize() for request in requests.values())
        replies = self.client.ask(members, "SecureAggregation", requests, learner_pb2.SecAggReply, self.timeout)
        answered = []
        for learner, reply in sorted(replies.items()):
            if isinstance(reply, grpc.RpcError):
                self.failed(members[learner], phase, reply, unable)
                continue
            try:
                with self._lock:
                    leader_round.take(phase, learner, reply)
            except secagg.Refused as refused:
                log.warning(
                    "secure aggregation, phase %d: learner %d left out of the round: %s", phase, learner, refused
                )
                continue
            self.bytes_in += reply.ByteSize()
            answered.append(learner)
        if len(answered) < len(members):
            self._troubled()
        return answered

    def failed(self, member: Member, phase: int, error: grpc.RpcError, unable: Unable) -> None:
        """A phase's call failed: the learner is left out of the round; one that does not know the call, of every
        secure round."""
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            unable(member, f"learner {member.learner_id} {UNIMPLEMENTED_WHY}")
            return
        log.warning(
            "secure aggregation, phase %d: learner %d left out of the round (%s %s)",
            phase,
            member.learner_id,
            error.code().name,
            error.details(),
        )

    def add_masked(self, learner_id: int, masked: dict[str, torch.Tensor]) -> None:
        """A committed learner's masked input (its tensors), into the round's sum; raises secagg.Refused (no
        secure round open, not the ring's tensors, not committed, a second one)."""
        with self._lock:
            if self._round is None:
                raise secagg.Refused("no secure round is open: the round's setup did not commit enough learners")
            self._round.add_masked(learner_id, masked)

    def finish(
        self,
        survivors: list[int],
        members: dict[int, Member],
        quantisation: secagg.Quantisation,
        mean_out: torch.Tensor,
        noise: tuple[float, float] | None = None,
    ) -> SecureOutcome:
        """Phase 5 to the survivors (whose masked inputs arrived), unmask, and dequantise the weighted mean into
        mean_out; or why the round is discarded (mean_out then untouched). noise: distributed DP's (noise
        multiplier, clip), whose share at the round's threshold each learner added (and quantised with)."""
        with self._lock:
            leader_round, self._round = self._round, None
        if leader_round is not None and noise is not None:
            quantisation = replace(quantisation, noise_std=dp.noise_share_std(*noise, leader_round.threshold))
        if quantisation.ring(self.ring.size) != self.ring:  # the inputs were taken in self.ring's layout
            raise ValueError(f"a quantisation in {quantisation.ring(self.ring.size)}, not this run's {self.ring}")
        if leader_round is None or len(survivors) < secagg.MIN_LEARNERS:
            self._troubled()
            return SecureOutcome(
                discarded=f"secure aggregation: fewer than {secagg.MIN_LEARNERS} learners committed and sent a "
                f"masked input ({len(survivors)})",
                revealed=False,
            )
        alive, started = {learner: members[learner] for learner in survivors if learner in members}, time.perf_counter()
        if len(alive) < len(leader_round.shared):  # a committed learner dropped: its epoch serves no more rounds
            self._troubled()
        try:
            self.run_phase(leader_round, secagg.UNMASK, alive, lambda member, why: None)
            total = leader_round.unmask()
            mean, samples, loss = quantisation.dequantise(total, len(leader_round.survivors or ()), noise is not None)
        except secagg.BelowThreshold as below:
            self._troubled()
            return SecureOutcome(
                discarded=f"secure aggregation: below the threshold, nothing unmasked ({below})", revealed=False
            )
        except secagg.Refused as refused:
            self._troubled()
            return SecureOutcome(discarded=f"secure aggregation: the sum is not what honest inputs make ({refused})")
        mean_out.copy_(mean)
        log.debug("secure round: phase 5 and the unmasking took %.3f s", time.perf_counter() - started)
        # under distributed DP learners give no loss (an un-noised sum of losses would reveal what the noise hides)
        return SecureOutcome(round(samples), math.nan if noise is not None else loss)
