"""Callers that hold on: unread streams, requests never finished, streams that stall, on live servers."""

import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

import framing
import guard
import learner as learner_module
import rpc
import wire
from live import LiveLeader
from rpc import leader_pb2

IDLE_S = 1.0


@pytest.fixture
def live(tmp_path, port):
    live = LiveLeader.start(tmp_path, port, "--learners", "2", "--batch-size", "8", "--idle-timeout", str(IDLE_S))
    yield live
    live.stop()


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


def test_unread_streams_neither_starve_registration_nor_gradients_and_are_cut_off(live):
    credentials = live.enrol(1)
    streams = open_unread_streams(live, "GetData", 20, credentials[0])
    time.sleep(1.0)  # every stream has been admitted or refused by now
    started = time.monotonic()
    assert live.register("127.0.0.1:7777", timeout=5).success  # the 16 pool threads of old would all be taken
    live.send_counted(live.gradient(0), credentials[0])
    assert time.monotonic() - started < 5
    assert live.close_round()[0].learners == 1
    codes = [first_code(call) for call in streams[4:]]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 15, codes  # beyond 4 concurrent GetData streams
    time.sleep(IDLE_S + 1.5)  # the admitted, unread streams have been cancelled for making no progress
    payload = learner_module.receive_stream(live.channel, "GetData", leader_pb2.LearnerDataRequest(network_addr="x:1"),
                                            30, credential=credentials[0])
    assert len(payload.tensors["labels"]) == 5000
    for call in streams:
        call.cancel()


def test_calls_that_never_send_their_request_are_cut_off_after_the_idle_timeout(live):
    credentials = live.enrol(2)
    blocked = threading.Event()

    def never():
        blocked.wait(30)
        yield b""

    open_call = live.channel.stream_unary(f"/{rpc.LEADER_SERVICE}/AccumulateGradients")
    stalled = [open_call.future(never()) for _ in range(8)]  # callers that open a gradient call and send nothing
    time.sleep(0.5)
    with pytest.raises(grpc.RpcError) as error:  # every permit of the method is held...
        live.accumulate(live.gradient(0), credentials[0], timeout=5)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in error.value.details()
    time.sleep(IDLE_S + 1.0)  # ...until the idle timeout ends those calls
    live.send_counted(live.gradient(0), credentials[0])
    assert live.close_round()[0].learners == 1
    assert all(call.exception(timeout=5) is not None for call in stalled)
    blocked.set()


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
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(rpc.LEADER_SERVICE,
                                                                                   {"GetModel": handler})])
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return grpc.insecure_channel(f"127.0.0.1:{port}")

    def __exit__(self, *_) -> None:
        self.server.stop(0)


def test_a_slow_stream_may_take_long_but_not_stall():
    payload = wire.encode({"w": torch.ones(1000)})
    with SlowStream(payload, [0.5] * 6) as channel:  # 3 s in all, never 1.5 s without a chunk
        received = learner_module.receive_stream(channel, "GetModel", leader_pb2.Empty(), idle_timeout=1.5)
        assert torch.equal(received.tensors["w"], torch.ones(1000))
    with SlowStream(payload, [0.1, 2.5, 0.1]) as channel:  # one pause of 2.5 s
        with pytest.raises(learner_module.LeaderLost, match="nothing arrived for 2 s"):
            learner_module.receive_stream(channel, "GetModel", leader_pb2.Empty(), idle_timeout=1.5)


def test_the_watchdog_cancels_only_what_overstays():
    cancelled = []
    with guard.WATCHDOG.deadline(0.3, lambda: cancelled.append("slow")):
        time.sleep(0.8)
    with guard.WATCHDOG.deadline(5, lambda: cancelled.append("quick")):
        pass
    time.sleep(0.5)
    assert cancelled == ["slow"]
