"""Callers that hold on: unread streams, requests never finished, streams that stall, on live servers."""

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federated.leader import dispatch
from federated.learner import session as learner_session
from federated.net import guard, rpc
from federated.net.rpc import leader_pb2
from federated.tools import launch
from federated.wire import codec, framing
from tests.support.live import LiveLeader

IDLE_S = 1.0


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One live leader for the module (each test enrols learners of its own, and plays whole rounds)."""
    live = LiveLeader.start(
        tmp_path_factory.mktemp("guard"),
        launch.free_port(),
        "--learners",
        "8",
        "--batch-size",
        "8",
        "--idle-timeout",
        str(IDLE_S),
    )
    yield live
    live.stop()


def enrol(live, count: int) -> list[tuple[int, str]]:
    """Fake learners started on the shared leader: (learner id, credential) each."""
    return [(live.leader.registry.holder(credential), credential) for credential in live.enrol(count)]


def open_unread_streams(live, method: str, count: int, credential: str) -> list:
    """count calls of a streaming method whose replies nobody reads; each holds the server while it is admitted."""
    request = leader_pb2.LearnerDataRequest(network_addr="x:1") if method == "GetData" else leader_pb2.Empty()
    stream = framing.chunk_stream(live.channel, rpc.LEADER_SERVICE, method)
    return [stream(request, timeout=60, metadata=rpc.with_credential(credential)) for _ in range(count)]


def first_code(call) -> grpc.StatusCode | None:
    """The status of a stream call once its first message is asked for (None if a message came)."""
    try:
        next(call)
        return None
    except grpc.RpcError as error:
        return error.code()


def test_unread_streams_neither_starve_registration_nor_gradients_and_are_cut_off(tmp_path, port):
    live = LiveLeader.start(tmp_path, port, "--learners", "2", "--idle-timeout", str(IDLE_S))  # shards of 15 MB
    ((learner, credential),) = enrol(live, 1)
    streams = open_unread_streams(live, "GetData", 20, credential)
    time.sleep(1.0)  # every stream has been admitted or refused by now
    assert sum(not call.done() for call in streams) == 2  # two admitted, stalled: nobody reads them
    started = time.monotonic()
    assert live.register("127.0.0.1:7777", timeout=5).success  # the 16 pool threads of old would all be taken
    live.send_counted(live.gradient(learner), credential)
    assert time.monotonic() - started < 5
    assert live.close_round()[0].learners == 1
    codes = [first_code(call) for call in streams[2:]]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 17, codes  # beyond 2 concurrent GetData streams each
    time.sleep(IDLE_S + 0.6)  # the admitted, unread streams have been cancelled for making no progress
    payload = learner_session.receive_stream(
        live.channel, "GetData", leader_pb2.LearnerDataRequest(network_addr="x:1"), 30, credential=credential
    )
    assert len(payload.tensors["labels"]) == len(live.leader.data.shards.indices[learner])
    for call in streams:
        call.cancel()
    live.stop()


def stalled_calls(live, method: str, count: int, credential: str | None) -> tuple[list, threading.Event]:
    """count calls of a unary method (a LeaderService name, or a full one) that open and never send their request."""
    blocked = threading.Event()

    def never():
        blocked.wait(30)
        yield b""

    open_call = live.channel.stream_unary(method if method.startswith("/") else f"/{rpc.LEADER_SERVICE}/{method}")
    calls = [open_call.future(never(), metadata=rpc.with_credential(credential)) for _ in range(count)]
    time.sleep(0.5)
    return calls, blocked


def test_gradient_calls_without_a_credential_are_refused_before_they_hold_anything(live):
    (learner, credential), _ = enrol(live, 2)
    calls, blocked = stalled_calls(live, "AccumulateGradients", 12, None)
    assert all(call.exception(timeout=5).code() == grpc.StatusCode.UNAUTHENTICATED for call in calls)
    live.send_counted(live.gradient(learner), credential)
    assert live.close_round()[0].learners == 1
    blocked.set()


def test_a_learner_that_never_sends_its_requests_holds_only_its_own_turn_and_not_for_long(live):
    (first, first_credential), (second, second_credential) = enrol(live, 2)
    calls, blocked = stalled_calls(live, "AccumulateGradients", 3, first_credential)
    with pytest.raises(grpc.RpcError) as error:  # the first learner's own turns are taken...
        live.accumulate(live.gradient(first), first_credential, timeout=5)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "from this caller" in error.value.details()
    live.send_counted(live.gradient(second), second_credential)  # ...the second's are not
    time.sleep(IDLE_S + 0.6)  # the idle timeout ends the stalled calls
    live.send_counted(live.gradient(first), first_credential)
    assert live.close_round()[0].learners == 2
    assert all(call.exception(timeout=5) is not None for call in calls)
    blocked.set()


def test_a_held_health_service_is_no_reason_to_drop_anyone(live):
    ((learner, _),) = enrol(live, 1)
    member = live.leader.registry.members([learner])[learner]
    health_channel = grpc.insecure_channel(member.address)
    blocked = threading.Event()

    def never():
        blocked.wait(30)
        yield b""

    held = [health_channel.stream_unary("/grpc.health.v1.Health/Check").future(never()) for _ in range(6)]
    time.sleep(0.5)
    dropped = []
    live.leader.federation.client.probe({learner: member}, lambda *failure: dropped.append(failure), silent_limit_s=0.0)
    time.sleep(dispatch.PROBE_TIMEOUT_S + 1.0)  # past the check's deadline: a queued check would have timed out
    assert dropped == [] and live.leader.registry.is_active(learner)  # RESOURCE_EXHAUSTED: something answers there
    blocked.set()
    for call in held:
        call.cancel()


class SlowStream:
    """A server streaming chunk messages with a pause before each: pauses[i] seconds before chunk i."""

    def __init__(self, payload: bytes, pauses: list[float]) -> None:
        self.payload, self.pauses = payload, pauses

    def __enter__(self) -> grpc.Channel:
        def stream(request, context):
            pieces = list(framing.chunk_messages(self.payload, len(self.payload) // len(self.pauses) + 1))
            for pause, piece in zip(self.pauses, pieces):
                time.sleep(pause)
                yield piece

        handler = grpc.unary_stream_rpc_method_handler(stream)
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(rpc.LEADER_SERVICE, {"GetModel": handler})]
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return grpc.insecure_channel(f"127.0.0.1:{port}")

    def __exit__(self, *_) -> None:
        self.server.stop(0)


def test_a_slow_stream_may_take_long_but_not_stall():
    payload = codec.encode({"w": torch.ones(1000)})
    with SlowStream(payload, [0.4] * 6) as channel:  # 2.4 s in all, never 1.2 s without a chunk
        received = learner_session.receive_stream(channel, "GetModel", leader_pb2.Empty(), idle_timeout=1.2)
        assert torch.equal(received.tensors["w"], torch.ones(1000))
    with SlowStream(payload, [0.1, 2.0, 0.1]) as channel:  # one pause of 2 s
        with pytest.raises(learner_session.LeaderLost, match="nothing arrived for 1 s"):
            learner_session.receive_stream(channel, "GetModel", leader_pb2.Empty(), idle_timeout=1.2)


def test_a_flood_of_calls_grpc_turns_away_leaves_no_permit_behind(tmp_path, port):
    live = LiveLeader.start(tmp_path, port, "--learners", "2")
    try:
        ((learner, credential),) = enrol(live, 1)
        register = live.channel.unary_unary(f"/{rpc.LEADER_SERVICE}/RegisterLearner")
        gradient = live.channel.unary_unary(f"/{rpc.LEADER_SERVICE}/AccumulateGradients")
        request = leader_pb2.LearnerInfo(network_addr="127.0.0.1:1").SerializeToString()
        flood = [call.future(request, timeout=20) for _ in range(300) for call in (register, gradient)]
        codes = {future.exception().code() if future.exception() else grpc.StatusCode.OK for future in flood}
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes  # more than the server takes at once
        for address in ("127.0.0.1:7101", "127.0.0.1:7102"):  # after the flood, every method admits calls again
            with pytest.raises(grpc.RpcError) as error:
                live.register(address, timeout=5)
            assert "all 2 learner slots are held" in error.value.details()  # refused by the registry, not the gate
        live.send_counted(live.gradient(learner), credential)
        assert live.close_round()[0].learners == 1
    finally:
        live.stop()


def test_callers_without_a_credential_cannot_take_a_learners_turns(live):
    ((learner, credential),) = enrol(live, 1)
    held = [
        stalled_calls(live, method, 10, None)
        for method in ("RegisterLearner", "GetModel", "/grpc.health.v1.Health/Check")
    ]
    health = health_pb2_grpc.HealthStub(live.channel)
    session = health_pb2.HealthCheckRequest(service=rpc.SESSION_PREFIX + rpc.session_id(credential))
    assert (
        health.Check(session, timeout=5, metadata=rpc.with_credential(credential)).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    address = live.leader.registry.members([learner])[learner].address
    assert live.register(address, credential, timeout=5).learner_id == learner
    with pytest.raises(grpc.RpcError) as error:  # another anonymous call from the same address waits its turn
        live.register("127.0.0.1:7300", timeout=5)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "from this caller" in error.value.details()
    for calls, blocked in held:
        blocked.set()
        for call in calls:
            call.cancel()


class GatedStreams:
    """A server on 127.0.0.1 whose one method streams count messages of 1 MiB (after each, it waits for
    release), behind a Gate admitting 1 stream per caller and 4 in all from callers without a credential; a
    caller sending the header "name" is named by it."""

    METHOD = "/test.Streams/Read"

    def __init__(self, count: int, min_anonymous_rate: float = guard.MIN_ANONYMOUS_RATE) -> None:
        self.count, self.release = count, threading.Event()
        self.release.set()

        def read(request, context):
            for _ in range(self.count):
                yield b"x" * (1 << 20)
                self.release.wait(10)

        gate = guard.Gate(
            {self.METHOD: guard.Limit(1, anonymous=4)},
            idle_timeout=IDLE_S,
            identify=lambda headers: headers.get("name"),
            named_callers=2,
            min_anonymous_rate=min_anonymous_rate,
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(gate.threads_needed()), interceptors=[gate])
        handler = grpc.unary_stream_rpc_method_handler(read)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Streams", {"Read": handler})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def call(self, port: int | None = None, name: str | None = None):
        """A stream through port (the server's by default); the client lets the server send only as fast as it
        reads (no window probing)."""
        channel = grpc.insecure_channel(f"127.0.0.1:{port or self.port}", options=[("grpc.http2.bdp_probe", 0)])
        return channel.unary_stream(self.METHOD)(b"", timeout=30, metadata=[("name", name)] if name else None)

    def stop(self) -> None:
        self.release.set()
        self.server.stop(0)


@contextmanager
def relay_from(source: str, port: int) -> Iterator[int]:
    """A port on 127.0.0.1 whose connections reach 127.0.0.1:port from the address source (of 127.0.0.0/8, all
    this machine's), byte for byte: a caller at another address."""
    listener = socket.create_server(("127.0.0.1", 0))

    def pipe(reader: socket.socket, writer: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := reader.recv(1 << 16):
                writer.sendall(data)
        for end in (reader, writer):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed: the relay is over
            while True:
                caller, _ = listener.accept()
                server = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
                for ends in ((caller, server), (server, caller)):
                    threading.Thread(target=pipe, args=ends, daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_callers_without_a_credential_count_by_network_not_by_address():
    streams = GatedStreams(2)
    streams.release.clear()  # every stream admitted holds its turn
    try:
        with relay_from("127.0.0.2", streams.port) as neighbour, relay_from("127.0.1.1", streams.port) as other:
            held = [streams.call()]  # from 127.0.0.1 (kept: a call nobody refers to any more is cancelled)
            assert first_code(held[0]) is None
            refused = streams.call(neighbour)  # another address of the same /24: the same caller
            assert first_code(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "from this caller" in refused.details()
            held.append(streams.call(other))
            assert first_code(held[1]) is None  # another /24 has a turn of its own
    finally:
        streams.stop()


def test_an_anonymous_stream_read_too_slowly_is_cut_though_it_never_stalls():
    # 8 MiB/s at least, after the first second; the readers take 1 MiB every 0.25 s, never stalling for IDLE_S
    streams = GatedStreams(16, min_anonymous_rate=8 << 20)

    def read_slowly(call) -> int:
        read = 0
        for _ in call:
            read += 1
            time.sleep(0.25)
        return read

    try:
        assert sum(1 for _ in streams.call()) == 16  # read at once: well within the bound
        with futures.ThreadPoolExecutor(2) as pool:
            anonymous = pool.submit(read_slowly, streams.call())
            named = pool.submit(read_slowly, streams.call(name="learner 1"))
            with pytest.raises(grpc.RpcError) as cut:
                anonymous.result()
            # refused as it asks for the next chunk, or cancelled while it does not read the one it was sent
            assert cut.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)
            assert named.result() == 16  # a learner named by its credential holds only its own turn: no bound
    finally:
        streams.stop()
