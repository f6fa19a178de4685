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
    """Learner slots 0..capacity-1, each held by the address its learner advertises.

    A slot is active while its learner trains. The leader drops a learner it cannot reach; the
    learner (or a new one) can then register again: the same address gets its own slot back, a new
    address takes a dropped slot. (Re)registered learners wait as joiners until the round loop
    admits them with StartTraining."""

    def __init__(self, capacity: int, addresses: list[str] = ()) -> None:
        self.capacity = capacity
        self._addresses: list[str] = list(addresses)  # slot -> address; restored ones start dropped
        self._active: set[int] = set()
        self._joiners: set[int] = set()
        self._changed = threading.Condition()

    def register(self, address: str) -> tuple[int | None, str]:
        """The learner's slot and a message for the reply, or None and why it was refused."""
        problem = check_address(address)
        if problem:
            return None, problem
        with self._changed:
            if address in self._addresses:
                learner_id, verb = self._addresses.index(address), "re-registered"
            elif len(self._addresses) < self.capacity:
                learner_id, verb = len(self._addresses), "registered"
                self._addresses.append(address)
            else:
                free = [slot for slot in range(self.capacity) if slot not in self._active | self._joiners]
                if not free:
                    return None, f"the leader already has its {self.capacity} learners; start it with a larger --learners"
                learner_id, verb = free[0], f"took over the slot of {self._addresses[free[0]]}:"
                self._addresses[learner_id] = address
            self._active.discard(learner_id)
            self._joiners.add(learner_id)
            self._changed.notify_all()
            return learner_id, f"{address} {verb} learner {learner_id} of {self.capacity}"

    def id_of(self, address: str) -> int | None:
        with self._changed:
            return self._addresses.index(address) if address in self._addresses else None

    def addresses(self) -> list[str]:
        """The address of every slot ever taken, by learner id."""
        with self._changed:
            return list(self._addresses)

    def is_active(self, learner_id: int) -> bool:
        with self._changed:
            return learner_id in self._active

    def active(self) -> list[int]:
        with self._changed:
            return sorted(self._active)

    def active_addresses(self) -> dict[int, str]:
        """Id to address of every active learner, as one consistent snapshot."""
        with self._changed:
            return {learner_id: self._addresses[learner_id] for learner_id in sorted(self._active)}

    def take_joiners(self) -> dict[int, str]:
        """The learners that registered since the last call, and their addresses; they count as active."""
        with self._changed:
            joiners = {learner_id: self._addresses[learner_id] for learner_id in sorted(self._joiners)}
            self._active |= self._joiners
            self._joiners.clear()
            return joiners

    def drop(self, learner_id: int) -> None:
        with self._changed:
            self._active.discard(learner_id)

    def count(self) -> int:
        """Learners active or waiting to be started."""
        with self._changed:  # re-entrant: wait_for below calls this while holding the lock
            return len(self._active | self._joiners)

    def wait_for(self, count: int, timeout: float) -> bool:
        """Whether at least count learners are active or joining, waiting at most timeout seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count() >= count, timeout)


@dataclass(frozen=True)
class RoundSummary:
    round: int
    learners: int
    samples: int
    loss: float
    bytes_in: int


class RoundCollector:
    """Gradients of the open round, summed as they arrive; each learner counts once per round."""

    def __init__(self, size: int, first_round: int = 0) -> None:
        self._accumulator = Accumulator(size)
        self._expected: set[int] = set()
        self._reported: set[int] = set()
        self._round = first_round
        self._bytes_in = 0
        self._changed = threading.Condition()

    @property
    def round(self) -> int:
        with self._changed:
            return self._round

    def expect(self, learner_ids: list[int]) -> None:
        """The learners whose gradients complete the open round."""
        with self._changed:
            self._expected = set(learner_ids)

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
            return self._changed.wait_for(lambda: self._expected <= self._reported, timeout)

    def missing(self) -> list[int]:
        with self._changed:
            return sorted(self._expected - self._reported)

    def reported(self) -> int:
        with self._changed:
            return len(self._reported)

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
