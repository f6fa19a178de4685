"""Adaptive server optimizers (Reddi et al. 2021, Algorithm 2, v starting at tau^2) on the mean pseudo-gradient g:
m = beta1 m + (1 - beta1) g; then FedAdagrad v += g^2, FedAdam v = beta2 v + (1 - beta2) g^2, or FedYogi
v -= (1 - beta2) g^2 sign(v - g^2); x -= lr m / (sqrt(v) + tau), with Adam's bias correction of m and (FedAdam,
FedYogi) v unless --no-bias-correction or --as-published (the paper leaves it out).

Bias-corrected, the first step moves a coordinate by lr g / (sqrt(v_hat) + tau), where v_hat is g^2 + tau^2
(FedAdagrad), g^2 + beta2 / (1 - beta2) tau^2 (FedAdam: g^2 + 99 tau^2 at beta2 0.99) or, for |g| > tau, g^2 +
tau^2 / (1 - beta2) (FedYogi: g^2 + 100 tau^2): the correction divides the tau^2 that v starts at too. So the step
is the server lr only where |g| is well above 10 tau (0.01 at the defaults; tau for FedAdagrad): at |g| = tau it is
lr / 11 for FedAdam and FedYogi and lr / 2.4 for FedAdagrad."""

from typing import Any, ClassVar

import torch

from federated.core.strategies.base import LocalTraining, bias_corrections, registry

# Reddi et al.'s first-moment decay, and the one measured to train in 20 rounds of 8 local steps (`python bench.py
# --only defaults`): with 0.9, as with FedAvgM's server momentum 0.9, the test loss stayed far above the training
# loss (FedAdam at server lr 0.03: 0.92 against 0.27, accuracy 0.78; with 0.5, 0.98)
PUBLISHED_BETA1, DEFAULT_BETA1 = 0.9, 0.5


class Adaptive(LocalTraining):
    """The shared step; subclasses say how the second moment follows g^2 (second_moment)."""

    flags: ClassVar[tuple[str, ...]] = (
        *LocalTraining.flags,
        "beta1",
        "tau",
        "no_bias_correction",
        "as_published",
    )
    corrects_second: ClassVar[bool] = True  # the second moment is a decaying mean (not FedAdagrad's sum)
    published_server_lr: ClassVar[float]  # the paper's, for --as-published

    @staticmethod
    def default_beta1_of(config: Any) -> float:
        return PUBLISHED_BETA1 if config.as_published else DEFAULT_BETA1

    @classmethod
    def default_server_lr_of(cls, config: Any) -> float:
        return cls.published_server_lr if config.as_published else cls.default_server_lr

    @classmethod
    def default_server_lr_text(cls) -> str:
        return f"{cls.default_server_lr:g} ({cls.published_server_lr:g} with --as-published)"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.beta1 = config.beta1 if config.beta1 is not None else self.default_beta1_of(config)
        self.beta2, self.tau = config.beta2, config.tau
        self.bias_correction = not (config.no_bias_correction or config.as_published)  # the papers ran none

    def optimizer_settings(self) -> dict[str, float]:
        return {"lr": self.server_lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def server_update(self, parameter: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta1, tau = group["beta1"], group["tau"]
        first = state.setdefault("momentum_buffer", torch.zeros_like(parameter))
        second = state.setdefault("variance", torch.full_like(parameter, tau * tau))
        first.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.second_moment(second, grad.square(), group["beta2"])
        if not self.bias_correction:
            parameter.addcdiv_(first, second.sqrt().add_(tau), value=-group["lr"])
            return
        of_first, of_second = bias_corrections(state, beta1, group["beta2"] if self.corrects_second else 0.0)
        denominator = second.div(of_second).sqrt_().add_(tau)
        parameter.addcdiv_(first, denominator, value=-group["lr"] / of_first)

    def second_moment(self, second: torch.Tensor, squared: torch.Tensor, beta2: float) -> None:
        """Move the second moment v towards g^2 (squared, which may be overwritten), in place."""
        raise NotImplementedError

    def describe(self, base_lr: float) -> str:
        corrected = "" if self.bias_correction else ", no bias correction"
        return f"{super().describe(base_lr)}, beta1 {self.beta1:g}, tau {self.tau:g}{corrected}"


# Reddi et al. 2021 tuned server learning rates of 10^-1 for FedAdagrad and 10^-2 for FedAdam and FedYogi on CIFAR-10
# over thousands of rounds (published_server_lr); the defaults were measured to train in 20 rounds of 8 local steps
# (`python bench.py --only defaults`)
@registry.register("fedadagrad")
class FedAdagrad(Adaptive):
    published_server_lr = 0.1
    default_server_lr = 0.03  # 0.1, bias-corrected, stepped 0.1 per coordinate at first and never learned here
    corrects_second = False

    def second_moment(self, second: torch.Tensor, squared: torch.Tensor, beta2: float) -> None:
        second.add_(squared)


@registry.register("fedadam")
class FedAdam(Adaptive):
    flags: ClassVar[tuple[str, ...]] = (*Adaptive.flags, "beta2")
    published_server_lr = 0.01
    default_server_lr = 0.03

    def second_moment(self, second: torch.Tensor, squared: torch.Tensor, beta2: float) -> None:
        second.mul_(beta2).add_(squared, alpha=1 - beta2)


@registry.register("fedyogi")
class FedYogi(Adaptive):
    flags: ClassVar[tuple[str, ...]] = (*Adaptive.flags, "beta2")
    published_server_lr = 0.01
    default_server_lr = 0.03

    def second_moment(self, second: torch.Tensor, squared: torch.Tensor, beta2: float) -> None:
        second.sub_(squared.mul_(torch.sign(second - squared)).mul_(1 - beta2))
