"""The leader's optimizer step: SGD with momentum for FedSGD, and the guard that refuses or undoes a step that
would leave a non-finite or absurd model."""

from collections.abc import Iterable

import torch
from torch import nn

from federated.core.checks import problem_in
from federated.core.layout import GradientLayout


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
    variance in the model or its momentum, weights beyond the wire dtype's range, or change the weights (or a
    statistic) by far more than any sane step does: a hostile or broken round never reaches the model, nor a
    checkpoint, nor the learners. Works on two flat copies of the model and its momentum (before and after),
    reused every round: a few passes over memory."""

    def __init__(self, model: nn.Module, layout: GradientLayout, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.layout, self.optimizer = model, layout, optimizer
        self._flat = {"before": torch.empty(0), "after": torch.empty(0)}

    def __call__(self, mean: torch.Tensor, lr: float, batches: int = 1) -> str | None:
        """Step with the averaged update; None, or why the model was left as it was."""
        problem = problem_in(self.layout.views(mean), mean)
        if problem:
            return f"the averaged update holds {problem}"
        saved = self._floats()
        before = self._flatten("before", saved.values())
        counters = [counter.clone() for counter in self.layout.counters]
        entries = {p: dict(state) for p, state in self.optimizer.state.items()}  # its tensors restored with saved
        apply_mean_gradient(self.layout, self.optimizer, mean, lr, batches)
        floats = self._floats()
        after = self._flatten("after", floats.values())
        problem = problem_in(floats, after)
        problem = (
            f"the step would leave {problem}"
            if problem
            else self._wire_problem(after) or self._change_problem(before, after, lr)
        )
        if problem:
            self._restore(saved, before, counters, entries)
        return problem

    def _floats(self) -> dict[str, torch.Tensor]:
        """What a step changes, by name: parameters, then running statistics, then the optimizer's state (momentum
        first, once there is some; a server optimizer's second moments after it)."""
        names: dict[torch.Tensor, str] = {parameter: name for name, parameter in self.layout.parameters}
        state = {
            f"{key} of {names[p]}": tensor
            for key in OPTIMIZER_STATE
            for p, entries in self.optimizer.state.items()
            if isinstance(tensor := entries.get(key), torch.Tensor)
        }
        return {**{name: p.detach() for name, p in self.layout.parameters}, **dict(self.layout.buffers), **state}

    def _flatten(self, which: str, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        tensors = [tensor.reshape(-1) for tensor in tensors]
        if self._flat[which].numel() != sum(tensor.numel() for tensor in tensors):
            self._flat[which] = torch.empty(sum(tensor.numel() for tensor in tensors))
        return torch.cat(tensors, out=self._flat[which])

    def _wire_problem(self, after: torch.Tensor) -> str | None:
        """Why the weights after the step could not travel in the wire dtype (a value beyond its range would arrive
        as Inf, and learners refuse such a state), or None. One pass over the weights, and none for float32: the
        statistics and SCAFFOLD's control travel in float32, already known finite."""
        limit = torch.finfo(self.layout.wire_dtype).max
        if limit >= torch.finfo(torch.float32).max:
            return None
        low, high = torch.aminmax(after[: self.layout.parameter_count])
        if max(-low.item(), high.item()) <= limit:
            return None
        name, largest = next(
            (name, value) for name, p in self.layout.parameters if (value := p.detach().abs().max().item()) > limit
        )
        dtype = str(self.layout.wire_dtype).removeprefix("torch.")
        return f"the step would leave {name} beyond {dtype}'s range ({largest:.3g}): its state could not travel"

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
        momenta = after[statistics.stop :][: layout.parameter_count]
        reach = lr / (1 - momentum) * norm(momenta) if momentum and momenta.numel() else 0.0
        if reach > MAX_MOMENTUM_REACH * size:
            return f"the momentum would carry the weights {reach / size:.3g} times their norm further"
        change = after[statistics].sub_(before[statistics]).abs_().div_(before[statistics].abs().add_(1))
        if change.numel() and (largest := change.max().item()) > MAX_STATISTIC_CHANGE:
            return f"the step would change a BatchNorm statistic by {largest:.3g} times its size"
        return None

    @torch.no_grad()
    def _restore(
        self,
        saved: dict[str, torch.Tensor],
        before: torch.Tensor,
        counters: list[torch.Tensor],
        entries: dict[torch.Tensor, dict],
    ) -> None:
        """Leave the model and the optimizer exactly as before the step: tensors copied back, and the optimizer's
        entries as they were (the moments a step created dropped, and a step counter, which bias correction reads,
        not advanced by a step never taken)."""
        for tensor, copy in zip(saved.values(), before.split([t.numel() for t in saved.values()])):
            tensor.copy_(copy.view_as(tensor))
        for counter, count in zip(self.layout.counters, counters):
            counter.copy_(count)
        for parameter in list(self.optimizer.state):
            if parameter in entries:
                self.optimizer.state[parameter] = entries[parameter]
            else:
                del self.optimizer.state[parameter]
