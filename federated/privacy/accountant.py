"""The privacy a run has spent: Opacus' RDP accountant over its noised steps, as epsilon at a delta.

CONTRACT (written by the lead before the work was split; the implementer replaces this paragraph and the stubs).
Used by the leader (every --dp mode: one step per round) and by a learner under --dp local (its own DP-SGD steps).
"""


class Accountant:
    """Opacus' RDPAccountant for one run, with its history in a checkpointable form."""

    def __init__(self, delta: float, history: list[tuple[float, float, int]] | None = None) -> None:
        """history: (noise_multiplier, sample_rate, steps) entries, as state() returned them (a resume)."""
        raise NotImplementedError

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Charge `steps` Gaussian mechanism steps of this noise multiplier, each sampling at sample_rate."""
        raise NotImplementedError

    def epsilon(self) -> float:
        """The epsilon spent so far at the accountant's delta (0 before any step)."""
        raise NotImplementedError

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """The epsilon it would have spent after these further steps (the accountant itself unchanged)."""
        raise NotImplementedError

    def state(self) -> list[tuple[float, float, int]]:
        """The history, for a checkpoint."""
        raise NotImplementedError
