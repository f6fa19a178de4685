"""Virtual learners' model-sized state (SCAFFOLD's controls and pending change, error feedback's residuals and
PowerSGD's warm starts) kept in memory up to a budget: beyond it, the least recently used learners' state is
written to a private temporary folder and dropped from memory, and read back, bit-identical, when the learner
next needs it. Secure aggregation's keys stay in memory (a few hundred bytes a learner)."""

import atexit
import functools
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import torch

if TYPE_CHECKING:
    from federated.learner.state import Replica

log = logging.getLogger("learner")

P = ParamSpec("P")
R = TypeVar("R")

MB = 1 << 20
LOG_INTERVAL_S = 30.0  # the pool says how much is spilled at most this often
EMPTY = torch.empty(0)  # what a spilled control holds: any use before it comes back fails on its shape


def held(replica: "Replica") -> dict[str, object]:
    """The replica's model-sized state, by what it is (tensors, and dicts of them, as torch.save takes them)."""
    parts: dict[str, object] = {}
    if replica.controls is not None:
        parts["server"], parts["own"] = replica.controls.server, replica.controls.own
    if replica.change is not None:
        parts["change"] = replica.change
    if replica.compressor is not None:
        parts["residuals"], parts["states"] = replica.compressor.residuals, replica.compressor.states
    return parts


def size_of(parts: dict[str, object]) -> int:
    """Bytes the tensors of held's parts take."""
    total = 0
    for part in parts.values():
        if isinstance(part, torch.Tensor):
            total += part.nbytes
        elif isinstance(part, dict):
            total += size_of(part)
    return total


def drop(replica: "Replica") -> None:
    """Let go of what held gave (once it is on disk)."""
    if replica.controls is not None:
        replica.controls.server = replica.controls.own = EMPTY
    replica.change = None
    if replica.compressor is not None:
        replica.compressor.residuals = {}
        replica.compressor.states = {}


def put_back(replica: "Replica", parts: dict) -> None:
    """Give the replica back what held gave (read from disk)."""
    if replica.controls is not None:
        replica.controls.server, replica.controls.own = parts["server"], parts["own"]
    replica.change = parts.get("change")
    if replica.compressor is not None:
        replica.compressor.residuals, replica.compressor.states = parts["residuals"], parts["states"]


class Spill:
    """The per-learner state of a process's learners, least recently used first: within budget bytes (None:
    unbounded, and nothing is tracked) it stays in memory; beyond, the least recently used learners not in use
    go to files in a folder of this process's own (mode 0700, made at the first spill, removed at exit).
    Whatever reads or writes a replica's state does so inside using(replica)."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.resident: OrderedDict[Replica, int] = OrderedDict()  # bytes in memory, least recently used first
        self.in_memory = 0  # their sum
        self.spilled: dict[Replica, tuple[Path, int]] = {}  # its file and bytes
        self.in_use: dict[Replica, int] = {}  # how many using() hold it (re-entrant: a method inside a round's)
        self.lock = threading.Lock()
        self.folder: Path | None = None
        self.said = 0.0

    @contextmanager
    def using(self, replica: "Replica") -> Iterator[None]:
        """The replica's state in memory, and kept there, until the block ends; then, if the learners' state
        passes the budget, the least recently used learners' goes to disk."""
        if self.budget is None:
            yield
            return
        with self.lock:
            if replica in self.spilled:
                self.read(replica)
            self.in_use[replica] = self.in_use.get(replica, 0) + 1  # (after a read that did not fail)
        try:
            yield
        finally:
            with self.lock:
                self.in_use[replica] -= 1
                if not self.in_use[replica]:
                    del self.in_use[replica]
                size = size_of(held(replica))  # (its state may have grown: a first compressor)
                self.in_memory += size - self.resident.get(replica, 0)
                self.resident[replica] = size
                self.resident.move_to_end(replica)
                self.fit()

    def fit(self) -> None:
        """Spill the least recently used learners not in use until the rest fit the budget (under the lock)."""
        assert self.budget is not None
        while self.in_memory > self.budget:
            oldest = next((replica for replica in self.resident if replica not in self.in_use), None)
            if oldest is None:  # the rest are in use
                break
            self.write(oldest)
        self.say()

    def write(self, replica: "Replica") -> None:
        """Move a replica's state to its file."""
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="federated-spill-"))  # (mode 0700: this user's alone)
            atexit.register(shutil.rmtree, self.folder, ignore_errors=True)
        path = self.folder / f"{id(replica)}.pt"
        torch.save(held(replica), path)
        size = self.resident.pop(replica)
        self.spilled[replica] = (path, size)
        self.in_memory -= size
        drop(replica)

    def read(self, replica: "Replica") -> None:
        """Bring a replica's state back from its file (under the lock)."""
        path, _ = self.spilled.pop(replica)
        put_back(replica, torch.load(path, weights_only=True))  # (each tensor where it was: controls on the device)
        path.unlink()

    def say(self) -> None:
        """Every LOG_INTERVAL_S, while some state is on disk: how much, and how much is kept in memory."""
        if not self.spilled or time.monotonic() - self.said < LOG_INTERVAL_S:
            return
        self.said = time.monotonic()
        log.info("pool: %s", self.summary())

    def summary(self) -> str:
        assert self.budget is not None
        on_disk = sum(size for _, size in self.spilled.values())
        return (
            f"{len(self.spilled)} learners' state spilled to {self.folder} ({on_disk / MB:.1f} MB), "
            f"{len(self.resident)} learners' kept in memory ({self.in_memory / MB:.1f} MB; "
            f"--state-budget {self.budget / MB:g} MB)"
        )


def needs_state(method: "Callable[Concatenate[Replica, P], R]") -> "Callable[Concatenate[Replica, P], R]":
    """A Replica method that reads or writes the learner's state: it runs with the state in memory."""

    @functools.wraps(method)
    def with_state(replica: "Replica", *args: P.args, **kwargs: P.kwargs) -> R:
        with replica.shared.spill.using(replica):
            return method(replica, *args, **kwargs)

    return with_state
