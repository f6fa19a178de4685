"""Federated algorithms as arithmetic on tensors: strategies, aggregation rules and server optimizers.

No gRPC, no threads. An update is one flat float32 vector in a fedsgd.GradientLayout: the model part
(a gradient for FedSGD; for every other strategy the pseudo-gradient, the round's starting weights minus
the learner's weights after local training), then the BatchNorm statistics the learner ended with, then
(SCAFFOLD only) the change of the learner's control variate. Aggregation rules see whole updates; the
server optimizer moves the weights with the model part; statistics are averaged and copied, never passed
through an optimizer.
"""

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

# Strategies: FedSGD is the article's algorithm (one gradient per learner per round); the others train
# locally for several steps and send a pseudo-gradient, which the server optimizer applies.
STRATEGIES = ("fedsgd", "fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi", "scaffold")
ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")  # Reddi et al. 2021, Algorithm 2
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum", "multi-krum")
# Server learning rates the papers use: 1 for FedAvg and its kin (McMahan et al. 2017, Hsu et al. 2019,
# Karimireddy et al. 2020); Reddi et al. 2021 tuned 10^-2 for FedAdam/FedYogi and 10^-1 for FedAdagrad on CIFAR-10.
DEFAULT_SERVER_LR = {"fedadagrad": 0.1, "fedadam": 0.01, "fedyogi": 0.01}
MAX_CONTROL_NORM = 10.0  # SCAFFOLD's server control, against the weights' norm: a catastrophe bound, not a tuning


def update_kind(strategy: str) -> str:
    """What a learner sends under a strategy: a gradient (FedSGD) or a pseudo-gradient (local training)."""
    return "gradient" if strategy == "fedsgd" else "pseudo-gradient"


@dataclass(frozen=True)
class Strategy:
    """What the leader runs: the algorithm, how learners train locally, and how updates are combined."""

    name: str = "fedsgd"
    local_steps: int = 1
    client_momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0  # FedProx
    server_lr: float = 1.0
    server_momentum: float = 0.0  # FedAvgM
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    aggregator: str = "mean"
    trim: float = 0.2
    byzantine: int = 1
    clip_norm: float = 0.0  # 0: no clipping

    @property
    def local(self) -> bool:
        """Whether learners train locally and send pseudo-gradients (every strategy but FedSGD)."""
        return self.name != "fedsgd"

    @property
    def keeps_updates(self) -> bool:
        """Whether rounds keep every update (robust rules need them all); the mean keeps one running sum."""
        return self.aggregator != "mean"


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


def control_problem(control: torch.Tensor, change: torch.Tensor, weights_norm: float) -> str | None:
    """Why SCAFFOLD's server control must not take this change (it would hold NaN or Inf, or exceed
    MAX_CONTROL_NORM times the weights' norm: a control estimates a gradient), or None."""
    norm = torch.linalg.vector_norm(control + change).item()
    if not math.isfinite(norm) or norm > MAX_CONTROL_NORM * max(weights_norm, 1.0):
        return f"the control variate would reach norm {norm:.3g}"
    return None


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


# --- server optimizers -----------------------------------------------------------------------------------

class ServerOptimizer(torch.optim.Optimizer):
    """The server step on the mean pseudo-gradient g (in each parameter's .grad; g = -Delta in Reddi et al.'s
    notation). FedAvg: x -= lr g. FedAvgM (Hsu et al. 2019): v = momentum v + g; x -= lr v. FedAdagrad, FedAdam,
    FedYogi (Reddi et al. 2021, Algorithm 2, no bias correction, v starts at tau^2): m = beta1 m + (1-beta1) g;
    v += g^2 | v = beta2 v + (1-beta2) g^2 | v -= (1-beta2) g^2 sign(v - g^2); x -= lr m / (sqrt(v) + tau)."""

    def __init__(self, params, rule: str, lr: float, momentum: float = 0.0, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3) -> None:
        if rule not in STRATEGIES or rule == "fedsgd":
            raise ValueError(f"no server optimizer for {rule!r}")
        super().__init__(params, {"rule": rule, "lr": lr, "momentum": momentum, "beta1": beta1, "beta2": beta2,
                                  "tau": tau})

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self._step_one(parameter, parameter.grad, group)

    def _step_one(self, parameter: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[parameter]
        if group["rule"] not in ADAPTIVE:
            if not group["momentum"]:
                parameter.add_(grad, alpha=-group["lr"])
                return
            velocity = state.setdefault("momentum_buffer", torch.zeros_like(parameter))
            velocity.mul_(group["momentum"]).add_(grad)
            parameter.add_(velocity, alpha=-group["lr"])
            return
        beta1, beta2, tau = group["beta1"], group["beta2"], group["tau"]
        first = state.setdefault("momentum_buffer", torch.zeros_like(parameter))
        second = state.setdefault("variance", torch.full_like(parameter, tau * tau))
        first.mul_(beta1).add_(grad, alpha=1 - beta1)
        squared = grad.square()
        if group["rule"] == "fedadagrad":
            second.add_(squared)
        elif group["rule"] == "fedadam":
            second.mul_(beta2).add_(squared, alpha=1 - beta2)
        else:  # fedyogi
            second.sub_(squared.mul_(torch.sign(second - squared)).mul_(1 - beta2))
        parameter.addcdiv_(first, second.sqrt().add_(tau), value=-group["lr"])


def make_server_optimizer(model: torch.nn.Module, strategy: Strategy) -> ServerOptimizer:
    """The server optimizer of a local-training strategy, over the model's trainable parameters."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    return ServerOptimizer(parameters, strategy.name, strategy.server_lr, strategy.server_momentum,
                           strategy.beta1, strategy.beta2, strategy.tau)


def sample_participants(active: list[int], count: int, generator: torch.Generator) -> list[int]:
    """count of the active learners (all if fewer), drawn without replacement with the run's seeded generator."""
    if count <= 0 or count >= len(active):
        return sorted(active)
    order = torch.randperm(len(active), generator=generator)[:count].tolist()
    return sorted(active[index] for index in order)
