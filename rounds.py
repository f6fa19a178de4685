"""The leader's membership and round bookkeeping: who is registered, who has reported this round.

Thread-safe: gRPC handler threads submit, the leader's main loop waits. Every wait takes a timeout.
"""

import re
import threading
from dataclasses import dataclass

import torch

from fedsgd import Accumulator

ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


def check_address(address: str) -> str | None:
    """Why a learner's network address is unusable, or None if it is a valid HOST:PORT."""
    match = ADDRESS.match(address)
    if not match:
        return f"network_addr {address!r} is not HOST:PORT"
    if not 0 < int(match.group(2)) < 65536:
        return f"network_addr {address!r} has port {match.group(2)}, outside 1-65535"
    return None


class Registry:
    """Learner slots 0..capacity-1, keyed by the address each learner advertises."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: dict[str, int] = {}
        self._full = threading.Condition()

    def register(self, address: str) -> tuple[int | None, str]:
        """The learner's id (the same one again for a known address) and a message for the reply."""
        problem = check_address(address)
        if problem:
            return None, problem
        with self._full:
            if address in self._ids:
                return self._ids[address], f"{address} is already registered as learner {self._ids[address]}"
            if len(self._ids) >= self.capacity:
                return None, f"the leader already has its {self.capacity} learners; start it with a larger --learners"
            self._ids[address] = len(self._ids)
            self._full.notify_all()
            return self._ids[address], f"registered {address} as learner {self._ids[address]} of {self.capacity}"

    def id_of(self, address: str) -> int | None:
        with self._full:
            return self._ids.get(address)

    def addresses(self) -> dict[int, str]:
        """Learner id to address, for every registered learner."""
        with self._full:
            return {learner_id: address for address, learner_id in self._ids.items()}

    def wait_full(self, timeout: float) -> bool:
        """Whether every slot is taken, waiting at most timeout seconds."""
        with self._full:
            return self._full.wait_for(lambda: len(self._ids) >= self.capacity, timeout)


@dataclass(frozen=True)
class RoundSummary:
    round: int
    learners: int
    samples: int
    loss: float
    bytes_in: int


class RoundCollector:
    """Gradients of the open round, summed as they arrive; each learner counts once per round."""

    def __init__(self, size: int, expected: int) -> None:
        self.expected = expected
        self._accumulator = Accumulator(size)
        self._reported: set[int] = set()
        self._round = 0
        self._bytes_in = 0
        self._changed = threading.Condition()

    @property
    def round(self) -> int:
        with self._changed:
            return self._round

    def submit(self, learner_id: int, round_index: int, gradient: torch.Tensor, samples: int, loss: float,
               wire_bytes: int) -> str | None:
        """Add a learner's gradient to the open round; the reason it was ignored, or None if counted."""
        with self._changed:
            if round_index != self._round:
                return f"gradient for round {round_index} ignored: round {self._round} is open"
            if learner_id in self._reported:
                return f"learner {learner_id} already reported for round {round_index}; duplicate ignored"
            self._accumulator.add(gradient, samples, loss)
            self._reported.add(learner_id)
            self._bytes_in += wire_bytes
            self._changed.notify_all()
            return None

    def wait_complete(self, timeout: float) -> bool:
        """Whether every expected learner has reported, waiting at most timeout seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._reported) >= self.expected, timeout)

    def missing(self, learner_ids: list[int]) -> list[int]:
        with self._changed:
            return [learner_id for learner_id in learner_ids if learner_id not in self._reported]

    def close(self, mean_out: torch.Tensor) -> RoundSummary:
        """Write the round's weighted mean into mean_out, then open the next round."""
        with self._changed:
            self._accumulator.mean_into(mean_out)
            summary = RoundSummary(self._round, len(self._reported), self._accumulator.samples,
                                   self._accumulator.mean_loss, self._bytes_in)
            self._accumulator.reset()
            self._reported.clear()
            self._round += 1
            self._bytes_in = 0
            return summary
