"""A learner's work for one round as plain functions (no gRPC): the gradient of one batch, or local SGD steps and
their pseudo-gradient, with the hooks through which strategies change those steps; and evaluation.

FedSGD sends the gradient of one batch (compute_gradient). Every other strategy takes plan.local_steps SGD steps
from the round's global weights w0 with a fresh client optimizer and sends the pseudo-gradient w0 - w
(train_locally). The update vector (a layout.GradientLayout) ends with the BatchNorm statistics the learner
ended with and, for SCAFFOLD, the change of its control variate. Both compute each step's gradient with a Backward:
the mean loss's, or under local differential privacy DP-SGD's (federated/privacy/local.py).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from federated.core.layout import GradientLayout
from federated.core.plan import TrainingPlan
from federated.core.steps import make_optimizer

Batch = tuple[torch.Tensor, torch.Tensor]


class Backward:
    """How a step's gradient comes from its batch: here the mean cross-entropy's, added to the parameters' .grad."""

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Add the batch's gradient to the parameters' .grad (zeroed by the caller); return the batch's loss."""
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        return loss.item()


def compute_gradient(
    model: nn.Module,
    layout: GradientLayout,
    flat: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    backward: Backward = Backward(),
) -> float:
    """Fill flat (bound with layout.bind_gradients) with the gradient (backward's) and the updated
    BatchNorm statistics of one training batch; return the loss."""
    model.train()
    flat[: layout.parameter_count].zero_()
    loss = backward(model, images, labels)
    layout.read_buffers(flat)
    return loss


class LocalHooks:
    """What a strategy adds to plain local SGD: nothing here; FedProx's proximal term and SCAFFOLD's correction
    and control update in theirs."""

    def after_backward(
        self,
        gradient: torch.Tensor,
        grads: Sequence[torch.Tensor],
        weights: Sequence[torch.Tensor],
        start: Sequence[torch.Tensor],
    ) -> None:
        """Change the step's gradient in place before the optimizer steps: the flat vector, or the same memory as
        one tensor per parameter (grads, the parameters' .grad); weights are the parameters, start the round's
        global weights."""

    def finish(self, flat: torch.Tensor, steps: int) -> None:
        """Complete the update vector (its model part and statistics are written) after steps local steps."""


def flat_parameters(layout: GradientLayout) -> torch.Tensor:
    """A copy of the model's trainable parameters as one flat vector, in layout order."""
    return torch.cat([p.detach().reshape(-1) for _, p in layout.parameters])


def train_locally(
    model: nn.Module,
    layout: GradientLayout,
    flat: torch.Tensor,
    batch_at: Callable[[int], Batch],
    plan: TrainingPlan,
    hooks: LocalHooks = LocalHooks(),
    backward: Backward = Backward(),
) -> float:
    """plan.local_steps SGD steps from the model's weights w0 with a fresh client optimizer, the hooks adjusting
    each step's gradients (backward's: under local DP the hooks see only the noised gradient, so what they derive
    stays private); then fill flat (bound with layout.bind_gradients) with the pseudo-gradient w0 - w and the
    statistics the learner ended with. batch_at(k) is the round's k-th batch. Returns the mean training loss."""
    model.train()
    start = flat_parameters(layout)
    weights, views = [p for _, p in layout.parameters], layout.views(flat)
    grads = [views[name] for name, _ in layout.parameters]  # each parameter's .grad (bound to flat)
    start_pieces = [piece.view_as(p) for piece, p in zip(start.split([p.numel() for p in weights]), weights)]
    optimizer = make_optimizer(model, plan.client_lr, plan.client_momentum, plan.weight_decay)
    gradient, loss_sum = flat[: layout.parameter_count], 0.0
    for step in range(plan.local_steps):
        gradient.zero_()
        loss_sum += backward(model, *batch_at(step))
        with torch.no_grad():
            hooks.after_backward(gradient, grads, weights, start_pieces)
        optimizer.step()
    with torch.no_grad():
        gradient.copy_(start.sub_(flat_parameters(layout)))  # w0 - w: the pseudo-gradient
        layout.read_buffers(flat)
        hooks.finish(flat, plan.local_steps)
    return loss_sum / plan.local_steps


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    correct: int


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> Evaluation:
    """Mean cross-entropy and accuracy (a fraction) on normalised images."""
    model.eval()
    device = next(model.parameters(), images).device  # (a model without parameters runs where the images are)
    loss_sum, correct = 0.0, 0
    for batch, targets in zip(images.split(batch_size), labels.split(batch_size)):
        logits = model(batch.to(device))
        loss_sum += F.cross_entropy(logits, targets.to(device), reduction="sum").item()
        correct += (logits.argmax(1) == targets.to(device)).sum().item()
    return Evaluation(loss_sum / len(labels), correct / len(labels), correct)
