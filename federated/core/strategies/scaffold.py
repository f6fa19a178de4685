"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each learner's drift. The leader keeps the server
control c, sent with every state; each learner keeps its own c_i, adds c - c_i to every local gradient, and sends
the change of c_i with its update; the leader moves c by |S| / N times the participants' mean change."""

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from federated.core.layout import GradientLayout
from federated.core.plan import TrainingPlan
from federated.core.steps import GuardedStep
from federated.core.strategies.base import Proximal, registry
from federated.core.strategies.fedavg import FedAvg
from federated.core.training import LocalHooks

MAX_CONTROL_NORM = 10.0  # the server control, against the weights' norm: a catastrophe bound, not a tuning


class Controls:
    """The control variates as a learner holds them: the server's c, as pushed with the latest state, and the
    learner's own c_i, kept from round to round (zero at first). local_update computes the change of c_i; the
    learner commits it once the leader has accepted the update."""

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        self.server = torch.zeros(size, device=device)
        self.own = torch.zeros(size, device=device)

    def commit(self, change: torch.Tensor) -> None:
        self.own.add_(change)


class Correction(Proximal):
    """c - c_i added to each local gradient (after the plan's proximal term, if any); the raw gradients summed, so
    that the new c_i is their mean: what option II's (w0 - w) / (K lr) - c + c_i equals under plain SGD, and still
    right with client momentum, weight decay or a learning rate of zero. The update's control part carries
    c_i+ - c_i."""

    def __init__(self, layout: GradientLayout, controls: Controls, mu: float = 0.0) -> None:
        super().__init__(mu)
        self.layout, self.controls = layout, controls
        self.correction = controls.server - controls.own
        self.gradient_sum = torch.zeros(layout.parameter_count, device=controls.own.device)

    def after_backward(
        self,
        gradient: torch.Tensor,
        grads: Sequence[torch.Tensor],
        weights: Sequence[torch.Tensor],
        start: Sequence[torch.Tensor],
    ) -> None:
        self.gradient_sum.add_(gradient)
        super().after_backward(gradient, grads, weights, start)
        gradient.add_(self.correction)

    def finish(self, flat: torch.Tensor, steps: int) -> None:
        flat[self.layout.controls].copy_(self.gradient_sum.div_(steps).sub_(self.controls.own))


@registry.register("scaffold")
class Scaffold(FedAvg):
    """FedAvg with control variates; the server control travels with every state and is checkpointed."""

    controls: ClassVar[bool] = True
    control: torch.Tensor

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.control = torch.zeros(0)  # sized for the model by bind

    def bind(self, layout: GradientLayout) -> None:
        self.control = torch.zeros(layout.parameter_count)

    def apply(
        self, step: GuardedStep, mean: torch.Tensor, lr: float, steps: int, participants: int, learners: int
    ) -> str | None:
        """The server step, then Karimireddy et al.'s c += |S| / N * the mean change of the participants' controls;
        the control's change is checked before the step and applied after it."""
        layout = step.layout
        change = mean[layout.controls] * (participants / learners)
        weights = torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for _, p in layout.parameters]))
        if problem := control_problem(self.control, change, weights.item()):
            return problem
        problem = super().apply(step, mean, lr, steps, participants, learners)
        if problem is None:
            self.control.add_(change)
        return problem

    def checkpoint(self) -> dict[str, torch.Tensor]:
        return {"control": self.control}

    def restore(self, saved: dict) -> None:
        self.control.copy_(saved["control"])

    @classmethod
    def hooks(cls, layout: GradientLayout, plan: TrainingPlan, controls: Any) -> LocalHooks:
        return Correction(layout, controls, plan.mu)


def control_problem(control: torch.Tensor, change: torch.Tensor, weights_norm: float) -> str | None:
    """Why the server control must not take this change (it would hold NaN or Inf, or exceed MAX_CONTROL_NORM
    times the weights' norm: a control estimates a gradient), or None."""
    norm = torch.linalg.vector_norm(control + change).item()
    if not math.isfinite(norm) or norm > MAX_CONTROL_NORM * max(weights_norm, 1.0):
        return f"the control variate would reach norm {norm:.3g}"
    return None
