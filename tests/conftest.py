"""Shared test set-up: the repository on sys.path, one torch thread, and real processes on localhost (or on
the network-namespace hosts of tests/hosts.py).

Every leader, learner or peer process a test starts comes from spawn(); tests marked slow (whole runs,
faults, attacks) are left out by `pytest -m "not slow"`, the quick loop for editing.
"""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from federated.tools import launch


@pytest.fixture
def port() -> int:
    return launch.free_port()


def spawn(log: Path | None, *args: str, env: dict | None = None, prefix: Sequence[str] = ()) -> subprocess.Popen:
    """A Python process in the repository root running args, its output appended to log (or piped, as text);
    prefix runs it through another command first (e.g. `ip netns exec HOST`, see tests/hosts.py)."""
    output = open(log, "a") if log else subprocess.PIPE
    return subprocess.Popen([*prefix, sys.executable, *args], cwd=ROOT, env=env, stdout=output,
                            stderr=subprocess.STDOUT, text=log is None)


def start_leader(out: Path, port: int, *args: str, host: str = "127.0.0.1",
                 prefix: Sequence[str] = ()) -> subprocess.Popen:
    """A leader listening on host (localhost unless told), with the synthetic set unless args say otherwise,
    logging to out/leader.log (appending, so a restart keeps the first log)."""
    out.mkdir(parents=True, exist_ok=True)
    return spawn(out / "leader.log", "leader.py", "--host", host, "--port", str(port), "--out", str(out),
                 "--dataset", "synthetic", *args, prefix=prefix)


def start_learner(out: Path, name: str, port: int, *args: str, leader: str = "127.0.0.1",
                  host: str | None = "127.0.0.1", prefix: Sequence[str] = ()) -> subprocess.Popen:
    """A learner with one thread, of the leader at leader:port, serving on host (localhost unless told; None:
    learner.py's default, every interface, advertising its own address), logging to out/<name>.log."""
    listen = ["--host", host] if host else []
    return spawn(out / f"{name}.log", "learner.py", "--leader", f"{leader}:{port}", *listen, "--threads", "1", *args,
                 prefix=prefix)


def make_certs(directory: Path, sans: str = "") -> Path:
    """Throw-away certificates in directory, as `make certs SANS=...` makes them (certs.sh), also naming sans
    (e.g. "IP:10.47.0.1,IP:10.47.0.2")."""
    subprocess.run(["bash", str(ROOT / "federated" / "tools" / "certs.sh"), str(directory), sans], check=True, capture_output=True, timeout=60)
    return directory


def tls_flags(certs: Path, name: str) -> list[str]:
    """The TLS flags of a leader or learner (name) with certificates from make_certs: mutual TLS."""
    return ["--tls-cert", str(certs / f"{name}.pem"), "--tls-key", str(certs / f"{name}.key"),
            "--tls-ca", str(certs / "ca.pem")]


def run_federation(out: Path, learners: int, leader_args: list[str], learner_args: list[str] = (),
                   timeout: float = 400) -> list[int | None]:
    """Run a leader and learners as real processes to the end; return their exit codes."""
    port = launch.free_port()
    leader = start_leader(out, port, "--learners", str(learners), *leader_args)
    procs = [start_learner(out, f"learner{index}", port, *learner_args) for index in range(learners)]
    return launch.wait_all([leader, *procs], timeout)


def logs(out: Path) -> str:
    """Every process log of a run, for assertion messages."""
    return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(out.glob("*.log")))


def records(out: Path) -> list[dict]:
    """The records of out/metrics.jsonl so far (none before it exists)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def wait_for_round(out: Path, round_index: int, timeout: float = 300) -> None:
    """Block until metrics.jsonl records round_index."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max((record["round"] for record in records(out)), default=0) >= round_index:
            return
        time.sleep(0.2)
    raise TimeoutError(f"round {round_index} not reached within {timeout} s\n{logs(out)}")


def wait_for_log(path: Path, text: str, timeout: float = 120) -> None:
    """Block until the log at path contains text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} not in {path.name} within {timeout} s\n{path.read_text()[-3000:] if path.exists() else ''}")
