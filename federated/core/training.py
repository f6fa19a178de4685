"""A learner's work for one round, for every strategy, as plain functions (no gRPC), and evaluation.

FedSGD: the gradient of one batch. Every other strategy: plan.local_steps SGD steps from the round's global
weights w0 with a fresh client optimizer (FedProx adds mu (w - w0) to each gradient; SCAFFOLD adds c - c_i),
then the pseudo-gradient w0 - w. The update vector (a layout.GradientLayout) ends with the BatchNorm
statistics the learner ended with and, for SCAFFOLD, the change of its control variate c_i. SCAFFOLD's new
c_i is the mean of the round's raw minibatch gradients: what option II's (w0 - w) / (K lr) - c + c_i equals
under plain SGD, and still right with client momentum, weight decay or a learning rate of zero.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from federated.core.layout import GradientLayout
from federated.core.steps import make_optimizer
from federated.wire.messages import TrainingPlan

Batch = tuple[torch.Tensor, torch.Tensor]


def compute_gradient(
    model: nn.Module, layout: GradientLayout, flat: torch.Tensor, images: torch.Tensor, labels: torch.Tensor
) -> float:
    """Fill flat (bound with layout.bind_gradients) with the mean-loss gradient and the updated
    BatchNorm statistics of one training batch; return the loss."""
    model.train()
    flat[: layout.parameter_count].zero_()
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    layout.read_buffers(flat)
    return loss.item()


class Controls:
    """SCAFFOLD's control variates as a learner holds them (Karimireddy et al. 2020): the server's c, as pushed
    with the latest state, and the learner's own c_i, kept from round to round (zero at first). local_update
    computes the change of c_i; the learner commits it once the leader has accepted the update."""

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        self.server = torch.zeros(size, device=device)
        self.own = torch.zeros(size, device=device)

    def commit(self, change: torch.Tensor) -> None:
        self.own.add_(change)

def _flat_parameters(layout: GradientLayout) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in layout.parameters])

def local_update(model: nn.Module, layout: GradientLayout, flat: torch.Tensor, batch_at: Callable[[int], Batch],
                 plan: TrainingPlan, controls: Controls | None = None) -> float:
    """Fill flat (bound with layout.bind_gradients) with this round's update; return the mean training loss.
    batch_at(k) is the k-th batch of the round (0 <= k < plan.local_steps)."""
    if plan.strategy == "fedsgd":
        return compute_gradient(model, layout, flat, *batch_at(0))
    model.train()
    start = _flat_parameters(layout)
    parameters = [p for _, p in layout.parameters]
    sizes = [p.numel() for p in parameters]
    correction = gradient_sum = None
    if plan.strategy == "scaffold":
        correction = (controls.server - controls.own).split(sizes)
        gradient_sum = torch.zeros_like(start)
    optimizer = make_optimizer(model, plan.client_lr, plan.client_momentum, plan.weight_decay)
    loss_sum = 0.0
    for step in range(plan.local_steps):
        flat[: layout.parameter_count].zero_()
        images, labels = batch_at(step)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        loss_sum += loss.item()
        if gradient_sum is not None:
            gradient_sum.add_(flat[: layout.parameter_count])
        with torch.no_grad():
            if plan.mu:  # FedProx: the gradient of mu/2 ||w - w0||^2
                for parameter, origin in zip(parameters, start.split(sizes)):
                    parameter.grad.add_(parameter - origin.view_as(parameter), alpha=plan.mu)
            if correction is not None:
                for parameter, piece in zip(parameters, correction):
                    parameter.grad.add_(piece.view_as(parameter))
        optimizer.step()
    with torch.no_grad():
        moved = start.sub_(_flat_parameters(layout))  # w0 - w: the pseudo-gradient
        flat[: layout.parameter_count].copy_(moved)
        layout.read_buffers(flat)
        if gradient_sum is not None:  # c_i+ = the mean of the raw minibatch gradients; the update carries c_i+ - c_i
            flat[layout.controls].copy_(gradient_sum.div_(plan.local_steps).sub_(controls.own))
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
