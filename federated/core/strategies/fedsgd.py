"""FedSGD, the original article's algorithm: each learner sends the gradient of one batch; the leader steps with
SGD and momentum on their sample-weighted mean, as one large-batch step would."""

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from federated.core.layout import GradientLayout
from federated.core.plan import TrainingPlan
from federated.core.steps import GuardedStep, make_optimizer
from federated.core.strategies.base import BASE_LR, REFERENCE_BATCH, Strategy, registry
from federated.core.training import Backward, Batch, compute_gradient


@registry.register("fedsgd")
class FedSGD(Strategy):
    """One gradient per learner per round; --lr, --momentum and --weight-decay act on the leader's step."""

    flags: ClassVar[tuple[str, ...]] = ("lr", "momentum")
    local: ClassVar[bool] = False
    update_kind: ClassVar[str] = "gradient"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.momentum = config.momentum

    @classmethod
    def steps_per_round(cls, config: Any, steps_per_epoch: int) -> int:
        return 1

    @classmethod
    def peak_lr(cls, config: Any) -> float:
        # the round's batch is every learner's together: the linear scaling rule for the total batch
        if config.lr is not None:
            return config.lr
        return BASE_LR * config.learners * config.batch_size / REFERENCE_BATCH

    def plan(self, steps: int, lr: float, participants: tuple[int, ...] | None, evaluate: bool) -> TrainingPlan:
        return TrainingPlan(participants=participants, evaluate=evaluate)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(model, 0.0, self.momentum, self.weight_decay)

    def apply(
        self, step: GuardedStep, mean: torch.Tensor, lr: float, steps: int, participants: int, learners: int
    ) -> str | None:
        return step(mean, lr)

    def describe(self, base_lr: float) -> str:
        return f"peak lr {base_lr:.3g}"

    def suspects(self, base_lr: float) -> str:
        return f"--lr (now {base_lr:.3g})"

    @classmethod
    def local_update(
        cls,
        model: nn.Module,
        layout: GradientLayout,
        flat: torch.Tensor,
        batch_at: Callable[[int], Batch],
        plan: TrainingPlan,
        controls: Any = None,
        backward: Backward = Backward(),
    ) -> float:
        return compute_gradient(model, layout, flat, *batch_at(0), backward)
