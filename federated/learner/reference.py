"""A learner's reference under --compress-down: the state it holds in step with the leader's replica, which the
leader's deltas apply to, checked, in the order they arrive (docs/compression.md, "The state going down").

The reference lives with the gRPC servicer, not the training thread: the inbox keeps only the newest state, so a
delta cannot wait there. It is replaced, never changed in place (the training thread may still be loading the
state it came from), and only by a delta that passes every check and gives exactly the state the leader hashed.
"""

import logging
import threading

import numpy as np
import torch

from federated.core.compression.delta import apply_delta, delta_problem, state_hash, state_problem
from federated.wire import codec
from federated.wire.messages import DeltaInfo, without_delta

log = logging.getLogger("learner")


class StateReference:
    """The state this learner holds in step with its leader's replica (float32 copies of its own), and its version
    (round)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] | None = None
        self.version = -1
        self._lock = threading.Lock()

    def take_full(self, payload: codec.Payload, round_index: int) -> None:
        """A full state of the leader's replica (checked against the learner's spec) becomes the reference; an
        older one than the reference (a push overtaken) is no news. Its tensors are held as they are, no copy:
        nothing writes into a pushed state (the training thread copies it into the model, Replica.adopt, and a
        delta makes new tensors)."""
        with self._lock:
            if round_index < self.version:
                return
            self.tensors = dict(payload.tensors)
            self.version = round_index

    def apply(self, payload: codec.Payload, delta: DeltaInfo, round_index: int) -> codec.Payload:
        """Apply a delta to a copy of the reference and make the result the reference; return it as a full state
        (the delta's metadata without the keys of --compress-down). PayloadError, the reference untouched, on a
        delta from another version, entries other than the codec's for the reference's tensors (those of the
        learner's state: its full states were checked), a random-k ratio above MAX_DELTA_RANDK_RATIO, a non-finite
        result, or a result whose hash is not the leader's."""
        assert delta.base is not None
        with self._lock:
            if self.tensors is None or delta.base != self.version:
                raise codec.PayloadError(
                    f"a delta from round {delta.base}, but this learner holds the state of round {self.version}"
                )
            if round_index <= delta.base:
                raise codec.PayloadError(f"a delta to round {round_index} from round {delta.base}, not an earlier one")
            problem = delta_problem(payload.tensors, self.tensors, delta.codec, delta.ratio, delta.rank)
            if problem is not None:
                raise codec.PayloadError(f"delta ({delta.codec}) refused: {problem}")
            updated = apply_delta(self.tensors, payload.tensors, delta.codec, delta.ratio, delta.rank)
            problem = state_problem(updated)
            if problem is not None:
                raise codec.PayloadError(f"delta ({delta.codec}) refused: it makes {problem}")
            if state_hash(updated) != delta.state_hash:
                raise codec.PayloadError(
                    f"delta ({delta.codec}) refused: the state it makes is not the leader's (hash)"
                )
            self.tensors, self.version = updated, round_index
        # the state itself, no bytes of its own: never changed in place (the reference is replaced, and the
        # training thread adopts a copy)
        return codec.Payload(without_delta(payload.metadata), updated, np.empty(0, np.uint8), 0)

    def clear(self) -> None:
        """Forget the reference: a leader found again sends the full state first."""
        with self._lock:
            self.tensors, self.version = None, -1
