"""The LearnerService a learner serves to its leader: the inbox of pushed model states, the servicer that checks
who calls and what it pushes, its admission limits, and the server with the address the leader dials."""

import dataclasses
import logging
import socket
import threading

import grpc

from federated.core import compression
from federated.core.checks import TensorSpec
from federated.core.compression.delta import delta_spec
from federated.core.plan import MAX_COMPRESS_RANK, MAX_LEARNERS
from federated.learner.config import LearnerConfig
from federated.learner.limits import Limits
from federated.learner.reference import ReferenceBook, StateReference
from federated.learner.secure import SecureParty
from federated.learner.session import LeaderCredential
from federated.net import guard, rpc
from federated.net.rpc import learner_pb2, learner_pb2_grpc
from federated.privacy import secagg
from federated.wire import codec, framing, messages

log = logging.getLogger("learner")

# What a model state's metadata may take: a few short facts, and a round's participants (up to MAX_LEARNERS ids,
# each with its comma).
STATE_METADATA_BYTES = codec.HEADER_SLACK_BYTES + MAX_LEARNERS * len(f"{MAX_LEARNERS - 1},")

# A pushed model state reaches SyncModelState as a framing.ChunkRequest (no protobuf copies of it).
ADD_LEARNER_SERVICE = framing.without_protobuf_copies(
    learner_pb2_grpc.add_LearnerServiceServicer_to_server, requests={"SyncModelState"}
)


def default_advertise(leader: str, port: int) -> str:
    """127.0.0.1 for a leader on this machine, else the local address of the route to the leader."""
    host = leader.rsplit(":", 1)[0].strip("[]")
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return f"127.0.0.1:{port}"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP connect sends nothing; it only picks the outgoing interface
            return f"{probe.getsockname()[0]}:{port}"
    except OSError:
        return f"{socket.gethostname()}:{port}"


class StateInbox:
    """The newest model state pushed by the leader, handed from the gRPC thread to the training thread.

    Each accepted state gets the next version number; a state older than the newest is dropped (pushes may
    overtake each other). A final state (the leader finished or was stopped) wins over any other, and stays; any
    other is forgotten once taken (the learner holds it then: the inbox keeps no second reference)."""

    def __init__(self) -> None:
        self._payload: codec.Payload | None = None
        self._round, self._version = -1, 0
        self.final: codec.Payload | None = None
        self._changed = threading.Condition()
        self._wakes = 0  # wake() calls: a waiting take returns at the next one, to look at what else changed

    def put(self, round_index: int, payload: codec.Payload) -> None:
        with self._changed:
            if messages.is_final(payload):
                self.final = payload
            elif round_index >= self._round:  # the same round again: a plan made after the state was first served
                self._round, self._payload = round_index, payload
            else:
                return
            self._version += 1
            self._changed.notify_all()

    def clear(self) -> None:
        """Forget states from a previous leader session (a resumed leader goes back in rounds)."""
        with self._changed:
            self._round, self._version, self._payload, self.final = -1, 0, None, None

    def take(self, after_version: int, timeout: float) -> tuple[int, codec.Payload] | None:
        """The final state, or the newest state if its version is after after_version and it was not taken yet,
        with its version; waits at most timeout seconds."""
        with self._changed:
            wakes = self._wakes
            news = lambda: self.final is not None or (self._payload is not None and self._version > after_version)
            if not self._changed.wait_for(lambda: news() or self._wakes != wakes, timeout) or not news():
                return None
            payload = self.final or self._payload
            assert payload is not None
            self._payload = None
            return self._version, payload

    def wake(self) -> None:
        """End a take that waits (it gives None): something else its learner waits on changed (it was stopped,
        another learner of its process lost the leader)."""
        with self._changed:
            self._wakes += 1
            self._changed.notify_all()

    def has_final(self) -> bool:
        """Whether the leader said goodbye: training finished or was stopped."""
        return self.final is not None


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    """Checks that calls come from this learner's leader and what it pushes, and hands it to the training thread."""

    def __init__(
        self,
        state_spec: TensorSpec,
        inbox: StateInbox,
        started: threading.Event,
        credential: LeaderCredential,
        leader_name: str | None,
        limits: Limits,
        secure: SecureParty | None = None,
        book: ReferenceBook | None = None,
    ) -> None:
        """limits: what this learner takes on; a pushed state whose plan asks for more is refused. secure: its side
        of secure aggregation (a fresh one if not given). book: --compress-down's states, shared by the learners of
        a process (one of its own if not given)."""
        self.state_spec, self.inbox, self.started = state_spec, inbox, started
        self.secure = secure or SecureParty()
        self.credential, self.leader_name, self.limits = credential, leader_name, limits
        # A state's header names the model's tensors (or a delta's entries), its facts and the round's
        # participants: a longer one is refused unparsed (STATE_METADATA_BYTES).
        self.state_header_bytes = max(
            codec.header_limit(spec, STATE_METADATA_BYTES) for spec in [state_spec, *largest_deltas(state_spec)]
        )
        self.reference = StateReference(book)  # --compress-down's: what the leader's deltas apply to

    def check_caller(self, context: grpc.ServicerContext) -> None:
        """Only the leader may start training or overwrite the model: under mutual TLS its certificate,
        and always the credential it gave this learner at registration."""
        if self.leader_name and rpc.peer_common_name(context) != self.leader_name:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"only the leader (certificate CN {self.leader_name!r}) may call this learner",
            )
        refusal = self.credential.refusal(context)
        if refusal:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)

    def StartTraining(self, request: learner_pb2.Empty, context: grpc.ServicerContext) -> learner_pb2.Ack:
        self.check_caller(context)
        self.started.set()
        return learner_pb2.Ack(success=True, message="training started")

    def SyncModelState(self, request: framing.ChunkRequest, context: grpc.ServicerContext) -> learner_pb2.Ack:
        self.check_caller(context)
        try:
            payload = codec.decode(request.chunk, self.state_header_bytes)
            delta = messages.DeltaInfo.from_metadata(payload.metadata)
            if delta is None or delta.base is None:
                codec.check_matches(payload, self.state_spec)
            round_index = messages.round_of(payload)
            if not messages.is_final(payload):  # a final state carries no plan
                plan = messages.plan_from_metadata(payload.metadata)
                # (the batch counts only with local epochs: what the article's leader pushes need not name it)
                batch_size = codec.metadata_int(payload.metadata, "batch_size", 1) if plan.local_epochs else 1
                self.limits.check_plan(plan, batch_size)
            if delta is not None and delta.base is not None:  # checked, applied, and now the reference
                payload = self.reference.apply(payload, delta, round_index)
            else:
                if delta is not None:
                    self.reference.take_full(payload, round_index)
                payload = dataclasses.replace(payload, metadata=messages.without_delta(payload.metadata))
        except codec.PayloadError as error:
            log.warning("rejected a model state: %s", error)
            return learner_pb2.Ack(success=False, message=f"model state rejected: {error}")
        self.inbox.put(round_index, payload)
        return learner_pb2.Ack(success=True, message=f"model state for round {round_index} received")

    def SecureAggregation(
        self, request: learner_pb2.SecAggRequest, context: grpc.ServicerContext
    ) -> learner_pb2.SecAggReply:
        self.check_caller(context)
        try:
            return self.secure.answer(request)
        except secagg.Refused as refused:
            log.warning(
                "refused the leader's secure aggregation phase %d of round %d: %s",
                request.phase,
                request.round,
                refused,
            )
            rpc.abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"secure aggregation refused: {refused}")


def largest_deltas(state_spec: TensorSpec) -> list[TensorSpec]:
    """For each codec, the entries of its largest delta of a state of this spec (the most values top-k and
    random-k send, PowerSGD's highest rank): whose header is the longest a delta may have."""
    return [delta_spec(state_spec, name, 1.0, MAX_COMPRESS_RANK) for name in compression.CODECS if name != "none"]


def method_limits(idle_timeout: float) -> dict[str, guard.Limit]:
    """How a learner admits calls: its leader's (those with its credential) have turns of their own, which
    strangers cannot take; the learners of a process have as many as a learner of its own has, each (the
    server names a caller by the learner whose credential it carries: dispatch.PoolServer.caller), so that the
    leader's calls to many of them are not served one after another, nor one learner's held by another's. The
    servicer still checks every call in full."""
    learner_method = lambda name: f"/{rpc.LEARNER_SERVICE}/{name}"
    return {
        learner_method("StartTraining"): guard.Limit(2, anonymous=2),
        learner_method("SyncModelState"): guard.Limit(2, anonymous=2, request_s=idle_timeout),
        learner_method("SecureAggregation"): guard.Limit(1, anonymous=0),
        "/grpc.health.v1.Health/Check": guard.Limit(2, anonymous=4),
    }


def advertised(config: LearnerConfig, index: int, port: int) -> str:
    """Where the leader dials the index-th learner of this process, listening on port: --advertise HOST:PORT gives
    HOST:PORT+index, --advertise HOST gives HOST:port; else default_advertise."""
    if not config.advertise:
        return default_advertise(config.leader, port)
    host, colon, given = config.advertise.rpartition(":")
    if colon and given.isdigit() and (":" not in host or host.endswith("]")):  # HOST:PORT, [IPv6]:PORT
        return f"{host}:{int(given) + index}"
    return f"{config.advertise}:{port}"


class LearnerServer:
    """One learner's side of its process's server (dispatch.PoolServer, which hands it the calls that carry its
    credential): what the leader pushes lands in inbox, its order to start in started; address is where the
    leader dials it. Stopped, its calls fail as a stopped process's would, until it is started again."""

    def __init__(
        self,
        config: LearnerConfig,
        security: rpc.Security,
        credential: LeaderCredential,
        state_spec: TensorSpec,
        limits: Limits,
        book: ReferenceBook | None = None,
    ) -> None:
        """state_spec: what a pushed model state must hold; limits: what this learner takes on for its leader; book:
        --compress-down's states, shared by the learners of a process (one of its own if not given)."""
        self.credential = credential
        self.inbox, self.started, self.secure = StateInbox(), threading.Event(), SecureParty()
        self.servicer = LearnerServicer(
            state_spec,
            self.inbox,
            self.started,
            credential,
            config.leader_name if security.ca else None,
            limits,
            self.secure,
            book,
        )
        self.stopped = threading.Event()
        self.index, self.port, self.address, self.listening = 0, 0, "", ""

    def listen(self, config: LearnerConfig, index: int, port: int) -> None:
        """It is the index-th learner of its process, listening on port (the one it got: --port 0 asks for any)."""
        self.index, self.port, self.listening = index, port, f"{config.host}:{port}"
        self.address = advertised(config, index, port)

    def where(self) -> str:
        """Where it listens, and where the leader dials it when that is another address."""
        reached = f", reached at {self.address}" if self.address != self.listening else ""
        return f"listening on {self.listening}{reached}"

    def forget_states(self) -> None:
        """Forget the leader's orders and states: a leader found again starts afresh (and may go back in rounds)."""
        self.started.clear()
        self.inbox.clear()
        self.servicer.reference.clear()

    def stop(self) -> None:
        """Stop serving the leader: its calls fail UNAVAILABLE, its health checks find no registration; its thread,
        waiting for a state or for the start of training, looks at once (and finds itself stopped)."""
        self.stopped.set()
        self.inbox.wake()
        self.started.set()  # (a wake: Member.started and the training loop look at stopped first)

    def restart(self) -> None:
        """Serve the leader again, from a fresh start (it registers again)."""
        self.forget_states()
        self.stopped.clear()
