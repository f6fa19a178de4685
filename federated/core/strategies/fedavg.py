"""FedAvg and its kin: local SGD, then the mean pseudo-gradient applied at a server learning rate (McMahan et al.
2017); with server momentum (FedAvgM, Hsu et al. 2019); with a proximal term on the learners (FedProx, Li et al.
2020)."""

from typing import Any, ClassVar

import torch

from federated.core.strategies.base import LocalTraining, registry

# Hsu et al. 2019's server momentum, and the one measured to train in 20 rounds of 8 local steps (`python bench.py
# --only defaults`: with 0.9 the test loss stayed far above the training loss, 1.70 against 0.81, and the
# accuracy at 0.47, with or without a bias-corrected velocity)
PUBLISHED_SERVER_MOMENTUM, DEFAULT_SERVER_MOMENTUM = 0.9, 0.5
DEFAULT_MU = 0.01


@registry.register("fedavg")
class FedAvg(LocalTraining):
    """The mean pseudo-gradient at --server-lr (1: the mean of the learners' weights, McMahan et al. 2017)."""


@registry.register("fedavgm")
class FedAvgM(FedAvg):
    """Server momentum: v = momentum v + g; x -= lr v."""

    flags: ClassVar[tuple[str, ...]] = (*FedAvg.flags, "server_momentum", "as_published")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.server_momentum = self.momentum_of(config)

    @staticmethod
    def momentum_of(config: Any) -> float:
        if config.server_momentum is not None:
            return config.server_momentum
        return PUBLISHED_SERVER_MOMENTUM if config.as_published else DEFAULT_SERVER_MOMENTUM

    @classmethod
    def default_server_lr_of(cls, config: Any) -> float:
        """1 - momentum, so that the steady step is FedAvg's (Hsu et al. 2019: what matters is lr / (1 - momentum);
        1 with momentum 0.9 diverged on the synthetic set)."""
        return 1.0 - cls.momentum_of(config)

    @classmethod
    def default_server_lr_text(cls) -> str:
        return "1 - the server momentum"

    def optimizer_settings(self) -> dict[str, float]:
        return {"lr": self.server_lr, "momentum": self.server_momentum}

    def server_update(self, parameter: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        if not group["momentum"]:
            super().server_update(parameter, grad, state, group)
            return
        velocity = state.setdefault("momentum_buffer", torch.zeros_like(parameter))
        velocity.mul_(group["momentum"]).add_(grad)
        parameter.add_(velocity, alpha=-group["lr"])

    def describe(self, base_lr: float) -> str:
        return f"{super().describe(base_lr)}, server momentum {self.server_momentum:g}"


@registry.register("fedprox")
class FedProx(FedAvg):
    """A proximal term mu on the learners keeps local training near the round's global weights."""

    flags: ClassVar[tuple[str, ...]] = (*FedAvg.flags, "mu")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.mu = DEFAULT_MU if config.mu is None else config.mu

    def describe(self, base_lr: float) -> str:
        return f"{super().describe(base_lr)}, mu {self.mu:g}"
