"""What the figures share: statistics of repeated runs, timing, helper processes, work folders, and the leader's
flags for a compression codec.

Imports nothing heavy (no torch, no gRPC), so that the command line can parse and list figures at once."""

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]  # the repository: bench.py, leader.py, learner.py
SERVER_LIFETIME_S = 900  # the longest a helper process serves: a bound on every wait of theirs
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
COMPRESS_RATIO = 0.01  # top-k's and random-k's share in every compression figure: the top-1 %


def spread(values: list[float]) -> dict:
    """The median of repeated measurements with their range and count: how results.json reports each."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def child(*args: str, **kwargs: Any) -> subprocess.Popen:
    """bench.py running one of its helper subcommands (registry.HELPERS) as a process of its own, so that
    every transfer crosses a real process boundary."""
    return subprocess.Popen([sys.executable, str(ROOT / "bench.py"), *args], env=ENV, **kwargs)


def empty_dir(path: Path) -> None:
    """Create path, or empty it: a previous run's files would be read as this run's progress."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def wait_for_port(port: int, timeout: float = 60) -> None:
    """Return once something listens on the local port; raise TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


def timed(action: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of `repeats` runs of action, after one warm-up run."""
    return timed_together([action], repeats)[0]


def timed_together(actions: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds of each action, the actions taking turns so that the machine's drift hits them alike."""
    for action in actions:
        action()  # warm-up: connections, page faults, allocator
    times: list[list[float]] = [[] for _ in actions]
    for _ in range(repeats):
        for action, seconds in zip(actions, times):
            started = time.perf_counter()
            action()
            seconds.append(time.perf_counter() - started)
    return times


def compress_flags(up: str, down: str = "none") -> list[str]:
    """The leader's flags for a codec up, named as codec_costs names its rows ('topk', 'powersgd rank 4'), and
    a codec down (--compress-down); none for 'none'. Top-k and random-k send COMPRESS_RATIO of the values."""
    codec, _, rank = up.partition(" rank ")
    flags = []
    if codec != "none":
        flags += ["--compress", codec, "--compress-ratio", str(COMPRESS_RATIO), "--compress-rank", rank or "2"]
    if down != "none":
        flags += ["--compress-down", down]
    return flags
