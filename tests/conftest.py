"""Shared test set-up: the repository on sys.path, one torch thread, and real processes on localhost."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

import launch  # noqa: E402  (needs ROOT on sys.path)


@pytest.fixture
def port() -> int:
    return launch.free_port()


def run_federation(out: Path, learners: int, leader_args: list[str], learner_args: list[str] = (),
                   timeout: float = 400) -> list[int | None]:
    """Run a leader and learners as real processes to the end; return their exit codes."""
    leader, procs = launch.start_federation(learners, leader_args, launch.free_port(), out, list(learner_args))
    return launch.wait_all([leader, *procs], timeout)


def logs(out: Path) -> str:
    """Every process log of a run, for assertion messages."""
    return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(out.glob("*.log")))


def python(*args: str, **kwargs) -> subprocess.Popen:
    """A Python child process in the repository root."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, **kwargs)


def start_leader(out: Path, port: int, *args: str) -> subprocess.Popen:
    """A leader process on localhost, logging to out/leader.log (appending, so a restart keeps the first log)."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "leader.log", "a")
    return subprocess.Popen([sys.executable, "leader.py", "--host", "127.0.0.1", "--port", str(port), "--out", str(out),
                             "--dataset", "synthetic", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def start_learner(out: Path, name: str, port: int, *args: str) -> subprocess.Popen:
    """A learner process with one thread, logging to out/<name>.log."""
    log = open(out / f"{name}.log", "a")
    return subprocess.Popen([sys.executable, "learner.py", "--leader", f"127.0.0.1:{port}", "--threads", "1", *args],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_for_round(out: Path, round_index: int, timeout: float = 300) -> None:
    """Block until metrics.jsonl records round_index."""
    import json
    import time

    deadline = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists():
            rounds = [json.loads(line).get("round", 0) for line in path.read_text().splitlines() if line.strip()]
            if rounds and max(rounds) >= round_index:
                return
        time.sleep(0.2)
    raise TimeoutError(f"round {round_index} not reached within {timeout} s\n{logs(out)}")
