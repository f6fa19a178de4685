"""Benchmarks (`make bench`): every figure is a ratio against a baseline measured in the same run.

Prints a table and writes bench/results.json, one key per figure. Medians of --repeats runs, with the
spread (min, max) of each. Helper processes (servers, fake learners) are this script's hidden
subcommands, so every transfer crosses a real process boundary on loopback; the links figure puts the
leader and its learners on network-namespace hosts with limited links (tests/hosts.py).
"""

import argparse
import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc
import torch
import torch.nn.functional as F

from federated.wire import framing
from federated.tools import launch
from federated.learner import servicer as learner_service
from federated.learner import session as learner_session
from federated.learner import state as learner_state
from federated.leader import app as leader
from federated.wire import messages
from federated.net import rpc
from federated.common import runtime
import utils
from federated.wire import codec
from federated.leader.metrics import read_metrics
from model import build_model
from federated.net.rpc import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
from federated.leader.registry import SERVING, Registry
from federated.leader.collector import RoundCollector

from federated.tools import hosts
from federated.core.checks import TensorSpec
from federated.core.layout import GradientLayout
from federated.core.steps import make_optimizer
from federated.core.training import compute_gradient, evaluate
RAW_SERVICE, RAW_METHOD = "bench.Raw", "/bench.Raw/Stream"
SERVER_LIFETIME_S = 900
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def child(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(launch.ROOT / "bench.py"), *args], env=ENV, **kwargs)


def empty_dir(path: Path) -> None:
    """Create path, or empty it: a previous run's files would be read as this run's progress."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


# ---- helper processes -------------------------------------------------------------------------

def serve_raw(port: int, total: int, chunk: int) -> None:
    """A bare grpcio server-stream of `total` bytes in `chunk`-byte messages, without protobuf. The chunks are
    distinct, prepared once: like a model's bytes, and unlike one block sent again, they are not in cache."""
    payload = os.urandom(total)
    chunks = [payload[start : start + chunk] for start in range(0, total, chunk)]

    def stream(request, context):
        yield from chunks

    server = grpc.server(futures.ThreadPoolExecutor(4))
    handler = grpc.unary_stream_rpc_method_handler(stream)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(RAW_SERVICE, {"Stream": handler})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination(SERVER_LIFETIME_S)


def serve_model(port: int, architecture: str) -> None:
    """The real LeaderService (GetModel) over a freshly initialised global model."""
    args = leader.parse_args(["--model", architecture])
    global_model = leader.GlobalModel(architecture, 10, args, ([0.5] * 3, [0.25] * 3))
    servicer = leader.LeaderServicer(Registry(1, keep_s=30), RoundCollector(1, 1), global_model, lambda learner_id: [],
                                     batch_size=64)
    server, _ = rpc.start_server(f"127.0.0.1:{port}", [(leader.ADD_LEADER_SERVICE, servicer)],
                                 [rpc.LEADER_SERVICE], 1 << 20)
    server.wait_for_termination(SERVER_LIFETIME_S)


def tcp_source(port: int, total: int) -> None:
    block = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        for start in range(0, total, len(block)):
            connection.sendall(block[: min(len(block), total - start)])


class FakeLearner(learner_pb2_grpc.LearnerServiceServicer):
    """A learner that sends a valid, precomputed ResNet-20 gradient each round instead of training."""

    def __init__(self, leader_address: str) -> None:
        channel = rpc.channel(leader_address)
        self.stub = leader_pb2_grpc.LeaderServiceStub(channel)
        state = learner_session.retry_until(time.monotonic() + SERVER_LIFETIME_S,
                                            lambda: learner_session.fetch_model(channel), "GetModel")
        model = build_model(messages.StateInfo.from_payload(state).architecture)
        self.layout = GradientLayout(model)
        flat = torch.randn(self.layout.size) * 1e-3
        self.layout.read_buffers(flat)  # the model's own BatchNorm statistics: no negative variances
        self.gradient = self.layout.wire_tensors(flat)
        self.round = messages.round_of(state)
        self.inbox, self.started = learner_service.StateInbox(), threading.Event()
        self.session = ""  # its registration, which the leader's health checks ask about
        self.server, port = rpc.start_server("127.0.0.1:0", [(learner_service.ADD_LEARNER_SERVICE, self)],
                                             [rpc.LEARNER_SERVICE], 64 << 20, limits=learner_service.method_limits(60),
                                             sessions=lambda session: SERVING if session == self.session else None)
        register = lambda: self.stub.RegisterLearner(leader_pb2.LearnerInfo(network_addr=f"127.0.0.1:{port}"), timeout=60)
        reply = learner_session.retry_until(time.monotonic() + SERVER_LIFETIME_S, register, "RegisterLearner")
        self.learner_id, self.credential = reply.learner_id, rpc.with_credential(reply.credential)
        self.session = rpc.session_id(reply.credential)

    def StartTraining(self, request, context):
        self.started.set()
        return learner_pb2.Ack(success=True)

    def SyncModelState(self, request, context):
        payload = codec.decode(request.chunk)
        self.inbox.put(messages.round_of(payload), payload)
        return learner_pb2.Ack(success=True)

    def run(self) -> None:
        if not self.started.wait(SERVER_LIFETIME_S):
            return
        version = 0
        while True:  # each wait below is bounded; the leader's final state ends the loop
            claims = messages.UpdateInfo(self.learner_id, self.round, samples=1, loss=1.0)
            request = leader_pb2.GradientData(chunk=codec.encode(self.gradient, claims.to_metadata()))
            send = lambda: self.stub.AccumulateGradients(request, timeout=600, metadata=self.credential)
            learner_session.retry_until(time.monotonic() + SERVER_LIFETIME_S, send, "AccumulateGradients")
            pushed = self.inbox.take(version, 600)
            if pushed is None or messages.is_final(pushed[1]):
                return
            version, self.round = pushed[0], messages.round_of(pushed[1])


def fake_learners(leader_address: str, count: int) -> None:
    torch.set_num_threads(1)
    fakes = [FakeLearner(leader_address) for _ in range(count)]
    threads = [threading.Thread(target=fake.run) for fake in fakes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SERVER_LIFETIME_S)


# ---- figures --------------------------------------------------------------------------------

def receive_raw(channel: grpc.Channel) -> int:
    return sum(len(chunk) for chunk in channel.unary_stream(RAW_METHOD)(b"", timeout=120))


def receive_model(channel: grpc.Channel, model: torch.nn.Module, spec: TensorSpec) -> None:
    """What a learner does with GetModel: receive, check, load."""
    learner_state.adopt_state(model, learner_session.fetch_model(channel), spec)


def timed(action, repeats: int) -> list[float]:
    return timed_together([action], repeats)[0]


def timed_together(actions: list, repeats: int) -> list[list[float]]:
    """Seconds of each action, the actions taking turns so that the machine's drift hits them alike."""
    for action in actions:
        action()  # warm-up: connections, page faults, allocator
    times = [[] for _ in actions]
    for _ in range(repeats):
        for action, seconds in zip(actions, times):
            started = time.perf_counter()
            action()
            seconds.append(time.perf_counter() - started)
    return times


def tcp_seconds(total: int) -> float:
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


def model_transfer(repeats: int) -> dict:
    """GetModel of ResNet-18 into a learner's model, against a bare gRPC stream of the same bytes
    (its best chunk size), the two taking turns."""
    model = build_model("resnet18")
    total = len(codec.encode(model.state_dict()))
    servers, raw_channels = [], {}
    for chunk in (256 << 10, 1 << 20, 4 << 20):
        port = launch.free_port()
        servers.append(child("_serve-raw", str(port), str(total), str(chunk)))
        wait_for_port(port)
        raw_channels[chunk] = grpc.insecure_channel(f"127.0.0.1:{port}")
    port = launch.free_port()
    servers.append(child("_serve-model", str(port), "resnet18"))
    wait_for_port(port)
    channel, spec = rpc.channel(f"127.0.0.1:{port}"), codec.spec_of(model.state_dict())
    by_chunk = {chunk: statistics.median(timed(lambda: receive_raw(raw), repeats)) for chunk, raw in raw_channels.items()}
    best_chunk = min(by_chunk, key=by_chunk.get)
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
    return {"value": raw["median"] / ours["median"], "bytes": total, "ours_s": ours, "raw_grpc_s": raw,
            "steps_median_s": {name: statistics.median(seconds) for name, seconds in times.items()},
            "raw_best_chunk": best_chunk, "ours_gbps": total / ours["median"] / 1e9,
            "raw_grpc_gbps": total / raw["median"] / 1e9, "raw_tcp_gbps": total / tcp["median"] / 1e9,
            "raw_grpc_by_chunk_gbps": {str(size): total / seconds / 1e9 for size, seconds in by_chunk.items()}}


def federation_run(out: Path, learners: int, leader_args: list[str], learner_args: list[str] = ()) -> tuple[list[dict], list]:
    """Run a local federation to the end; return its metrics and (rounds done, loopback bytes) samples."""
    empty_dir(out)
    leader_process, learner_processes = launch.start_federation(learners, leader_args, launch.free_port(), out,
                                                                list(learner_args))
    samples = []
    while leader_process.poll() is None:
        samples.append((rounds_done(out / "metrics.jsonl"), loopback_bytes()))
        time.sleep(0.05)
    codes = launch.wait_all([leader_process, *learner_processes], 900)
    if codes != [0] * (learners + 1):
        raise RuntimeError(f"federation failed with exit codes {codes}; see {out}")
    return read_metrics(out / "metrics.jsonl"), samples


def rounds_done(path: Path) -> int:
    return path.read_text().count("train_loss") if path.exists() else 0


def loopback_bytes() -> int:
    """Bytes the kernel has carried over the loopback interface (each packet counted once)."""
    with open("/proc/net/dev") as devices:
        line = next(line for line in devices if line.strip().startswith("lo:"))
    return int(line.split(":")[1].split()[0])


def os_bytes_per_round(samples: list, first: int, last: int) -> float:
    """Loopback bytes per round between the samples where rounds first and last were reached."""
    start = next(sample for sample in samples if sample[0] >= first)
    end = next(sample for sample in samples if sample[0] >= last)
    return (end[1] - start[1]) / (end[0] - start[0])


def plain_step_seconds(batch: int, threads: int, steps: int, with_optimizer: bool = True) -> list[float]:
    """One plain PyTorch process: forward, backward and SGD step of ResNet-20 on random CIFAR-shaped batches."""
    with runtime.torch_threads(threads):
        torch.manual_seed(0)
        model = build_model("resnet20").train()
        optimizer = make_optimizer(model, 0.05, 0.9, 5e-4)
        images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

        def step():
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            if with_optimizer:
                optimizer.step()

        return timed(step, steps)


def coscheduled_step_seconds(processes: int, threads: int, steps: int, batch: int = 64) -> list[float]:
    """Step times of `processes` plain processes running at once, as learners sharing a machine do."""
    runs = [child("_plain-steps", str(threads), str(steps), str(batch), stdout=subprocess.PIPE, text=True)
            for _ in range(processes)]
    return [seconds for run in runs for seconds in json.loads(run.communicate(timeout=600)[0])]


def round_overhead(work: Path, rounds: int, runs: int = 3) -> dict:
    """Median FedSGD round (2 learners, batch 64 each, ResNet-20) over a plain process's step. Plain steps
    and federation runs take turns, so that drift in the machine's speed hits both alike."""
    threads = max(1, runtime.available_cores() // 2)
    plain, seconds, per_learner, trained_rounds, learner_logs = plain_step_seconds(64, threads, 10), [], [], [], []
    for run in range(runs):
        out = work / f"rounds{run}"
        records, samples = federation_run(out, 2, ["--dataset", "synthetic", "--rounds", str(rounds),
                                                   "--batch-size", "64", "--eval-every", "0"], ["--log-every", "5"])
        trained = [r for r in records if "train_loss" in r][3:]  # the first rounds warm up connections and caches
        seconds += [r["seconds"] for r in trained]
        trained_rounds += trained
        per_learner += [(r["bytes_in"] + r["bytes_out"]) / r["learners"] for r in trained]
        learner_logs += [entry for path in sorted(out.glob("learner*.log")) for entry in learner_progress(path)[1:]]
        plain += plain_step_seconds(64, threads, 10)
    coscheduled = spread(coscheduled_step_seconds(2, threads, 20))
    parameter_bytes = sum(p.numel() * 4 for p in build_model("resnet20").parameters())
    plain_s, round_s = spread(plain), spread(seconds)
    plain_rate = 64 / plain_s["median"]
    learner_rates = [entry.images_per_s for entry in learner_logs]
    where = {f"leader_{key}": statistics.median(r[key] for r in trained_rounds) for key in ("gradients_s", "step_s", "push_s")}
    where["learner_sending_and_waiting_s"] = statistics.median(entry.waiting_s for entry in learner_logs)
    return {
        "round_overhead_ratio": {"value": round_s["median"] / plain_s["median"], "round_s": round_s,
                                 "plain_step_s": plain_s, "threads_per_learner": threads, "runs": runs,
                                 "vs_two_plain_processes_at_once": round_s["median"] / coscheduled["median"],
                                 "two_plain_processes_step_s": coscheduled, "where_the_round_goes": where},
        "wire_bytes_ratio": {"value": statistics.median(per_learner) / (2 * parameter_bytes),
                             "bytes_per_learner_round": statistics.median(per_learner),
                             "os_loopback_bytes_per_learner_round": os_bytes_per_round(samples, 5, rounds - 5) / 2,
                             "parameter_bytes": parameter_bytes},
        "learner_throughput_ratio": {"value": statistics.median(learner_rates) / plain_rate,
                                     "federated_images_per_s": spread(learner_rates), "plain_images_per_s": plain_rate,
                                     "vs_two_plain_processes_at_once": statistics.median(learner_rates) * coscheduled["median"] / 64},
    }


class Progress(NamedTuple):
    round: int
    images_per_s: float  # computing
    waiting_s: float  # a round, sending and waiting


def learner_progress(learner_log: Path) -> list[Progress]:
    """A learner's progress lines ('round N: loss L, R images/s computing, W ms a round sending and waiting')."""
    fields = [line.split(", ") for line in learner_log.read_text().splitlines() if "images/s computing" in line]
    return [Progress(int(re.search(r"round (\d+):", head).group(1)), float(rate.split()[0]),
                     float(waiting.split()[0]) / 1000) for head, rate, waiting in fields]


def memory_mb(pid: int, field: str) -> float:
    """A field of /proc/PID/status in MiB: VmHWM (peak resident), RssAnon (resident heap and stacks)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def watch_memory(process: subprocess.Popen, out: Path, rounds: int) -> dict:
    """Until the leader ends: its peak RSS; and, sampled every 50 ms, its peak anonymous RSS, that when it
    starts the learners (just before the first round) and the most the rounds added to it.

    Anonymous memory is what the process allocated; the rest of RSS is file pages (PyTorch's libraries
    are ~0.5 GB of them) that the kernel may drop and reload at any time, which makes RSS itself swing
    by hundreds of MB here (this machine runs DAMON page-out)."""
    peak = peak_anon = before = during = 0.0
    while process.poll() is None:
        try:
            peak, anon = memory_mb(process.pid, "VmHWM"), memory_mb(process.pid, "RssAnon")
        except (OSError, StopIteration):
            break
        peak_anon = max(peak_anon, anon)
        if not before and "starting learners" in (out / "leader.log").read_text():
            before = anon
        if before and rounds_done(out / "metrics.jsonl") < rounds:
            during = max(during, anon)
        time.sleep(0.05)
    return {"leader_peak_rss_mb": peak, "leader_peak_anon_mb": peak_anon, "anon_before_rounds_mb": before,
            "anon_growth_in_rounds_mb": during - before}


def leader_scale(work: Path, counts: list[int], rounds: int) -> dict:
    """Rounds per second and peak leader RSS with 1..64 fake learners (valid gradients, no training)."""
    results = {}
    for count in counts:
        out, port = work / f"scale{count}", launch.free_port()
        empty_dir(out)
        leader_process = subprocess.Popen(
            [sys.executable, str(launch.ROOT / "leader.py"), "--learners", str(count), "--dataset", "synthetic",
             "--rounds", str(rounds), "--batch-size", "1", "--host", "127.0.0.1", "--port", str(port),
             "--out", str(out), "--threads", "1", "--register-timeout", "120"], env=ENV,
            stdout=open(out / "leader.log", "w"), stderr=subprocess.STDOUT)
        wait_for_port(port)
        groups = [min(16, count - first) for first in range(0, count, 16)]
        fakes = [child("_fake-learners", f"127.0.0.1:{port}", str(size), stdout=open(out / f"fakes{i}.log", "w"),
                       stderr=subprocess.STDOUT) for i, size in enumerate(groups)]
        memory = watch_memory(leader_process, out, rounds)
        launch.wait_all(fakes, 120)
        seconds = [r["seconds"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r][2:]
        results[str(count)] = {"rounds_per_s": 1 / statistics.median(seconds), "round_s": spread(seconds), **memory}
    model_mb = sum(p.numel() * 4 for p in build_model("resnet20").parameters()) / 2**20
    first, last = results[str(counts[0])], results[str(counts[-1])]
    return {"value": results, "model_mb": model_mb,
            "rss_growth_mb": last["leader_peak_rss_mb"] - first["leader_peak_rss_mb"],
            "anon_growth_mb": last["leader_peak_anon_mb"] - first["leader_peak_anon_mb"],
            "anon_growth_in_rounds_mb": last["anon_growth_in_rounds_mb"] - first["anon_growth_in_rounds_mb"],
            "rss_growth_limit_mb": counts[-1] * 1.5 * model_mb,
            "round_time_growth": last["round_s"]["median"] / first["round_s"]["median"],
            "learner_growth": counts[-1] / counts[0]}


def serialization(repeats: int) -> dict:
    """Encode and decode of a ResNet-18 state_dict: our format, safetensors and torch.save."""
    import safetensors.torch

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
        results[name] = {"encode_gbps": size / spread(timed(encode, repeats))["median"] / 1e9,
                         "decode_gbps": size / spread(timed(lambda: decode(data), repeats))["median"] / 1e9}
    return {"value": results, "bytes": size}


def time_to_accuracy(work: Path, rounds: int, target: float = 0.90) -> dict:
    """Wall time to `target` test accuracy: 2 learners of batch 32 against one process of batch 64."""
    records, _ = federation_run(work / "tta", 2, ["--dataset", "synthetic", "--rounds", str(rounds), "--batch-size", "32",
                                                "--eval-every", "10"])
    federated = _seconds_to(records, target)
    central = _seconds_to(centralised_records(rounds, 64, target), target)
    return {"value": federated / central if federated and central else None, "federated_s": federated,
            "centralised_s": central, "target": target}


def _seconds_to(records: list[dict], target: float) -> float | None:
    elapsed = 0.0
    for record in records:
        if "train_loss" in record:
            elapsed += record["seconds"]
        elif record["test_accuracy"] >= target:
            return elapsed
    return None


BENCH_STRATEGIES = ("fedsgd", "fedavg", "fedavgm", "fedprox", "fedadam", "scaffold")


def strategy_runs(work: Path, epochs: float, target: float = 0.90) -> dict:
    """Each strategy on the synthetic set with 2 learners of batch 32 for `epochs` passes over their shards (the
    same compute for all; the local strategies train one local epoch per round): rounds, bytes on the wire
    (both ways) and wall time until test accuracy first reaches target, and the final accuracy."""
    runs = {}
    for name in BENCH_STRATEGIES:
        every = "10" if name == "fedsgd" else "1"
        flags = ["--dataset", "synthetic", "--batch-size", "32", "--epochs", str(epochs), "--eval-every", every,
                 "--strategy", name]
        runs[name] = federation_run(work / f"strategy-{name}", 2, flags)[0]
    # A FedAvg round of one local epoch against that epoch's bare compute: two plain processes stepping at once
    epoch_compute = statistics.median(coscheduled_step_seconds(2, 1, 40, batch=32)) * (utils.SYNTHETIC_SIZES[True] // 2 // 32)
    fedavg_round = statistics.median([record["seconds"] for record in runs["fedavg"] if "train_loss" in record])
    return {**strategy_table(runs, target, work.parent / "strategies.png"), "epochs": epochs,
            "fedavg_round_s": fedavg_round, "local_epoch_compute_s": epoch_compute,
            "fedavg_round_vs_compute": fedavg_round / epoch_compute}


def strategy_table(runs: dict[str, list[dict]], target: float, plot: Path) -> dict:
    """The strategies table and plot from each strategy's metrics records."""
    table, curves = {}, {name: accuracy_by_bytes(records) for name, records in runs.items()}
    for name, points in curves.items():
        reached = next(((rounds, sent, seconds) for rounds, sent, seconds, accuracy in points if accuracy >= target), None)
        table[name] = {"rounds_to_target": reached and reached[0], "mb_to_target": reached and reached[1] / 1e6,
                       "seconds_to_target": reached and reached[2], "final_accuracy": points[-1][3],
                       "rounds": points[-1][0]}
    base = table["fedsgd"]
    for row in table.values():  # how many times fewer bytes and how much faster than FedSGD
        reached = row["mb_to_target"] and base["mb_to_target"]
        row["bytes_vs_fedsgd"] = row["mb_to_target"] / base["mb_to_target"] if reached else None
        row["seconds_vs_fedsgd"] = row["seconds_to_target"] / base["seconds_to_target"] if reached else None
    plot_strategies(curves, plot, target)
    return {"value": table, "target": target, "plot": str(plot)}


def accuracy_by_bytes(records: list[dict]) -> list[tuple[int, float, float, float]]:
    """(rounds, bytes sent both ways, seconds of rounds, test accuracy) at each evaluation of a run (an
    evaluation's record comes before its round's)."""
    sent, seconds, upto = 0.0, 0.0, {0: (0.0, 0.0)}
    for record in records:
        if "train_loss" in record:
            sent, seconds = sent + record["bytes_in"] + record["bytes_out"], seconds + record["seconds"]
            upto[record["round"]] = (sent, seconds)
    return [(record["round"], *upto[record["round"]], record["test_accuracy"]) for record in records
            if "test_accuracy" in record]


def plot_strategies(curves: dict, path: Path, target: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        axis.plot([sent / 1e6 for _, sent, _, _ in points], [accuracy for *_, accuracy in points], marker=".", label=name)
    axis.axhline(target, color="grey", linestyle=":", linewidth=1)
    axis.set(xscale="log", xlabel="MB on the wire (both ways, 2 learners)", ylabel="test accuracy",
             title="Synthetic set, ResNet-20, same compute per strategy")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


PARTITIONS = {"iid": [], "dirichlet 0.5": ["--partition", "dirichlet", "--alpha", "0.5"],
              "dirichlet 0.1": ["--partition", "dirichlet", "--alpha", "0.1"],
              "2 classes each": ["--partition", "classes", "--classes-per-learner", "2"]}
NON_IID_STRATEGIES = ("fedsgd", "fedavg", "fedprox", "scaffold")


def non_iid_runs(work: Path, dataset: str, epochs: float, learners: int = 10, target: float = 0.80) -> dict:
    """Each strategy with its defaults on each partition of the dataset among `learners` learners of batch 32,
    for `epochs` passes over their shards: the final test accuracy and the rounds until it first reached target."""
    table = {}
    for partition, partition_flags in PARTITIONS.items():
        for strategy in NON_IID_STRATEGIES:
            flags = ["--dataset", dataset, "--batch-size", "32", "--epochs", str(epochs), "--strategy", strategy,
                     "--eval-every", "10" if strategy == "fedsgd" else "1", *partition_flags]
            name = f"non-iid-{partition.replace(' ', '-')}-{strategy}"
            evaluations = [r for r in federation_run(work / name, learners, flags)[0] if "test_accuracy" in r]
            reached = next((r["round"] for r in evaluations if r["test_accuracy"] >= target), None)
            table.setdefault(partition, {})[strategy] = {"final_accuracy": evaluations[-1]["test_accuracy"],
                                                         "rounds_to_target": reached, "rounds": evaluations[-1]["round"]}
            print(f"  {partition:15} {strategy:9} final accuracy {evaluations[-1]['test_accuracy']:.4f}, "
                  f"{reached or '-'} rounds to {target:.0%}", flush=True)
    return {"value": table, "target": target, "learners": learners, "epochs": epochs, "dataset": dataset}
# ---- links: the leader and its learners on hosts of their own, each link limited ------------------------

LINK_PORT = 50051  # every host has a network stack of its own: the port is free there
LINK_LEARNERS = 2
LINK_RATES = ("100mbit", "1gbit")


@dataclass(frozen=True)
class LinkRun:
    """One configuration of the links figure: LINK_LEARNERS learners, one thread each, on the synthetic set."""

    model: str
    batch: int
    rounds: int  # rounds recorded
    skip: int  # first rounds left out of the median (connections, caches)
    rates: tuple[str, ...] = LINK_RATES
    wire_dtype: str = "float32"
    local_steps: int = 0  # 0: FedSGD; else FedAvg with this many local steps a round

    @property
    def name(self) -> str:
        strategy = f"fedavg {self.local_steps} steps" if self.local_steps else "fedsgd"
        return f"{self.model} {strategy} {self.wire_dtype}"

    def leader_args(self) -> list[str]:
        local = ["--strategy", "fedavg", "--local-steps", str(self.local_steps)] if self.local_steps else []
        return ["--dataset", "synthetic", "--model", self.model, "--batch-size", str(self.batch),
                "--wire-dtype", self.wire_dtype, *local]


LINK_RUNS = (LinkRun("resnet20", 64, 10, 2), LinkRun("resnet20", 64, 10, 2, wire_dtype="float16"),
             LinkRun("resnet18", 32, 4, 1),  # 45 MB a state: a round at 100 Mbit/s takes seconds
             LinkRun("resnet20", 64, 4, 1, ("100mbit",), local_steps=10))


def links(work: Path) -> dict:
    """Rounds with the leader and LINK_LEARNERS learners on hosts of their own (network namespaces,
    tests/hosts.py), every host's outgoing link limited to each rate, against the physical bound of the same
    round: its compute, one learner's upload of its update, and the leader's uploads of the state to every
    learner at the link's rate.
    The bytes are those the run moved (the payloads in its metrics.jsonl); the rate is the link's, so TCP/IP's
    headers (about 4.5 % at 1500-byte packets: 96 Mbit/s of payload on a 100 Mbit/s link here) count against
    us. Skipped, saying why, where network namespaces cannot be made."""
    reason = hosts.unavailable()
    if reason:
        print(f"links: skipped: {reason}", flush=True)
        return {"value": None, "skipped": reason}
    table = {}
    for run in LINK_RUNS:
        for rate in run.rates:
            records, compute = link_rounds(work / f"links-{run.name.replace(' ', '-')}-{rate}", rate, run)
            table[f"{run.name} @ {rate}"] = link_row(records[run.skip:], compute, hosts.rate_bits(rate))
    return {"value": table}


def link_rounds(out: Path, rate: str, run: LinkRun, timeout: float = 600) -> tuple[list[dict], dict[int, float]]:
    """The first run.rounds round records of a federation on hosts of its own whose links are limited to rate,
    and each round's compute: the slower learner's, from its progress line for that round.

    The compute part of the bound comes from the same rounds, not from plain steps timed before them: this
    machine is shared and its speed drifts by tens of percent from one minute to the next, and plain steps
    timed at the start of the figure put its ResNet-20 ratios anywhere between 1.0 and 2.1. Nor is it the
    round on unlimited links, which would put our own work (the checked step, encoding, gRPC) into the bound
    and hide it. (Learners log whole images/s: ResNet-18's compute is known to about 5 %.)
    The processes are killed with the hosts after those rounds: the final evaluation and state, which no
    round's time includes, would add a minute with ResNet-18."""
    empty_dir(out)
    with hosts.Hosts(1 + LINK_LEARNERS, rate) as net:
        leader_process, learner_processes = launch.start_federation(
            LINK_LEARNERS, [*run.leader_args(), "--rounds", str(run.rounds + 1)], LINK_PORT, out,
            ["--log-every", "1"], hosts=net.hosts)
        processes = [leader_process, *learner_processes]
        deadline = time.monotonic() + timeout
        while min(rounds_done(out / "metrics.jsonl"), logged_rounds(out)) < run.rounds:  # logged: once its state is in
            if any(process.poll() is not None for process in processes) or time.monotonic() > deadline:
                raise RuntimeError(f"{run.name} at {rate}: {run.rounds} rounds not done in {timeout:.0f} s; see {out}")
            time.sleep(0.2)
    launch.wait_all(processes, 10)  # reap them: leaving the hosts killed them
    images = run.batch * max(1, run.local_steps)
    computes: dict[int, list[float]] = {}
    for path in out.glob("learner*.log"):
        for entry in learner_progress(path):
            computes.setdefault(entry.round, []).append(images / entry.images_per_s)
    records = [record for record in read_metrics(out / "metrics.jsonl") if "train_loss" in record][:run.rounds]
    slowest = {round_index: max(seconds) for round_index, seconds in computes.items() if len(seconds) == LINK_LEARNERS}
    return records, slowest


def logged_rounds(out: Path) -> int:
    """The last round every learner of the run in out has logged its progress for (0 before any)."""
    logs = sorted(out.glob("learner*.log"))
    return min((max((entry.round for entry in learner_progress(path)), default=0) for path in logs), default=0)


def link_row(records: list[dict], compute: dict[int, float], rate_bits: int) -> dict:
    """A run's median round against its bound: the median of its rounds' compute, then the transfer of the
    median update up one learner's link and of the median states down the leader's one link to every learner,
    at rate_bits/s less what the link's full token bucket lets through at once (it refills while the learners
    compute). Rounds without both learners' compute are left out."""
    timed = [record for record in records if record["round"] in compute]
    update = statistics.median(record["bytes_in"] / record["learners"] for record in timed)
    states = statistics.median(record["bytes_out"] for record in timed)
    burst = hosts.burst_bytes(rate_bits)
    transfer = (max(0.0, update - burst) + max(0.0, states - burst)) * 8 / rate_bits
    measured, computed = spread([record["seconds"] for record in timed]), spread([compute[r["round"]] for r in timed])
    bound = computed["median"] + transfer
    return {"round_s": measured, "bound_s": bound, "ratio": measured["median"] / bound, "compute_s": computed,
            "transfer_s": transfer, "update_bytes": update, "states_bytes": states, "burst_bytes": burst,
            "leader_step_s": statistics.median(record["step_s"] for record in timed)}


def centralised_records(rounds: int, batch: int, target: float) -> list[dict]:
    """The same training in one process on the whole training set, with the leader's schedule,
    evaluated every 10 steps until it reaches target."""
    runtime.set_threads(0)
    train, test = utils.synthetic(True), utils.synthetic(False)
    mean, std = utils.channel_stats(train.images)
    test_images = utils.normalize(test.images, mean, std)
    torch.manual_seed(0)
    model = build_model("resnet20")
    layout = GradientLayout(model)
    gradient = torch.zeros(layout.size)
    layout.bind_gradients(gradient)
    optimizer = make_optimizer(model, 0.0, 0.9, 5e-4)
    batches = utils.BatchSchedule(len(train), batch, 0)
    args = leader.parse_args(["--learners", "1", "--batch-size", str(batch), "--rounds", str(rounds)])
    lr_schedule = leader.make_schedule(args, len(train))  # the leader's own schedule for one learner of this batch
    records = []
    for round_index in range(rounds):
        started = time.perf_counter()
        images, labels = utils.training_batch(train, batches, round_index, mean, std)
        compute_gradient(model, layout, gradient, images, labels)
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule.lr(round_index)
        optimizer.step()
        records.append({"train_loss": 0.0, "seconds": time.perf_counter() - started})
        if (round_index + 1) % 10 == 0:
            records.append({"test_accuracy": evaluate(model, test_images, test.labels).accuracy})
            if records[-1]["test_accuracy"] >= target:
                break
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=runtime.HelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each timed transfer")
    parser.add_argument("--rounds", type=int, default=20, help="FedSGD rounds of each of the round-overhead runs")
    parser.add_argument("--scale", default="1,4,16,64", help="learner counts for leader_scale")
    parser.add_argument("--strategy-epochs", type=float, default=3, help="epochs of each run of the strategies table")
    parser.add_argument("--non-iid-epochs", type=float, default=3, help="epochs of each run of the non_iid table")
    parser.add_argument("--non-iid-dataset", choices=("synthetic", "cifar10"), default="synthetic",
                        help="dataset of the non_iid table (cifar10 needs data/cifar-10-batches-py and hours on a CPU)")
    parser.add_argument("--out", default="bench", help="directory for results.json and the runs' logs")
    parser.add_argument("--only", nargs="*", help="run only these figures (results.json keeps the earlier values of the others)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    figures = {
        "model_transfer_ratio": lambda: model_transfer(args.repeats),
        "round_overhead": lambda: round_overhead(out / "work", args.rounds),
        "leader_scale": lambda: leader_scale(out / "work", [int(n) for n in args.scale.split(",")], 20),
        "serialization_gbps": lambda: serialization(args.repeats),
        "time_to_accuracy": lambda: time_to_accuracy(out / "work", 250),
        "strategies": lambda: strategy_runs(out / "work", args.strategy_epochs),
        "non_iid": lambda: non_iid_runs(out / "work", args.non_iid_dataset, args.non_iid_epochs),
        "links": lambda: links(out / "work"),
    }
    results = {}
    for name, measure in figures.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        measured = measure()
        results.update(measured if name == "round_overhead" else {name: measured})
        print(f"{name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    path = out / "results.json"
    earlier = json.loads(path.read_text()) if args.only and path.exists() else {}  # --only updates those figures
    path.write_text(json.dumps({**earlier, **results}, indent=2))
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print(f"\n{'figure':28} {'value':>10}  details")
    for name, result in results.items():
        value = result["value"]
        shown = f"{value:10.3f}" if isinstance(value, float) else f"{'see json':>10}"
        details = {k: v for k, v in result.items() if k != "value" and not isinstance(v, dict)}
        print(f"{name:28} {shown}  {json.dumps(details)[:160]}")
    if "leader_scale" in results:
        for count, row in results["leader_scale"]["value"].items():
            print(f"  {count:>3} learners: {row['rounds_per_s']:7.2f} rounds/s; leader peak RSS {row['leader_peak_rss_mb']:7.1f} MB,"
                  f" peak anonymous {row['leader_peak_anon_mb']:7.1f} MB, of which the rounds added {row['anon_growth_in_rounds_mb']:5.1f} MB")
    if "strategies" in results:
        print(f"  {'strategy':10} {'rounds':>6} {'MB':>9} {'seconds':>8} to {results['strategies']['target']:.0%}; "
              "final accuracy; bytes and time against FedSGD")
        for name, row in results["strategies"]["value"].items():
            shown = lambda value, form: format(value, form) if value is not None else "-"
            print(f"  {name:10} {shown(row['rounds_to_target'], '6d'):>6} {shown(row['mb_to_target'], '9.1f'):>9} "
                  f"{shown(row['seconds_to_target'], '8.1f'):>8}    {row['final_accuracy']:.4f}   "
                  f"{shown(row['bytes_vs_fedsgd'], '.3f')} {shown(row['seconds_vs_fedsgd'], '.3f')}")
    if "non_iid" in results:
        result = results["non_iid"]
        strategies = list(next(iter(result["value"].values())))
        print(f"  non_iid: final accuracy (rounds to {result['target']:.0%}), {result['learners']} learners, "
              f"{result['epochs']:g} epochs of {result['dataset']}")
        print(f"  {'partition':16}" + "".join(f"{name:>16}" for name in strategies))
        for partition, row in result["value"].items():
            print(f"  {partition:16}" + "".join(f"{row[name]['final_accuracy']:>9.4f} ({row[name]['rounds_to_target'] or '-':>4})"
                                                for name in strategies))
    if "serialization_gbps" in results:
        for codec, row in results["serialization_gbps"]["value"].items():
            print(f"  {codec:12} encode {row['encode_gbps']:6.2f} GB/s, decode {row['decode_gbps']:8.2f} GB/s")


if __name__ == "__main__":
    runtime.tune_allocator()  # as leader.py and learner.py do; the baselines get the same allocator
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        command, rest = sys.argv[1], sys.argv[2:]
        {"_serve-raw": lambda: serve_raw(int(rest[0]), int(rest[1]), int(rest[2])),
         "_serve-model": lambda: serve_model(int(rest[0]), rest[1]),
         "_tcp-source": lambda: tcp_source(int(rest[0]), int(rest[1])),
         "_fake-learners": lambda: fake_learners(rest[0], int(rest[1])),
         "_plain-steps": lambda: print(json.dumps(plain_step_seconds(int(rest[2]), int(rest[0]), int(rest[1]))))}[command]()
        sys.exit(0)
    sys.exit(main())
