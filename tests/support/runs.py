"""A run's folder read while it runs or after it: its process logs, its metrics records, and waits for a
round or a log line (bounded, saying what was missing)."""

import json
import time
from pathlib import Path


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
    raise TimeoutError(
        f"{text!r} not in {path.name} within {timeout} s\n{path.read_text()[-3000:] if path.exists() else ''}"
    )
