"""FedSGD arithmetic on tensors: the update layout, gradients, the guarded optimizer step, evaluation.

No gRPC here. An update is one flat float32 vector: every trainable parameter's gradient (or, for local
training, its pseudo-gradient) followed by every running statistic (BatchNorm's mean and variance) and,
for SCAFFOLD, the control variate's change, so that the leader can average them all with one in-place add
per learner. On the wire the gradients may be float16 or bfloat16; the
statistics are always float32.
"""

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import wire

# BatchNorm statistics travel in float32 whatever the wire dtype: in bfloat16 a small change to a running
# variance near 1.0 would round away entirely.
STATISTICS_DTYPE = torch.float32
# The buffers that training changes, and so an update carries. A model's other float buffers are constants
# (Swin V2's relative_coords_table) that travel in the state alone: averaged with the statistics, they would
# drift, since a weighted mean of equal float32 values is not always that value (22% of entries move by one
# ulp a round over five learners of unequal batches).
RUNNING_STATISTICS = ("running_mean", "running_var")


class GradientLayout:
    """Where each parameter gradient and running statistic of a model sits in one flat float32 vector."""

    def __init__(self, model: nn.Module, wire_dtype: torch.dtype = torch.float32, controls: bool = False) -> None:
        self.parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.buffers = [(name, b) for name, b in model.named_buffers()
                        if b.is_floating_point() and name.rsplit(".", 1)[-1] in RUNNING_STATISTICS]
        self.counters = [b for name, b in model.named_buffers() if name.endswith("num_batches_tracked")]
        self.variances = [name for name, _ in self.buffers if name.endswith("running_var")]
        self.parameter_count = sum(p.numel() for _, p in self.parameters)
        self.statistics_count = sum(b.numel() for _, b in self.buffers)
        self.size = self.parameter_count + self.statistics_count + (self.parameter_count if controls else 0)
        self.wire_dtype = wire_dtype
        self.spec: wire.TensorSpec = {  # what an update payload must hold, in order
            **{name: (wire_dtype, tuple(p.shape)) for name, p in self.parameters},
            **{name: (STATISTICS_DTYPE, tuple(b.shape)) for name, b in self.buffers},
            **({control_name(name): (STATISTICS_DTYPE, tuple(p.shape)) for name, p in self.parameters} if controls else {}),
        }

    @property
    def controls(self) -> slice:
        """Where SCAFFOLD's control variates sit (an empty slice without them)."""
        return slice(self.parameter_count + self.statistics_count, self.size)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into a flat vector, in layout order."""
        shapes = [shape for _, shape in self.spec.values()]
        pieces = flat.split([math.prod(shape) for shape in shapes])
        return {name: piece.view(shape) for name, piece, shape in zip(self.spec, pieces, shapes)}

    def wire_tensors(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector's tensors as they travel, on the CPU: parameter gradients in the wire dtype, statistics
        in float32 (no copy of a float32 vector on the CPU)."""
        views = self.views(flat.to("cpu"))
        return {name: views[name].to(dtype) for name, (dtype, _) in self.spec.items()}

    def check_update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise PayloadError unless an update's BatchNorm variances are non-negative (its values must already
        be known finite, as wire.check_matches makes sure): a weighted mean of them must be a variance."""
        if _any_negative([tensors[name] for name in self.variances]):
            raise wire.PayloadError(f"the update holds {_first_problem((name, tensors[name]) for name in self.variances)}")

    def bind_gradients(self, flat: torch.Tensor) -> None:
        """Make every parameter's .grad a view into flat, so backward() and step() use it in place."""
        views = self.views(flat)
        for name, parameter in self.parameters:
            parameter.grad = views[name]

    def read_buffers(self, flat: torch.Tensor) -> None:
        """Copy the model's running statistics into the tail of flat."""
        views = self.views(flat)
        for name, buffer in self.buffers:
            views[name].copy_(buffer)

    def write_buffers(self, flat: torch.Tensor, batches: int = 1) -> None:
        """Copy the statistics part of flat into the model's running statistics and count the batches they saw."""
        views = self.views(flat)
        with torch.no_grad():
            for name, buffer in self.buffers:
                buffer.copy_(views[name])
            for counter in self.counters:
                counter += batches


def control_name(parameter: str) -> str:
    """The name under which a parameter's SCAFFOLD control variate travels."""
    return f"control.{parameter}"


def wire_state(model: nn.Module, wire_dtype: torch.dtype, control: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A model's state_dict as it travels: parameters in the wire dtype, buffers (BatchNorm statistics,
    batch counters) as they are (no copy for float32); with SCAFFOLD, then the server's control variate
    (a flat vector over the trainable parameters) in float32."""
    parameters = {name for name, _ in model.named_parameters()}
    state = {name: tensor.to(wire_dtype) if name in parameters else tensor
             for name, tensor in model.state_dict().items()}
    if control is not None:
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        pieces = control.split([p.numel() for _, p in trainable])
        state.update({control_name(name): piece.view(p.shape) for (name, p), piece in zip(trainable, pieces)})
    return state


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


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum; weight decay only on weights, not on BatchNorm parameters or biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def apply_mean_gradient(
    layout: GradientLayout, optimizer: torch.optim.Optimizer, mean: torch.Tensor, lr: float, batches: int = 1
) -> None:
    """One optimizer step with the averaged gradient (whose head backs the parameters' .grad)
    and adoption of the averaged BatchNorm statistics (computed over `batches` batches) that follow it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    layout.write_buffers(mean, batches)


# Bounds past which a step is no step of a sane run but a hostile update's blow-up. Training ResNet-20 and
# ResNet-18 on the synthetic set (lr 0.1-0.4, momentum 0.9) measured at most: a step of 0.04 times the
# weights' norm; 0.45 times one tensor's norm (or 1, if smaller); momentum that would carry the weights 0.4
# times their norm further; and a statistic changing by 1.3 times its size plus one. The bounds leave a
# wide margin: they stop catastrophes, not a member that steers the model by small steps.
MAX_RELATIVE_STEP = 1.0
MAX_TENSOR_STEP = 10.0
MAX_MOMENTUM_REACH = 10.0
MAX_STATISTIC_CHANGE = 1000.0
OPTIMIZER_STATE = ("momentum_buffer", "variance")  # what SGD and strategies.ServerOptimizer keep per parameter


class GuardedStep:
    """apply_mean_gradient, refused or undone when it would leave a NaN, an Inf or a negative BatchNorm
    variance in the model or its momentum, or change the weights (or a statistic) by far more than any sane
    step does: a hostile or broken round never reaches the model, nor a checkpoint. Works on two flat
    copies of the model and its momentum (before and after), reused every round: a few passes over memory."""

    def __init__(self, model: nn.Module, layout: GradientLayout, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.layout, self.optimizer = model, layout, optimizer
        self._flat = {"before": torch.empty(0), "after": torch.empty(0)}

    def __call__(self, mean: torch.Tensor, lr: float, batches: int = 1) -> str | None:
        """Step with the averaged update; None, or why the model was left as it was."""
        problem = _problem_in(self.layout.views(mean), mean)
        if problem:
            return f"the averaged update holds {problem}"
        saved = self._floats()
        before = self._flatten("before", saved.values())
        counters = [counter.clone() for counter in self.layout.counters]
        apply_mean_gradient(self.layout, self.optimizer, mean, lr, batches)
        floats = self._floats()
        after = self._flatten("after", floats.values())
        problem = _problem_in(floats, after)
        problem = f"the step would leave {problem}" if problem else self._change_problem(before, after, lr)
        if problem:
            self._restore(saved, before, counters)
        return problem

    def _floats(self) -> dict[str, torch.Tensor]:
        """What a step changes, by name: parameters, then running statistics, then the optimizer's state (momentum
        first, once there is some; a server optimizer's second moments after it)."""
        names = {parameter: name for name, parameter in self.layout.parameters}
        state = {f"{key} of {names[p]}": tensor for key in OPTIMIZER_STATE for p, entries in self.optimizer.state.items()
                 if isinstance(tensor := entries.get(key), torch.Tensor)}
        return {**{name: p.detach() for name, p in self.layout.parameters}, **dict(self.layout.buffers), **state}

    def _flatten(self, which: str, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        tensors = [tensor.reshape(-1) for tensor in tensors]
        if self._flat[which].numel() != sum(tensor.numel() for tensor in tensors):
            self._flat[which] = torch.empty(sum(tensor.numel() for tensor in tensors))
        return torch.cat(tensors, out=self._flat[which])

    def _change_problem(self, before: torch.Tensor, after: torch.Tensor, lr: float) -> str | None:
        """Why the step just taken is too large to be a sane one, or None; overwrites after with the change."""
        layout = self.layout
        weights = slice(0, layout.parameter_count)
        statistics = slice(layout.parameter_count, layout.parameter_count + layout.statistics_count)
        norm = lambda tensor: torch.linalg.vector_norm(tensor).item()  # inf if it overflows: refused
        size = max(norm(before[weights]), 1.0)
        step = after[weights].sub_(before[weights])
        if norm(step) > MAX_RELATIVE_STEP * size:
            return f"the step would change the weights by {norm(step) / size:.3g} times their norm"
        sizes = [p.numel() for _, p in layout.parameters]
        for (name, _), change, old in zip(layout.parameters, step.split(sizes), before[weights].split(sizes)):
            if norm(change) > MAX_TENSOR_STEP * max(norm(old), 1.0):
                return f"the step would change {name} by {norm(change) / max(norm(old), 1.0):.3g} times its norm"
        momentum = self.optimizer.param_groups[0].get("momentum", 0.0)
        momenta = after[statistics.stop:][:layout.parameter_count]
        reach = lr / (1 - momentum) * norm(momenta) if momentum and momenta.numel() else 0.0
        if reach > MAX_MOMENTUM_REACH * size:
            return f"the momentum would carry the weights {reach / size:.3g} times their norm further"
        change = after[statistics].sub_(before[statistics]).abs_().div_(before[statistics].abs().add_(1))
        if change.numel() and (largest := change.max().item()) > MAX_STATISTIC_CHANGE:
            return f"the step would change a BatchNorm statistic by {largest:.3g} times its size"
        return None

    @torch.no_grad()
    def _restore(self, saved: dict[str, torch.Tensor], before: torch.Tensor, counters: list[torch.Tensor]) -> None:
        for tensor, copy in zip(saved.values(), before.split([t.numel() for t in saved.values()])):
            tensor.copy_(copy.view_as(tensor))
        for counter, count in zip(self.layout.counters, counters):
            counter.copy_(count)
        for state in self.optimizer.state.values():  # optimizer state the step created goes again
            for key in OPTIMIZER_STATE:
                if key in state and not any(state[key] is tensor for tensor in saved.values()):
                    del state[key]


def _problem_in(named: Mapping[str, torch.Tensor], flat: torch.Tensor) -> str | None:
    """'NaN or Inf in NAME' or 'a negative variance in NAME' for the first such tensor of named (also given
    as one flat vector, checked in one pass), else None."""
    variances = [tensor for name, tensor in named.items() if name.endswith("running_var")]
    if wire.all_finite(flat) and not _any_negative(variances):
        return None
    return _first_problem(named.items())


def _any_negative(tensors: list[torch.Tensor]) -> bool:
    """Whether any element of the tensors is negative (one pass over them all)."""
    return bool(tensors) and torch.cat([tensor.reshape(-1) for tensor in tensors]).min().item() < 0


def _first_problem(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """'NaN or Inf in NAME' or 'a negative variance in NAME' for the first such tensor, else None."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not wire.all_finite(tensor):
            return f"NaN or Inf in {name}"
        if name.endswith("running_var") and tensor.numel() and tensor.min() < 0:
            return f"a negative variance in {name}"
    return None


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
