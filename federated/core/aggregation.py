"""How a round's updates combine: the sample-weighted mean or a robust rule (coordinate median, trimmed mean,
Krum), registered by name, with clipping, gathered as they arrive. No gRPC, no threads.

Rules see whole updates (model part, statistics and controls; see strategies.base for what an update holds).
"""

import hashlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from federated.common.registry import Registry

if TYPE_CHECKING:
    from federated.privacy.dp import CentralMechanism

# A compressed update, as the sum takes it: adds weight times the decoded update into a flat vector in place, or
# raises before it writes a value (core/compression's decode_add validates first).
DecodeAdd = Callable[[torch.Tensor, float], None]

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


def trimmed_per_end(trim: float, count: int) -> int:
    """How many of count values the trimmed mean drops at each end: floor(trim * count), as the float product
    gives it (1/161 * 161 is just below 1), leaving at least one value. TrimmedMean.minimum_updates asks the same."""
    return min(math.floor(trim * count), (count - 1) // 2)


def trimmed_mean(updates: torch.Tensor, trim: float) -> torch.Tensor:
    """Each coordinate's mean after dropping its trimmed_per_end largest and smallest values (Yin et al. 2018)."""
    count = len(updates)
    cut = trimmed_per_end(trim, count)
    return updates.sort(dim=0).values[cut : count - cut].mean(dim=0)


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


class Aggregator:
    """An aggregation rule. Only the mean weights by sample count: robust rules treat every learner alike, or a
    learner could buy weight with its claim. Subclasses are registered by name with @rules.register(NAME)."""

    name: ClassVar[str]
    flags: ClassVar[tuple[str, ...]] = ()  # the leader's aggregator flags it reads; given for another, refused
    keeps_updates: ClassVar[bool] = True  # a robust rule needs every update of the round (memory: K updates)

    @classmethod
    def from_config(cls, config: Any) -> "Aggregator":
        """The rule with the flags of a run (the leader's configuration)."""
        return cls()

    @classmethod
    def problems(cls, config: Any) -> list[str]:
        """What is wrong with the flags for this rule, beyond each flag's own bounds."""
        return []

    def minimum_updates(self) -> float:
        """The fewest updates with which the rule outvotes a hostile one (1: it withstands nobody)."""
        return 1

    def too_few(self, count: int) -> str | None:
        """Why a round of count updates is too small for the rule to withstand anyone, or None."""
        needed = self.minimum_updates()
        if count >= needed:
            return None
        return f"{self.name} needs at least {needed} updates to outvote a hostile one, the round had {count}"

    def combine(self, updates: torch.Tensor, samples: torch.Tensor, model_size: int | None = None) -> torch.Tensor:
        """The round's update from its updates stacked as rows [K, D] and their sample counts; model_size: how
        many leading values are the model part (the rest: statistics and controls)."""
        raise NotImplementedError


rules: Registry[type[Aggregator]] = Registry("aggregator")


@rules.register("mean")
class Mean(Aggregator):
    """The sample-weighted mean, summed as updates arrive (memory: one update, whatever the learner count)."""

    keeps_updates: ClassVar[bool] = False

    def combine(self, updates: torch.Tensor, samples: torch.Tensor, model_size: int | None = None) -> torch.Tensor:
        return weighted_mean(updates, samples)


@rules.register("median")
class Median(Aggregator):
    """Each coordinate's median of whole updates (model part, statistics and controls alike: a median of
    variances is still a variance)."""

    def minimum_updates(self) -> float:
        return 3

    def combine(self, updates: torch.Tensor, samples: torch.Tensor, model_size: int | None = None) -> torch.Tensor:
        return coordinate_median(updates)


@rules.register("trimmed-mean")
class TrimmedMean(Aggregator):
    """Each coordinate's mean after dropping the --trim fraction of largest and of smallest values."""

    flags: ClassVar[tuple[str, ...]] = ("trim",)

    def __init__(self, trim: float) -> None:
        self.trim = trim

    @classmethod
    def from_config(cls, config: Any) -> "Aggregator":
        return cls(config.trim)

    @classmethod
    def problems(cls, config: Any) -> list[str]:
        return ["--trim 0 trims nothing: use --aggregator mean"] if config.trim == 0 else []

    def minimum_updates(self) -> float:
        """The fewest updates of which the rule drops one at each end (more drop at least as many): the count near
        1 / trim at which trimmed_per_end, the cut trimmed_mean makes, reaches 1 (for 1/161: 162, not 161)."""
        if self.trim <= 0 or math.isinf(1 / self.trim):
            return math.inf
        near = max(3, math.ceil(1 / self.trim))
        cuts = (count for count in range(near - 1, near + 2) if count >= 3 and trimmed_per_end(self.trim, count) >= 1)
        return next(cuts, math.inf)

    def combine(self, updates: torch.Tensor, samples: torch.Tensor, model_size: int | None = None) -> torch.Tensor:
        return trimmed_mean(updates, self.trim)


@rules.register("krum")
class Krum(Aggregator):
    """The update with the lowest Krum score, chosen by distances between model parts (Blanchard et al. 2017);
    statistics and controls, of which those distances say nothing, by their coordinate median."""

    flags: ClassVar[tuple[str, ...]] = ("byzantine",)

    def __init__(self, byzantine: int) -> None:
        self.byzantine = byzantine

    @classmethod
    def from_config(cls, config: Any) -> "Aggregator":
        return cls(config.byzantine)

    def minimum_updates(self) -> float:
        return 2 * self.byzantine + 3

    def selected(self, count: int) -> int:
        """How many of count updates the rule averages."""
        return 1

    def combine(self, updates: torch.Tensor, samples: torch.Tensor, model_size: int | None = None) -> torch.Tensor:
        chosen = multi_krum(updates[:, :model_size], self.byzantine, self.selected(len(updates)))[1]
        result = updates[chosen].mean(dim=0)
        if model_size is not None:
            result[model_size:] = coordinate_median(updates[:, model_size:])
        return result


@rules.register("multi-krum")
class MultiKrum(Krum):
    """The mean of the K - F updates with the lowest Krum scores."""

    def selected(self, count: int) -> int:
        return max(1, count - self.byzantine)


class RoundUpdates:
    """The updates of one round as they arrive: a running weighted sum for the mean (memory of one update,
    whatever the learner count), or every update kept for a robust rule (memory K updates). With clip_norm,
    each update's model part is clipped as it arrives, and its control part (SCAFFOLD's: the last model_size values,
    with controls) by the same factor. With privacy (--dp central, whose flags leave only the mean and updates of
    a model part alone), each update is clipped by it and weighs the same, and the mean is released noised."""

    def __init__(
        self,
        size: int,
        model_size: int,
        rule: Aggregator = Mean(),
        clip_norm: float = 0.0,
        controls: bool = False,
        privacy: "CentralMechanism | None" = None,
    ) -> None:
        self.model_size, self.rule, self.clip_norm, self.controls = model_size, rule, clip_norm, controls
        self.privacy, self.size = privacy, size
        self.total = torch.zeros(size if not rule.keeps_updates else 0)
        self.kept: list[torch.Tensor] = []
        self.sample_counts: list[int] = []
        self.loss_sum, self.loss_samples = 0.0, 0  # of the updates that gave a loss (NaN: none)

    def add(self, pieces: list[torch.Tensor], samples: int, loss: float) -> None:
        """Add one learner's update, given as consecutive 1-D pieces of any floating-point dtype that together
        cover the vector (codec.flat_runs), the mean over its `samples` examples."""
        clip, keep, private = self.clip_norm > 0, self.rule.keeps_updates, self.privacy is not None
        if self.needs_whole:
            update = torch.cat([piece.float() for piece in pieces])
            if self.privacy is not None:
                self.privacy.clip_update(update[: self.model_size])
            if clip:
                norm = clip_to_norm(update[: self.model_size], self.clip_norm)
                if self.controls and norm > self.clip_norm:
                    # a control change estimates the pseudo-gradient per step: scaled alike, it keeps the ratio that
                    # SCAFFOLD's bound checks (the model part clipped alone, an honest change looks too large)
                    update[-self.model_size :].mul_(self.clip_norm / norm)
            pieces = [update]
        if keep:
            self.kept.append(pieces[0])
        else:
            weight = 1 if private else samples  # DP-FedAvg: equal weights keep the sum's sensitivity at the clip
            for piece, part in zip(pieces, self.total.split([piece.numel() for piece in pieces])):
                part.add_(piece, alpha=weight)
        self.count(samples, loss)

    @property
    def needs_whole(self) -> bool:
        """Whether each update is needed whole, as a dense vector: to clip it, or for a robust rule."""
        return self.clip_norm > 0 or self.rule.keeps_updates or self.privacy is not None

    def add_decoded(self, decode_add: DecodeAdd, samples: int, loss: float) -> None:
        """Add one learner's compressed update (see DecodeAdd). With the mean it is decoded straight into the
        running sum, weighted by its samples: no dense copy of it (top-k scatters, PowerSGD adds its factors'
        product). Clipping, privacy and a robust rule need it whole: decoded into a vector first, as dense as a
        plain update. A malformed one raises and leaves the sum as it was."""
        if not self.needs_whole:
            decode_add(self.total, samples)
            self.count(samples, loss)
            return
        update = torch.zeros(self.size)
        decode_add(update, 1.0)
        self.add([update], samples, loss)

    def count(self, samples: int, loss: float) -> None:
        """Count an added update's samples and loss."""
        self.sample_counts.append(samples)
        if not math.isnan(loss):
            self.loss_sum += loss * samples
            self.loss_samples += samples

    @property
    def samples(self) -> int:
        return sum(self.sample_counts)

    @property
    def mean_loss(self) -> float:
        """The sample-weighted mean of the losses the updates gave (NaN if none did)."""
        return self.loss_sum / self.loss_samples if self.loss_samples else math.nan

    def combine_into(self, out: torch.Tensor) -> None:
        """Write the round's aggregate into out."""
        if self.privacy is not None:
            self.privacy.release(self.total, len(self.sample_counts), out)
            return
        if not self.rule.keeps_updates:
            torch.div(self.total, self.samples, out=out)
            return
        weights = torch.tensor(self.sample_counts, dtype=torch.float32)
        out.copy_(self.rule.combine(torch.stack(self.kept), weights, self.model_size))

    def reset(self) -> None:
        self.total.zero_()
        self.kept, self.sample_counts, self.loss_sum, self.loss_samples = [], [], 0.0, 0
