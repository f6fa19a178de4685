"""Local differential privacy on a learner (--dp local): DP-SGD's gradient (Abadi et al. 2016) from Opacus'
per-example gradients, and the learner's own accountant, which sits rounds out rather than exceed --max-epsilon.

Each step's gradient is (sum over the batch of clip(g_i) + N(0, (sigma C)^2 I)) / B: every example's gradient g_i
clipped to L2 norm C (the plan's clip), Gaussian noise of sigma times C (the plan's noise multiplier) added to the
sum, divided by the batch size B. One example then moves a step's gradient by at most C / B before the noise, and
everything computed from the noised gradients (the local steps, the pseudo-gradient, SCAFFOLD's control change) is
post-processing: it costs no further privacy.
"""

import secrets
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from federated.core.plan import TrainingPlan
from federated.core.training import Backward
from federated.privacy.accountant import Accountant

# Opacus' hooks on the first layer, whose input (the images) needs no gradient, make torch warn at every backward
warnings.filterwarnings("ignore", "Full backward hook is firing when gradients are computed with respect to module")

NORM_OFFSET = 1e-6  # Opacus' clip factor is C / (|g_i| + 1e-6), at most 1: a zero gradient divides by no zero


def model_problem(model: nn.Module) -> str | None:
    """Why DP-SGD cannot train this model, or None. A layer that normalises with its batch's statistics (BatchNorm,
    and batch renorm, a subclass that Opacus' ModuleValidator lets through: it looks types up exactly) makes each
    example's output depend on the others in its batch, so no per-example gradient bounds one example's influence."""
    from opacus.validators import ModuleValidator

    batch_norms = (module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm))
    mixing = sorted({type(module).__name__ for module in batch_norms})
    if mixing:
        return f"its {', '.join(mixing)} layers mix the examples of a batch"
    if errors := ModuleValidator.validate(model, strict=False):
        return str(errors[0]).split(".")[0]
    return None


def hook_examples(model: nn.Module) -> nn.Module:
    """Hook the model's layers (Opacus' GradSampleModule, kept as long as the model) so that every backward pass
    through it leaves each parameter's per-example gradients in p.grad_sample. Raises ValueError for a model that
    DP-SGD cannot train (model_problem)."""
    if problem := model_problem(model):
        raise ValueError(f"local differential privacy cannot train this model: {problem}; use --norm group")
    from opacus import GradSampleModule

    return GradSampleModule(model)  # loss_reduction "mean": grad_sample holds each example's own loss gradient


def fresh_generator(device: torch.device | str) -> torch.Generator:
    """A generator for the noise seeded from the operating system, never from the run's --seed (which the leader
    sends every learner: noise from it would be known to the leader, and subtracted)."""
    return torch.Generator(device).manual_seed(secrets.randbits(63))


@dataclass
class ExampleGradients(Backward):
    """DP-SGD's gradient of a batch, for a model hooked by hook_examples: each example's gradient clipped to L2 norm
    clip, their sum noised with N(0, (noise_multiplier clip)^2) in every coordinate, divided by the batch; written
    into the parameters' .grad (the update vector, bound to them)."""

    clip: float
    noise_multiplier: float
    generator: torch.Generator

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        parameters = [p for p in model.parameters() if p.requires_grad]
        examples = [p.grad_sample for p in parameters]  # type: ignore[attr-defined]  # (set by the hooks)
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in examples], dim=1).norm(dim=1)
        factors = (self.clip / (norms + NORM_OFFSET)).clamp(max=1.0)
        std = self.noise_multiplier * self.clip
        with torch.no_grad():
            for parameter, per_example in zip(parameters, examples):
                total = torch.einsum("i,i...->...", factors, per_example)
                noise = torch.normal(0.0, std, total.shape, generator=self.generator, device=total.device)
                parameter.grad.copy_(total.add_(noise).div_(len(labels)))  # type: ignore[union-attr]
                parameter.grad_sample = None  # type: ignore[attr-defined]  # (Opacus adds to it otherwise)
        return loss.item()


class Budget:
    """This learner's own accountant of its DP-SGD steps (Opacus' RDP accountant), at the plan's delta held to at
    most 1 / its shard's size (a larger delta would let the leader shrink the epsilon it reports), and --max-epsilon:
    a round that would take the spent epsilon past it is sat out, whatever the leader asks. With --max-epsilon, a
    plan without local DP is sat out too: its updates would spend without bound."""

    def __init__(self, max_epsilon: float) -> None:
        """max_epsilon: --max-epsilon (0: no limit)."""
        self.max_epsilon = max_epsilon
        self.delta = 0.0  # the first round charged sets it (at: before any step, the delta does not matter)
        self.accountant = Accountant(self.delta)

    def at(self, delta: float) -> Accountant:
        """The accountant, reporting at delta (its history kept)."""
        if delta != self.delta:
            self.delta, self.accountant = delta, Accountant(delta, self.accountant.state())
        return self.accountant

    def refusal(self, plan: TrainingPlan, shard_size: int, batch_size: int) -> str | None:
        """Why this learner must sit out a round of this plan (as it follows it on its shard), or None."""
        if not self.max_epsilon:
            return None
        if plan.dp != "local":
            return "the leader's plan asks for no local differential privacy, and --max-epsilon trains only with it"
        accountant = self.at(delta_for(plan.dp_delta, shard_size))
        rate = sample_rate(shard_size, batch_size)
        after = accountant.epsilon_after(plan.dp_noise_multiplier, rate, plan.local_steps)
        if after > self.max_epsilon:
            return (
                f"its {plan.local_steps} DP-SGD steps would take the spent epsilon from {accountant.epsilon():.3g} to "
                f"{after:.3g}, past --max-epsilon {self.max_epsilon:g}"
            )
        return None

    def summary(self) -> str | None:
        """What this learner spent, for its last log line; None if it never trained under local DP."""
        steps = sum(entry[2] for entry in self.accountant.state())
        if not steps:
            return None
        return f"spent epsilon {self.accountant.epsilon():.3f} at delta {self.delta:.3g} in {steps} DP-SGD steps"

    def charge(self, plan: TrainingPlan, shard_size: int, batch_size: int) -> float:
        """Charge a round trained under the plan's local DP; the epsilon spent so far."""
        accountant = self.at(delta_for(plan.dp_delta, shard_size))
        accountant.step(plan.dp_noise_multiplier, sample_rate(shard_size, batch_size), plan.local_steps)
        return accountant.epsilon()


def sample_rate(shard_size: int, batch_size: int) -> float:
    """The chance that a step's batch holds a given example of the shard: batch / shard (one smaller batch of a
    shard smaller than a batch holds every example). Batches are a shuffled pass's fixed-size slices, charged as
    Poisson sampling at that rate, as Opacus does."""
    return min(1.0, batch_size / shard_size)


def delta_for(plan_delta: float, shard_size: int) -> float:
    """The delta this learner reports at: the plan's, at most 1 / its shard's size."""
    return min(plan_delta, 1.0 / shard_size)
