"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each learner's drift. The leader keeps the server
control c, sent with every state; each learner keeps its own c_i, adds c - c_i to every local gradient, and sends
the change of c_i with its update; the leader moves c by |S| / N times the participants' mean change."""

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from federated.core.layout import GradientLayout
from federated.core.plan import TrainingPlan
from federated.core.steps import GuardedStep
from federated.core.strategies.base import Proximal, registry
from federated.core.strategies.fedavg import FedAvg
from federated.core.training import LocalHooks

# Bounds on the server control, catastrophe bounds like steps.py's. A control estimates a gradient: a learner's new
# c_i is the mean of its K raw gradients, and its pseudo-gradient is lr times the sum of its K corrected steps
# (g_k + c - c_i, amplified by the client momentum's gain), so an honest update's control change c_i+ - c_i equals
# its pseudo-gradient / (K lr gain) - c under SGD, and the round's mean change is at most the mean pseudo-gradient's
# norm per step plus |c|. Honest runs (python -m federated.tools.bench.poisoning controls: IID, Dirichlet and two
# classes per learner, full and sampled participation) measured at most 0.83 of that, and a new c of at most 1.46
# times the median per-step norm of recent rounds.
MAX_CONTROL_CHANGE = 3.0  # |the change| against |the mean pseudo-gradient| / (K lr gain) + |c|
MAX_CONTROL_REACH = 10.0  # |c + the change| against the median per-step norm of the last RECENT_ROUNDS applied rounds
RECENT_ROUNDS = 16


class Controls:
    """The control variates as a learner holds them: the server's c, as pushed with the latest state, and the
    learner's own c_i, kept from round to round (zero at first). local_update computes the change of c_i; the
    learner commits it only once a later state says that the round it was sent for was applied (pending until
    then), and starts c_i again from zero when the leader reset the controls."""

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        self.server = torch.zeros(size, device=device)
        self.own = torch.zeros(size, device=device)
        self.counts = (0, 0)  # the leader's discarded rounds and control resets, as the latest state says
        self.pending: tuple[int, tuple[int, int]] | None = None  # a taken update's round, and counts when trained

    def commit(self, change: torch.Tensor) -> None:
        self.own.add_(change)

    def taken(self, round_index: int) -> None:
        """The leader took this learner's update of round_index: its control change waits for the leader's word."""
        self.pending = (round_index, self.counts)

    def adopt(
        self,
        server: torch.Tensor,
        round_index: int,
        counts: tuple[int, int],
        change: torch.Tensor | None,
        fetched: bool,
    ) -> bool | None:
        """A new state (of round_index, with the leader's counts of discarded rounds and control resets): its server
        control. A pending change is committed when the state comes after its round and nothing was discarded nor
        reset since, and dropped when a later state says otherwise or the state was fetched after losing the leader
        (which says nothing of it): never committed unless applied. change: the pending change (the control part of
        the update taken; None only when none is pending). Returns whether a pending change was committed (None:
        nothing was decided)."""
        self.server.copy_(server)
        decided = None
        if self.pending is not None and (fetched or round_index > self.pending[0]):
            decided = not fetched and counts == self.pending[1]
            if decided:
                assert change is not None  # (kept with the update: Replica.keep_change)
                self.commit(change)
            self.pending = None
        if counts[1] != self.counts[1]:  # the leader reset c (and every c_i with it)
            self.own.zero_()
        self.counts = counts
        return decided


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


def momentum_gain(steps: int, momentum: float) -> float:
    """How much heavy-ball momentum lengthens steps SGD steps of a constant gradient: the mean over the steps of
    (1 - momentum^(K - k + 1)) / (1 - momentum) (1 without momentum)."""
    if not momentum:
        return 1.0
    return (steps - momentum * (1 - momentum**steps) / (1 - momentum)) / (steps * (1 - momentum))


@dataclass(frozen=True)
class ControlCheck:
    """A round's change of the server control against what honest rounds give (the bounds above)."""

    norm: float  # |c + change|: the new control's norm
    change: float  # |change| / (the round's per-step pseudo-gradient norm + |c|)
    reach: float  # |c + change| / the median per-step norm of recent applied rounds (0 before there are any)

    def problem(self) -> str | None:
        """Why the server control must not take the change, or None."""
        if not math.isfinite(self.norm):
            return f"the control variate would reach norm {self.norm:.3g}"
        if self.change > MAX_CONTROL_CHANGE:
            return (
                f"the control variate's change is {self.change:.3g} times the round's pseudo-gradient per step "
                f"plus the control (at most {MAX_CONTROL_CHANGE:g})"
            )
        if self.reach > MAX_CONTROL_REACH:
            return (
                f"the control variate would reach {self.reach:.3g} times the recent rounds' pseudo-gradients per "
                f"step (at most {MAX_CONTROL_REACH:g})"
            )
        return None


@registry.register("scaffold")
class Scaffold(FedAvg):
    """FedAvg with control variates; the server control travels with every state and is checkpointed, with the
    per-step norms of the last applied rounds' pseudo-gradients that bound it."""

    controls: ClassVar[bool] = True
    control: torch.Tensor

    @classmethod
    def problems(cls, config: Any) -> list[str]:
        problems = super().problems(config)
        if config.local_steps_per == "learner":  # check_control's bound is per step of the round's one K
            problems.append(
                "scaffold checks its control against the same local steps for every learner: not "
                "--local-steps-per learner"
            )
        return problems

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.control = torch.zeros(0)  # sized for the model by bind
        self.recent: list[float] = []  # per-step pseudo-gradient norms of the last RECENT_ROUNDS applied rounds

    def bind(self, layout: GradientLayout) -> None:
        self.control = torch.zeros(layout.parameter_count)

    def per_step(self, layout: GradientLayout, mean: torch.Tensor, lr: float, steps: int) -> float:
        """The norm of the round's mean pseudo-gradient per local step: what a control estimates."""
        norm = torch.linalg.vector_norm(mean[: layout.parameter_count]).item()
        return norm / (steps * lr * momentum_gain(steps, self.client_momentum))

    def check_control(
        self, layout: GradientLayout, mean: torch.Tensor, lr: float, steps: int, participants: int, learners: int
    ) -> ControlCheck:
        """How the round's change of the server control (|S| / N times the mean change) compares with honest ones."""
        change = mean[layout.controls] * (participants / learners)
        norm = lambda tensor: torch.linalg.vector_norm(tensor).item()
        control, new = norm(self.control), norm(self.control + change)
        recent = statistics.median(self.recent) if self.recent else 0.0
        return ControlCheck(
            new,
            norm(change) / max(self.per_step(layout, mean, lr, steps) + control, 1e-12),
            new / recent if recent else 0.0,
        )

    def apply(
        self, step: GuardedStep, mean: torch.Tensor, lr: float, steps: int, participants: int, learners: int
    ) -> str | None:
        """The server step, then Karimireddy et al.'s c += |S| / N * the mean change of the participants' controls;
        the control's change is checked before the step (check_control) and applied after it."""
        layout = step.layout
        if problem := self.check_control(layout, mean, lr, steps, participants, learners).problem():
            return problem
        problem = super().apply(step, mean, lr, steps, participants, learners)
        if problem is None:
            self.control.add_(mean[layout.controls], alpha=participants / learners)
            self.recent = [*self.recent, self.per_step(layout, mean, lr, steps)][-RECENT_ROUNDS:]
        return problem

    def recover(self) -> str | None:
        if not self.control.any():
            return None
        norm = torch.linalg.vector_norm(self.control).item()
        self.control.zero_()
        return f"the server control variate (norm {norm:.3g}) is reset to zero, and every learner's with it"

    def checkpoint(self) -> dict[str, torch.Tensor]:
        return {"control": self.control, "control_recent": torch.tensor(self.recent, dtype=torch.float64)}

    def restore(self, saved: dict) -> None:
        self.control.copy_(saved["control"])
        self.recent = saved["control_recent"].tolist() if "control_recent" in saved else []  # (older: none)

    @classmethod
    def hooks(cls, layout: GradientLayout, plan: TrainingPlan, controls: Any) -> LocalHooks:
        return Correction(layout, controls, plan.mu)
