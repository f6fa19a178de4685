"""A learner: serves LearnerService, trains the leader's model on its shard and pushes gradients."""

import argparse
import logging
import signal
import socket
import sys
import threading
import time
from typing import Callable, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import fedsgd
import rpc
import runtime
import utils
import wire
from model import build_model
from rpc import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc

log = logging.getLogger("learner")
T = TypeVar("T")

MAX_STREAM_BYTES = 4 << 30  # largest model or data shard a learner will buffer from GetModel/GetData
WAIT_LOG_INTERVAL_S = 10.0
RPC_TIMEOUT_S = 60.0
HEALTH_CHECK_INTERVAL_S = 3.0  # while waiting for a state, how often to check the leader is alive
# A pushed model state reaches SyncModelState as an rpc.ChunkRequest (no protobuf copies of it).
ADD_LEARNER_SERVICE = rpc.without_protobuf_copies(learner_pb2_grpc.add_LearnerServiceServicer_to_server,
                                                  requests={"SyncModelState"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Federated learning learner: registers with the leader, serves LearnerService, "
        "and each round sends the gradient of one batch of its data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--leader", default="127.0.0.1:50051", help="the leader's HOST:PORT")
    parser.add_argument("--host", default="0.0.0.0", help="address for this learner's server to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    parser.add_argument("--advertise", help="HOST:PORT the leader dials to reach this learner "
                        "(default: 127.0.0.1 for a local leader, else this machine's address on the route to it)")
    parser.add_argument("--dataset", choices=utils.DATASETS,
                        help="train on this local dataset instead of a shard from the leader (raw data stays here)")
    parser.add_argument("--data-dir", default="data", help="where the local --dataset lives")
    parser.add_argument("--device", default="auto", help="where to train: auto (a CUDA GPU if there is one, "
                        "else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores; give each learner "
                        "its share when several run on one machine)")
    parser.add_argument("--connect-timeout", type=float, default=300.0,
                        help="seconds to keep trying to reach the leader, at start and after losing it")
    parser.add_argument("--wait-timeout", type=float, default=600.0,
                        help="seconds to wait for the leader's next instruction before giving up")
    parser.add_argument("--log-every", type=int, default=50, help="log progress every N rounds")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    rpc.add_security_flags(parser, "learner")
    parser.add_argument("--leader-name", default="leader",
                        help="with --tls-ca: the common name the leader's certificate must carry")
    return parser.parse_args(argv)


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

    A final state (the leader finished or was stopped) wins over any other, even of the same round."""

    def __init__(self) -> None:
        self._payload: wire.Payload | None = None
        self._round = -1
        self.final: wire.Payload | None = None
        self._changed = threading.Condition()

    def put(self, round_index: int, payload: wire.Payload) -> None:
        with self._changed:
            if payload.metadata.get("finished") == "1":
                self.final = payload
            elif round_index > self._round:
                self._round, self._payload = round_index, payload
            self._changed.notify_all()

    def clear(self) -> None:
        """Forget states from a previous leader session (a resumed leader goes back in rounds)."""
        with self._changed:
            self._round, self._payload, self.final = -1, None, None

    def take(self, round_index: int, timeout: float) -> wire.Payload | None:
        """The final state, or the state for round_index or later, waiting at most timeout seconds."""
        with self._changed:
            if self._changed.wait_for(lambda: self.final is not None or self._round >= round_index, timeout):
                return self.final or self._payload
            return None


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    """Checks what the leader pushes and hands it to the training thread."""

    def __init__(self, state_spec: wire.TensorSpec, inbox: StateInbox, started: threading.Event,
                 leader_name: str | None) -> None:
        self.state_spec, self.inbox, self.started = state_spec, inbox, started
        self.leader_name = leader_name

    def check_caller(self, context: grpc.ServicerContext) -> None:
        """Under mutual TLS, only the leader's certificate may start training or overwrite the model."""
        if self.leader_name and rpc.peer_common_name(context) != self.leader_name:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"only the leader (certificate CN {self.leader_name!r}) may call this learner")

    def StartTraining(self, request: learner_pb2.Empty, context: grpc.ServicerContext) -> learner_pb2.Ack:
        self.check_caller(context)
        self.started.set()
        return learner_pb2.Ack(success=True, message="training started")

    def SyncModelState(self, request: rpc.ChunkRequest, context: grpc.ServicerContext) -> learner_pb2.Ack:
        self.check_caller(context)
        try:
            payload = wire.decode(request.chunk)
            wire.check_matches(payload, self.state_spec)
            round_index = wire.metadata_int(payload, "round")
        except wire.PayloadError as error:
            log.warning("rejected a model state: %s", error)
            return learner_pb2.Ack(success=False, message=f"model state rejected: {error}")
        self.inbox.put(round_index, payload)
        return learner_pb2.Ack(success=True, message=f"model state for round {round_index} received")


def load_state(model: torch.nn.Module, payload: wire.Payload, take_over: bool = False) -> None:
    """Copy a checked state payload into the model. With take_over, the model instead takes the payload's
    tensors themselves where dtype and device match: they must be writable and used nowhere else,
    as wire.receive's are."""
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            received = payload.tensors[name]
            if take_over and received.dtype == tensor.dtype and received.device == tensor.device:
                tensor.data = received  # the same Parameter or buffer object, now over the received bytes
            else:
                tensor.copy_(received)


def adopt_state(model: torch.nn.Module, state: wire.Payload, spec: wire.TensorSpec) -> None:
    """Check a state from fetch_model (its values were checked as it streamed in) and make it the model's."""
    wire.check_layout(state, spec)
    load_state(model, state, take_over=True)


def shard_from_payload(payload: wire.Payload, num_classes: int) -> utils.ImageSet:
    """The images and labels of a data shard payload, after checking shapes, dtypes and label range."""
    labels, images = payload.tensors.get("labels"), payload.tensors.get("images")
    if labels is None or images is None or len(payload.tensors) != 2:
        raise wire.PayloadError(f"a data shard holds exactly 'labels' and 'images', got {list(payload.tensors)}")
    count = len(labels)
    shape = (count, 3, utils.IMAGE_SIZE, utils.IMAGE_SIZE)
    if labels.dtype != torch.int64 or images.dtype != torch.uint8 or labels.ndim != 1 or images.shape != shape or count == 0:
        raise wire.PayloadError(f"expected int64 labels [N] and uint8 images {list(shape)} with N > 0")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise wire.PayloadError(f"labels must lie in [0, {num_classes})")
    return utils.ImageSet(images, labels, num_classes)


def fetch_model(channel: grpc.Channel) -> wire.Payload:
    """The leader's current model state from GetModel, checked finite as it streams in."""
    return receive_stream(channel, "GetModel", leader_pb2.Empty(), check_finite=True)


def receive_stream(channel: grpc.Channel, method: str, request, check_finite: bool = False) -> wire.Payload:
    """The payload a LeaderService method streams in chunks, decoded as they arrive."""
    call = rpc.chunk_stream(channel, rpc.LEADER_SERVICE, method)(request, timeout=RPC_TIMEOUT_S)
    try:
        return wire.receive(call, MAX_STREAM_BYTES, check_finite)
    finally:
        call.cancel()  # frees the stream if the payload was refused part way; no-op once it is complete


def retry_until(deadline: float, action: Callable[[], T], what: str) -> T:
    """Run action until it stops failing with UNAVAILABLE or the deadline passes, backing off."""
    delay = 0.5
    while True:  # ends by returning, or by raising once the deadline has passed
        try:
            return action()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay > deadline:
                raise
            log.info("%s: leader unavailable, retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class LeaderLost(Exception):
    """The leader is unreachable or no longer counts this learner: reconnect and register again."""


REJOIN_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


class Learner:
    """One learner's run: fetch the model and data, serve, train; after losing the leader, rejoin."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.security = rpc.Security.from_args(args)
        self.channel = rpc.channel(args.leader, self.security)
        self.leader = leader_pb2_grpc.LeaderServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(rpc.channel(args.leader, self.security))
        state = retry_until(time.monotonic() + args.connect_timeout, lambda: fetch_model(self.channel), "GetModel")
        self.model = build_model(state.metadata["architecture"], wire.metadata_int(state, "num_classes", 1))
        self.wire_dtype = wire.WIRE_DTYPES.get(state.metadata.get("wire_dtype", "float32"))
        if self.wire_dtype is None:
            raise wire.PayloadError(f"unknown wire_dtype {state.metadata['wire_dtype']!r}")
        self.state_spec = wire.spec_of(self.model.state_dict(), self.wire_dtype)
        self.adopt(state)
        self.device = runtime.pick_device(args.device)
        self.model.to(self.device)
        self.batch_size = wire.metadata_int(state, "batch_size", 1)
        self.seed = wire.metadata_int(state, "seed")
        self.mean = [float(value) for value in state.metadata["mean"].split(",")]
        self.std = [float(value) for value in state.metadata["std"].split(",")]
        self.layout = fedsgd.GradientLayout(self.model)
        self.gradient = torch.zeros(self.layout.size, device=self.device)
        self.layout.bind_gradients(self.gradient)
        self.inbox, self.started = StateInbox(), threading.Event()
        servicer = LearnerServicer(self.state_spec, self.inbox, self.started,
                                   args.leader_name if self.security.ca else None)
        self.server, port = rpc.start_server(
            f"{args.host}:{args.port}", [(ADD_LEARNER_SERVICE, servicer)],
            [rpc.LEARNER_SERVICE],
            len(state.buffer) + rpc.ENVELOPE_BYTES, self.security,
        )
        self.address = args.advertise or default_advertise(args.leader, port)
        self.learner_id, self.data = -1, None
        self.join(time.monotonic() + args.connect_timeout)

    def adopt(self, state: wire.Payload) -> None:
        """Continue training from a model state from fetch_model."""
        adopt_state(self.model, state, self.state_spec)
        self.round = wire.metadata_int(state, "round")

    def join(self, deadline: float) -> None:
        """Register (again) and get this slot's data, unless it is local or already here."""
        previous = self.learner_id
        self.learner_id = retry_until(deadline, self.register, "RegisterLearner")
        if self.data is None or (self.learner_id != previous and not self.args.dataset):
            self.data = self.load_data(self.model.fc.out_features)

    def register(self) -> int:
        reply = self.leader.RegisterLearner(leader_pb2.LearnerInfo(network_addr=self.address), timeout=RPC_TIMEOUT_S)
        if not reply.success:
            raise SystemExit(f"the leader refused registration: {reply.message}")
        log.info("%s; serving LearnerService at %s (%s)", reply.message, self.address, self.security.describe())
        return reply.learner_id

    def load_data(self, num_classes: int) -> utils.ImageSet:
        if self.args.dataset:
            data = utils.load_dataset(self.args.dataset, self.args.data_dir, train=True)
            log.info("training on local %s data: %d images", self.args.dataset, len(data))
            return data
        payload = receive_stream(self.channel, "GetData", leader_pb2.LearnerDataRequest(network_addr=self.address))
        data = shard_from_payload(payload, num_classes)
        log.info("received a shard of %d images from the leader", len(data))
        return data

    def reconnect(self) -> None:
        """After losing the leader: wait for it (with backoff), take its current model, register again."""
        deadline = time.monotonic() + self.args.connect_timeout
        self.started.clear()
        self.inbox.clear()
        self.adopt(retry_until(deadline, lambda: fetch_model(self.channel), "GetModel"))
        self.join(deadline)
        log.info("rejoined at round %d", self.round)

    def wait_for_start(self) -> None:
        waited = 0.0
        while not self.started.wait(WAIT_LOG_INTERVAL_S):
            waited += WAIT_LOG_INTERVAL_S
            if waited >= self.args.wait_timeout:
                raise SystemExit(f"the leader did not start training within --wait-timeout {self.args.wait_timeout:.0f} s")
            log.info("waiting for the leader to start training")

    def send_gradient(self, round_index: int, loss: float) -> None:
        metadata = {"learner_id": str(self.learner_id), "round": str(round_index),
                    "samples": str(self.batch_size), "loss": repr(loss)}
        gradient = self.layout.views(self.gradient.to("cpu", self.wire_dtype))  # no copy for float32 on the CPU
        request = leader_pb2.GradientData(chunk=wire.encode(gradient, metadata))
        try:
            reply = self.leader.AccumulateGradients(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as error:
            if error.code() in REJOIN_CODES:
                raise LeaderLost(f"{error.code().name}: {error.details()}") from None
            raise
        if not reply.success:
            log.warning("round %d: the leader ignored the gradient: %s", round_index, reply.message)

    def await_state(self, round_index: int) -> wire.Payload:
        """The leader's state for round_index or later; raise LeaderLost if the leader stops answering."""
        waited = 0.0
        while (state := self.inbox.take(round_index, HEALTH_CHECK_INTERVAL_S)) is None:
            waited += HEALTH_CHECK_INTERVAL_S
            try:
                self.health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_CHECK_INTERVAL_S)
            except grpc.RpcError as error:
                raise LeaderLost(f"health check: {error.code().name}") from None
            if waited >= self.args.wait_timeout:
                raise SystemExit(f"no model state for round {round_index} within --wait-timeout {self.args.wait_timeout:.0f} s")
        return state

    def train(self) -> wire.Payload:
        """Rounds until the leader marks a state finished: gradient of the round's batch, then the new state."""
        schedule = utils.BatchSchedule(len(self.data), self.batch_size, self.seed * 10_007 + self.learner_id)
        prepare = lambda index: (index, [tensor.to(self.device) for tensor in
                                         utils.training_batch(self.data, schedule, index, self.mean, self.std)])
        prepared, batch = prepare(self.round)
        compute_seconds, round_seconds, computed_rounds = 0.0, 0.0, 0
        while True:  # every wait inside is bounded (--wait-timeout); the leader's final state ends it
            round_started = started = time.perf_counter()
            if prepared != self.round:
                prepared, batch = prepare(self.round)
            loss = fedsgd.compute_gradient(self.model, self.layout, self.gradient, *batch)
            compute_seconds += time.perf_counter() - started
            self.send_gradient(self.round, loss)
            # The next batch does not depend on the new weights: prepare it while the leader aggregates.
            started = time.perf_counter()
            prepared, batch = prepare(self.round + 1)
            compute_seconds += time.perf_counter() - started
            computed_rounds += 1
            state = self.await_state(self.round + 1)
            load_state(self.model, state)
            round_seconds += time.perf_counter() - round_started
            self.round = wire.metadata_int(state, "round")
            if self.round % self.args.log_every == 0:
                log.info("round %d: loss %.4f, %.0f images/s computing, %.1f ms a round sending and waiting",
                         self.round, loss, computed_rounds * self.batch_size / compute_seconds,
                         (round_seconds - compute_seconds) / computed_rounds * 1000)
                compute_seconds, round_seconds, computed_rounds = 0.0, 0.0, 0
            if state.metadata.get("finished") == "1":
                return state

    def train_until_final(self) -> wire.Payload:
        """Train through leader losses until the leader sends its final state; return that state."""
        while True:  # each pass ends in the final state, or in a reconnect bounded by --connect-timeout
            self.wait_for_start()
            try:
                return self.train()
            except LeaderLost as lost:
                if self.inbox.final is not None:  # it said goodbye before it went
                    return self.inbox.final
                log.warning("lost the leader (%s); reconnecting for up to %.0f s", lost, self.args.connect_timeout)
                self.reconnect()

    def run(self) -> None:
        try:
            final = self.train_until_final()
            how = "was stopped" if final.metadata.get("stopped") == "1" else "finished training"
            log.info("the leader %s at round %d", how, wire.metadata_int(final, "round"))
        finally:
            self.server.stop(grace=2).wait(5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runtime.tune_allocator()
    runtime.configure_logging("learner", args.verbose)
    log.info("using %d torch threads; training on %s", runtime.set_threads(args.threads), runtime.pick_device(args.device))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops cleanly, like Ctrl-C
    try:
        Learner(args).run()
    except KeyboardInterrupt:
        log.info("stopping on signal")
    except grpc.RpcError as error:
        log.error("lost the leader at %s: %s %s", args.leader, error.code().name, error.details())
        return 1
    except (wire.PayloadError, utils.DatasetError, rpc.SecurityError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
