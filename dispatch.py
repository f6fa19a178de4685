"""The leader's calls to its learners, each with the learner's credential: one RPC to many at once, and
health checks of their registrations, which tell the leader who is still there."""

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import framing
import rpc
from rounds import Member
from rpc import learner_pb2

log = logging.getLogger("leader")

MAX_IN_FLIGHT = 8  # concurrent pushes of a model state: bounds the leader's memory with many learners
PROBE_INTERVAL_S = 2.0  # how often a learner the round waits for is asked whether it is still there
PROBE_TIMEOUT_S = 2.0

# How the leader reads a failed call to a learner: the process at its address is not (or no longer) the
# learner that registered, or nothing answers there.
GONE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED}

OnFailure = Callable[[Member, str, bool], None]  # (the registration, why, whether it is certainly gone)


@dataclass
class _Probe:
    generation: int
    in_flight: bool = False
    last: float = 0.0
    silent_since: float | None = None


class LearnerClient:
    """The leader's calls to learners, each with the learner's credential: one RPC on many at once without
    waiting on the slow ones, and health checks of their registrations; one channel per address."""

    def __init__(self, security: rpc.Security) -> None:
        self.security = security
        self._channels: dict[str, grpc.Channel] = {}
        self._probes: dict[int, _Probe] = {}
        self._lock = threading.Lock()

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = rpc.channel(address, self.security)
            return self._channels[address]

    def keep_only(self, addresses: set[str]) -> None:
        """Close the channels to addresses no learner holds any more."""
        with self._lock:
            for address in set(self._channels) - addresses:
                self._channels.pop(address).close()

    def send(self, members: dict[int, Member], method: str, request: object, on_failure: OnFailure,
             timeout: float, then: Callable[[Member], None] = lambda member: None) -> list[grpc.Future]:
        """Start <method>(request) on every member, at most MAX_IN_FLIGHT at a time (gRPC holds a copy of
        each call's request until it is sent), waiting at most timeout in all for slots; request may be
        ready-serialised bytes, serialised once for all. on_failure runs for each call that fails, then
        for each that succeeds (or, for a model state, finds the learner still busy with earlier ones)."""
        slots, calls, deadline = threading.Semaphore(MAX_IN_FLIGHT), [], time.monotonic() + timeout
        for member in members.values():
            # Past the deadline, send without a slot: slow learners cannot stall the loop.
            release = slots.release if slots.acquire(timeout=max(0.0, deadline - time.monotonic())) else (lambda: None)
            stub = framing.unary_call(self.channel(member.address), rpc.LEARNER_SERVICE, method, learner_pb2.Ack)
            call = stub.future(request, timeout=timeout, metadata=rpc.with_credential(member.credential))
            call.add_done_callback(lambda done, member=member, release=release:
                                   (release(), self._report(done, member, method, on_failure, then)))
            calls.append(call)
        return calls

    def start(self, members: dict[int, Member], state: bytes | None, on_started: Callable[[Member], None],
              on_failure: OnFailure, timeout: float) -> None:
        """Send each member the current state (a serialised ModelState, if any), then StartTraining, without
        waiting; on_started runs for each one that accepted."""
        start_training = lambda member: self.send({member.learner_id: member}, "StartTraining", learner_pb2.Empty(),
                                                  on_failure, timeout, on_started)
        if state is None:
            for member in members.values():
                start_training(member)
        else:
            self.send(members, "SyncModelState", state, on_failure, timeout, start_training)

    def heard_from(self, member: Member) -> None:
        """The learner answered (a gradient, an accepted push): whatever its health checks said, it is there."""
        with self._lock:
            probe = self._probes.get(member.learner_id)
            if probe is not None and probe.generation == member.generation:
                probe.silent_since = None

    def _report(self, call: grpc.Future, member: Member, method: str, on_failure: OnFailure,
                then: Callable[[Member], None]) -> None:
        error = call.exception()
        if error is not None and method == "SyncModelState" and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            log.debug("learner %d is still taking earlier states; it will take a later one", member.learner_id)
            then(member)
        elif error is not None:
            on_failure(member, f"{method} failed: {error.code().name} {error.details()}", error.code() in GONE_CODES)
        elif not (reply := call.result(timeout=0)).success:  # done: the callback runs after completion
            on_failure(member, f"{method} refused: {reply.message}", False)
        else:
            self.heard_from(member)
            then(member)

    def probe(self, members: dict[int, Member], on_failure: OnFailure, silent_limit_s: float) -> None:
        """Ask each member's health service whether its registration is there, at most every PROBE_INTERVAL_S
        seconds each, without waiting. on_failure runs for a member found gone, or silent for silent_limit_s."""
        now = time.monotonic()
        for member in members.values():
            with self._lock:
                probe = self._probes.get(member.learner_id)
                if probe is None or probe.generation != member.generation:
                    probe = self._probes[member.learner_id] = _Probe(member.generation)
                if probe.in_flight or now - probe.last < PROBE_INTERVAL_S:
                    continue
                probe.in_flight, probe.last = True, now
            stub = health_pb2_grpc.HealthStub(self.channel(member.address))
            request = health_pb2.HealthCheckRequest(service=rpc.SESSION_PREFIX + rpc.session_id(member.credential))
            call = stub.Check.future(request, timeout=PROBE_TIMEOUT_S)
            call.add_done_callback(lambda done, member=member, probe=probe:
                                   self._judge(done, member, probe, on_failure, silent_limit_s))

    def _judge(self, call: grpc.Future, member: Member, probe: _Probe, on_failure: OnFailure,
               silent_limit_s: float) -> None:
        verdict, reason = probe_verdict(call)
        with self._lock:
            probe.in_flight = False
            if verdict == THERE:
                probe.silent_since = None
                return
            if verdict == SILENT:
                probe.silent_since = probe.silent_since or probe.last
                silent = time.monotonic() - probe.silent_since
                if silent < silent_limit_s:
                    return
                reason = f"no answer to health checks for {silent:.0f} s ({reason})"
        on_failure(member, reason, verdict == GONE)


THERE, GONE, SILENT = "there", "gone", "silent"


def probe_verdict(call: grpc.Future) -> tuple[str, str]:
    """What a health check of a registration says (THERE, GONE or SILENT), and why. A busy learner
    (RESOURCE_EXHAUSTED) and one whose health service knows no sessions (a peer built from the article's
    protos) are there: something answered for them."""
    error = call.exception()
    if error is None:
        if call.result().status == health_pb2.HealthCheckResponse.SERVING:
            return THERE, "serving"
        return GONE, "its health service says it no longer holds this registration"
    code = error.code()
    if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED) or (
            code == grpc.StatusCode.NOT_FOUND and not rpc.knows_sessions(error)):
        return THERE, code.name
    if code in GONE_CODES:
        return GONE, f"health check: {code.name} {error.details()}"
    return SILENT, code.name


def wait_calls(calls: list[grpc.Future], timeout: float) -> None:
    """Wait until the calls are done or timeout seconds have passed."""
    deadline = time.monotonic() + timeout
    for call in calls:
        try:
            call.exception(timeout=max(0.0, deadline - time.monotonic()))
        except (grpc.FutureTimeoutError, grpc.FutureCancelledError):
            return
