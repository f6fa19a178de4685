"""Samples of the discrete Gaussian N_Z(0, sigma^2) (Canonne, Kamath and Steinke 2020), vectorised, by rejection.

Proposal: a continuous Gaussian of the same sigma, rounded to the nearest integer, whose mass at k is
q(k) = integral over u in [-1/2, 1/2] of phi_sigma(k + u) du. The target's mass is p(k) ~ exp(-k^2 / 2 sigma^2), so
p(k)/q(k) ~ 1/D(k) with D(k) = integral over u of exp(-u^2 / 2 sigma^2) cosh(k u / sigma^2) du, smallest at k = 0:
accepting k with probability D(0)/D(k) <= 1 leaves exactly the discrete Gaussian (up to float64 rounding of the
acceptance probability, about 1e-15). Acceptance is above 1 - 1/(8 sigma^2) on average, so one or two passes;
as cosh(k u / sigma^2) <= cosh(k / 2 sigma^2), D(0)/D(k) >= 1/cosh(k / 2 sigma^2): a uniform below that bound is
accepted without the quadrature (all but about k^2 / 8 sigma^4 of the draws).
"""

import numpy as np
import torch

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(24)
_U, _W = _NODES / 2, _WEIGHTS / 2  # Gauss-Legendre on [-1/2, 1/2]


def sample(sigma: float, size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` independent draws of N_Z(0, sigma^2), int64; zeros when sigma is 0. The randomness is the
    generator's; the arithmetic numpy's (one thread: torch's two wait on each other on a busy CPU)."""
    result = np.zeros(size, dtype=np.int64)
    pending = np.arange(size) if sigma > 0 else np.arange(0)
    while len(pending):
        draws = np.round(torch.randn(len(pending), dtype=torch.float64, generator=generator).numpy() * sigma)
        uniform = torch.rand(len(pending), dtype=torch.float64, generator=generator).numpy()
        accepted = uniform < 1 / np.cosh(draws / (2 * sigma**2))  # a lower bound of the acceptance: sure
        unsure = ~accepted
        accepted[unsure] = uniform[unsure] < _acceptance(draws[unsure], sigma)
        result[pending[accepted]] = draws[accepted]
        pending = pending[~accepted]
    return torch.from_numpy(result)


def _acceptance(k: np.ndarray, sigma: float) -> np.ndarray:
    """D(0)/D(k): the probability of keeping a rounded-Gaussian draw k."""
    envelope = np.exp(-(_U**2) / (2 * sigma**2)) * _W
    return np.minimum(envelope.sum() / (np.cosh(np.outer(k, _U) / sigma**2) @ envelope), 1.0)
