"""The privacy a run has spent: Opacus' RDP accountant over its noised steps, as epsilon at a delta.

Used by the leader under --dp central and distributed (one step per round that released an aggregate) and by
each learner under --dp local (its own DP-SGD steps; the leader then keeps none). The history is Opacus' own:
(noise_multiplier, sample_rate, steps) entries, consecutive equal steps merged, so a checkpoint of it (or a
learner's --budget-file) resumes to exactly the epsilon an uninterrupted run reports.
"""

import json
import math
import os
from pathlib import Path

History = list[tuple[float, float, int]]


class Accountant:
    """Opacus' RDPAccountant for one run, with its history in a checkpointable form."""

    def __init__(self, delta: float, history: History | None = None) -> None:
        """history: (noise_multiplier, sample_rate, steps) entries, as state() returned them (a resume)."""
        self.delta = delta
        self._history: History = [(float(s), float(q), int(n)) for s, q, n in history or []]

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Charge `steps` Gaussian mechanism steps of this noise multiplier, each sampling at sample_rate."""
        self._history = _charged(self._history, noise_multiplier, sample_rate, steps)

    def epsilon(self) -> float:
        """The epsilon spent so far at the accountant's delta (0 before any step)."""
        return _epsilon(self._history, self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """The epsilon it would have spent after these further steps (the accountant itself unchanged)."""
        return _epsilon(_charged(self._history, noise_multiplier, sample_rate, steps), self.delta)

    def state(self) -> History:
        """The history, for a checkpoint."""
        return list(self._history)


def _charged(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """The history with `steps` more steps, merged into the last entry where it has the same mechanism."""
    if steps < 1:
        return list(history)
    entry = (float(noise_multiplier), float(sample_rate))
    if history and history[-1][:2] == entry:
        return [*history[:-1], (*entry, history[-1][2] + steps)]
    return [*history, (*entry, steps)]


def _epsilon(history: History, delta: float) -> float:
    """Opacus' RDP analysis of this history at delta (0 without steps, inf for a step without noise)."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant  # here: importing opacus takes seconds, which runs without --dp skip

    opacus_accountant = RDPAccountant()
    opacus_accountant.history = list(history)
    return float(opacus_accountant.get_epsilon(delta=delta))


def read_history(path: Path) -> History:
    """The accountant's history that write_history kept in path; ValueError if it holds none: every entry a
    finite noise multiplier above 0, a sample rate in (0, 1] and a whole number of steps of at least 1 (a negative
    count, or a NaN that Opacus' analysis never finishes on, would make the budget spend less than it did)."""
    try:
        history = [(float(sigma), float(rate), int(steps)) for sigma, rate, steps in json.loads(path.read_text())]
    except (ValueError, TypeError) as error:
        raise ValueError(f"--budget-file {path} holds no budget of this learner's ({error})") from error
    for sigma, rate, steps in history:
        if not (math.isfinite(sigma) and sigma > 0 and 0 < rate <= 1 and steps >= 1):
            raise ValueError(
                f"--budget-file {path} holds no budget of this learner's: an entry of noise multiplier {sigma}, "
                f"sample rate {rate} and {steps} steps"
            )
    return history


def write_history(history: History, path: Path) -> None:
    """The history into path, whole or not at all (a temporary file, flushed to disk, renamed over it)."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two learners given one path never share it
    with open(temporary, "w") as file:
        json.dump(history, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
