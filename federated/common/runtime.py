"""Process setup shared by the entry points: logs, --help, memory allocator, torch threads and device."""

import argparse
import contextlib
import ctypes
import logging
import os
import resource
from collections.abc import Iterator

import torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none (its help says what unset means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return (action.help or "") if action.default is None else (super()._get_help_string(action) or "")


# Open files a process needs beside its sockets: its libraries, logs, checkpoints, gRPC's own descriptors.
OPEN_FILES_SLACK = 64


def soft_open_files(need: int, soft: int, hard: int) -> int:
    """The soft open-files limit that holds need files, given the current soft and hard limits (RLIM_INFINITY is
    unlimited); SystemExit, saying how to raise it, when the hard limit is below need."""
    unlimited = resource.RLIM_INFINITY
    if soft == unlimited or soft >= need:
        return soft
    if hard != unlimited and hard < need:
        raise SystemExit(
            f"this process needs about {need} open files (its sockets to its learners or leader, and its own "
            f"files), and may open at most {hard} (ulimit -Hn): raise the limit, e.g. ulimit -n {need} in the shell "
            "that starts it (as root, or after raising the hard limit in /etc/security/limits.conf), or "
            f"LimitNOFILE={need} under systemd"
        )
    return need


def allow_open_files(sockets: int) -> None:
    """Raise this process's soft open-files limit (up to its hard limit) so that it holds `sockets` sockets
    beside its own files: a leader of 1,000 learners dials 1,000 addresses at the start, a process of 1,000
    virtual learners listens on 1,000 ports and takes as many connections, and the usual default is 1,024.
    SystemExit, saying how to raise it, when the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = soft_open_files(sockets + OPEN_FILES_SLACK, soft, hard)
    if wanted != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def configure_logging(name: str, verbose: bool = False) -> logging.Logger:
    """Log lines as 'time name level message' on stderr; return the process's logger."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # Opacus configures the root logger when imported (at WARNING): this process's logging wins
    )
    return logging.getLogger(name)


# glibc mallopt() options
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def tune_allocator() -> bool:
    """Have glibc's malloc keep freed memory for reuse, in one heap; call before starting threads.

    By default every buffer over 32 MiB is a fresh mmap that page-faults on first touch (a 45 MB copy:
    27 ms instead of 6), and each thread that allocates gets its own heap, so memory freed by gRPC's
    threads cannot serve the main thread. Kept in one heap, 45 MB messages move 2-4x faster and the
    leader's memory does not grow with its learner count (see docs/performance); the price is that
    RSS stays at its peak. Returns False where the C library is not glibc (then nothing changes)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    settings = ((M_MMAP_THRESHOLD, 2**31 - 1), (M_TRIM_THRESHOLD, 2**32 - 1), (M_ARENA_MAX, 1))
    return all(mallopt(option, value) == 1 for option, value in settings)


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def set_threads(count: int) -> int:
    """Use count torch threads (0: one per available core); return the number chosen."""
    chosen = count or available_cores()
    torch.set_num_threads(chosen)
    return chosen


def pick_device(name: str) -> torch.device:
    """The torch device for a --device value; auto means a CUDA GPU when one is available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Temporarily run torch with count threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
