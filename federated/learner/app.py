"""The learner's run: check its own data, reach the leader, serve and register, train the rounds it takes part in,
report evaluations, and rejoin after losing the leader, until the leader's final state."""

import logging
import math
import time
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import utils
from federated.core.checks import first_problem
from federated.core.plan import SecureRound, TrainingPlan
from federated.core.training import Batch
from federated.learner import floors
from federated.learner.config import LearnerConfig
from federated.learner.data import Batches, LocalData, LocalShare, own_data, shard_from_payload
from federated.learner.dispatch import PoolServer
from federated.learner.limits import Limits
from federated.learner.pool import CURRENT, POOL_LOG, Pool, Stopped, ports, ranges
from federated.learner.reference import ReferenceBook
from federated.learner.servicer import LearnerServer
from federated.learner.session import HealthPacing, LeaderLost, LeaderSession
from federated.learner.spill import MB
from federated.learner.state import Replica, SharedModel
from federated.net import rpc
from federated.net.rpc import leader_pb2
from federated.privacy import dp, secagg
from federated.privacy.local import Budget
from federated.wire import codec, messages

log = logging.getLogger("learner")

JOINING_AT_ONCE = 4  # learners of a pool that join at once (their registrations still go one at a time)


def round_batch(batches: Batches, replica: Replica, steps: int, step: int) -> Batch:
    """The step-th batch of the replica's round of steps local steps: the rounds' steps follow each other through
    the shard's order."""
    return batches.at(replica.round * steps + step, replica.mean, replica.std)


@dataclass(frozen=True)
class Unmasked:
    """A secure round's update as it leaves the shared model's lock (Member.update_request): a copy of the update
    vector and its claims, masked once the leader commits this learner (Member.masked_input), outside the lock, so
    that the wait for the commit does not hold up the other learners of a pool."""

    round_index: int
    update: torch.Tensor
    samples: int
    loss: float
    plan: TrainingPlan


class Member:
    """This learner in the federation, from the leader's first state on: its replica of the model, the server the
    leader calls, its registration and its data. Registered and holding its data once built; trains the rounds
    it takes part in, and rejoins after losing the leader."""

    def __init__(
        self,
        config: LearnerConfig,
        session: LeaderSession,
        server: LearnerServer,
        replica: Replica,
        local: LocalData | LocalShare | None,
        deadline: float,
    ) -> None:
        """local: the learner's own images (else it trains on a shard from the leader); deadline: of registering."""
        self.config, self.session, self.server, self.replica = config, session, server, replica
        own: utils.ImageSet | None = None
        self.held_out: utils.ImageSet | None = None  # images to evaluate the global model on
        if local is not None:
            own, self.held_out = local.load(replica.info)
        # local data first: the registration summarises it (the leader never sees the images)
        self.summary = None if own is None else messages.DataSummary.of(own, len(self.held_out) if self.held_out else 0)
        self.learner_id = self.register(deadline)
        self.data = self.hold(self.fetch_shard() if own is None else own)
        self.sent_round = -1  # the round of the last update sent
        self.updates_sent = 0  # updates the leader took (the pool's progress lines count them)
        # local DP: what it has spent (here, or kept in --budget-file), and may
        self.budget = Budget(config.max_epsilon, Path(config.budget_file) if config.budget_file else None)
        self.refusal: str | None = None  # why it sat the last round out, for the budget

    def hold(self, data: utils.ImageSet) -> utils.ImageSet:
        """data, to train on from now on: the states this learner admits are checked on its size, the one it holds
        already too (PayloadError: more local steps on it than --max-local-steps allows)."""
        self.session.limits.held(len(data))
        self.session.limits.check_plan(self.replica.plan, self.replica.info.batch_size)
        return data

    def register(self, deadline: float) -> int:
        """Register (again, with the credential of the last registration to take its slot back); its id."""
        reply = self.session.register(self.server.address, self.summary, deadline)
        self.server.secure.bind(reply.learner_id)
        log.info("%s; LearnerService %s (%s)", reply.message, self.server.where(), self.session.security.describe())
        return reply.learner_id

    def fetch_shard(self) -> utils.ImageSet:
        """This slot's shard of the leader's data."""
        info = self.replica.info
        admit = self.session.limits.shard_admission(info, self.replica.spec)
        data = shard_from_payload(
            self.session.fetch_shard(self.server.address, admit), info.num_classes, info.image_size
        )
        log.info("received a shard of %d images from the leader", len(data))
        return data

    def rejoin(self, deadline: float) -> None:
        """Register again; a new slot (another id) has other data, unless the data is this learner's own."""
        previous = self.learner_id
        self.learner_id = self.register(deadline)
        if self.learner_id != previous:
            self.replica.forget_own_controls()
            self.replica.forget_compression("this learner rejoined in another slot")
            if not self.config.dataset:
                self.data = self.hold(self.fetch_shard())

    def round_plan(self) -> TrainingPlan:
        """The replica's plan as this learner follows it: with the leader's local epochs, as many steps as they
        make on its own data; PayloadError when that is more than --max-local-steps allows. States are checked when
        admitted, but on the batch size and data known then (a state pushed before the shard came, or naming
        another batch size than the one this learner trains with, was checked on less): this is the check on what
        the round will really do."""
        batch_size = self.replica.info.batch_size
        self.session.limits.check_plan(self.replica.plan, batch_size)
        return self.replica.plan.for_shard(len(self.data), batch_size)

    def within_budget(self, round_index: int) -> bool:
        """Whether this learner trains the round: only if its plan keeps this learner's privacy floors (floors.py)
        and, under local differential privacy, its own accountant stays within --max-epsilon (whatever the leader
        asks). A round sat out is not tried again; the leader waits for it as for any missing update
        (--round-timeout), and goes on without it."""
        plan = self.round_plan()
        refusal = floors.refusal(self.config, plan) or self.budget.refusal(
            plan, len(self.data), self.replica.info.batch_size
        )
        if refusal is not None:
            if refusal != self.refusal:
                log.warning("round %d: this learner sits the round out: %s", round_index, refusal)
            self.sent_round = round_index
        self.refusal = refusal
        return refusal is None

    def charge(self, round_index: int, plan: TrainingPlan) -> None:
        """Under local differential privacy, charge the round's DP-SGD steps to this learner's own accountant."""
        if plan.dp != "local":
            return
        epsilon = self.budget.charge(plan, len(self.data), self.replica.info.batch_size)
        if round_index % self.config.log_every == 0:
            delta = self.budget.delta
            log.info("round %d: spent epsilon %.3f at delta %.3g (local DP-SGD)", round_index, epsilon, delta)

    def send_update(self, round_index: int, loss: float, plan: TrainingPlan) -> None:
        """Send the round's update (update_request's, made under the shared model's lock; sent after releasing
        it)."""
        with self.replica.shared.lock:
            request = self.update_request(round_index, loss, plan)
        if request is not None:
            self.send_request(round_index, request)

    def update_request(
        self, round_index: int, loss: float, plan: TrainingPlan
    ) -> leader_pb2.GradientData | Unmasked | None:
        """The round's update (the replica's update vector, trained by plan: round_plan's) as it travels, with what
        it claims: samples, loss, kind, steps (in a secure round, Unmasked, masked by send_request); None when the
        learner sits the round out. An update that holds NaN or
        Inf (as it travels) is not sent: only the leader's state, trained on this learner's data, makes one, and the
        leader would refuse it. Reads the shared update vector: the caller holds the shared model's lock, and the
        request holds nothing of the model."""
        replica = self.replica
        replica.check_update_own()  # (send_update is public: whoever calls it must have trained last)
        self.sent_round = round_index
        replica.keep_change()
        # (a secure round's int8/int4 levels are the masked input's own: secagg.Quantisation, unbiased, no residual)
        compressed = plan.compress != "none" and plan.secure is None
        tensors = replica.layout.views(replica.gradient.cpu()) if compressed else replica.update_tensors()
        if not compressed:  # stale residuals must not come back in a later compressed round
            replica.forget_compression("this round's update travels uncompressed")
        if problem := first_problem(tensors.items()):
            log.warning(
                "round %d: this learner's update holds %s (the leader's model gives that on this learner's data); "
                "it sits this round out",
                round_index,
                problem,
            )
            return None
        batch = min(replica.info.batch_size, len(self.data))  # a shard smaller than a batch is one smaller batch
        if plan.dp == "local":  # the loss is no DP-SGD output, and would tell of the data: the leader gets none
            loss = 0.0 if plan.secure is not None else math.nan  # (a secure round sums it: 0, as distributed DP's)
        if plan.secure is not None:  # never a plain update in a secure round
            update = replica.gradient.detach().to("cpu", copy=True)  # (the shared vector changes once unlocked)
            return Unmasked(round_index, update, batch * plan.local_steps, loss, plan)
        claims = messages.UpdateInfo(
            self.learner_id,
            round_index,
            batch * plan.local_steps,
            loss,
            replica.strategy.update_kind,
            plan.local_steps,
            plan.compress if compressed else "none",
        )
        if compressed:  # after the check above: a NaN would stay in the residuals for good
            tensors = replica.compressed(tensors, plan, self.learner_id)
        return leader_pb2.GradientData(chunk=codec.encode(tensors, claims.to_metadata()))

    def send_request(self, round_index: int, request: leader_pb2.GradientData | Unmasked) -> None:
        """Send the round's update request (update_request's; a secure round's masked first, which waits for the
        leader's commit: the caller holds no lock) to the leader; the replica learns whether it took it."""
        if isinstance(request, Unmasked):
            masked = self.masked_input(request)
            if masked is None:
                return
            request = masked
        reply = self.session.send_update(round_index, request, stop=self.server.inbox.has_final)
        if reply is not None and not reply.success:
            log.warning("round %d: the leader ignored the update: %s", round_index, reply.message)
        elif reply is not None:
            self.replica.update_taken(round_index)
            self.updates_sent += 1

    def masked_input(self, unmasked: Unmasked) -> leader_pb2.GradientData | None:
        """A secure round's update: once the leader has committed this learner to the round (waiting at most
        --wait-timeout), the update vector masked, with its samples and loss folded in; in the clear only its
        slot and round. None (it sits the round out) when no commit came in time. Under distributed DP the
        update is clipped to the plan's L2 bound and carries this learner's share of the noise; it weighs as
        much as any other and gives no loss, so that the sum reveals nothing un-noised but the count of its
        learners, which the leader knows anyway (DP-FedAvg's equal weights: the sum's sensitivity is the clip)."""
        round_index, plan = unmasked.round_index, unmasked.plan
        update, samples, loss = unmasked.update, unmasked.samples, unmasked.loss
        secure = typing.cast(SecureRound, plan.secure)
        if not self.server.secure.wait_committed(round_index, self.config.wait_timeout, stop=self.ended):
            if self.ended():
                log.info(
                    "round %d: the run ended (or this learner was stopped) before this learner's secure round was "
                    "committed",
                    round_index,
                )
                return None
            log.warning(
                "round %d: the leader did not commit this learner to the secure round in time; it sits the round "
                "out (a plain update would show the leader its update)",
                round_index,
            )
            return None
        noise: tuple[float, float] | None = None
        if plan.dp == "distributed":
            update, noise = dp.clipped(update, plan.dp_clip), (plan.dp_noise_multiplier, plan.dp_clip)
            samples, loss = int(secure.weight_unit), 0.0
        try:
            masked = self.server.secure.masked_input(
                round_index, update, samples, loss, secure, noise, self.replica.layout.statistics
            )
        except secagg.Refused as refused:  # the unmasking began first, or a quantisation for fewer inputs
            log.warning("round %d: no masked input (%s); this learner sits the round out", round_index, refused)
            return None
        if masked is None:
            log.warning("round %d: the leader started the next secure round; this learner sits it out", round_index)
            return None
        info = messages.MaskedInfo(self.learner_id, round_index)
        return leader_pb2.GradientData(chunk=codec.encode(masked, info.to_metadata()))

    def ended(self) -> bool:
        """Whether there is no point waiting for the leader any more: it sent its final state, or this learner is
        stopped (Pool.stop_learner: as its process would be)."""
        return self.server.inbox.has_final() or self.server.stopped.is_set()

    def report_evaluation(self, state: codec.Payload) -> None:
        """When the state asks for it, evaluate it on the held-out images and tell the leader."""
        asked = messages.plan_from_metadata(state.metadata).evaluate
        if self.held_out is None or not self.replica.normalised or not asked:
            return
        round_index = messages.round_of(state)
        with self.replica.shared.lock:
            result = self.replica.evaluate(self.held_out)
        report = leader_pb2.EvaluationReport(
            learner_id=self.learner_id,
            round=round_index,
            samples=len(self.held_out),
            correct=result.correct,
            loss=result.loss,
        )
        taken = self.session.report_evaluation(report)
        if taken is not None:
            log.info(
                "round %d: held-out loss %.4f, accuracy %.4f on %d images (%s)",
                round_index,
                result.loss,
                result.accuracy,
                len(self.held_out),
                taken,
            )

    def train(self) -> codec.Payload:
        """Rounds until the leader marks a state finished: when the round's plan includes this learner, its
        update (the strategy's local_update), then the next state."""
        replica, inbox = self.replica, self.server.inbox
        batches = Batches(self.data, replica.info.batch_size, replica.info.seed, self.learner_id, replica.device)
        version, compute_seconds, round_seconds, computed_rounds, images = 0, 0.0, 0.0, 0, 0
        pushed = inbox.take(version, timeout=0)  # a state pushed since the one fetched, on joining
        while True:  # every wait inside is bounded (--wait-timeout); the leader's final state ends it
            if pushed is not None:
                version, state = pushed
                if messages.is_final(state):
                    self.evaluate_final(state)
                    return state
                if messages.round_of(state) >= replica.round:  # not older than the state fetched on joining
                    replica.adopt(state, fetched=False)
                    self.report_evaluation(state)
                del state
                pushed = None  # (the replica holds what it keeps of it)
            round_started = time.perf_counter()
            # sampling may leave it out of this round; a state of a round it already sent (pushed again) is no news;
            # nobody trains before a leader without data has settled the normalisation
            if (
                replica.plan.takes_part(self.learner_id)
                and replica.round != self.sent_round
                and replica.normalised
                and self.within_budget(replica.round)
            ):
                plan = self.round_plan()
                # (its state stays in memory from training to the request: a learner training is never spilled)
                with replica.shared.lock, replica.shared.spill.using(replica):  # released before sending
                    computing = time.perf_counter()  # (not the wait for the lock: other learners' compute)
                    loss = replica.local_update(partial(round_batch, batches, replica, plan.local_steps), plan)
                    compute_seconds += time.perf_counter() - computing
                    request = self.update_request(replica.round, loss, plan)
                self.charge(replica.round, plan)
                if request is not None:
                    self.send_request(replica.round, request)
                started = time.perf_counter()  # the next batch does not depend on the new weights
                batches.at((replica.round + 1) * plan.local_steps, replica.mean, replica.std)
                compute_seconds += time.perf_counter() - started
                computed_rounds += 1
                images += replica.info.batch_size * plan.local_steps
            else:  # a learner trains only on a state pushed after this one: a thousand left out would add up
                replica.set_aside()
            # With sampling, a learner gets a state only when it is drawn: it waits as long as the leader counts it in.
            sampled = replica.plan.participants is not None
            awaited = "a round to take part in" if sampled else f"the state of round {replica.round + 1}"
            pushed = self.session.wait_until(partial(self.pushed_after, version), awaited, bounded=not sampled)
            round_seconds += time.perf_counter() - round_started
            if computed_rounds and messages.round_of(pushed[1]) % self.config.log_every == 0:
                log.info(
                    "round %d: loss %.4f, %.0f images/s computing, %.1f ms a round sending and waiting",
                    messages.round_of(pushed[1]),
                    loss,
                    images / compute_seconds,
                    (round_seconds - compute_seconds) / computed_rounds * 1000,
                )
                compute_seconds, round_seconds, computed_rounds, images = 0.0, 0.0, 0, 0

    def pushed_after(self, version: int, timeout: float) -> tuple[int, codec.Payload] | None:
        """The inbox's newest state if newer than version (StateInbox.take); Stopped once this learner is stopped."""
        if self.server.stopped.is_set():
            raise Stopped
        return self.server.inbox.take(version, timeout)

    def started(self, timeout: float) -> bool | None:
        """True once the leader has started this learner; Stopped once this learner is stopped."""
        if self.server.stopped.is_set():
            raise Stopped
        started = self.server.started.wait(timeout)
        if self.server.stopped.is_set():  # (stopping sets started, to wake this wait)
            raise Stopped
        return started or None

    def evaluate_final(self, state: codec.Payload) -> None:
        """The leader's last state, when it asks to be evaluated: take it, evaluate and report."""
        if self.held_out is not None and messages.plan_from_metadata(state.metadata).evaluate:
            self.replica.take_final(state)
            self.report_evaluation(state)

    def train_until_final(self) -> codec.Payload:
        """Train through leader losses until the leader sends its final state; return that state."""
        inbox = self.server.inbox
        while True:  # each pass ends in the final state, or in a reconnect bounded by --connect-timeout
            try:
                self.session.wait_until(self.started, "the start of training")
                return self.train()
            except LeaderLost as lost:
                if inbox.final is not None:  # it said goodbye before it went
                    return inbox.final
                if self.server.stopped.is_set():  # the leader dropped it for being stopped
                    raise Stopped from None
                log.warning("lost the leader (%s); reconnecting for up to %.0f s", lost, self.config.connect_timeout)
                final = self.reconnect()
                if final is not None:
                    return final

    def reconnect(self) -> codec.Payload | None:
        """After losing the leader: wait for it (with backoff), take its current model, register again;
        the leader's final state instead if it has one."""
        lost = time.monotonic()
        deadline = lost + self.config.connect_timeout
        self.server.forget_states()
        self.sent_round = -1  # a resumed leader may go back in rounds
        state = self.session.fetch_model(deadline, stop=self.server.inbox.has_final, since=lost)
        if state is None or messages.is_final(state):
            return state or self.server.inbox.final
        self.replica.adopt(state)
        self.rejoin(deadline)
        log.info("rejoined at round %d", self.replica.round)
        return None


class Learner:
    """The learners of this process (--virtual N; one by default): their own data checked first, then the leader
    reached, its model fetched once and every learner joined as a Member, each trains until the leader's final
    state."""

    def __init__(self, config: LearnerConfig, member_type: Callable[..., Member] = Member) -> None:
        """Raises DatasetError at once when --data-dir does not hold --dataset. member_type makes the Members that
        join (tests/peers/hostile_learner.py's attackers are Members of their own)."""
        self.config, self.member_type = config, member_type
        self.local = own_data(config)  # before any connection: a mistake fails fast
        pacing, first = HealthPacing(config.virtual), None
        self.sessions: list[LeaderSession] = []
        for index in range(config.virtual):
            images = self.local[index].images if self.local else 0
            self.sessions.append(LeaderSession(config, Limits.of(config, images), first, pacing))
            first = first or self.sessions[0]
        self.session = self.sessions[0]
        if config.virtual > 1:
            log.addFilter(POOL_LOG)  # (once however many pools a process makes: tests make several)

    def connect(self) -> Pool | codec.Payload:
        """Take the leader's model (once for all), start serving, register every learner and get its data: the
        pool of Members; the leader's final state instead if training is already over."""
        deadline = time.monotonic() + self.config.connect_timeout
        state = self.session.fetch_model(deadline)
        assert state is not None  # (only a stop condition gives None; there is none before serving)
        if messages.is_final(state):
            return state
        # one model for the process: a learner of its own takes the fetched state's tensors over, a pool's copy it
        device = self.config.device
        budget = None if self.config.state_budget is None else int(self.config.state_budget * MB)
        shared = SharedModel(state, device, budget) if self.config.virtual > 1 else None
        replica = Replica(state, device, shared)
        # --compress-down's states, once for the pool (a learner of its own keeps only its version's)
        book = ReferenceBook() if self.config.virtual > 1 else None
        learners = [
            LearnerServer(self.config, session.security, session.credential, replica.spec, session.limits, book)
            for session in self.sessions
        ]
        self.session.pacing.alarms = [learner.inbox.wake for learner in learners]
        server = PoolServer(self.config, self.session.security, learners, len(state.buffer) + rpc.ENVELOPE_BYTES)
        started = time.monotonic()
        try:
            members = [self.join(0, learners[0], replica, deadline)]  # alone: a mistake fails before the others
            with ThreadPoolExecutor(JOINING_AT_ONCE) as joining:
                joined = lambda index: self.join(index, learners[index], Replica(state, device, shared), deadline)
                members += joining.map(joined, range(1, len(learners)))
        except BaseException:  # not registered, or without its data: nothing will call it
            server.stop(0)
            raise
        if len(members) > 1:
            ids = [member.learner_id for member in members]
            log.info(
                "pool: %d learners registered as %s in %.1f s; LearnerService on %s",
                len(members),
                ranges(ids),
                time.monotonic() - started,
                ports(learner.port for learner in learners),
            )
            if budget is not None:
                log.info("pool: learners' state beyond %g MB (--state-budget) is spilled to disk", budget / MB)
        return Pool(members, server)

    def join(self, index: int, learner: LearnerServer, replica: Replica, deadline: float) -> Member:
        """The index-th learner of this process, registered and holding its data."""
        CURRENT.index = index if self.config.virtual > 1 else None
        try:
            local = self.local[index] if self.local else None
            return self.member_type(self.config, self.sessions[index], learner, replica, local, deadline)
        finally:
            CURRENT.index = None

    def run(self) -> None:
        joined = self.connect()
        if isinstance(joined, Pool):
            try:
                joined.start()
                final = joined.wait()  # (each learner's thread ends: every wait of a learner is bounded)
            finally:
                joined.stop()
            for member in joined.members:
                if spent := member.budget.summary():
                    log.info("%s (local differential privacy)", spent)
        else:
            final = joined
        how = "was stopped" if final.metadata.get("stopped") == "1" else "finished training"
        log.info("the leader %s at round %d", how, messages.round_of(final))
        if isinstance(joined, Pool):
            joined.check_failed()
