"""Federated algorithms as arithmetic on tensors: strategies, aggregation rules and server optimizers.

No gRPC, no threads. An update is one flat float32 vector in a fedsgd.GradientLayout: the model part
(a gradient for FedSGD; for every other strategy the pseudo-gradient, the round's starting weights minus
the learner's weights after local training), then the BatchNorm statistics the learner ended with, then
(SCAFFOLD only) the change of the learner's control variate. Aggregation rules see whole updates; the
server optimizer moves the weights with the model part; statistics are averaged and copied, never passed
through an optimizer.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch

# Strategies: FedSGD is the article's algorithm (one gradient per learner per round); the others train
# locally for several steps and send a pseudo-gradient, which the server optimizer applies.
STRATEGIES = ("fedsgd", "fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi", "scaffold")
ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")  # Reddi et al. 2021, Algorithm 2
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


def control_problem(control: torch.Tensor, change: torch.Tensor, weights_norm: float) -> str | None:
    """Why SCAFFOLD's server control must not take this change (it would hold NaN or Inf, or exceed
    MAX_CONTROL_NORM times the weights' norm: a control estimates a gradient), or None."""
    norm = torch.linalg.vector_norm(control + change).item()
    if not math.isfinite(norm) or norm > MAX_CONTROL_NORM * max(weights_norm, 1.0):
        return f"the control variate would reach norm {norm:.3g}"
    return None


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
