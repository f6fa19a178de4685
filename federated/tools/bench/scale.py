"""Leader scale and memory: rounds per second and the leader's memory with 1 to 64 fake learners (this script's
_fake-learners helper: processes of 16 learners that send valid ResNet-20 gradients without training); and with 100
to 1,000 registered learners that train, virtual learners in a few processes (learner.py --virtual N), some drawn a
round (virtual_scale)."""

import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch

from federated.core.layout import GradientLayout
from federated.leader.metrics import read_metrics
from federated.leader.registry import SERVING
from federated.learner import servicer as learner_service
from federated.learner import session as learner_session
from federated.net import rpc
from federated.net.rpc import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
from federated.tools import launch
from federated.tools.bench.common import (
    ENV,
    ROOT,
    SERVER_LIFETIME_S,
    child,
    empty_dir,
    spread,
    wait_for_port,
)
from federated.tools.bench.federations import learner_progress, rounds_done
from federated.wire import codec, messages
from model import build_model

FAKES_PER_PROCESS = 16


class FakeLearner(learner_pb2_grpc.LearnerServiceServicer):
    """A learner that sends a valid, precomputed ResNet-20 gradient each round instead of training."""

    def __init__(self, leader_address: str) -> None:
        channel = rpc.channel(leader_address)
        self.stub = leader_pb2_grpc.LeaderServiceStub(channel)
        state = learner_session.retried(
            time.monotonic() + SERVER_LIFETIME_S, lambda: learner_session.fetch_model(channel), "GetModel"
        )
        model = build_model(messages.StateInfo.from_payload(state).architecture)
        self.layout = GradientLayout(model)
        flat = torch.randn(self.layout.size) * 1e-3
        self.layout.read_buffers(flat)  # the model's own BatchNorm statistics: no negative variances
        self.gradient = self.layout.wire_tensors(flat)
        self.round = messages.round_of(state)
        self.inbox, self.started = learner_service.StateInbox(), threading.Event()
        self.session = ""  # its registration, which the leader's health checks ask about
        self.server, port = rpc.start_server(
            "127.0.0.1:0",
            [(learner_service.ADD_LEARNER_SERVICE, self)],
            [rpc.LEARNER_SERVICE],
            64 << 20,
            limits=learner_service.method_limits(60),
            sessions=lambda session: SERVING if session == self.session else None,
        )
        register = lambda: self.stub.RegisterLearner(
            leader_pb2.LearnerInfo(network_addr=f"127.0.0.1:{port}"), timeout=60
        )
        reply = learner_session.retried(time.monotonic() + SERVER_LIFETIME_S, register, "RegisterLearner")
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
        """Send the gradient for each round until the leader's final state (each wait bounded)."""
        if not self.started.wait(SERVER_LIFETIME_S):
            return
        version = 0
        while True:  # each wait below is bounded; the leader's final state ends the loop
            claims = messages.UpdateInfo(self.learner_id, self.round, samples=1, loss=1.0)
            request = leader_pb2.GradientData(chunk=codec.encode(self.gradient, claims.to_metadata()))
            send = partial(self.stub.AccumulateGradients, request, timeout=600, metadata=self.credential)
            learner_session.retried(time.monotonic() + SERVER_LIFETIME_S, send, "AccumulateGradients")
            pushed = self.inbox.take(version, 600)
            if pushed is None or messages.is_final(pushed[1]):
                return
            version, self.round = pushed[0], messages.round_of(pushed[1])


def fake_learners(leader_address: str, count: int) -> None:
    """The _fake-learners helper: count fake learners of the leader at leader_address, until its last round."""
    torch.set_num_threads(1)
    fakes = [FakeLearner(leader_address) for _ in range(count)]
    threads = [threading.Thread(target=fake.run) for fake in fakes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SERVER_LIFETIME_S)


def leader_scale(work: Path, counts: list[int], rounds: int) -> dict:
    """Rounds per second and peak leader RSS with 1..64 fake learners (valid gradients, no training)."""
    results = {str(count): scale_run(work / f"scale{count}", count, rounds) for count in counts}
    model_mb = sum(p.numel() * 4 for p in build_model("resnet20").parameters()) / 2**20
    first, last = results[str(counts[0])], results[str(counts[-1])]
    return {
        "value": results,
        "model_mb": model_mb,
        "rss_growth_mb": last["leader_peak_rss_mb"] - first["leader_peak_rss_mb"],
        "anon_growth_mb": last["leader_peak_anon_mb"] - first["leader_peak_anon_mb"],
        "anon_growth_in_rounds_mb": last["anon_growth_in_rounds_mb"] - first["anon_growth_in_rounds_mb"],
        "rss_growth_limit_mb": counts[-1] * 1.5 * model_mb,
        "round_time_growth": last["round_s"]["median"] / first["round_s"]["median"],
        "learner_growth": counts[-1] / counts[0],
    }


def scale_run(out: Path, count: int, rounds: int) -> dict:
    """One leader of `rounds` rounds with `count` fake learners: its rounds per second and its memory."""
    port = launch.free_port()
    empty_dir(out)
    with open(out / "leader.log", "w") as log:  # the process keeps its own copy of the file
        leader_process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "leader.py"),
                "--learners",
                str(count),
                "--dataset",
                "synthetic",
                "--rounds",
                str(rounds),
                "--batch-size",
                "1",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--out",
                str(out),
                "--threads",
                "1",
                "--register-timeout",
                "120",
            ],
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_for_port(port)
    groups = [min(FAKES_PER_PROCESS, count - first) for first in range(0, count, FAKES_PER_PROCESS)]
    fakes = [start_fakes(f"127.0.0.1:{port}", size, out / f"fakes{i}.log") for i, size in enumerate(groups)]
    memory = watch_memory(leader_process, out, rounds)
    launch.wait_all(fakes, 120)
    seconds = [r["seconds"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r][2:]
    return {"rounds_per_s": 1 / statistics.median(seconds), "round_s": spread(seconds), **memory}


def start_fakes(leader_address: str, count: int, log_path: Path) -> subprocess.Popen:
    """A _fake-learners process of count fake learners, logging to log_path."""
    with open(log_path, "w") as log:
        return child("_fake-learners", leader_address, str(count), stdout=log, stderr=subprocess.STDOUT)


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
    return {
        "leader_peak_rss_mb": peak,
        "leader_peak_anon_mb": peak_anon,
        "anon_before_rounds_mb": before,
        "anon_growth_in_rounds_mb": during - before,
    }


# ---- virtual_scale: many learners in a few processes (learner.py --virtual N) ------------------------------------

POOL_SIZE = 250  # virtual learners per learner process in the rows of several hundred
# What a drawn learner does each round in every virtual_scale run: FedAvg, 2 local steps of 8 images (the synthetic
# set's 10,000 images make 1,000 shards of 10), at the run's image size
IMAGES_PER_UPDATE = 16
VIRTUAL_LEADER_FLAGS = [
    "--strategy",
    "fedavg",
    "--local-steps",
    "2",
    "--batch-size",
    "8",
    "--dataset",
    "synthetic",
    "--threads",
    "1",
    "--checkpoint-every",
    "0",
    "--register-timeout",
    "600",
]
GOAL = (1000, 20)  # the goal: 1,000 registered, 20 a round, in one process (its learners train in turn)
SAME_ROUNDS = 10  # learner processes of the rows that compare processes with virtual learners (all drawn)


def virtual_scale(work: Path, runs: list[tuple[int, int]], rounds: int, image_size: int) -> dict:
    """FedAvg rounds with REGISTERED virtual learners (pools of POOL_SIZE per learner process) of which PER_ROUND are
    drawn a round: registration, rounds per second, memory, bytes; the goal row (1,000 registered, 20 a round, one
    process) against its drawn learners' compute; and 10 learner processes against 10 virtual learners in one. The
    compute of a round's drawn learners: PER_ROUND times a learner's update as a lone learner process reports it
    (its images/s computing): a pool's learners train one at a time, and one's own figure there would count its wait
    for the others."""
    run = partial(virtual_run, rounds=rounds, image_size=image_size)
    alone = run(work / "alone", 1, 1, processes=1)
    measured = {
        "rows": {
            f"{registered}:{per_round}": run(
                work / f"virtual{registered}-{per_round}", registered, per_round, processes=-(-registered // POOL_SIZE)
            )
            for registered, per_round in runs
        },
        "goal": run(work / "goal", *GOAL, processes=1),
        "processes": run(work / "processes", SAME_ROUNDS, SAME_ROUNDS, processes=SAME_ROUNDS),
        "pooled": run(work / "pooled", SAME_ROUNDS, SAME_ROUNDS, processes=1),
    }
    for run in [*measured["rows"].values(), measured["goal"], measured["processes"], measured["pooled"]]:
        run["compute_s"] = run["per_round"] * alone["update_s"]
    goal = measured["goal"]
    return {
        "value": goal["round_s"] / goal["compute_s"],
        "update_s": alone["update_s"],
        "image_size": image_size,
        **measured,
    }


def virtual_run(out: Path, registered: int, per_round: int, rounds: int, processes: int, image_size: int) -> dict:
    """One leader of `rounds` FedAvg rounds with `registered` learners in `processes` learner processes (virtual
    learners when fewer processes than learners), `per_round` drawn a round."""
    port = launch.free_port()
    empty_dir(out)
    leader_flags = ["--learners", str(registered), "--learners-per-round", str(per_round), "--rounds", str(rounds)]
    leader_flags += ["--image-size", str(image_size)]
    serving = ["--host", "127.0.0.1", "--port", str(port), "--out", str(out)]
    with open(out / "leader.log", "w") as log:  # the process keeps its own copy of the file
        leader = subprocess.Popen(
            [sys.executable, str(ROOT / "leader.py"), *serving, *leader_flags, *VIRTUAL_LEADER_FLAGS],
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_for_port(port)
    sizes = [registered // processes + (index < registered % processes) for index in range(processes)]
    started = time.monotonic()
    learners = [start_pool(f"127.0.0.1:{port}", size, out / f"learners{index}.log") for index, size in enumerate(sizes)]
    watched = watch_run(leader, learners, out / "leader.log")
    codes = launch.wait_all([leader, *learners], 300)
    if codes != [0] * (processes + 1):
        raise RuntimeError(f"virtual_scale run failed with exit codes {codes}; see {out}")
    records = [record for record in read_metrics(out / "metrics.jsonl") if "train_loss" in record][1:-1]
    # a lone learner process's updates (the first of a process: its warm-up), as it reports their compute
    updates = [IMAGES_PER_UPDATE / progress.images_per_s for progress in learner_progress(out / "learners0.log")[1:]]
    round_s = statistics.median(record["seconds"] for record in records)
    return {
        "registered": registered,
        "per_round": per_round,
        "processes": processes,
        "registration_s": watched["starting_at"] - started,
        "rounds_per_s": 1 / round_s,
        "round_s": round_s,
        "update_s": statistics.median(updates) if registered == processes and updates else None,
        "bytes_per_round": statistics.median(record["bytes_in"] + record["bytes_out"] for record in records),
        "leader_peak_rss_mb": watched["leader_mb"],
        "learners_peak_rss_mb": watched["learners_mb"],
    }


def start_pool(leader_address: str, count: int, log_path: Path) -> subprocess.Popen:
    """A learner process of count learners (--virtual), one torch thread, logging every round's compute."""
    flags = ["--threads", "1", "--log-every", "1", "--virtual", str(count)]
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "learner.py"), "--leader", leader_address, "--host", "127.0.0.1", *flags],
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def watch_run(leader: subprocess.Popen, learners: list[subprocess.Popen], leader_log: Path) -> dict:
    """Until the leader ends, every 0.2 s: when it started the learners (all registered), its peak RSS and the
    learner processes' peak RSS together."""
    starting_at, leader_mb, learners_mb = 0.0, 0.0, {}
    while leader.poll() is None:
        try:
            leader_mb = memory_mb(leader.pid, "VmHWM")
            for learner in learners:
                learners_mb[learner.pid] = memory_mb(learner.pid, "VmHWM")
        except (OSError, StopIteration):  # (one that just ended: its last reading stands)
            pass
        if not starting_at and "starting learners" in leader_log.read_text():
            starting_at = time.monotonic()
        time.sleep(0.2)
    return {"starting_at": starting_at, "leader_mb": leader_mb, "learners_mb": sum(learners_mb.values())}
