"""Local federations for the figures: run one to its end, and read what its processes wrote (metrics
records, learners' progress lines) and what the kernel counted on loopback."""

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from federated.leader.metrics import read_metrics
from federated.tools import launch
from federated.tools.bench.common import empty_dir


def federation_run(
    out: Path, learners: int, leader_args: list[str], learner_args: Sequence[str] = (), until: float | None = None
) -> tuple[list[dict], list[tuple[int, int]]]:
    """Run a local federation to the end, or only until its test accuracy first reaches `until`: the figures that
    ask so read nothing after that, and the rest of such a run is minutes of rounds and evaluations for nothing on
    a busy machine. Return its metrics and (rounds done, loopback bytes) samples."""
    empty_dir(out)
    leader_process, learner_processes = launch.start_federation(
        learners, leader_args, launch.free_port(), out, list(learner_args)
    )
    processes, metrics, samples = [leader_process, *learner_processes], out / "metrics.jsonl", []
    while leader_process.poll() is None:
        samples.append((rounds_done(metrics), loopback_bytes()))
        if until is not None and best_accuracy(metrics) >= until:
            launch.wait_all(processes, 0)  # stops them: every record up to that evaluation is written
            return complete_records(metrics), samples
        time.sleep(0.05)
    codes = launch.wait_all(processes, 900)
    if codes != [0] * (learners + 1):
        raise RuntimeError(f"federation failed with exit codes {codes}; see {out}")
    return read_metrics(metrics), samples


def best_accuracy(path: Path) -> float:
    """The best test accuracy in a run's metrics.jsonl so far (0 before any evaluation)."""
    evaluations = [record["test_accuracy"] for record in complete_records(path) if "test_accuracy" in record]
    return max(evaluations, default=0.0)


def complete_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl that its writer may still be appending to: the lines it has finished."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # the last piece is empty or still being written
    return [json.loads(line) for line in lines if line.strip()]


def rounds_done(path: Path) -> int:
    """Rounds recorded so far in a run's metrics.jsonl (0 before it exists)."""
    return path.read_text().count("train_loss") if path.exists() else 0


def loopback_bytes() -> int:
    """Bytes the kernel has carried over the loopback interface (each packet counted once)."""
    with open("/proc/net/dev") as devices:
        line = next(line for line in devices if line.strip().startswith("lo:"))
    return int(line.split(":")[1].split()[0])


class Progress(NamedTuple):
    """One progress line of a learner's log."""

    round: int
    images_per_s: float  # computing
    waiting_s: float  # a round, sending and waiting


def learner_progress(learner_log: Path) -> list[Progress]:
    """A learner's progress lines ('round N: loss L, R images/s computing, W ms a round sending and waiting')."""
    fields = [line.split(", ") for line in learner_log.read_text().splitlines() if "images/s computing" in line]
    return [
        Progress(int(_round_number(head)), float(rate.split()[0]), float(waiting.split()[0]) / 1000)
        for head, rate, waiting in fields
    ]


def _round_number(head: str) -> str:
    found = re.search(r"round (\d+):", head)
    if found is None:
        raise ValueError(f"not a progress line: {head!r}")
    return found.group(1)
