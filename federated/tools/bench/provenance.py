"""Where a figure's numbers came from: when, by which command, on which machine and under what load. Stored
with each figure in results.json (key "measured"), so that the results page can date every row."""

import os
import platform
import shlex
import time
from datetime import UTC, datetime
from importlib import metadata


def command_line(argv: list[str]) -> str:
    """The command as a user would type it again."""
    return shlex.join(["python", "bench.py", *argv])


def machine() -> dict:
    """This machine: its CPU, cores (all, and those this process may use), and the versions that set the figures."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "available_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "grpcio": _version("grpcio"),
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what platform says where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(
                (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                platform.processor() or platform.machine(),
            )
    except OSError:
        return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class Stopwatch:
    """A figure's run: started now; record() says when it ran, for how long, and the load at its start and end.

    The load averages (1, 5 and 15 minutes) say how busy the shared machine was: these machines run other
    people's work, and a figure measured at a load of 13 is that hour's, not the code's."""

    def __init__(self) -> None:
        self.started_at = datetime.now(UTC)
        self.started = time.perf_counter()
        self.load_at_start = list(os.getloadavg())

    def record(self, command: str, host: dict) -> dict:
        return {
            "date": self.started_at.isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - self.started, 1),
            "command": command,
            "machine": host,
            "load_at_start": self.load_at_start,
            "load_at_end": list(os.getloadavg()),
        }
