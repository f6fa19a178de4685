"""The learners as a group through the rounds: who takes part, starting joiners, pushing states, waiting
for updates (deadline, quorum, liveness) and dropping the learners found gone.

The leader's round loop calls start() once, then for each round open(), wait_for_round(), close() and
push_state(); the servicer calls probe() and received(). Every wait is bounded and logged.
"""

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from federated.core.plan import TrainingPlan
from federated.core.sampling import sample_participants
from federated.leader import dispatch
from federated.leader.collector import RoundCollector, RoundSummary
from federated.leader.config import LeaderConfig, min_learners
from federated.leader.global_model import GlobalModel
from federated.leader.planner import Planner
from federated.leader.registry import MAX_MISSED_ROUNDS, Member, Registry, bench_rounds
from federated.leader.secure import SecureRounds
from federated.privacy.secagg import MIN_LEARNERS, Quantisation
from federated.wire import framing

log = logging.getLogger("leader")

WAIT_LOG_INTERVAL_S = 10.0
WAIT_SLICE_S = 1.0  # how often waits look at stop requests, joiners and missing learners


class Stalled(Exception):
    """Too few learners for too long: the leader checkpoints and exits, to be resumed later."""


@dataclass(frozen=True)
class Settings:
    """The leader's flags about learners and waiting."""

    learners: int
    min_learners: int
    learners_per_round: int  # 0: all
    round_timeout: float
    register_timeout: float
    sync_timeout: float
    rejoin_grace: float
    resuming: bool
    out: Path  # where a stalled run's checkpoint is, to resume from
    # Joiners at round 0 fetched a state without the normalisation a leader without data settles on later
    resend_first_state: bool = False

    @classmethod
    def of(cls, config: LeaderConfig) -> "Settings":
        return cls(
            config.learners,
            min_learners(config),
            config.learners_per_round,
            config.round_timeout,
            config.register_timeout,
            config.sync_timeout,
            config.rejoin_grace,
            bool(config.resume),
            config.output_dir,
            config.dataset == "none",
        )


class Federation:
    """Rounds as the learners see them: the registry of slots, the open round's collector, the states pushed."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        collector: RoundCollector,
        global_model: GlobalModel,
        planner: Planner,
        client: dispatch.LearnerClient,
        sampler: torch.Generator,
        stopping: threading.Event,
        participants: list[int] | None = None,
        secure: SecureRounds | None = None,
    ) -> None:
        self.settings, self.registry, self.collector = settings, registry, collector
        self.secure = secure  # with --secure-aggregation
        self.global_model, self.planner = global_model, planner
        self.client, self.sampler, self.stopping = client, sampler, stopping
        self.participants = participants  # the open round's, with --learners-per-round (a resume's: restored)
        self.sampled_at = 0.0  # when they were drawn
        # how many candidates this process drew them from, in one draw (None: a resume's restored or a second draw)
        self.drawn_from: int | None = None
        self.opened_at = time.monotonic()  # when the open round opened: its missing learners held their slots then
        self.freed_at = 0.0  # when a learner was last given up on, its slot opened to newcomers
        if settings.learners_per_round:  # until the first draw, nobody's update counts
            collector.expect([], participants or [])

    def start(self) -> None:
        """Start the learners registered so far; the first round waits for them (and, with sampling, gets its
        participants and their state)."""
        self.admit_joiners()
        if not self.registry.wait_started(self.settings.sync_timeout):
            log.warning("some learners did not accept StartTraining within --sync-timeout; starting without them")
        if self.settings.learners_per_round:  # a resume takes the participants its checkpoint had drawn
            self.send_state(self.open_round(self.collector.round, self.participants))

    def open(self) -> None:
        """Open the next round: start joiners, forget channels to learners not in play (not counted on; with
        sampling, not drawn for it), and expect the updates of the learners ready (not those still being started:
        they may add theirs in time)."""
        self.admit_joiners()
        self.client.keep_only({member.address for member in self.registry.members(self.participants).values()})
        self.opened_at = time.monotonic()
        self.collector.expect(self.registry.ready(), self.participants)
        if self.secure is not None:
            self.begin_secure()

    def begin_secure(self) -> None:
        """A secure round's phases 1-4 with the learners it expects (they were sent its state, and train
        meanwhile): it waits only for those committed. A learner that joins mid-round takes part from the next."""
        assert self.secure is not None
        round_index = self.collector.round
        self.wait_for_secure_quorum(round_index)
        if self.stopping.is_set():  # (wait_for_round gives the round up)
            return
        committed = self.secure.begin(round_index, self.registry.members(self.collector.missing()), self.unable)
        self.collector.commit(committed)
        if not committed:
            log.warning(
                "round %d: secure aggregation committed too few learners; the round will be discarded", round_index + 1
            )

    def wait_for_secure_quorum(self, round_index: int) -> None:
        """Before a secure round's phases, wait until it expects at least secagg.MIN_LEARNERS learners (joiners
        admitted meanwhile take part): with fewer, the round could only be discarded, and the next at once too.
        Raises Stalled after --register-timeout; returns at once if stopped."""
        started, last_log = time.monotonic(), 0.0
        while len(self.collector.missing()) < MIN_LEARNERS and not self.stopping.wait(WAIT_SLICE_S):
            waited = time.monotonic() - started
            if waited > self.settings.register_timeout:
                raise Stalled(
                    f"round {round_index + 1}: fewer than {MIN_LEARNERS} learners for a secure round within "
                    f"--register-timeout {self.settings.register_timeout:.0f} s; start more learners"
                )
            if waited - last_log >= WAIT_LOG_INTERVAL_S:
                last_log = waited
                log.info("round %d: a secure round needs %d learners; waiting", round_index + 1, MIN_LEARNERS)
            self.admit_joiners()
            self.collector.expect(self.registry.ready(), self.participants)

    def unable(self, member: Member, why: str) -> None:
        """A learner that cannot take part in secure rounds: not counted on (its slot is free)."""
        self.drop(member, why, dispatch.GONE)

    def probe(self, learner_ids: tuple[int, ...] | list[int]) -> None:
        """Check on these learners' registrations; drop those found gone or silent for --sync-timeout."""
        self.client.probe(self.registry.members(list(learner_ids)), self.drop, self.settings.sync_timeout)

    def received(self, member: Member, counted: bool) -> None:
        """An update of the learner arrived: a sign of life (it is there, whatever its health checks said). Only
        one that counted is a sign of taking part, after which rounds wait for it again: one that came late, twice
        or unasked for leaves the rounds it missed counted."""
        self.client.heard_from(member)
        if counted and self.registry.participated(member.learner_id, member.generation):
            log.info("learner %d takes part again (an update of its counted): rounds wait for it", member.learner_id)

    def missed(self, learner_ids: list[int] | tuple[int, ...]) -> None:
        """These learners missed the open round (a deadline passed, or it closed, without their update); after
        MAX_MISSED_ROUNDS in a row, or the one round of their probation, they are given up on: the open round waits
        for them no more, the next rounds leave them out for a while (Registry.missed), and a newcomer may take
        their slots."""
        given_up = self.registry.missed(list(learner_ids), self.opened_at)
        if not given_up:
            return
        self.freed_at = time.monotonic()
        self.collector.stop_waiting_for(sorted(given_up))
        for strikes in sorted(set(given_up.values())):
            learners = sorted(learner for learner, times in given_up.items() if times == strikes)
            why = (
                f"missed {MAX_MISSED_ROUNDS} rounds in a row"
                if strikes == 1
                else f"missed their round on probation (given up on {strikes} times in a row)"
            )
            log.warning(
                "learners %s %s: rounds leave them out for the next %d rounds, then wait for them once more (an "
                "update of theirs that counts ends this; a miss then, and they are left out twice as long), and a "
                "new learner may take their slots",
                learners,
                why,
                bench_rounds(strikes),
            )

    def close(self, mean_out: torch.Tensor) -> RoundSummary:
        """Close the open round into mean_out (see RoundCollector.close); the learners it waited for in vain
        since its last deadline miss it, and those given up on before it opened have sat out one more round."""
        summary = self.close_secure(mean_out) if self.secure is not None else self.collector.close(mean_out)
        self.missed(summary.missed)
        if back := self.registry.round_closed(self.opened_at):
            log.info(
                "learners %s sat out their rounds: the next round waits for them once more (given up on again at "
                "once if they miss it)",
                back,
            )
        return summary

    def close_secure(self, mean_out: torch.Tensor) -> RoundSummary:
        """Close a secure round: phase 5 with the learners whose masked inputs arrived, the mean unmasked into
        mean_out (or the round discarded); its bytes in count the phases' replies too."""
        assert self.secure is not None
        secure = self.planner.secure_round()
        assert secure is not None  # (the planner plans secure rounds whenever the federation runs them)
        survivors, config = self.collector.seal(), self.planner.config
        noise = (config.dp_noise_multiplier, config.dp_clip) if config.dp == "distributed" else None
        outcome = self.secure.finish(
            survivors,
            self.registry.members(survivors),
            Quantisation(**dataclasses.asdict(secure), wide=self.global_model.layout.statistics),
            mean_out,
            noise,
        )
        summary = self.collector.close(mean_out, outcome)
        return dataclasses.replace(
            summary, bytes_in=summary.bytes_in + self.secure.bytes_in, bytes_out=self.secure.bytes_out
        )

    def drop(self, member: Member, reason: str, verdict: str) -> None:
        """Stop counting on a learner a call or health check failed with (verdict: see dispatch.OnFailure). One the
        leader could never dial at the address it registered is told so when it registers again from there."""
        if verdict == dispatch.UNREACHABLE and self.registry.never_reached(member):
            if self.registry.drop(member.learner_id, member.generation, unreachable=reason):
                log.warning(
                    "cannot reach learner %d at %s, the address it registered (%s); dropped it, and it is told "
                    "to start with --advertise HOST:PORT that this leader can dial",
                    member.learner_id,
                    member.address,
                    reason,
                )
            return
        gone = verdict == dispatch.GONE
        if self.registry.drop(member.learner_id, member.generation, gone):
            kept = "its slot is free" if gone else f"its slot is kept for it for {self.settings.rejoin_grace:.0f} s"
            log.warning("dropped learner %d (%s); %s", member.learner_id, reason, kept)

    def wait_for_learners(self) -> bool:
        """Wait until --learners learners registered (after a resume, --min-learners suffice once
        --round-timeout has passed); False if stopped first. Raises Stalled after --register-timeout."""
        started, last_log = time.monotonic(), 0.0
        while not self.registry.wait_for(self.settings.learners, WAIT_SLICE_S):
            waited = time.monotonic() - started
            present = self.registry.count()
            if self.stopping.is_set():
                return False
            if (
                self.settings.resuming
                and waited >= self.settings.round_timeout
                and present >= self.settings.min_learners
            ):
                return True
            if waited > self.settings.register_timeout:
                raise Stalled(
                    f"only {present} of {self.settings.learners} learners registered within --register-timeout "
                    f"{self.settings.register_timeout:.0f} s; start more learners or lower --learners"
                )
            if waited - last_log >= WAIT_LOG_INTERVAL_S:
                last_log = waited
                log.info("%d of %d learners registered; waiting", present, self.settings.learners)
        return True

    def admit_joiners(self) -> None:
        """Start the learners that (re)registered, and give them the current model state."""
        joiners = self.registry.take_joiners()
        if not joiners:
            return
        log.info("starting learners %s at round %d", sorted(joiners), self.collector.round)
        # Rounds may have passed since the joiner's GetModel: the state goes first (a serialised ModelState);
        # not while participants are yet to be sampled (that state goes to them, and must not be overtaken).
        unsampled = self.settings.learners_per_round and self.participants is None
        fetched_old = self.collector.round > 0 or self.settings.resend_first_state
        state = framing.chunk_message(self.global_model.encoded_state) if fetched_old and not unsampled else None
        downlink = self.global_model.downlink
        took_state = (  # --compress-down: the replica's full state, on which the next round's delta builds
            partial(downlink.acknowledged, version=downlink.version)
            if downlink is not None and downlink.sending_replica
            else lambda member: None
        )
        self.client.start(joiners, state, self.started, self.drop, self.settings.sync_timeout, took_state)

    def started(self, member: Member) -> None:
        """The learner accepted StartTraining: rounds count on it (one given up on for missing rounds that
        registered again, only once an update of its counts or its probation comes: re-registering is no way to be
        waited for again)."""
        self.registry.started(member.learner_id, member.generation)
        self.client.heard_from(member)

    def wait_for_round(self, round_index: int) -> bool:
        """Wait for the expected updates, or after --round-timeout for --min-learners of them; a round
        whose missing learners were all dropped closes at once. Learners the round waits for are checked on
        and dropped when gone; each --round-timeout deadline counts a missed round for those still missing
        (after MAX_MISSED_ROUNDS, or one on probation, the round stops waiting for them: see missed);
        newcomers join; with sampling, silent or gone participants are replaced. False if stopped first;
        raises Stalled when fewer than --min-learners updates came and nobody made up the number within
        --register-timeout of the first deadline (or of the last learner given up on, if later)."""
        started, last_log, was_alone, deadlines = time.monotonic(), 0.0, False, 0
        while not self.collector.wait_complete(WAIT_SLICE_S):
            if self.stopping.is_set():
                return False
            waited = time.monotonic() - started
            if waited // self.settings.round_timeout > deadlines:  # (deadlines closer than a slice count once)
                deadlines = int(waited // self.settings.round_timeout)
                self.missed(self.collector.overdue(self.drawn_lately()))
            missing, arrived, active = self.collector.missing(), self.collector.reported(), self.registry.active()
            enough = arrived >= self.settings.min_learners
            if enough and not set(missing) & set(active):
                return True
            if enough and waited >= self.settings.round_timeout:
                log.warning(
                    "round %d: closing after %.0f s with %d gradients; missing learners %s",
                    round_index,
                    waited,
                    arrived,
                    missing,
                )
                return True
            self.check_stalled(round_index, started, arrived)
            # those given up on too: rounds no longer wait for them, but one found gone frees its slot and no longer
            # counts as present (a round of nobody but a dead learner says so, and stalls for want of learners)
            self.probe(sorted((set(missing) | set(self.registry.given_up())) & set(active)))
            self.sample_again(round_index, active, arrived)
            alone = self.registry.count() == 0
            if waited - last_log >= WAIT_LOG_INTERVAL_S or (alone and not was_alone):
                last_log = waited
                self.log_waiting(round_index, waited, arrived, missing, alone)
            was_alone = alone
            self.admit_joiners()
        return True

    def drawn_lately(self) -> set[int]:
        """The open round's participants when they were drawn less than --round-timeout ago (drawn again mid-round):
        a deadline soon after a draw is no deadline of theirs, and they miss none at it."""
        recent = time.monotonic() - self.sampled_at < self.settings.round_timeout
        return set(self.participants) if self.participants is not None and recent else set()

    def check_stalled(self, round_index: int, started: float, arrived: int) -> None:
        """Raise Stalled when the round, short of --min-learners updates, has waited --register-timeout past its
        first deadline (and past the last time a learner was given up on, freeing a slot) for learners to make
        up the number."""
        now = time.monotonic()
        if now - max(started + self.settings.round_timeout, self.freed_at) <= self.settings.register_timeout:
            return
        short = f"round {round_index}: {arrived} gradients after {now - started:.0f} s, fewer than --min-learners "
        short += str(self.settings.min_learners)
        if given_up := self.registry.given_up():
            raise Stalled(
                f"{short}; learners {given_up} were given up on for missing {MAX_MISSED_ROUNDS} rounds in a row (no "
                "update of theirs counted: see their logs), and no new learner took their slots within "
                f"--register-timeout {self.settings.register_timeout:.0f} s; fix or replace them, then resume with "
                f"--resume {self.settings.out}"
            )
        raise Stalled(
            f"{short} within --round-timeout plus --register-timeout; resume with --resume {self.settings.out} when "
            "learners can take part"
        )

    def log_waiting(self, round_index: int, waited: float, arrived: int, missing: list[int], alone: bool) -> None:
        if alone:
            log.warning(
                "round %d: no learner is left; waiting up to --register-timeout %.0f s for learners to register",
                round_index,
                self.settings.register_timeout,
            )
            return
        need = (
            ""
            if arrived >= self.settings.min_learners
            else f" (need at least --min-learners {self.settings.min_learners})"
        )
        log.info(
            "round %d: %d gradients after %.0f s; waiting for learners %s%s",
            round_index,
            arrived,
            waited,
            missing,
            need,
        )

    def sample_again(self, round_index: int, active: list[int], arrived: int) -> None:
        """With sampling, draw the round's participants again when none of them is left, or when a whole
        --round-timeout since the last draw brought fewer than --min-learners updates (they may be silent),
        if any learner is ready. Updates already counted stay counted, and those of the earlier draw that
        arrive later count too."""
        if self.participants is None or not self.candidates():
            return
        overdue = time.monotonic() - self.sampled_at >= self.settings.round_timeout
        if set(self.participants) & set(active) and (arrived >= self.settings.min_learners or not overdue):
            return
        if self.secure is not None:  # a secure round's learners were fixed at its commit: no newcomer can join it
            log.warning(
                "round %d: %d masked inputs of the sampled learners %s; closing it",
                round_index,
                arrived,
                self.participants,
            )
            self.collector.commit([])  # (unmasked if enough inputs arrived, else discarded; the next round draws)
            return
        log.warning(
            "round %d: %s of the sampled learners %s; sampling again",
            round_index,
            "none is left" if not set(self.participants) & set(active) else f"{arrived} updates",
            self.participants,
        )
        self.send_state(self.open_round(round_index, widen=True))

    def candidates(self) -> list[int]:
        """The learners a round may sample: ready, not sitting out rounds after being given up on."""
        return self.registry.ready()

    def open_round(self, round_index: int, participants: list[int] | None = None, widen: bool = False) -> bytes:
        """Sample who trains round_index (with --learners-per-round: these participants, or a draw among the
        candidates), count only their updates from now on (widen: and still those of the round's earlier draw),
        and publish the state for it; returns it as one serialised ModelState."""
        if self.settings.learners_per_round:
            candidates = self.candidates()
            self.participants = (
                participants
                if participants is not None
                else sample_participants(candidates, self.settings.learners_per_round, self.sampler)
            )
            self.drawn_from = len(candidates) if participants is None and not widen else None
            self.collector.expect(self.registry.ready(), self.participants, widen)
            self.sampled_at = time.monotonic()
            log.debug("round %d: learners %s take part", round_index, self.participants)
        return self.global_model.publish(
            round_index, finished=False, plan=self.planner.plan(round_index, self.participants)
        )

    def sample_rate(self) -> float:
        """The fraction of the candidates the open round's participants were drawn from, which a secret draw
        amplifies privacy by; 1 where no such fraction holds (everyone took part, a resume's restored draw, or a
        second draw mid-round, whose updates count beside the first's)."""
        if self.participants is None or not self.drawn_from:
            return 1.0
        return min(1.0, len(self.participants) / self.drawn_from)

    def send_state(self, request: bytes, everyone: bool = False) -> int:
        """Send a serialised state to the open round's participants (everyone: to every learner counted on);
        returns the bytes sent."""
        members = {
            learner_id: member
            for learner_id, member in self.registry.members().items()
            if everyone or self.participants is None or learner_id in self.participants
        }
        downlink = self.global_model.downlink
        if downlink is None or not downlink.sending_replica:
            broadcast = self.client.send(members, "SyncModelState", request, self.drop, self.settings.sync_timeout)
            sent = len(request) * len(members)
        else:  # --compress-down: the delta to learners in step, the full state to the others
            requests = downlink.requests(members, request)
            broadcast = self.client.send(
                members,
                "SyncModelState",
                requests,
                partial(self.push_failed, full=request, version=downlink.version, sent=requests),
                self.settings.sync_timeout,
                succeeded=partial(downlink.acknowledged, version=downlink.version),
            )
            sent = sum(map(len, requests.values()))
        if everyone:
            broadcast.wait(self.settings.sync_timeout)
        return sent

    def push_failed(
        self,
        member: Member,
        reason: str,
        verdict: str,
        full: bytes,
        version: int,
        sent: Mapping[int, bytes] | None = None,
    ) -> None:
        """A push of the downlink's replica (of this version; sent: what each member was sent, full or the delta)
        failed: the learner gets the full state next, if it stays. A delta it answered with a refusal (whatever
        the reason: it lacks the base, a check failed, it knows no deltas) is no reason to drop it: it gets the
        full state at once, and full states only from now on."""
        downlink = self.global_model.downlink
        assert downlink is not None
        if verdict != dispatch.THERE or sent is None or sent[member.learner_id] is full:
            downlink.forget(member)
            self.drop(member, reason, verdict)
            return
        downlink.refused_delta(member)
        log.warning("learner %d refused a delta: %s; it gets full states from now on", member.learner_id, reason)
        self.client.send(
            {member.learner_id: member},
            "SyncModelState",
            full,
            partial(self.push_failed, full=full, version=version),
            self.settings.sync_timeout,
            succeeded=partial(downlink.acknowledged, version=version),
        )

    def push_state(self, rounds_done: int, finished: bool, stopped: bool = False) -> int:
        """Encode the state after rounds_done once and send it to the next round's participants (to everyone
        when it is the last); return bytes sent."""
        if not finished:
            return self.send_state(self.open_round(rounds_done))
        # the last: no training, but learners evaluate it when the plan says so
        plan = TrainingPlan(evaluate=self.planner.evaluation_due(rounds_done) and not stopped)
        return self.send_state(self.global_model.publish(rounds_done, True, stopped, plan=plan), everyone=True)

    def release(self) -> None:
        """Training was already over: push the final state to every slot's learner, and keep serving it
        (GetModel) for --rejoin-grace seconds to learners that reconnect, unless all were told."""
        started = time.monotonic()
        members = {
            key: member
            for key, member in self.registry.members(list(range(self.settings.learners))).items()
            if member.address
        }
        request = framing.chunk_message(self.global_model.encoded_state)  # published as finished
        broadcast = self.client.send(
            members, "SyncModelState", request, lambda *failure: None, self.settings.sync_timeout
        )
        if broadcast.wait(self.settings.sync_timeout) and broadcast.all_succeeded():
            return
        remaining = max(0.0, self.settings.rejoin_grace - (time.monotonic() - started))
        log.info("telling learners that connect in the next %.0f s (--rejoin-grace) that training is over", remaining)
        self.stopping.wait(remaining)
