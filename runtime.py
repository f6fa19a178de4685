"""Process setup shared by the entry points: readable logs and deliberate torch thread counts."""

import contextlib
import logging
import os
from typing import Iterator

import torch


def configure_logging(name: str, verbose: bool = False) -> logging.Logger:
    """Log lines as 'time name level message' on stderr; return the process's logger."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    return logging.getLogger(name)


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
