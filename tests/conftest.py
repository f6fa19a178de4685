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
