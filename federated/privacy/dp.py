"""Differential privacy's arithmetic on updates: L2 clipping, calibrated Gaussian noise, adaptive clipping (Andrew
et al. 2021) and each learner's share of the noise under distributed DP. No gRPC, no threads.

Sensitivity: an update clipped to L2 norm C changes a sum of equally weighted updates by at most C (add or
remove one learner; DP-FedAvg, McMahan et al. 2018), so N(0, (sigma C)^2) on that sum is the Gaussian mechanism
of noise multiplier sigma, which the accountant charges once per round.
"""

import math
import secrets
from dataclasses import dataclass

import torch

from federated.core.aggregation import clip_to_norm

# Andrew et al. 2021, section 3: the geometric update's learning rate (they find 0.2 works across tasks), and
# the noise on the count of unclipped updates, as a fraction of the expected count (their sigma_b = m / 20)
CLIP_LEARNING_RATE = 0.2
COUNT_NOISE_FRACTION = 1 / 20


def fresh_generator() -> torch.Generator:
    """A generator seeded from the operating system's entropy: DP noise nobody can predict from --seed."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def gaussian(size: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """size independent draws of N(0, std^2), float32 (drawn in float64: float32 sums of them keep their spread)."""
    return (torch.randn(size, generator=generator, dtype=torch.float64) * std).float()


def clipped(update: torch.Tensor, clip: float) -> torch.Tensor:
    """A copy of update scaled to L2 norm clip if it is longer."""
    copy = update.clone()
    clip_to_norm(copy, clip)
    return copy


def noise_share_std(noise_multiplier: float, clip: float, threshold: int) -> float:
    """Distributed DP: the standard deviation each learner adds so that the noise of any `threshold` of them
    (the fewest a secure round unmasks: below it the round is discarded) already sums to sigma * C. More
    survivors add more noise, never less."""
    return noise_multiplier * clip / math.sqrt(threshold)


def count_noise(expected_count: float, noise_multiplier: float) -> float:
    """Adaptive clipping: the standard deviation of the noise on the round's count of unclipped updates. Andrew
    et al.'s m / 20, but at least sigma, so that the update's noise (adjusted_noise_multiplier) stays finite
    and spends most of the budget: at sigma_b = sigma, it is sigma / sqrt(3/4), 15 % more."""
    return max(expected_count * COUNT_NOISE_FRACTION, noise_multiplier)


def adjusted_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """Andrew et al. 2021, Theorem 1: the update's noise multiplier sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^-1/2
    such that the update and the noised count (each bit of sensitivity 1/2 once centred) together are the
    Gaussian mechanism of noise multiplier sigma, which the accountant is charged."""
    return (noise_multiplier**-2 - (2 * count_std) ** -2) ** -0.5


@dataclass
class AdaptiveClip:
    """A clip that moves geometrically towards the `quantile` of the updates' norms: C <- C exp(-eta (b - gamma)),
    b the noised fraction of updates that were not clipped (Andrew et al. 2021, Algorithm 1)."""

    clip: float
    quantile: float
    count_std: float

    def adapt(self, unclipped: int, count: int, generator: torch.Generator) -> float:
        """The next round's clip, after a round of count updates of which unclipped had norms within the clip."""
        noised = unclipped + gaussian(1, self.count_std, generator).item()
        self.clip *= math.exp(-CLIP_LEARNING_RATE * (noised / count - self.quantile))
        return self.clip


class CentralMechanism:
    """--dp central on the leader: each update's model part clipped to the clip as it arrives, unclipped ones
    counted, and the round's sum released as (sum + N(0, (sigma_delta C)^2)) / count, where sigma_delta is
    sigma, or with an adaptive clip sigma adjusted for the noised count it also releases."""

    def __init__(
        self,
        clip: float,
        noise_multiplier: float,
        quantile: float = 0.0,
        expected_count: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.noise_multiplier, self.clip = noise_multiplier, clip
        self.generator = generator or fresh_generator()
        self.adaptive = (
            AdaptiveClip(clip, quantile, count_noise(expected_count, noise_multiplier)) if quantile > 0 else None
        )
        self.unclipped = 0

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier of the update's noise (sigma, or adjusted for the noised count)."""
        if self.adaptive is None:
            return self.noise_multiplier
        return adjusted_noise_multiplier(self.noise_multiplier, self.adaptive.count_std)

    def clip_update(self, model_part: torch.Tensor) -> None:
        """Clip one update's model part in place to the round's clip."""
        if clip_to_norm(model_part, self.clip) <= self.clip:
            self.unclipped += 1

    def release(self, total: torch.Tensor, count: int, out: torch.Tensor) -> None:
        """Write (total + noise) / count into out: total, the sum of count clipped model parts; then adapt the
        clip for the next round."""
        noise = gaussian(total.numel(), self.update_noise_multiplier * self.clip, self.generator)
        torch.div(total + noise, count, out=out)
        if self.adaptive is not None:
            self.clip = self.adaptive.adapt(self.unclipped, count, self.generator)
        self.unclipped = 0
