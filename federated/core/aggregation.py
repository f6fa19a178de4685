"""How a round's updates combine: the sample-weighted mean, robust rules (coordinate median, trimmed mean, Krum),
clipping, and the round's running sum. No gRPC, no threads.

Aggregation rules see whole updates (model part, statistics and controls); see strategies for what an update holds.
"""

import hashlib
import math

import torch

from federated.core.strategies import Strategy

AGGREGATORS = ("mean", "median", "trimmed-mean", "krum", "multi-krum")


# --- aggregation rules: each takes the round's updates stacked as rows [K, D] ------------------------------

def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean of the rows, weighted (by sample counts)."""
    weights = weights.to(updates.dtype)
    return weights @ updates / weights.sum()

def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    """Each coordinate's median (Yin et al. 2018); with an even count, the mean of the two middle values."""
    ordered = updates.sort(dim=0).values
    count = len(updates)
    return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2

def trimmed_mean(updates: torch.Tensor, trim: float) -> torch.Tensor:
    """Each coordinate's mean after dropping its floor(trim * K) largest and smallest values (Yin et al. 2018)."""
    count = len(updates)
    cut = min(math.floor(trim * count), (count - 1) // 2)
    return updates.sort(dim=0).values[cut:count - cut].mean(dim=0)

def krum_scores(updates: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Blanchard et al. 2017: each update's summed squared distance to its K - F - 2 nearest others (at least 1)."""
    count = len(updates)
    wide = updates.double()
    distances = torch.cdist(wide, wide).square()
    neighbours = max(1, min(count - 1, count - byzantine - 2))
    distances.fill_diagonal_(math.inf)
    return distances.topk(neighbours, dim=1, largest=False).values.sum(dim=1)

def multi_krum(updates: torch.Tensor, byzantine: int, selected: int) -> tuple[torch.Tensor, list[int]]:
    """The mean of the `selected` updates with the lowest Krum scores, and their indices (Krum: selected=1).
    Ties go by a digest of the update's bytes, so that the result never depends on the order of arrival."""
    scores = krum_scores(updates, byzantine).tolist()
    digest = lambda index: hashlib.blake2b(updates[index].numpy().tobytes(), digest_size=16).digest()
    chosen = sorted(range(len(updates)), key=lambda index: (scores[index], digest(index)))[:selected]
    return updates[chosen].mean(dim=0), chosen

def clip_to_norm(update: torch.Tensor, max_norm: float) -> float:
    """Scale update in place so that its L2 norm is at most max_norm; returns the norm it had."""
    norm = torch.linalg.vector_norm(update).item()
    if norm > max_norm:
        update.mul_(max_norm / norm)
    return norm

def aggregate(strategy: Strategy, updates: torch.Tensor, samples: torch.Tensor, model_size: int | None = None) -> torch.Tensor:
    """The round's update by the strategy's aggregation rule. Median and trimmed mean work per coordinate on
    whole updates (model part, statistics and controls alike: a median of variances is still a variance); Krum
    chooses by distances between the first model_size values (the model part) and takes the coordinate median
    of the rest. Only the mean weights by sample count: robust rules treat every learner alike, or a learner
    could buy weight with its claim."""
    rule = strategy.aggregator
    if rule == "mean":
        return weighted_mean(updates, samples)
    if rule == "median":
        return coordinate_median(updates)
    if rule == "trimmed-mean":
        return trimmed_mean(updates, strategy.trim)
    selected = 1 if rule == "krum" else max(1, len(updates) - strategy.byzantine)
    chosen = multi_krum(updates[:, :model_size], strategy.byzantine, selected)[1]
    result = updates[chosen].mean(dim=0)
    if model_size is not None:  # statistics and controls: Krum chose on the model part, which says nothing of them
        result[model_size:] = coordinate_median(updates[:, model_size:])
    return result

def minimum_updates(aggregator: str, trim: float = 0.2, byzantine: int = 1) -> int:
    """The fewest updates with which the rule outvotes a hostile one: 3 for the median, as many as make the
    trimmed mean drop one value at each end, 2F + 3 for Krum (Blanchard et al.)."""
    if aggregator in ("krum", "multi-krum"):
        return 2 * byzantine + 3
    if aggregator == "trimmed-mean":
        return max(3, math.ceil(1 / trim)) if trim > 0 else math.inf
    return 3 if aggregator == "median" else 1

def too_few(strategy: Strategy, count: int) -> str | None:
    """Why a round of count updates is too small for the strategy's rule to withstand anyone, or None."""
    needed = minimum_updates(strategy.aggregator, strategy.trim, strategy.byzantine)
    if count >= needed:
        return None
    return f"{strategy.aggregator} needs at least {needed} updates to outvote a hostile one, the round had {count}"

class RoundUpdates:
    """The updates of one round as they arrive: a running weighted sum for the mean (memory of one update,
    whatever the learner count), or every update kept for a robust rule (memory K updates). With clip_norm,
    each update's model part is clipped as it arrives."""

    def __init__(self, size: int, model_size: int, strategy: Strategy) -> None:
        self.model_size, self.strategy = model_size, strategy
        self.total = torch.zeros(size if not strategy.keeps_updates else 0)
        self.kept: list[torch.Tensor] = []
        self.sample_counts: list[int] = []
        self.loss_sum = 0.0

    def add(self, pieces: list[torch.Tensor], samples: int, loss: float) -> None:
        """Add one learner's update, given as consecutive 1-D pieces of any floating-point dtype that together
        cover the vector (wire.flat_runs), the mean over its `samples` examples."""
        clip, keep = self.strategy.clip_norm > 0, self.strategy.keeps_updates
        if clip or keep:
            update = torch.cat([piece.float() for piece in pieces])
            if clip:
                clip_to_norm(update[:self.model_size], self.strategy.clip_norm)
            pieces = [update]
        if keep:
            self.kept.append(pieces[0])
        else:
            for piece, part in zip(pieces, self.total.split([piece.numel() for piece in pieces])):
                part.add_(piece, alpha=samples)
        self.sample_counts.append(samples)
        self.loss_sum += loss * samples

    @property
    def samples(self) -> int:
        return sum(self.sample_counts)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.samples

    def combine_into(self, out: torch.Tensor) -> None:
        """Write the round's aggregate into out."""
        if not self.strategy.keeps_updates:
            torch.div(self.total, self.samples, out=out)
            return
        weights = torch.tensor(self.sample_counts, dtype=torch.float32)
        out.copy_(aggregate(self.strategy, torch.stack(self.kept), weights, self.model_size))

    def reset(self) -> None:
        self.total.zero_()
        self.kept, self.sample_counts, self.loss_sum = [], [], 0.0
