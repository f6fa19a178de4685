"""Adaptive server optimizers (Reddi et al. 2021, Algorithm 2, no bias correction, v starting at tau^2) on the mean
pseudo-gradient g: m = beta1 m + (1 - beta1) g; then FedAdagrad v += g^2, FedAdam v = beta2 v + (1 - beta2) g^2,
or FedYogi v -= (1 - beta2) g^2 sign(v - g^2); x -= lr m / (sqrt(v) + tau)."""

from typing import Any, ClassVar

import torch

from federated.core.strategies.base import LocalTraining, registry


class Adaptive(LocalTraining):
    """The shared step; subclasses say how the second moment follows g^2 (second_moment)."""

    flags: ClassVar[tuple[str, ...]] = (*LocalTraining.flags, "beta1", "tau")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.beta1, self.beta2, self.tau = config.beta1, config.beta2, config.tau

    def optimizer_settings(self) -> dict[str, float]:
        return {"lr": self.server_lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def server_update(self, parameter: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta1, tau = group["beta1"], group["tau"]
        first = state.setdefault("momentum_buffer", torch.zeros_like(parameter))
        second = state.setdefault("variance", torch.full_like(parameter, tau * tau))
        first.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.second_moment(second, grad.square(), group["beta2"])
        parameter.addcdiv_(first, second.sqrt().add_(tau), value=-group["lr"])

    def second_moment(self, second: torch.Tensor, squared: torch.Tensor, beta2: float) -> None:
        """Move the second moment v towards g^2 (squared, which may be overwritten), in place."""
        raise NotImplementedError

    def describe(self, base_lr: float) -> str:
        return f"{super().describe(base_lr)}, beta1 {self.beta1:g}, tau {self.tau:g}"


# Reddi et al. 2021 tuned server learning rates of 10^-1 for FedAdagrad and 10^-2 for FedAdam and FedYogi on CIFAR-10
@registry.register("fedadagrad")
class FedAdagrad(Adaptive):
    default_server_lr: ClassVar[float] = 0.1

    def second_moment(self, second: torch.Tensor, squared: torch.Tensor, beta2: float) -> None:
        second.add_(squared)


@registry.register("fedadam")
class FedAdam(Adaptive):
    flags: ClassVar[tuple[str, ...]] = (*Adaptive.flags, "beta2")
    default_server_lr: ClassVar[float] = 0.01

    def second_moment(self, second: torch.Tensor, squared: torch.Tensor, beta2: float) -> None:
        second.mul_(beta2).add_(squared, alpha=1 - beta2)


@registry.register("fedyogi")
class FedYogi(Adaptive):
    flags: ClassVar[tuple[str, ...]] = (*Adaptive.flags, "beta2")
    default_server_lr: ClassVar[float] = 0.01

    def second_moment(self, second: torch.Tensor, squared: torch.Tensor, beta2: float) -> None:
        second.sub_(squared.mul_(torch.sign(second - squared)).mul_(1 - beta2))
