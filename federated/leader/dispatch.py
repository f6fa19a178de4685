"""The leader's calls to its learners, each with the learner's credential: one RPC to many at once, and
health checks of their registrations, which tell the leader who is still there."""

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federated.leader.registry import Member
from federated.net import rpc
from federated.net.rpc import learner_pb2
from federated.wire import framing

log = logging.getLogger("leader")

MAX_IN_FLIGHT = 8  # concurrent pushes of a model state: bounds the leader's memory with many learners
PROBE_INTERVAL_S = 2.0  # how often a learner the round waits for is asked whether it is still there
PROBE_TIMEOUT_S = 2.0

# What a failed call or health check says of a learner: see probe_verdict.
THERE, GONE, UNREACHABLE, SILENT = "there", "gone", "unreachable", "silent"
OnFailure = Callable[[Member, str, str], None]  # (the registration, why, the verdict)
Reply = TypeVar("Reply")


@dataclass
class _Probe:
    generation: int
    in_flight: bool = False
    last: float = 0.0
    silent_since: float | None = None
    unreachable: bool = False  # the last check found nothing answering at its address


class LearnerClient:
    """The leader's calls to learners, each with the learner's credential: one RPC on many at once without
    waiting on the slow ones, and health checks of their registrations; one channel per address, kept while the
    round loop says its learner is in play (keep_only) or a call on it is in flight."""

    def __init__(self, security: rpc.Security) -> None:
        self.security = security
        self._channels: dict[str, grpc.Channel] = {}
        # calls in flight by address: keep_only leaves their channels open (closing one would cancel them)
        self._calls: Counter[str] = Counter()
        self._probes: dict[int, _Probe] = {}
        self._lock = threading.Lock()

    def _dial(self, address: str) -> grpc.Channel:
        """The channel to address, with one more call in flight on it until _hang_up(address)."""
        with self._lock:
            if address not in self._channels:
                self._channels[address] = rpc.channel(address, self.security)
            self._calls[address] += 1
            return self._channels[address]

    def _hang_up(self, address: str) -> None:
        """A call to address that _dial counted ended."""
        with self._lock:
            self._calls[address] -= 1
            if not self._calls[address]:
                del self._calls[address]

    def forget(self, addresses: set[str]) -> None:
        """Close the channels to these addresses: the next call dials afresh."""
        with self._lock:
            for address in addresses & set(self._channels):
                self._channels.pop(address).close()

    def keep_only(self, addresses: set[str]) -> None:
        """Close the channels to other addresses (no learner in play holds them) once no call is in flight on them:
        with 1,000 registered and a few drawn a round, the leader keeps a socket (a file descriptor) to those drawn,
        not to every learner."""
        with self._lock:
            for address in set(self._channels) - addresses - self._calls.keys():
                self._channels.pop(address).close()

    def send(
        self,
        members: dict[int, Member],
        method: str,
        request: object,
        on_failure: OnFailure,
        timeout: float,
        then: Callable[[Member], None] = lambda member: None,
        succeeded: Callable[[Member], None] = lambda member: None,
    ) -> "Broadcast":
        """Call <method>(request) on every member without waiting: MAX_IN_FLIGHT at a time (gRPC holds a copy
        of each call's request until it is sent), the next starting as one ends. request may be ready-serialised
        bytes, serialised once for all, or a mapping of each member's learner id to its own. on_failure runs for
        each call that fails, then for each that succeeds (or, for a model state, finds the learner still busy with
        earlier ones), succeeded (before then) only for each that succeeds."""
        broadcast = Broadcast(list(members.values()))

        def launch() -> None:
            member = broadcast.next()
            if member is None:
                return
            stub = framing.unary_call(self._dial(member.address), rpc.LEARNER_SERVICE, method, learner_pb2.Ack)
            body = request[member.learner_id] if isinstance(request, Mapping) else request
            call = stub.future(body, timeout=timeout, metadata=rpc.with_credential(member.credential))
            call.add_done_callback(partial(ended, member=member))

        def ended(call: grpc.Future, member: Member) -> None:
            broadcast.ended(self._report(call, member, method, on_failure, then, succeeded))
            self._hang_up(member.address)  # (after then: a call it starts on the channel keeps it open)
            launch()

        for _ in range(MAX_IN_FLIGHT):
            launch()
        return broadcast

    def ask(
        self,
        members: dict[int, Member],
        method: str,
        requests: Mapping[int, object],
        reply_type: type[Reply],
        timeout: float,
    ) -> dict[int, Reply | grpc.RpcError]:
        """Call <method> on every member at once, each with its own request, and wait for them all (at most
        timeout: every call has it as its deadline): each member's reply, or the grpc.RpcError its call ended in."""
        calls = {
            learner: framing.unary_call(self._dial(member.address), rpc.LEARNER_SERVICE, method, reply_type).future(
                requests[learner], timeout=timeout, metadata=rpc.with_credential(member.credential)
            )
            for learner, member in members.items()
        }
        replies: dict[int, Reply | grpc.RpcError] = {}
        for learner, call in calls.items():
            try:
                replies[learner] = call.result()  # bounded: every call carries the deadline timeout
                self.heard_from(members[learner])
            except grpc.RpcError as error:
                replies[learner] = error
            finally:
                self._hang_up(members[learner].address)
        return replies

    def start(
        self,
        members: dict[int, Member],
        state: bytes | None,
        on_started: Callable[[Member], None],
        on_failure: OnFailure,
        timeout: float,
        took_state: Callable[[Member], None] = lambda member: None,
    ) -> None:
        """Send each member the current state (a serialised ModelState, if any), then StartTraining, without
        waiting; took_state runs for each one that accepted the state, on_started for each that accepted both."""

        def start_training(member: Member) -> None:
            self.send(
                {member.learner_id: member}, "StartTraining", learner_pb2.Empty(), on_failure, timeout, on_started
            )

        # A fresh dial for each start: a channel that failed before answers at once with its old error until its
        # reconnect backoff (up to 120 s) runs out, which would make a learner now listening there look unreachable.
        self.forget({member.address for member in members.values()})
        if state is None:
            for member in members.values():
                start_training(member)
        else:
            self.send(members, "SyncModelState", state, on_failure, timeout, start_training, took_state)

    def heard_from(self, member: Member) -> None:
        """The learner answered (a gradient, an accepted push): whatever its health checks said, it is there."""
        with self._lock:
            probe = self._probes.get(member.learner_id)
            if probe is not None and probe.generation == member.generation:
                probe.silent_since = None

    def _report(
        self,
        call: grpc.Future,
        member: Member,
        method: str,
        on_failure: OnFailure,
        then: Callable[[Member], None],
        succeeded: Callable[[Member], None],
    ) -> bool:
        """Act on a finished call; whether it succeeded. A failure makes the learner gone only when another
        process answers at its address (PERMISSION_DENIED: not our credential); nothing answering
        (UNAVAILABLE: refused, no route, no handshake) is unreachable: for a learner the leader has reached
        there before, a passing fault that health checks then tell apart; for one it never reached there (its
        start, dialled afresh), an address it cannot dial."""
        error = call.exception()
        if error is not None and method == "SyncModelState" and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            log.debug("learner %d is still taking earlier states; it will take a later one", member.learner_id)
            then(member)
        elif error is not None:
            verdict = {grpc.StatusCode.PERMISSION_DENIED: GONE, grpc.StatusCode.UNAVAILABLE: UNREACHABLE}.get(
                error.code(), SILENT
            )
            on_failure(member, f"{method} failed: {error.code().name} {error.details()}", verdict)
        elif not (reply := call.result(timeout=0)).success:  # done: the callback runs after completion
            on_failure(member, f"{method} refused: {reply.message}", THERE)
        else:
            self.heard_from(member)
            succeeded(member)
            then(member)
            return True
        return False

    def probe(self, members: dict[int, Member], on_failure: OnFailure, silent_limit_s: float) -> None:
        """Ask each member's health service whether its registration is there (with its credential), at most every
        PROBE_INTERVAL_S seconds each, without waiting. on_failure runs for a member found gone, or silent for
        silent_limit_s."""
        now = time.monotonic()
        for member in members.values():
            with self._lock:
                probe = self._probes.get(member.learner_id)
                if probe is None or probe.generation != member.generation:
                    probe = self._probes[member.learner_id] = _Probe(member.generation)
                if probe.in_flight or now - probe.last < PROBE_INTERVAL_S:
                    continue
                probe.in_flight, probe.last = True, now
            stub = health_pb2_grpc.HealthStub(self._dial(member.address))
            request = health_pb2.HealthCheckRequest(service=rpc.SESSION_PREFIX + rpc.session_id(member.credential))
            # with its credential, as every call to a learner: the check takes the learner's own turns, not those of
            # callers without one, which strangers may hold (and a busy answer reads as "there")
            call = stub.Check.future(request, timeout=PROBE_TIMEOUT_S, metadata=rpc.with_credential(member.credential))
            call.add_done_callback(
                lambda done, member=member, probe=probe: self._judge(done, member, probe, on_failure, silent_limit_s)
            )

    def _judge(
        self, call: grpc.Future, member: Member, probe: _Probe, on_failure: OnFailure, silent_limit_s: float
    ) -> None:
        verdict, reason = probe_verdict(call)
        self._hang_up(member.address)
        with self._lock:
            probe.in_flight = False
            unreachable_before, probe.unreachable = probe.unreachable, verdict == UNREACHABLE
            if verdict == THERE:
                probe.silent_since = None
                return
            if verdict == UNREACHABLE and unreachable_before:  # twice in a row, PROBE_INTERVAL_S apart
                verdict = GONE
            elif verdict in (SILENT, UNREACHABLE):
                probe.silent_since = probe.silent_since or probe.last
                silent = time.monotonic() - probe.silent_since
                if silent < silent_limit_s:
                    return
                reason = f"no answer to health checks for {silent:.0f} s ({reason})"
        on_failure(member, reason, verdict)


def probe_verdict(call: grpc.Future) -> tuple[str, str]:
    """What a health check of a registration says, and why: THERE; GONE (another process at its address, or
    one that knows the registration no longer); UNREACHABLE (nothing answers there: a learner that died,
    or a passing network fault); or SILENT (no answer in time). A busy learner (RESOURCE_EXHAUSTED) and one
    whose health service knows no sessions (a peer of the article's protos) are there: something answered."""
    error = call.exception()
    if error is None:
        if call.result(timeout=0).status == health_pb2.HealthCheckResponse.SERVING:  # (done: called back after it)
            return THERE, "serving"
        return GONE, "its health service says it no longer holds this registration"
    code = error.code()
    if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED) or (
        code == grpc.StatusCode.NOT_FOUND and not rpc.knows_sessions(error)
    ):
        return THERE, code.name
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
        return GONE, f"health check: {code.name} {error.details()}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return UNREACHABLE, f"health check: {code.name} {error.details()}"
    return SILENT, code.name


class Broadcast:
    """The calls of one LearnerClient.send: which members are still to be called, and how many calls ended."""

    def __init__(self, members: list[Member]) -> None:
        self._pending, self.total, self._open, self.succeeded = list(reversed(members)), len(members), len(members), 0
        self._lock, self._done = threading.Lock(), threading.Event()
        if not members:
            self._done.set()

    def next(self) -> Member | None:
        with self._lock:
            return self._pending.pop() if self._pending else None

    def ended(self, succeeded: bool) -> None:
        with self._lock:
            self._open -= 1
            self.succeeded += succeeded
            if not self._open:
                self._done.set()

    def wait(self, timeout: float) -> bool:
        """Whether every call ended (succeeded or not) within timeout seconds."""
        return self._done.wait(timeout)

    def all_succeeded(self) -> bool:
        with self._lock:
            return self.succeeded == self.total
