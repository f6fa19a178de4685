"""Transfers and serialisation: a learner's GetModel of ResNet-18 against bare gRPC and raw TCP moving the
same bytes between two processes, and our payload codec against safetensors and torch.save.

The servers are this script's helper subcommands (_serve-raw, _serve-model, _tcp-source), so every transfer
crosses a real process boundary on loopback."""

import io
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from functools import partial

import grpc
import torch

from federated.core import strategies
from federated.core.checks import TensorSpec
from federated.leader.collector import RoundCollector
from federated.leader.config import LeaderConfig
from federated.leader.data import DataFacts
from federated.leader.evaluation import Evaluations
from federated.leader.global_model import GlobalModel
from federated.leader.planner import Planner
from federated.leader.registry import Registry
from federated.leader.servicer import ADD_LEADER_SERVICE, LeaderServicer
from federated.learner import session as learner_session
from federated.learner import state as learner_state
from federated.net import rpc
from federated.net.rpc import leader_pb2
from federated.tools import launch
from federated.tools.bench.common import (
    SERVER_LIFETIME_S,
    child,
    spread,
    timed,
    timed_together,
    wait_for_port,
)
from federated.wire import codec, framing
from model import build_model

RAW_SERVICE, RAW_METHOD = "bench.Raw", "/bench.Raw/Stream"
RAW_CHUNKS = (256 << 10, 1 << 20, 4 << 20)  # the raw baseline takes its best of these chunk sizes


# ---- helper processes -------------------------------------------------------------------------


def serve_raw(port: int, total: int, chunk: int) -> None:
    """A bare grpcio server-stream of `total` bytes in `chunk`-byte messages, without protobuf. The chunks are
    distinct, prepared once: like a model's bytes, and unlike one block sent again, they are not in cache."""
    payload = os.urandom(total)
    chunks = [payload[start : start + chunk] for start in range(0, total, chunk)]

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from chunks

    server = grpc.server(futures.ThreadPoolExecutor(4))
    handler = grpc.unary_stream_rpc_method_handler(stream)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(RAW_SERVICE, {"Stream": handler})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination(SERVER_LIFETIME_S)


def serve_model(port: int, architecture: str) -> None:
    """The real LeaderService (GetModel) over a freshly initialised global model."""
    config = LeaderConfig(model=architecture)
    strategy = strategies.named(config.strategy)(config)
    global_model = GlobalModel(config, 10, strategy, ([0.5] * 3, [0.25] * 3))
    planner = Planner(config, strategy, DataFacts([0.5] * 3, [0.25] * 3, 5000))
    # GetModel is all this server is asked for: no learner registers, so no federation to tell
    servicer = LeaderServicer(
        Registry(1, keep_s=30),
        RoundCollector(1, 1),
        global_model,
        None,
        planner,
        None,  # type: ignore[arg-type]
        Evaluations(),
    )
    server, _ = rpc.start_server(f"127.0.0.1:{port}", [(ADD_LEADER_SERVICE, servicer)], [rpc.LEADER_SERVICE], 1 << 20)
    server.wait_for_termination(SERVER_LIFETIME_S)


def tcp_source(port: int, total: int) -> None:
    """Send `total` bytes to the local port over one plain TCP connection, 1 MiB at a time."""
    block = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        for start in range(0, total, len(block)):
            connection.sendall(block[: min(len(block), total - start)])


# ---- the receiving side -----------------------------------------------------------------------


def receive_raw(channel: grpc.Channel) -> int:
    """Bytes of one whole bare stream from a _serve-raw server."""
    return sum(len(chunk) for chunk in channel.unary_stream(RAW_METHOD)(b"", timeout=120))


def receive_model(channel: grpc.Channel, model: torch.nn.Module, spec: TensorSpec) -> None:
    """What a learner does with GetModel: receive, check, load."""
    learner_state.adopt_state(model, learner_session.fetch_model(channel), spec)


def tcp_seconds(total: int) -> float:
    """Seconds to receive `total` bytes from a _tcp-source process over loopback TCP, into one reused buffer."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        source = child("_tcp-source", str(listener.getsockname()[1]), str(total))
        connection, _ = listener.accept()
        buffer, received = bytearray(4 << 20), 0
        started = time.perf_counter()
        with connection:
            while received < total:
                count = connection.recv_into(buffer)
                if not count:
                    break
                received += count
        elapsed = time.perf_counter() - started
    source.wait(30)
    return elapsed


# ---- the figures ------------------------------------------------------------------------------


def model_transfer(repeats: int) -> dict:
    """GetModel of ResNet-18 into a learner's model, against a bare gRPC stream of the same bytes
    (its best chunk size), the two taking turns."""
    model = build_model("resnet18")
    total = len(codec.encode(model.state_dict()))
    servers, raw_channels, channel = start_servers(total)
    spec = codec.spec_of(model.state_dict())
    by_chunk = {
        chunk: statistics.median(timed(partial(receive_raw, raw), repeats)) for chunk, raw in raw_channels.items()
    }
    best_chunk = min(by_chunk, key=by_chunk.__getitem__)
    get_model = framing.chunk_stream(channel, rpc.LEADER_SERVICE, "GetModel")
    steps = {  # each step adds one piece of the learner's work to the one before
        "raw_grpc": lambda: receive_raw(raw_channels[best_chunk]),
        "our_stream": lambda: sum(len(chunk) for chunk in get_model(leader_pb2.Empty(), timeout=120)),
        "plus_copy_into_place": lambda: codec.receive(get_model(leader_pb2.Empty(), timeout=120), total * 2),
        "plus_finite_check_and_load": lambda: receive_model(channel, model, spec),
    }
    times = dict(zip(steps, timed_together(list(steps.values()), 3 * repeats)))
    for server in servers:
        server.kill()
    tcp = spread([tcp_seconds(total) for _ in range(repeats)])
    raw, ours = spread(times["raw_grpc"]), spread(times["plus_finite_check_and_load"])
    return {
        "value": raw["median"] / ours["median"],
        "bytes": total,
        "ours_s": ours,
        "raw_grpc_s": raw,
        "steps_median_s": {name: statistics.median(seconds) for name, seconds in times.items()},
        "raw_best_chunk": best_chunk,
        "ours_gbps": total / ours["median"] / 1e9,
        "raw_grpc_gbps": total / raw["median"] / 1e9,
        "raw_tcp_gbps": total / tcp["median"] / 1e9,
        "raw_grpc_by_chunk_gbps": {str(size): total / seconds / 1e9 for size, seconds in by_chunk.items()},
    }


def start_servers(total: int) -> tuple[list[subprocess.Popen], dict[int, grpc.Channel], grpc.Channel]:
    """A raw server of `total` bytes for each of RAW_CHUNKS and a model server of ResNet-18, each a process of
    its own: the processes, a channel to each raw server by chunk size, and one to the model server."""
    servers, raw_channels = [], {}
    for chunk in RAW_CHUNKS:
        port = launch.free_port()
        servers.append(child("_serve-raw", str(port), str(total), str(chunk)))
        wait_for_port(port)
        raw_channels[chunk] = grpc.insecure_channel(f"127.0.0.1:{port}")
    port = launch.free_port()
    servers.append(child("_serve-model", str(port), "resnet18"))
    wait_for_port(port)
    return servers, raw_channels, rpc.channel(f"127.0.0.1:{port}")


def serialization(repeats: int) -> dict:
    """Encode and decode of a ResNet-18 state_dict: our format, safetensors and torch.save."""
    import safetensors.torch  # only this figure needs it

    state = build_model("resnet18").state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())

    def torch_save() -> bytes:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    codecs = {
        "ours": (lambda: codec.encode(state), lambda data: codec.decode(data).tensors),
        "safetensors": (lambda: safetensors.torch.save(state), safetensors.torch.load),
        "torch_save": (torch_save, lambda data: torch.load(io.BytesIO(data), weights_only=True)),
    }
    results = {}
    for name, (encode, decode) in codecs.items():
        data = encode()
        results[name] = {
            "encode_gbps": size / spread(timed(encode, repeats))["median"] / 1e9,
            "decode_gbps": size / spread(timed(partial(decode, data), repeats))["median"] / 1e9,
        }
    return {"value": results, "bytes": size}
