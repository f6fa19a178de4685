"""A learner's reference under --compress-down: the state it holds in step with the leader's replica, which the
leader's deltas apply to, checked, in the order they arrive (docs/compression.md, "The state going down").

The reference lives with the gRPC servicer, not the training thread: the inbox keeps only the newest state, so a
delta cannot wait there. It is replaced, never changed in place (the training thread may still be loading the
state it came from), and only by a delta that passes every check and gives exactly the state the leader hashed.
The learners of a process share its tensors through one ReferenceBook; each holds only its version.
"""

import collections
import logging
import threading

import numpy as np
import torch

from federated.core.compression.delta import apply_delta, delta_problem, state_hash, state_problem
from federated.wire import codec
from federated.wire.messages import DeltaInfo, without_delta

log = logging.getLogger("learner")


class ReferenceBook:
    """The versions of the leader's replica the learners of a process hold, each version once, by (round, hash):
    learners in step share one set of tensors. Entries are never changed in place (a delta makes new tensors), so a
    learner's reference stays what it was when taken while the book keeps it. It counts the learners at each
    version: a version nobody holds goes first (lowest round first) once it holds more than keep, and a held one
    only past twice keep (lowest round first; its learners are then refused deltas, and the leader sends them full
    states): a leader that puts each learner at a version of its own cannot make the process hold N states."""

    def __init__(self, keep: int = 3) -> None:
        """keep: how many versions it holds at least (a push of round r needs r - 1, the base of its delta, and r)."""
        self.keep = keep
        self._states: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self._holders: collections.Counter[tuple[int, str]] = collections.Counter()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, str]) -> dict[str, torch.Tensor] | None:
        """The tensors of a version, or None when the book does not hold it (any more)."""
        with self._lock:
            return self._states.get(key)

    def move(
        self, previous: tuple[int, str] | None, key: tuple[int, str], tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A learner's reference moves from previous (None: it held none) to key, whose tensors are these unless the
        book holds that version already (the same round and hash: that one wins, and is returned)."""
        with self._lock:
            kept = self._states.setdefault(key, tensors)
            self._holders[key] += 1
            self._release(previous)
            return kept

    def release(self, previous: tuple[int, str] | None) -> None:
        """A learner's reference at previous is forgotten (a leader found again sends a full state first)."""
        with self._lock:
            self._release(previous)

    def _release(self, previous: tuple[int, str] | None) -> None:
        if previous is not None and self._holders[previous] > 0:
            self._holders[previous] -= 1
        for held in (False, True):  # those nobody holds first, then (past twice keep) the held ones
            limit = 2 * self.keep if held else self.keep
            for key in sorted(key for key in self._states if bool(self._holders[key]) == held):
                if len(self._states) <= limit:
                    break
                del self._states[key]
                self._holders.pop(key, None)

    def versions(self) -> list[tuple[int, str]]:
        """The (round, hash) of the versions held, oldest first."""
        with self._lock:
            return sorted(self._states)


class StateReference:
    """The state one learner holds in step with its leader's replica, and its version (round): a version in a
    ReferenceBook, shared by the learners of a process, or in a book of its own holding one version."""

    def __init__(self, book: ReferenceBook | None = None) -> None:
        self.book = book or ReferenceBook(keep=1)
        self.version = -1
        self._hash = ""  # the version's state hash: its key in the book (with the version)
        self._lock = threading.Lock()

    @property
    def key(self) -> tuple[int, str] | None:
        """The reference's version in the book (round, hash); None before the first full state."""
        return (self.version, self._hash) if self.version >= 0 else None

    @property
    def tensors(self) -> dict[str, torch.Tensor] | None:
        """The reference's tensors (float32 copies of the learner's own); None before the first full state, and once
        the book dropped this learner's version."""
        return self.book.get(self.key) if self.key is not None else None

    def take_full(self, payload: codec.Payload, round_index: int) -> None:
        """A full state of the leader's replica (checked against the learner's spec) becomes the reference; an
        older one than the reference (a push overtaken) is no news. Its tensors are held as they are, no copy:
        nothing writes into a pushed state (the training thread copies it into the model, Replica.load, and a
        delta makes new tensors); where the book holds the same version already (another learner's), that one."""
        with self._lock:
            if round_index < self.version:
                return
            key = (round_index, state_hash(payload.tensors))
            self.book.move(self.key, key, dict(payload.tensors))
            self.version, self._hash = key

    def apply(self, payload: codec.Payload, delta: DeltaInfo, round_index: int) -> codec.Payload:
        """Apply a delta to the reference and make the result the reference; return it as a full state (the delta's
        metadata without the keys of --compress-down). PayloadError, the reference untouched, on a delta from
        another version (or from one the book no longer holds), entries other than the codec's for the reference's
        tensors (those of the learner's state: its full states were checked), a random-k ratio above
        MAX_DELTA_RANDK_RATIO, a non-finite result, or a result whose hash is not the leader's. Where the book
        holds the result already (another learner in step applied the same delta), the entries are checked and
        that state taken: it is the one the leader hashed."""
        assert delta.base is not None
        with self._lock:
            base = self.tensors
            if base is None or delta.base != self.version:
                gone = " (no longer kept)" if base is None and self.version >= 0 else ""
                raise codec.PayloadError(
                    f"a delta from round {delta.base}, but this learner holds the state of round {self.version}{gone}"
                )
            if round_index <= delta.base:
                raise codec.PayloadError(f"a delta to round {round_index} from round {delta.base}, not an earlier one")
            problem = delta_problem(payload.tensors, base, delta.codec, delta.ratio, delta.rank)
            if problem is not None:
                raise codec.PayloadError(f"delta ({delta.codec}) refused: {problem}")
            key = (round_index, delta.state_hash)
            held = self.book.get(key)
            updated = self.book.move(self.key, key, held if held is not None else self.applied(payload, delta, base))
            self.version, self._hash = key
        # the state itself, no bytes of its own: never changed in place (the reference is replaced, and the
        # training thread adopts a copy)
        return codec.Payload(without_delta(payload.metadata), dict(updated), np.empty(0, np.uint8), 0)

    @staticmethod
    def applied(payload: codec.Payload, delta: DeltaInfo, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state a checked delta makes from base; PayloadError when it is not finite or not the leader's."""
        updated = apply_delta(base, payload.tensors, delta.codec, delta.ratio, delta.rank)
        problem = state_problem(updated)
        if problem is not None:
            raise codec.PayloadError(f"delta ({delta.codec}) refused: it makes {problem}")
        if state_hash(updated) != delta.state_hash:
            raise codec.PayloadError(f"delta ({delta.codec}) refused: the state it makes is not the leader's (hash)")
        return updated

    def clear(self) -> None:
        """Forget the reference: a leader found again sends the full state first. (A shared book keeps the version
        for the other learners, until newer ones push it out.)"""
        with self._lock:
            self.book.release(self.key)
            self.version, self._hash = -1, ""
