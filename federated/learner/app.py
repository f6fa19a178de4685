"""A learner: serves LearnerService, trains the leader's model on its shard and pushes gradients."""

import hmac
import logging
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federated.wire import framing
from federated.net import guard
from federated.core import strategies
from federated.core.strategies.scaffold import Controls
from federated.core.training import Batch
from federated.wire import messages
from federated.core import partition
from federated.net import rpc
from federated.common import runtime
import utils
from federated.wire import codec
from model import build_model
from federated.net.rpc import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
from federated.core.checks import TensorSpec
from federated.core.layout import GradientLayout, control_name, wire_state
from federated.core.training import evaluate
from federated.learner.config import LearnerConfig

log = logging.getLogger("learner")
T = TypeVar("T")

MAX_STREAM_BYTES = 4 << 30  # largest model or data shard a learner will buffer from GetModel/GetData
WAIT_LOG_INTERVAL_S = 10.0
RPC_TIMEOUT_S = 60.0
HEALTH_CHECK_INTERVAL_S = 3.0  # while waiting, how often to ask the leader whether it still counts this learner
# Calls from the leader may arrive before this learner has read the reply to its registration: they wait
# this long for it.
REGISTRATION_WAIT_S = 30.0
# The leader asks to be called again later (all slots held, too many calls at once) with these codes.
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# Health checks of the leader answered with these say nothing about this learner's registration: anyone
# can keep the leader's health service busy, and a leader built from the article's protos has none.
INCONCLUSIVE_CODES = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      grpc.StatusCode.DEADLINE_EXCEEDED)
# A gradient refused with these is this learner's fault (its model or data do not match the leader's).
REFUSED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
# A gradient answered with these means the leader no longer counts this registration: register again.
REJOIN_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.CANCELLED)  # (the leader cancels a gradient that takes over --idle-timeout to arrive)
# A pushed model state reaches SyncModelState as a framing.ChunkRequest (no protobuf copies of it).
ADD_LEARNER_SERVICE = framing.without_protobuf_copies(learner_pb2_grpc.add_LearnerServiceServicer_to_server,
                                                      requests={"SyncModelState"})


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
    overtake each other). A final state (the leader finished or was stopped) wins over any other."""

    def __init__(self) -> None:
        self._payload: codec.Payload | None = None
        self._round, self._version = -1, 0
        self.final: codec.Payload | None = None
        self._changed = threading.Condition()

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
        """The final state, or the newest state if its version is after after_version, with its version;
        waits at most timeout seconds."""
        with self._changed:
            if self._changed.wait_for(lambda: self.final is not None or self._version > after_version, timeout):
                return self._version, self.final or self._payload
            return None


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
        """Whether given is this learner's credential (any caller matches while it has none)."""
        return self.value is None or hmac.compare_digest((given or "").encode(), self.value.encode())

    def session(self) -> str:
        """The health-service name of this registration at the leader ('' for a leader without credentials)."""
        return rpc.SESSION_PREFIX + rpc.session_id(self.value) if self.value else ""


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    """Checks that calls come from this learner's leader and what it pushes, and hands it to the training thread."""

    def __init__(self, state_spec: TensorSpec, inbox: StateInbox, started: threading.Event,
                 credential: LeaderCredential, leader_name: str | None) -> None:
        self.state_spec, self.inbox, self.started = state_spec, inbox, started
        self.credential, self.leader_name = credential, leader_name

    def check_caller(self, context: grpc.ServicerContext) -> None:
        """Only the leader may start training or overwrite the model: under mutual TLS its certificate,
        and always the credential it gave this learner at registration."""
        if self.leader_name and rpc.peer_common_name(context) != self.leader_name:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"only the leader (certificate CN {self.leader_name!r}) may call this learner")
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
            payload = codec.decode(request.chunk)
            codec.check_matches(payload, self.state_spec)
            round_index = messages.round_of(payload)
            if not messages.is_final(payload):  # a final state carries no plan
                messages.plan_from_metadata(payload.metadata)
        except codec.PayloadError as error:
            log.warning("rejected a model state: %s", error)
            return learner_pb2.Ack(success=False, message=f"model state rejected: {error}")
        self.inbox.put(round_index, payload)
        return learner_pb2.Ack(success=True, message=f"model state for round {round_index} received")


def method_limits(idle_timeout: float) -> dict[str, guard.Limit]:
    """How a learner admits calls: its leader's (those with its credential) have turns of their own, which
    strangers cannot take; the servicer still checks every call in full."""
    learner_method = lambda name: f"/{rpc.LEARNER_SERVICE}/{name}"
    return {learner_method("StartTraining"): guard.Limit(2, anonymous=2),
            learner_method("SyncModelState"): guard.Limit(2, anonymous=2, request_s=idle_timeout),
            "/grpc.health.v1.Health/Check": guard.Limit(2, anonymous=4)}


def load_state(model: torch.nn.Module, payload: codec.Payload, take_over: bool = False) -> None:
    """Copy a checked state payload into the model. With take_over, the model instead takes the payload's
    tensors themselves where dtype and device match: they must be writable and used nowhere else,
    as codec.receive's are."""
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            received = payload.tensors[name]
            if take_over and received.dtype == tensor.dtype and received.device == tensor.device:
                tensor.data = received  # the same Parameter or buffer object, now over the received bytes
            else:
                tensor.copy_(received)


def adopt_state(model: torch.nn.Module, state: codec.Payload, spec: TensorSpec) -> None:
    """Check a state from fetch_model (its values were checked as it streamed in) and make it the model's."""
    codec.check_layout(state, spec)
    load_state(model, state, take_over=True)


def training_setup(info: messages.StateInfo, wire_dtype: torch.dtype,
                   device: torch.device | str) -> tuple[torch.nn.Module, GradientLayout, Controls | None]:
    """The state's model on the device, its update layout and (SCAFFOLD) its control variates. The model moves
    before the layout is made: moving replaces a model's buffers, and the layout must hold the ones training
    updates (adopting a state later copies into them in place). A run's strategy never changes."""
    try:
        model = build_model(info.architecture, info.num_classes, info.norm).to(device)
    except ValueError as error:  # the names come from the network
        raise codec.PayloadError(f"the leader's model state names a model this learner cannot build: {error}") from None
    controls = strategies.named(info.plan.strategy).controls
    layout = GradientLayout(model, wire_dtype, controls=controls)
    return model, layout, Controls(layout.parameter_count, device) if controls else None


def check_fits(state: codec.Payload, info: messages.StateInfo, wire_dtype: torch.dtype) -> None:
    """Raise PayloadError unless the state holds exactly the tensors of the model it names. Checked on the meta
    device (shapes without memory) before the model is built for real: a state that names a huge model but
    does not hold its weights costs this learner nothing."""
    with torch.device("meta"):
        model, _, controls = training_setup(info, wire_dtype, "meta")
    codec.check_layout(state, state_spec(model, wire_dtype, controls is not None))


def state_spec(model: torch.nn.Module, wire_dtype: torch.dtype, controls: bool = False) -> TensorSpec:
    """What a model state from the leader must hold: wire_state's tensors (with SCAFFOLD's control)."""
    control = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad)) if controls else None
    return codec.spec_of(wire_state(model, wire_dtype, control))


def shard_from_payload(payload: codec.Payload, num_classes: int, image_size: int = utils.IMAGE_SIZE) -> utils.ImageSet:
    """The images and labels of a data shard payload, after checking shapes, dtypes and label range."""
    labels, images = payload.tensors.get("labels"), payload.tensors.get("images")
    if labels is None or images is None or len(payload.tensors) != 2:
        raise codec.PayloadError(f"a data shard holds exactly 'labels' and 'images', got {list(payload.tensors)[:4]}")
    count = len(labels)
    shape = (count, 3, image_size, image_size)
    if labels.dtype != torch.int64 or images.dtype != torch.uint8 or labels.ndim != 1 or images.shape != shape or count == 0:
        raise codec.PayloadError(f"expected int64 labels [N] and uint8 images {list(shape)} with N > 0")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise codec.PayloadError(f"labels must lie in [0, {num_classes})")
    return utils.ImageSet(images, labels, num_classes)


class LeaderLost(Exception):
    """The leader is unreachable or no longer counts this learner: reconnect and register again."""


class GradientRefused(Exception):
    """The leader refused this learner's update as malformed: the learner's model or data do not match it."""


def receive_stream(channel: grpc.Channel, method: str, request, idle_timeout: float, check_finite: bool = False,
                   credential: str | None = None) -> codec.Payload:
    """The payload a LeaderService method streams in chunks, decoded as they arrive. There is no limit on
    the whole transfer (a slow link may take long), only on idle time: a stream that delivers nothing for
    idle_timeout seconds is abandoned with LeaderLost."""
    call = framing.chunk_stream(channel, rpc.LEADER_SERVICE, method)(request, metadata=rpc.with_credential(credential))
    try:
        return codec.receive(guard.idle_bounded(call, idle_timeout, call.cancel), MAX_STREAM_BYTES, check_finite)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.CANCELLED:  # only the idle watchdog cancels this call
            raise LeaderLost(f"{method}: nothing arrived for {idle_timeout:.0f} s") from None
        raise
    finally:
        call.cancel()  # frees the stream if the payload was refused part way; no-op once it is complete


def fetch_model(channel: grpc.Channel, idle_timeout: float = guard.IDLE_TIMEOUT_S,
                credential: str | None = None) -> codec.Payload:
    """The leader's current model state from GetModel, checked finite as it streams in."""
    return receive_stream(channel, "GetModel", leader_pb2.Empty(), idle_timeout, True, credential)


def retry_until(deadline: float, action: Callable[[], T], what: str, stop: Callable[[], bool] = lambda: False,
                codes: tuple[grpc.StatusCode, ...] = RETRY_CODES) -> T | None:
    """Run action until it stops failing with one of codes (or a lost stream) or the deadline passes,
    backing off; None as soon as stop() says there is no point any more."""
    delay = 0.5
    while not stop():  # ends by returning, or by raising once the deadline has passed
        try:
            return action()
        except (grpc.RpcError, LeaderLost) as error:
            if isinstance(error, grpc.RpcError) and error.code() not in codes or time.monotonic() + delay > deadline:
                raise
            reason = error.details() if isinstance(error, grpc.RpcError) else str(error)
            log.info("%s: %s; retrying in %.1f s", what, reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    return None


class Learner:
    """One learner's run: fetch the model and data, serve, train; after losing the leader, rejoin."""

    def __init__(self, config: LearnerConfig) -> None:
        self.config = config
        self.security = rpc.Security.of(config)
        self.channel = rpc.channel(config.leader, self.security)
        self.leader = leader_pb2_grpc.LeaderServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(rpc.channel(config.leader, self.security))
        self.inbox, self.started, self.credential = StateInbox(), threading.Event(), LeaderCredential()
        self.learner_id, self.data, self.server, self.round, self.sent_round = -1, None, None, 0, -1
        self.held_out: utils.ImageSet | None = None  # images to evaluate the global model on
        self.summary: messages.DataSummary | None = None  # what the leader is told of local data

    def fetch_model(self, deadline: float) -> codec.Payload | None:
        """The leader's current model state, checked finite as it streams in (retried until the deadline);
        None if the leader's final state was pushed meanwhile."""
        fetch = lambda: fetch_model(self.channel, self.config.idle_timeout, self.credential.value)
        return retry_until(deadline, fetch, "GetModel", stop=lambda: self.inbox.final is not None)

    def connect(self) -> codec.Payload | None:
        """Take the leader's model, start serving, register and get the data; the leader's final state
        instead if training is already over."""
        deadline = time.monotonic() + self.config.connect_timeout
        state = self.fetch_model(deadline)
        if messages.is_final(state):
            return state
        info = messages.StateInfo.from_payload(state)
        self.wire_dtype = codec.WIRE_DTYPES.get(info.wire_dtype)
        if self.wire_dtype is None:
            raise codec.PayloadError(f"unknown wire_dtype {info.wire_dtype[:32]!r}")
        self.device = runtime.pick_device(self.config.device)
        check_fits(state, info, self.wire_dtype)
        self.model, self.layout, self.controls = training_setup(info, self.wire_dtype, self.device)
        self.state_spec = state_spec(self.model, self.wire_dtype, self.controls is not None)
        self.info = info
        self.adopt(state)
        self.batch_size, self.seed = info.batch_size, info.seed
        self.gradient = torch.zeros(self.layout.size, device=self.device)
        self.layout.bind_gradients(self.gradient)
        servicer = LearnerServicer(self.state_spec, self.inbox, self.started, self.credential,
                                   self.config.leader_name if self.security.ca else None)
        self.server, port = rpc.start_server(
            f"{self.config.host}:{self.config.port}", [(ADD_LEARNER_SERVICE, servicer)], [rpc.LEARNER_SERVICE],
            len(state.buffer) + rpc.ENVELOPE_BYTES, self.security, method_limits(self.config.idle_timeout),
            self.config.idle_timeout, self.session_status,
            lambda headers: "leader" if self.credential.matches(headers.get(rpc.CREDENTIAL_HEADER)) else None, 1)
        self.address = self.config.advertise or default_advertise(self.config.leader, port)
        self.join(deadline)
        return None

    def session_status(self, session: str) -> int | None:
        """This learner's answer to the leader's health check of a registration: SERVING for its own, and
        while a registration is on its way (the leader may ask before its reply is here)."""
        mine = self.credential.value and hmac.compare_digest(session.encode(), rpc.session_id(self.credential.value).encode())
        return health_pb2.HealthCheckResponse.SERVING if mine or self.credential.in_flight else None

    def adopt(self, state: codec.Payload, fetched: bool = True) -> None:
        """Continue training from a model state: fetched (GetModel) or pushed (SyncModelState; checked there)."""
        if fetched:
            adopt_state(self.model, state, self.state_spec)
        else:
            load_state(self.model, state)
        info = messages.StateInfo.from_payload(state)  # parses the plan too: once a state
        self.round, self.plan = info.round, info.plan
        self.mean, self.std = list(info.mean), list(info.std)  # empty until a leader without data settled them
        if strategies.named(self.plan.strategy).controls != (self.controls is not None):
            raise codec.PayloadError(f"the leader changed its strategy to {self.plan.strategy} during the run")
        if self.controls is not None:
            self.controls.server.copy_(torch.cat([state.tensors[control_name(name)].reshape(-1)
                                                  for name, _ in self.layout.parameters]))

    def join(self, deadline: float) -> None:
        """Register (again) and get this slot's data, unless it is local or already here."""
        previous = self.learner_id
        if self.config.dataset and self.data is None:  # local data first: the registration summarises it
            self.data, self.held_out = self.load_local_data()
            self.summary = messages.DataSummary.of(self.data, len(self.held_out) if self.held_out else 0)
        self.learner_id = retry_until(deadline, self.register, "RegisterLearner")
        if self.learner_id != previous and self.controls is not None:  # SCAFFOLD: c_i belongs to a slot's data
            self.controls.own.zero_()
        if self.data is None or (self.learner_id != previous and not self.config.dataset):
            self.data = self.load_shard()

    def register(self) -> int:
        """Register with this learner's address (and its credential, to take its own slot back)."""
        with self.credential.registering():
            request = leader_pb2.LearnerInfo(network_addr=self.address)
            if self.summary is not None:
                self.summary.to_proto(request.data)
            reply = self.leader.RegisterLearner(request, timeout=RPC_TIMEOUT_S,
                                                metadata=rpc.with_credential(self.credential.value))
            if reply.success:
                self.credential.registered(reply.credential)
        if not reply.success:
            raise SystemExit(f"the leader refused registration: {reply.message}")
        log.info("%s; serving LearnerService at %s (%s)", reply.message, self.address, self.security.describe())
        return reply.learner_id

    def load_local_data(self) -> tuple[utils.ImageSet, utils.ImageSet | None]:
        """The local training images at the leader's image size, and those held out for evaluation: a
        --eval-fraction of them, else the dataset's test split if it has one."""
        config, size, classes = self.config, self.info.image_size, self.info.num_classes
        data = utils.load_dataset(config.dataset, config.data_dir, train=True, image_size=size)
        if data.num_classes != classes:
            raise utils.DatasetError(f"the local {config.dataset} has {data.num_classes} classes; the leader's model "
                                     f"tells {classes} apart")
        if config.eval_fraction:
            data, held_out = utils.held_out(data, config.eval_fraction, self.info.seed)
        else:
            try:
                held_out = utils.load_dataset(config.dataset, config.data_dir, train=False, image_size=size)
            except utils.DatasetError as missing:
                log.info("no held-out images to evaluate on (%s); --eval-fraction would hold some out", missing)
                held_out = None
        log.info("training on local %s data: %d images of %dx%d, %d held out for evaluation", config.dataset, len(data),
                 size, size, len(held_out) if held_out else 0)
        [labels] = partition.describe(partition.label_counts(data.labels, [torch.arange(len(data))], classes))
        log.info("its labels (this learner's own: the leader never sees them): %s", labels.split(": ", 1)[1])
        return data, held_out

    def load_shard(self) -> utils.ImageSet:
        """This slot's shard of the leader's data."""
        request = leader_pb2.LearnerDataRequest(network_addr=self.address)
        fetch = lambda: receive_stream(self.channel, "GetData", request, self.config.idle_timeout,
                                       credential=self.credential.value)
        payload = retry_until(time.monotonic() + self.config.connect_timeout, fetch, "GetData")
        data = shard_from_payload(payload, self.info.num_classes, self.info.image_size)
        log.info("received a shard of %d images from the leader", len(data))
        return data

    def report_evaluation(self, state: codec.Payload) -> None:
        """When the state asks for it, evaluate it on the held-out images and tell the leader (best effort:
        a lost report only leaves this learner out of that round's evaluation)."""
        if self.held_out is None or not self.mean or not messages.plan_from_metadata(state.metadata).evaluate:
            return
        round_index = messages.round_of(state)
        with torch.no_grad():
            result = evaluate(self.model, utils.normalize(self.held_out.images, self.mean, self.std),
                                     self.held_out.labels)
        report = leader_pb2.EvaluationReport(learner_id=self.learner_id, round=round_index, samples=len(self.held_out),
                                             correct=result.correct, loss=result.loss)
        try:
            reply = self.leader.ReportEvaluation(report, timeout=RPC_TIMEOUT_S,
                                                 metadata=rpc.with_credential(self.credential.value))
            log.info("round %d: held-out loss %.4f, accuracy %.4f on %d images (%s)", round_index, result.loss,
                     result.accuracy, len(self.held_out), reply.message)
        except grpc.RpcError as error:
            log.warning("round %d: the leader did not take this learner's evaluation: %s %s", round_index,
                        error.code().name, error.details())

    def reconnect(self) -> codec.Payload | None:
        """After losing the leader: wait for it (with backoff), take its current model, register again;
        the leader's final state instead if it has one."""
        deadline = time.monotonic() + self.config.connect_timeout
        self.started.clear()
        self.inbox.clear()
        self.sent_round = -1  # a resumed leader may go back in rounds
        state = self.fetch_model(deadline)
        if state is None or messages.is_final(state):
            return state or self.inbox.final
        self.adopt(state)
        self.join(deadline)
        log.info("rejoined at round %d", self.round)
        return None

    def check_leader(self) -> None:
        """Raise LeaderLost if the leader does not answer, or no longer counts this learner's registration."""
        request = health_pb2.HealthCheckRequest(service=self.credential.session())
        try:
            reply = self.health.Check(request, timeout=HEALTH_CHECK_INTERVAL_S,
                                      metadata=rpc.with_credential(self.credential.value))
        except grpc.RpcError as error:
            if error.code() in INCONCLUSIVE_CODES:  # busy, slow, or without the health service: it answers
                return
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise LeaderLost("the leader no longer knows this learner's registration") from None
            raise LeaderLost(f"health check: {error.code().name}") from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise LeaderLost("the leader dropped this learner")

    def wait_until(self, ready: Callable[[float], T | None], what: str, bounded: bool = True) -> T:
        """ready(timeout) until it gives something, checking on the leader every few seconds; raises
        LeaderLost, or SystemExit after --wait-timeout (unless not bounded: a learner left out of rounds by
        sampling waits for as long as the leader says it still counts on it)."""
        started, last_log = time.monotonic(), 0.0
        while (result := ready(HEALTH_CHECK_INTERVAL_S)) is None:
            self.check_leader()
            waited = time.monotonic() - started
            if bounded and waited >= self.config.wait_timeout:
                raise SystemExit(f"no {what} from the leader within --wait-timeout {self.config.wait_timeout:.0f} s")
            if waited - last_log >= WAIT_LOG_INTERVAL_S:
                last_log = waited
                log.info("waiting for %s", what)
        return result

    def send_update(self, round_index: int, loss: float) -> None:
        batch = min(self.batch_size, len(self.data))  # a shard smaller than a batch is one smaller batch
        claims = messages.UpdateInfo(self.learner_id, round_index, batch * self.plan.local_steps, loss,
                                     strategies.named(self.plan.strategy).update_kind, self.plan.local_steps)
        request = leader_pb2.GradientData(chunk=codec.encode(self.layout.wire_tensors(self.gradient), claims.to_metadata()))
        send = lambda: self.leader.AccumulateGradients(request, timeout=RPC_TIMEOUT_S,
                                                       metadata=rpc.with_credential(self.credential.value))
        try:  # a busy leader (RESOURCE_EXHAUSTED) gets the update again; a lost one means reconnecting
            reply = retry_until(time.monotonic() + self.config.wait_timeout, send, "AccumulateGradients",
                                stop=lambda: self.inbox.final is not None, codes=(grpc.StatusCode.RESOURCE_EXHAUSTED,))
        except grpc.RpcError as error:
            if error.code() in REJOIN_CODES:
                raise LeaderLost(f"{error.code().name}: {error.details()}") from None
            if error.code() in REFUSED_CODES:
                raise GradientRefused(f"the leader refused this learner's update for round {round_index}: "
                                      f"{error.code().name} {error.details()}") from None
            raise
        self.sent_round = round_index
        if reply is not None and not reply.success:
            log.warning("round %d: the leader ignored the update: %s", round_index, reply.message)
        elif reply is not None and self.controls is not None:  # SCAFFOLD: c_i moves only with an accepted update
            self.controls.commit(self.gradient[self.layout.controls])

    def batch_at(self, step: int) -> Batch:
        """The step-th batch of this learner's shard order (one per step of every round), on the device."""
        if self.prepared[0] != step:
            batch = utils.training_batch(self.data, self.schedule, step, self.mean, self.std)
            self.prepared = (step, [tensor.to(self.device) for tensor in batch])
        return self.prepared[1]

    def train(self) -> codec.Payload:
        """Rounds until the leader marks a state finished: when the round's plan includes this learner, its
        update (the strategy's local_update), then the next state."""
        self.schedule = utils.BatchSchedule(len(self.data), self.batch_size, self.seed * 10_007 + self.learner_id)
        self.prepared: tuple[int, list[torch.Tensor]] = (-1, [])
        version, compute_seconds, round_seconds, computed_rounds = 0, 0.0, 0.0, 0
        pushed = self.inbox.take(version, timeout=0)  # a state pushed since the one fetched, on joining
        while True:  # every wait inside is bounded (--wait-timeout); the leader's final state ends it
            if pushed is not None:
                version, state = pushed
                if messages.is_final(state):
                    self.evaluate_final(state)
                    return state
                if messages.round_of(state) >= self.round:  # not older than the state fetched on joining
                    self.adopt(state, fetched=False)
                    self.report_evaluation(state)
            round_started = time.perf_counter()
            # sampling may leave it out of this round; a state of a round it already sent (pushed again) is no news;
            # nobody trains before a leader without data has settled the normalisation
            if self.plan.takes_part(self.learner_id) and self.round != self.sent_round and self.mean:
                first_step = self.round * self.plan.local_steps
                loss = strategies.named(self.plan.strategy).local_update(self.model, self.layout, self.gradient,
                                          lambda step: self.batch_at(first_step + step), self.plan, self.controls)
                compute_seconds += time.perf_counter() - round_started
                self.send_update(self.round, loss)
                started = time.perf_counter()  # the next batch does not depend on the new weights
                self.batch_at((self.round + 1) * self.plan.local_steps)
                compute_seconds += time.perf_counter() - started
                computed_rounds += 1
            # With sampling, a learner gets a state only when it is drawn: it waits as long as the leader counts it in.
            sampled, next_round = self.plan.participants is not None, self.round + 1
            pushed = self.wait_until(lambda timeout: self.inbox.take(version, timeout),
                                     "a round to take part in" if sampled else f"the state of round {next_round}",
                                     bounded=not sampled)
            round_seconds += time.perf_counter() - round_started
            if computed_rounds and messages.round_of(pushed[1]) % self.config.log_every == 0:
                images = computed_rounds * self.batch_size * self.plan.local_steps
                log.info("round %d: loss %.4f, %.0f images/s computing, %.1f ms a round sending and waiting",
                         messages.round_of(pushed[1]), loss, images / compute_seconds,
                         (round_seconds - compute_seconds) / computed_rounds * 1000)
                compute_seconds, round_seconds, computed_rounds = 0.0, 0.0, 0

    def evaluate_final(self, state: codec.Payload) -> None:
        """The leader's last state, when it asks to be evaluated: take its weights (and normalisation: a learner
        sampling never drew may not have had it), evaluate and report."""
        if self.held_out is not None and messages.plan_from_metadata(state.metadata).evaluate:
            load_state(self.model, state)
            info = messages.StateInfo.from_payload(state)
            self.mean, self.std = list(info.mean), list(info.std)
            self.report_evaluation(state)

    def train_until_final(self) -> codec.Payload:
        """Train through leader losses until the leader sends its final state; return that state."""
        while True:  # each pass ends in the final state, or in a reconnect bounded by --connect-timeout
            try:
                self.wait_until(lambda timeout: self.started.wait(timeout) or None, "the start of training")
                return self.train()
            except LeaderLost as lost:
                if self.inbox.final is not None:  # it said goodbye before it went
                    return self.inbox.final
                log.warning("lost the leader (%s); reconnecting for up to %.0f s", lost, self.config.connect_timeout)
                final = self.reconnect()
                if final is not None:
                    return final

    def run(self) -> None:
        try:
            final = self.connect() or self.train_until_final()
            how = "was stopped" if final.metadata.get("stopped") == "1" else "finished training"
            log.info("the leader %s at round %d", how, messages.round_of(final))
        finally:
            if self.server is not None:
                self.server.stop(grace=2).wait(5)
