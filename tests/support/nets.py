"""Small networks, seeded batches and a parameter comparison for the arithmetic tests (tests/unit/test_fedsgd.py,
tests/unit/test_strategies.py)."""

import torch
from torch import nn


def small_net(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(3, 4, 3),
        *([nn.BatchNorm2d(4)] if batch_norm else []),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 10),
    ]
    return nn.Sequential(*layers)


def batch(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 8, 8, generator=rng), torch.randint(0, 10, (count,), generator=rng)


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
