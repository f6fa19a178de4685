"""FedSGD arithmetic on tensors: gradients, weighted accumulation, the optimizer step, evaluation.

No gRPC here. A gradient travels as one flat float32 vector: every trainable parameter's gradient
followed by every floating-point buffer (BatchNorm running statistics), so that the leader can
average both with one in-place add per learner.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import wire


class GradientLayout:
    """Where each parameter gradient and float buffer of a model sits in one flat float32 vector."""

    def __init__(self, model: nn.Module, wire_dtype: torch.dtype = torch.float32) -> None:
        self.parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.buffers = [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
        self.counters = [b for name, b in model.named_buffers() if name.endswith("num_batches_tracked")]
        self.parameter_count = sum(p.numel() for _, p in self.parameters)
        self.size = self.parameter_count + sum(b.numel() for _, b in self.buffers)
        self.spec: wire.TensorSpec = {  # what a gradient payload must hold, in order
            name: (wire_dtype, tuple(t.shape)) for name, t in self.parameters + self.buffers
        }

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into a flat vector, in layout order."""
        shapes = [shape for _, shape in self.spec.values()]
        pieces = flat.split([math.prod(shape) for shape in shapes])
        return {name: piece.view(shape) for name, piece, shape in zip(self.spec, pieces, shapes)}

    def bind_gradients(self, flat: torch.Tensor) -> None:
        """Make every parameter's .grad a view into flat, so backward() and step() use it in place."""
        views = self.views(flat)
        for name, parameter in self.parameters:
            parameter.grad = views[name]

    def read_buffers(self, flat: torch.Tensor) -> None:
        """Copy the model's float buffers into the tail of flat."""
        views = self.views(flat)
        for name, buffer in self.buffers:
            views[name].copy_(buffer)

    def write_buffers(self, flat: torch.Tensor) -> None:
        """Copy the tail of flat into the model's float buffers and count one more batch."""
        views = self.views(flat)
        with torch.no_grad():
            for name, buffer in self.buffers:
                buffer.copy_(views[name])
            for counter in self.counters:
                counter += 1


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


class Accumulator:
    """A running sum of gradient vectors weighted by batch size: one buffer, whatever the learner count."""

    def __init__(self, size: int) -> None:
        self.total = torch.zeros(size, dtype=torch.float32)
        self.samples = 0
        self.loss_sum = 0.0

    def add(self, flat: torch.Tensor, samples: int, loss: float) -> None:
        """Add one learner's gradient (the mean over its `samples` examples)."""
        self.total.add_(flat, alpha=samples)
        self.samples += samples
        self.loss_sum += loss * samples

    def mean_into(self, out: torch.Tensor) -> None:
        """Write the sample-weighted mean gradient into out."""
        torch.div(self.total, self.samples, out=out)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.samples

    def reset(self) -> None:
        self.total.zero_()
        self.samples, self.loss_sum = 0, 0.0


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum; weight decay only on weights, not on BatchNorm parameters or biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def apply_mean_gradient(
    layout: GradientLayout, optimizer: torch.optim.Optimizer, mean: torch.Tensor, lr: float
) -> None:
    """One optimizer step with the averaged gradient (whose head backs the parameters' .grad)
    and adoption of the averaged BatchNorm statistics from its tail."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    layout.write_buffers(mean)


def learning_rate(round_index: int, base_lr: float, warmup_rounds: int, total_rounds: int) -> float:
    """Linear warm-up to base_lr over warmup_rounds, then cosine decay towards zero."""
    if round_index < warmup_rounds:
        return base_lr * (round_index + 1) / warmup_rounds
    progress = (round_index - warmup_rounds) / max(1, total_rounds - warmup_rounds)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> Evaluation:
    """Mean cross-entropy and accuracy (a fraction) on normalised images."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for batch, targets in zip(images.split(batch_size), labels.split(batch_size)):
        logits = model(batch)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
    return Evaluation(loss_sum / len(labels), correct / len(labels))
