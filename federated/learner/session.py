"""The learner's connection to its leader: channel and stubs, the credential, registration, retries with backoff,
streams with idle limits, health checks of its registration, and waiting for the leader's next instruction."""

import hmac
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federated.learner.config import LearnerConfig
from federated.learner.limits import MAX_BUFFER_BYTES, Limits
from federated.net import guard, rpc
from federated.net.rpc import leader_pb2, leader_pb2_grpc
from federated.wire import codec, framing, messages

log = logging.getLogger("learner")
T = TypeVar("T")

WAIT_LOG_INTERVAL_S = 10.0
# A wait that retries says what it waits for once, then how it goes at most this often: logging each retry
# wrote 60 identical lines in the first 5 minutes of a learner started without its leader.
PROGRESS_INTERVAL_S = 30.0
# A leader that answers "busy, retry shortly" (two learners of one address asking for the model at once) is no
# news until it has gone on this long
BUSY_QUIET_S = 5.0
RPC_TIMEOUT_S = 60.0
HEALTH_CHECK_INTERVAL_S = 3.0  # while waiting, how often to ask the leader whether it still counts this learner
# The learners of one process (--virtual N) check on the leader at most this often a second in all: each learner's
# interval grows with N (HealthPacing).
MAX_CHECKS_PER_S = 20.0
FRESH_MODEL_S = 5.0  # a model state one learner of a process fetched this recently serves the others (PoolFetch)
FETCH_TURN_SLICE_S = (
    1.0  # how often a learner waiting for another's fetch of the model looks at its own stop and deadline
)
# Calls from the leader may arrive before this learner has read the reply to its registration: they wait
# this long for it.
REGISTRATION_WAIT_S = 30.0
# The leader asks to be called again later (all slots held, too many calls at once) with these codes.
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# Health checks of the leader answered with these say nothing about this learner's registration: anyone
# can keep the leader's health service busy, and a leader built from the article's protos has none.
INCONCLUSIVE_CODES = (
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)
# A gradient refused with these is this learner's fault (its model or data do not match the leader's).
REFUSED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
# A gradient answered with these means the leader no longer counts this registration: register again.
REJOIN_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.CANCELLED,
)  # (the leader cancels a gradient that takes over --idle-timeout to arrive)


class LeaderLost(Exception):
    """The leader is unreachable or no longer counts this learner: reconnect and register again."""

    def __init__(self, message: str, leader_gone: bool = True) -> None:
        """leader_gone: whether it tells of the leader itself (False: only this learner's registration is gone,
        which says nothing of the other learners of its process)."""
        super().__init__(message)
        self.leader_gone = leader_gone


class LeaderUnreachable(Exception):
    """No model state from the leader within --connect-timeout; the message asks whether it runs where --leader says."""


class GradientRefused(Exception):
    """The leader refused this learner's update as malformed: the learner's model or data do not match it."""


class LeaderCredential:
    """The secret this learner shares with the leader it registered with (AckWithMetadata.credential): a call
    that claims to come from that leader must carry it. Until a registration succeeds, and while one is on
    its way, such calls wait for it."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.in_flight = False  # a registration is on its way
        self._registered = False
        self._known = threading.Event()

    @contextmanager
    def registering(self) -> Iterator[None]:
        """While a registration is on its way, calls from the leader wait for its reply (which may bring a
        new credential); if it fails, an earlier registration's credential stands."""
        self._known.clear()
        self.in_flight = True
        try:
            yield
        finally:
            self.in_flight = False
            if self._registered:
                self._known.set()

    def registered(self, credential: str) -> None:
        """The registration succeeded; an empty credential means a leader built from the article's protos."""
        self.value, self._registered = credential or None, True
        self._known.set()

    def refusal(self, context: grpc.ServicerContext) -> str | None:
        """Why a call that claims to come from the leader must be refused, or None."""
        if not self._known.wait(REGISTRATION_WAIT_S):
            return "this learner is not registered with a leader yet"
        if self.value is None:
            return None
        if not self.matches(rpc.credential_of(context)):
            return "only the leader this learner registered with may call it (its credential is missing or wrong)"
        return None

    def matches(self, given: str | None) -> bool:
        """Whether given is this learner's credential. Nobody matches while it has none: before it registers, or
        with a leader built from the article's protos (which refusal lets call it, as any caller could)."""
        return self.value is not None and hmac.compare_digest((given or "").encode(), self.value.encode())

    def caller(self, headers: guard.Headers) -> str | None:
        """'leader' for a call that carries this credential (its admission turns are the leader's own), else None:
        without a credential to tell the leader apart, its calls take the turns of callers without one."""
        return "leader" if self.matches(headers.get(rpc.CREDENTIAL_HEADER)) else None

    def session(self) -> str:
        """The health-service name of this registration at the leader ('' for a leader without credentials)."""
        return rpc.SESSION_PREFIX + rpc.session_id(self.value) if self.value else ""

    def session_status(self, session: str) -> int | None:
        """This learner's answer to the leader's health check of a registration: SERVING for its own, and
        while a registration is on its way (the leader may ask before its reply is here)."""
        mine = self.value and hmac.compare_digest(session.encode(), rpc.session_id(self.value).encode())
        return health_pb2.HealthCheckResponse.SERVING if mine or self.in_flight else None


class HealthPacing:
    """How often the learners of one process ask the leader whether it still counts them while they wait: each every
    HEALTH_CHECK_INTERVAL_S seconds, or less often with many learners, so that the process makes at most about
    MAX_CHECKS_PER_S checks a second in all; and, once one of them has lost the leader, every other at its next
    tick (a few seconds), so that losing the leader is noticed as soon as by a single learner."""

    def __init__(self, learners: int = 1) -> None:
        self.interval = max(HEALTH_CHECK_INTERVAL_S, learners / MAX_CHECKS_PER_S)
        # how far a check after the first may move from the interval: half of it (a lone learner keeps its beat)
        self.spread = 0.0 if learners == 1 else self.interval / 2
        self.lost_at = -math.inf  # when a learner of this process last lost the leader
        # what wakes each learner's wait for a state (StateInbox.wake): a waiting learner sleeps until its next
        # check, and is woken when another loses the leader
        self.alarms: list[Callable[[], None]] = []

    def first_check(self) -> float:
        """When a wait that begins now checks first: a random point of the interval, so that learners that begin
        waiting together (after one round) spread their checks over it."""
        return time.monotonic() + random.uniform(0.0, self.interval - HEALTH_CHECK_INTERVAL_S) + HEALTH_CHECK_INTERVAL_S

    def next_check(self) -> float:
        """When a learner that checks now checks next: after the interval, give or take half of it (in a pool), so that
        learners woken together to check (one lost the leader) do not stay in step and check in bursts of the whole
        pool."""
        return time.monotonic() + self.interval + random.uniform(-self.spread, self.spread)

    def due(self, last_checked: float, next_check: float) -> bool:
        """Whether a learner that checked last at last_checked must check now."""
        return time.monotonic() >= next_check or self.lost_at > last_checked

    def lost(self) -> None:
        """A learner of this process lost the leader: the others are woken to check now."""
        self.lost_at = time.monotonic()
        for alarm in self.alarms:
            alarm()


class Progress:
    """How a retried wait is logged: once, when it begins, what it waits for and for how long; then how it goes,
    at most every interval seconds."""

    def __init__(
        self,
        waiting_for: str,
        deadline: float,
        flag: str = "",
        interval: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """flag: the option that sets the deadline, named in the first line."""
        self.waiting_for, self.deadline, self.flag, self.interval, self.clock = (
            waiting_for,
            deadline,
            flag,
            interval,
            clock,
        )
        self.started = clock()
        self.logged: float | None = None  # when it last said something

    def failed(self, reason: str, busy: bool = False) -> None:
        """One more attempt failed for reason (busy: the leader answered, asking to retry shortly)."""
        now = self.clock()
        if self.logged is None and busy and now - self.started < BUSY_QUIET_S:
            return
        if self.logged is None:
            limit = f"for up to {self.deadline - now:.0f} s" + (f" ({self.flag})" if self.flag else "")
            log.info("waiting for %s %s: %s", self.waiting_for, limit, reason)
        elif now - self.logged >= self.interval:
            log.info(
                "still waiting for %s (%.0f s so far, %.0f s left): %s",
                self.waiting_for,
                now - self.started,
                max(0.0, self.deadline - now),
                reason,
            )
        else:
            return
        self.logged = now


def never() -> bool:
    return False


def retry_until(
    deadline: float,
    action: Callable[[], T],
    what: str,
    stop: Callable[[], bool] = never,
    codes: tuple[grpc.StatusCode, ...] = RETRY_CODES,
    flag: str = "",
) -> T | None:
    """Run action until it stops failing with one of codes (or a lost stream) or the deadline passes,
    backing off; None as soon as stop() says there is no point any more. The wait is logged as what it
    waits for (Progress), with the flag that sets its deadline."""
    delay, progress = 0.5, Progress(what, deadline, flag)
    while not stop():  # ends by returning, or by raising once the deadline has passed
        try:
            return action()
        except (grpc.RpcError, LeaderLost) as error:
            if (isinstance(error, grpc.RpcError) and error.code() not in codes) or time.monotonic() + delay > deadline:
                raise
            busy = isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            progress.failed(reason_of(error), busy)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    return None


def retried(
    deadline: float,
    action: Callable[[], T],
    what: str,
    codes: tuple[grpc.StatusCode, ...] = RETRY_CODES,
    flag: str = "",
) -> T:
    """retry_until with nothing to stop it: the action's result, or its last error once the deadline has passed."""
    result = retry_until(deadline, action, what, never, codes, flag)
    assert result is not None  # (only stop() ends retry_until without a result)
    return result


def reason_of(error: grpc.RpcError | LeaderLost) -> str:
    return error.details() if isinstance(error, grpc.RpcError) else str(error)


def receive_stream(
    channel: grpc.Channel,
    method: str,
    request,
    idle_timeout: float,
    check_finite: bool = False,
    credential: str | None = None,
    max_bytes: int = MAX_BUFFER_BYTES,
    admit: codec.Admit | None = None,
) -> codec.Payload:
    """The payload a LeaderService method streams in chunks, decoded as they arrive: at most max_bytes, and its
    header shown to admit before it is buffered. There is no limit on the whole transfer (a slow link may take
    long), only on idle time: a stream that delivers nothing for idle_timeout seconds is abandoned with LeaderLost."""
    call = framing.chunk_stream(channel, rpc.LEADER_SERVICE, method)(request, metadata=rpc.with_credential(credential))
    try:
        return codec.receive(guard.idle_bounded(call, idle_timeout, call.cancel), max_bytes, check_finite, admit)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.CANCELLED:  # only the idle watchdog cancels this call
            raise LeaderLost(f"{method}: nothing arrived for {idle_timeout:.0f} s") from None
        raise
    finally:
        call.cancel()  # frees the stream if the payload was refused part way; no-op once it is complete


def fetch_model(
    channel: grpc.Channel,
    idle_timeout: float = guard.IDLE_TIMEOUT_S,
    credential: str | None = None,
    max_bytes: int = MAX_BUFFER_BYTES,
    admit: codec.Admit | None = None,
) -> codec.Payload:
    """The leader's current model state from GetModel, checked finite as it streams in (and by admit first)."""
    return receive_stream(channel, "GetModel", leader_pb2.Empty(), idle_timeout, True, credential, max_bytes, admit)


class PoolFetch:
    """The leader's model as the learners of a process (--virtual N) fetch it: one GetModel at a time, and a state
    fetched in the last FRESH_MODEL_S seconds serves the others, so that N learners reconnecting together (after a
    leader restart) fetch it about once, not N times at once. Their learners never write into a state (they share
    one model: state.py), so one state may serve them all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: codec.Payload | None = None
        self.fetched_at = -math.inf


class LeaderSession:
    """This learner's calls to its leader, each with the credential of its registration: retried while the
    leader asks for patience, bounded by the timeouts of the configuration, and logged."""

    def __init__(
        self,
        config: LearnerConfig,
        limits: Limits,
        pool: "LeaderSession | None" = None,
        pacing: HealthPacing | None = None,
    ) -> None:
        """limits: what this learner takes on for the leader, checked on every state and shard it fetches. pool: the
        session of another learner of this process, whose channels this one shares (a connection per process, not
        per learner) and whose turn to register it waits for; pacing: how often it checks on the leader while
        waiting (shared by the learners of a process)."""
        self.config, self.limits = config, limits
        self.security = rpc.Security.of(config)
        if pool is None:
            self.channel = rpc.channel(config.leader, self.security)
            self.leader = leader_pb2_grpc.LeaderServiceStub(self.channel)
            self.health = health_pb2_grpc.HealthStub(rpc.channel(config.leader, self.security))
            # the leader admits one registration without a credential at a time from a network: more would be
            # refused (RESOURCE_EXHAUSTED) and back off
            self.registration_turn = threading.Lock()
        else:
            self.channel, self.leader, self.health = pool.channel, pool.leader, pool.health
            self.registration_turn = pool.registration_turn
        # (a learner of its own takes a fetched state's tensors over: nobody else may hold them)
        self.fetches: PoolFetch | None = pool.fetches if pool else PoolFetch() if config.virtual > 1 else None
        self.pacing = pacing or HealthPacing()
        self.credential = LeaderCredential()

    def fetch_model(
        self, deadline: float, stop: Callable[[], bool] = never, since: float = -math.inf
    ) -> codec.Payload | None:
        """fetch_own_model's state; in a process of several learners, the one another learner fetched in the last
        FRESH_MODEL_S seconds, and not before since (when this learner lost the leader: an earlier state may be a
        leader's that is gone), checked against this learner's limits too, or fetched while they wait (PoolFetch)."""
        if self.fetches is None:
            return self.fetch_own_model(deadline, stop)
        # Another learner's fetch holds the turn, retrying until its own deadline: this one waits for it in slices,
        # minding its own stop and deadline, and past its deadline tries once on its own.
        while not self.fetches.lock.acquire(timeout=FETCH_TURN_SLICE_S):
            if stop():
                return None
            if time.monotonic() >= deadline:
                return self.fetch_own_model(deadline, stop)
        try:
            state, fetched_at = self.fetches.state, self.fetches.fetched_at
            if state is not None and fetched_at >= since and time.monotonic() - fetched_at < FRESH_MODEL_S:
                self.limits.admit_state(state.metadata, codec.spec_of(state.tensors))
                return state
            state = self.fetch_own_model(deadline, stop)
            if state is not None:
                self.fetches.state, self.fetches.fetched_at = state, time.monotonic()
            return state
        finally:
            self.fetches.lock.release()

    def fetch_own_model(self, deadline: float, stop: Callable[[], bool] = never) -> codec.Payload | None:
        """The leader's current model state, checked against this learner's limits before it is buffered and finite
        as it streams in (retried until the deadline); None if stop() says there is no point any more.
        LeaderUnreachable if the leader never answers (a busy one's last RESOURCE_EXHAUSTED is raised as it is)."""
        fetch = lambda: fetch_model(
            self.channel, self.config.idle_timeout, self.credential.value, self.limits.buffer, self.limits.admit_state
        )
        try:
            return retry_until(deadline, fetch, f"the leader at {self.config.leader}", stop, flag="--connect-timeout")
        except (grpc.RpcError, LeaderLost) as error:
            if isinstance(error, grpc.RpcError) and error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            raise LeaderUnreachable(
                f"no answer from the leader at {self.config.leader} within --connect-timeout "
                f"{self.config.connect_timeout:.0f} s ({reason_of(error)}). Is leader.py running there, and does "
                "--leader give its address? Start it (again, with --resume to continue a stopped run), or give a "
                "longer --connect-timeout."
            ) from None

    def register(
        self, address: str, summary: messages.DataSummary | None, deadline: float
    ) -> leader_pb2.AckWithMetadata:
        """Register (again) with address, where this learner serves (and its credential, to take its own slot
        back), retried until the deadline; the leader's reply, with this learner's id."""
        return retried(
            deadline,
            lambda: self.register_once(address, summary, deadline),
            f"the leader at {self.config.leader} to register this learner",
            flag="--connect-timeout",
        )

    def register_once(
        self, address: str, summary: messages.DataSummary | None, deadline: float = math.inf
    ) -> leader_pb2.AckWithMetadata:
        """One registration, in this process's turn (waited for until the deadline: LeaderLost, retried, if another
        learner's registration holds it so long)."""
        if not self.registration_turn.acquire(timeout=min(max(0.0, deadline - time.monotonic()), RPC_TIMEOUT_S)):
            raise LeaderLost("another learner of this process is still registering (its turn to register)")
        try:
            return self.register_in_turn(address, summary)
        finally:
            self.registration_turn.release()

    def register_in_turn(self, address: str, summary: messages.DataSummary | None) -> leader_pb2.AckWithMetadata:
        with self.credential.registering():
            request = leader_pb2.LearnerInfo(network_addr=address)
            if summary is not None:
                summary.to_proto(request.data)
            reply = self.leader.RegisterLearner(
                request, timeout=RPC_TIMEOUT_S, metadata=rpc.with_credential(self.credential.value)
            )
            if reply.success and not reply.credential and self.config.virtual > 1:
                raise SystemExit(
                    "the leader gives no credentials (a leader built from the article's protos): the learners of "
                    "--virtual N share one server and are told apart only by the credential the leader sends; run "
                    "them as separate processes (--virtual 1)"
                )
            if reply.success:
                self.credential.registered(reply.credential)
        if not reply.success:
            raise SystemExit(f"the leader refused registration: {reply.message}")
        return reply

    def fetch_shard(self, address: str, admit: codec.Admit) -> codec.Payload:
        """The shard of the leader's data that the slot of the learner at address trains on; admit checks its
        header before it is buffered."""
        request = leader_pb2.LearnerDataRequest(network_addr=address)
        fetch = lambda: receive_stream(
            self.channel,
            "GetData",
            request,
            self.config.idle_timeout,
            credential=self.credential.value,
            max_bytes=self.limits.buffer,
            admit=admit,
        )
        return retried(
            time.monotonic() + self.config.connect_timeout,
            fetch,
            f"the leader at {self.config.leader} to send this learner's shard",
            flag="--connect-timeout",
        )

    def send_update(
        self, round_index: int, request: leader_pb2.GradientData, stop: Callable[[], bool]
    ) -> leader_pb2.Ack | None:
        """Send this learner's update of a round; a busy leader (RESOURCE_EXHAUSTED) gets it again until
        --wait-timeout or until stop() says there is no point. LeaderLost when the leader no longer counts this
        registration, GradientRefused when it refuses the update as malformed; None if stopped."""
        send = lambda: self.leader.AccumulateGradients(
            request, timeout=RPC_TIMEOUT_S, metadata=rpc.with_credential(self.credential.value)
        )
        try:
            return retry_until(
                time.monotonic() + self.config.wait_timeout,
                send,
                f"the leader to take the update of round {round_index}",
                stop,
                (grpc.StatusCode.RESOURCE_EXHAUSTED,),
                "--wait-timeout",
            )
        except grpc.RpcError as error:
            if error.code() in REJOIN_CODES:
                raise LeaderLost(f"{error.code().name}: {error.details()}") from None
            if error.code() in REFUSED_CODES:
                raise GradientRefused(
                    f"the leader refused this learner's update for round {round_index}: "
                    f"{error.code().name} {error.details()}"
                ) from None
            raise

    def report_evaluation(self, report: leader_pb2.EvaluationReport) -> str | None:
        """Tell the leader how its model did on held-out images: its reply, or None if it did not take the report
        (best effort: a lost report only leaves this learner out of that round's evaluation)."""
        try:
            return self.leader.ReportEvaluation(
                report, timeout=RPC_TIMEOUT_S, metadata=rpc.with_credential(self.credential.value)
            ).message
        except grpc.RpcError as error:
            log.warning(
                "round %d: the leader did not take this learner's evaluation: %s %s",
                report.round,
                error.code().name,
                error.details(),
            )
            return None

    def check_leader(self) -> None:
        """Raise LeaderLost if the leader does not answer, or no longer counts this learner's registration."""
        request = health_pb2.HealthCheckRequest(service=self.credential.session())
        try:
            reply = self.health.Check(
                request, timeout=HEALTH_CHECK_INTERVAL_S, metadata=rpc.with_credential(self.credential.value)
            )
        except grpc.RpcError as error:
            if error.code() in INCONCLUSIVE_CODES:  # busy, slow, or without the health service: it answers
                return
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise LeaderLost("the leader no longer knows this learner's registration", leader_gone=False) from None
            raise LeaderLost(f"health check: {error.code().name}") from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise LeaderLost("the leader dropped this learner", leader_gone=False)

    def wait_until(self, ready: Callable[[float], T | None], what: str, bounded: bool = True) -> T:
        """ready(timeout) until it gives something, checking on the leader as its pacing says (ready sleeps until
        the next check, unless woken: HealthPacing.alarms); raises LeaderLost, or SystemExit after --wait-timeout
        (unless not bounded: a learner left out of rounds by sampling waits for as long as the leader says it still
        counts on it)."""
        started, last_log = time.monotonic(), 0.0
        checked, next_check = started, self.pacing.first_check()
        deadline = started + self.config.wait_timeout if bounded else math.inf
        while (result := ready(max(0.0, min(next_check, deadline) - time.monotonic()))) is None:
            if self.pacing.due(checked, next_check):
                checked, next_check = time.monotonic(), self.pacing.next_check()
                try:
                    self.check_leader()
                except LeaderLost as lost:
                    if lost.leader_gone:  # (the leader dropping this learner alone is routine: no alarm)
                        self.pacing.lost()
                    raise
            waited = time.monotonic() - started
            if bounded and waited >= self.config.wait_timeout:
                raise SystemExit(f"no {what} from the leader within --wait-timeout {self.config.wait_timeout:.0f} s")
            if waited - last_log >= WAIT_LOG_INTERVAL_S:
                last_log = waited
                log.info("waiting for %s", what)
        return result
