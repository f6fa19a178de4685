"""Who takes part in a round when only some learners are drawn (--learners-per-round)."""

import torch


def sample_participants(active: list[int], count: int, generator: torch.Generator) -> list[int]:
    """count of the active learners (all if fewer), drawn without replacement with the run's seeded generator."""
    if count <= 0 or count >= len(active):
        return sorted(active)
    order = torch.randperm(len(active), generator=generator)[:count].tolist()
    return sorted(active[index] for index in order)
