"""One gRPC server for the learners of a process (--virtual N): listening on N ports, each call handed to the learner
whose credential it carries, and each health check to the learner whose registration it names.

A learner's credential is the leader's proof that it is the learner's leader (LeaderCredential); with many learners
behind one server it also says which of them a call is for, so that the leader calls each one exactly as it would
call a process of its own. A pool of one hands every call to its only learner, whose servicer checks it as a
learner's always did."""

import collections
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health_pb2

from federated.learner.config import LearnerConfig
from federated.learner.pool import CURRENT
from federated.learner.servicer import ADD_LEARNER_SERVICE, LearnerServer, LearnerServicer, method_limits
from federated.learner.session import REGISTRATION_WAIT_S
from federated.net import guard, rpc
from federated.net.rpc import learner_pb2, learner_pb2_grpc
from federated.wire import framing

RETIRED_PER_LEARNER = 4  # left registrations remembered, per learner of the process
REGISTERING_POLL_S = 0.02  # how often a call waits again for a registration on its way to bring its credential
NOT_OURS = "only the leader this learner registered with may call it (its credential is missing or wrong)"


class Directory:
    """The learners of a process by the session id of their credential (rpc.session_id: a hash, so that looking a
    secret up reveals nothing of it), refreshed from their credentials when a lookup misses."""

    def __init__(self, learners: list[LearnerServer]) -> None:
        self.learners = learners
        self._by_session: dict[str, LearnerServer] = {}
        self._known: list[str | None] = [None] * len(learners)  # each learner's credential as last indexed
        # the session ids of registrations its learners left (rejoined in another slot), the latest few per learner:
        # their health checks get no answer, never the SERVING a registration on its way gets
        self._retired: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def holder(self, session: str) -> LearnerServer | None:
        """The learner whose current registration has this session id."""
        with self._lock:
            found = self._by_session.get(session)
            if found is None or not self._current(found, session):
                self._refresh()
                found = self._by_session.get(session)
            return found

    def _current(self, learner: LearnerServer, session: str) -> bool:
        value = learner.credential.value
        return value is not None and rpc.session_id(value) == session

    def _refresh(self) -> None:
        """Index the credentials that changed since the last refresh (registrations, rejoins)."""
        for index, learner in enumerate(self.learners):
            value = learner.credential.value
            if value == self._known[index]:
                continue
            if self._known[index] is not None:
                retired = rpc.session_id(self._known[index] or "")
                self._by_session.pop(retired, None)
                self._retired[retired] = None
                while len(self._retired) > RETIRED_PER_LEARNER * len(self.learners):
                    self._retired.popitem(last=False)
            if value is not None:
                self._by_session[rpc.session_id(value)] = learner
            self._known[index] = value

    def retired(self, session: str) -> bool:
        """Whether session is a registration one of these learners left (checked after a lookup missed)."""
        with self._lock:
            return session in self._retired

    def registering(self) -> bool:
        """Whether a registration of one of them is on its way (the leader may call it before its reply is here)."""
        return any(learner.credential.in_flight for learner in self.learners)

    def find(self, credential: str | None, wait: bool) -> LearnerServer | None:
        """The learner that holds credential; with wait, while registrations are on their way (at most
        REGISTRATION_WAIT_S), the one whose registration brings it."""
        if not credential:
            return None
        session, deadline = rpc.session_id(credential), time.monotonic() + REGISTRATION_WAIT_S
        while True:  # ends when found, or when no registration is on its way, or at the deadline
            learner = self.holder(session)
            if learner is not None and learner.credential.matches(credential):
                return learner
            if not (wait and self.registering()) or self.retired(session) or time.monotonic() > deadline:
                return None
            time.sleep(REGISTERING_POLL_S)


class Dispatcher(learner_pb2_grpc.LearnerServiceServicer):
    """The LearnerService of a process: each call served by its learner's LearnerServicer."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    def called(self, context: grpc.ServicerContext) -> LearnerServer:
        """The learner a call is for; the call ends PERMISSION_DENIED when it is none of them (no credential, or
        another's), UNAVAILABLE when that learner is stopped (as nothing answers at a stopped process's port)."""
        learners = self.directory.learners
        if len(learners) == 1:
            learner: LearnerServer | None = learners[0]
        else:
            learner = self.directory.find(rpc.credential_of(context), wait=True)
        if learner is None:
            rpc.abort(context, grpc.StatusCode.PERMISSION_DENIED, NOT_OURS)
        if learner.stopped.is_set():
            rpc.abort(context, grpc.StatusCode.UNAVAILABLE, "this learner is stopped")
        return learner

    @contextmanager
    def serving(self, context: grpc.ServicerContext) -> Iterator[LearnerServicer]:
        """The servicer of the learner a call is for; what it logs meanwhile names that learner (pool.PoolLog)."""
        learner = self.called(context)
        CURRENT.index = learner.index if len(self.directory.learners) > 1 else None
        try:
            yield learner.servicer
        finally:
            CURRENT.index = None

    def StartTraining(self, request: learner_pb2.Empty, context: grpc.ServicerContext) -> learner_pb2.Ack:
        with self.serving(context) as servicer:
            return servicer.StartTraining(request, context)

    def SyncModelState(self, request: framing.ChunkRequest, context: grpc.ServicerContext) -> learner_pb2.Ack:
        with self.serving(context) as servicer:
            return servicer.SyncModelState(request, context)

    def SecureAggregation(
        self, request: learner_pb2.SecAggRequest, context: grpc.ServicerContext
    ) -> learner_pb2.SecAggReply:
        with self.serving(context) as servicer:
            return servicer.SecureAggregation(request, context)


class PoolServer:
    """The server of a process's learners, serving from construction: learner i listens on --port + i (any free
    port with --port 0) and is reached at advertised(config, i, its port)."""

    def __init__(
        self, config: LearnerConfig, security: rpc.Security, learners: list[LearnerServer], max_message_bytes: int
    ) -> None:
        """max_message_bytes: the largest call it takes. Raises rpc.ListenError when a port cannot be had."""
        self.directory = Directory(learners)
        binds = [f"{config.host}:{config.port + index if config.port else 0}" for index in range(len(learners))]
        self.server, ports = rpc.start_server_on(
            binds,
            [(ADD_LEARNER_SERVICE, Dispatcher(self.directory))],
            [rpc.LEARNER_SERVICE],
            max_message_bytes,
            security,
            method_limits(config.idle_timeout),
            config.idle_timeout,
            self.session_status,
            self.caller,
            len(learners),  # (a server thread for each of their turns: rpc.start_server_on)
        )
        for index, (learner, port) in enumerate(zip(learners, ports, strict=True)):
            learner.listen(config, index, port)

    def session_status(self, session: str) -> int | None:
        """The answer to the leader's health check of a registration: its learner's (none for a stopped one), and
        SERVING while a registration is on its way (the leader may ask before its reply is here)."""
        learners = self.directory.learners
        learner = learners[0] if len(learners) == 1 else self.directory.holder(session)
        if learner is not None:
            return None if learner.stopped.is_set() else learner.credential.session_status(session)
        if self.directory.retired(session):  # a registration left: gone, whatever registers meanwhile
            return None
        return health_pb2.HealthCheckResponse.SERVING if self.directory.registering() else None

    def caller(self, headers: guard.Headers) -> str | None:
        """Whom a call with the credential of one of these learners counts as, for its turns (guard.Gate): that
        learner's leader, 'leader of #i', with the turns a learner of its own gives its leader: strangers cannot
        take them, and the leader's calls to one learner (a slow push) cannot take another's."""
        found = self.directory.find(headers.get(rpc.CREDENTIAL_HEADER), wait=False)
        return f"leader of #{found.index}" if found is not None else None

    def stop(self, grace: float = 2) -> None:
        self.server.stop(grace).wait(grace + 3)
