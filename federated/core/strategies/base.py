"""What every strategy is: the registry, the base class, local training's base class and its server optimizer.

A strategy class is what both sides know of an algorithm. The leader builds one from its flags (`Strategy(config)`):
it owns the defaults and checks of the flags it reads, the plan it sends learners each round, the optimizer
that applies the round's aggregate, and what it adds to a checkpoint. A learner looks the class up by the name
in its plan and calls local_update. Updates are flat vectors in a layout.GradientLayout: the model part (a
gradient, or the pseudo-gradient w0 - w of local training), then the BatchNorm statistics, then (SCAFFOLD) the
change of the learner's control variate; statistics are averaged and copied, never passed through an optimizer.
"""

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from federated.common.registry import Registry
from federated.core.layout import GradientLayout
from federated.core.plan import TrainingPlan, steps_for_epochs
from federated.core.steps import GuardedStep
from federated.core.training import Backward, Batch, LocalHooks, train_locally

# The default learning rate, BASE_LR at a batch of REFERENCE_BATCH images, scaled linearly with the batch (Goyal et
# al. 2017's rule): FedSGD's batch is every learner's together, a local step's one learner's.
BASE_LR, REFERENCE_BATCH = 0.1, 128
DEFAULT_LOCAL_EPOCHS = 1.0

registry: Registry[type["Strategy"]] = Registry("strategy")


class Strategy:
    """An algorithm: how learners train each round (local_update, after the plan) and how the leader applies
    the round's aggregate update (apply). Subclasses are registered by name with @registry.register(NAME)."""

    name: ClassVar[str]
    flags: ClassVar[tuple[str, ...]] = ()  # the leader's strategy flags it reads; given for another, refused
    local: ClassVar[bool] = True  # learners take local steps and send a pseudo-gradient
    update_kind: ClassVar[str] = "pseudo-gradient"
    controls: ClassVar[bool] = False  # updates and states carry control variates (SCAFFOLD)
    control: torch.Tensor | None = None  # the leader's control variate, with controls
    own_epochs: float = 0.0  # > 0: the passes each learner makes over its own shard a round (--local-steps-per)

    def __init__(self, config: Any) -> None:
        """The strategy of a run with these flags (the leader's configuration)."""
        self.weight_decay = config.weight_decay

    @classmethod
    def problems(cls, config: Any) -> list[str]:
        """What is wrong with the flags for this strategy, beyond each flag's own bounds."""
        return []

    @classmethod
    def steps_per_round(cls, config: Any, steps_per_epoch: int) -> int:
        """Local steps a round, for learners whose epoch is steps_per_epoch batches."""
        raise NotImplementedError

    @classmethod
    def peak_lr(cls, config: Any) -> float:
        """The learning rate the schedule warms up to and decays from."""
        raise NotImplementedError

    def plan(self, steps: int, lr: float, participants: tuple[int, ...] | None, evaluate: bool) -> TrainingPlan:
        """What learners do in a round of steps local steps whose learning rate is lr."""
        raise NotImplementedError

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The leader's optimizer, which applies each round's aggregate (bound as the parameters' .grad)."""
        raise NotImplementedError

    def bind(self, layout: GradientLayout) -> None:
        """Make what the strategy keeps beside the model, for the model of this layout (nothing, here)."""

    def apply(
        self, step: GuardedStep, mean: torch.Tensor, lr: float, steps: int, participants: int, learners: int
    ) -> str | None:
        """Apply the round's aggregate update (mean) with the guarded step; None, or why the model was left as
        it was. The round had steps local steps at learning rate lr; participants of the run's learners sent
        updates."""
        raise NotImplementedError

    def recover(self) -> str | None:
        """Rounds keep being discarded: reset what the strategy keeps beside the model that could make every round
        fail (SCAFFOLD's control); what was reset, or None when nothing could be (no reset can help)."""
        return None

    def checkpoint(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold beyond the model and optimizer to resume this strategy exactly."""
        return {}

    def restore(self, saved: dict) -> None:
        """Take back what checkpoint() saved."""

    def describe(self, base_lr: float) -> str:
        """The strategy's peak learning rate and hyper-parameters, for the log."""
        raise NotImplementedError

    def suspects(self, base_lr: float) -> str:
        """The flags most likely at fault when the model does not learn, with their values (for the warning)."""
        raise NotImplementedError

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
        """A learner's round: fill flat (bound with layout.bind_gradients) with its update; return the mean
        training loss. batch_at(k) is the round's k-th batch; backward computes each step's gradient."""
        raise NotImplementedError


class LocalTraining(Strategy):
    """Local SGD on each learner, then a server optimizer on the mean pseudo-gradient (server_update)."""

    flags: ClassVar[tuple[str, ...]] = (
        "local_epochs",
        "local_steps",
        "local_steps_per",
        "client_lr",
        "client_momentum",
        "server_lr",
    )
    default_server_lr: ClassVar[float] = 1.0
    mu: float = 0.0  # FedProx's proximal weight, in every plan (0: none)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.client_momentum = config.client_momentum
        self.server_lr = config.server_lr or self.default_server_lr_of(config)
        # learners' own epochs (McMahan et al.): the passes each learner makes over its own shard; 0: the same steps
        self.own_epochs = (config.local_epochs or DEFAULT_LOCAL_EPOCHS) if config.local_steps_per == "learner" else 0.0

    @classmethod
    def default_server_lr_of(cls, config: Any) -> float:
        return cls.default_server_lr

    @classmethod
    def default_server_lr_text(cls) -> str:
        """The default server learning rate, as --help says it."""
        return f"{cls.default_server_lr:g}"

    @classmethod
    def problems(cls, config: Any) -> list[str]:
        problems = []
        if config.local_epochs is not None and config.local_steps is not None:
            problems.append("give --local-epochs or --local-steps, not both")
        if config.local_steps_per == "learner" and config.local_steps is not None:
            problems.append(
                "--local-steps-per learner counts --local-epochs on each learner's shard: not --local-steps"
            )
        return problems

    @classmethod
    def steps_per_round(cls, config: Any, steps_per_epoch: int) -> int:
        return config.local_steps or steps_for_epochs(config.local_epochs or DEFAULT_LOCAL_EPOCHS, steps_per_epoch)

    @classmethod
    def peak_lr(cls, config: Any) -> float:
        # each learner steps on its own batch: the linear scaling rule for one learner's batch
        return config.client_lr if config.client_lr is not None else BASE_LR * config.batch_size / REFERENCE_BATCH

    def plan(self, steps: int, lr: float, participants: tuple[int, ...] | None, evaluate: bool) -> TrainingPlan:
        return TrainingPlan(
            self.name,
            steps,
            lr,
            self.client_momentum,
            self.weight_decay,
            self.mu,
            participants,
            evaluate,
            self.own_epochs,
        )

    def optimizer_settings(self) -> dict[str, float]:
        """The server optimizer's hyper-parameters (its param_groups' keys)."""
        return {"lr": self.server_lr}

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return ServerOptimizer([p for p in model.parameters() if p.requires_grad], self)

    def server_update(self, parameter: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        """One parameter's server step on its mean pseudo-gradient g (= -Delta in Reddi et al.'s notation), with
        the hyper-parameters of its group; state is the optimizer's for the parameter. FedAvg: x -= lr g."""
        parameter.add_(grad, alpha=-group["lr"])

    def apply(
        self, step: GuardedStep, mean: torch.Tensor, lr: float, steps: int, participants: int, learners: int
    ) -> str | None:
        return step(mean, self.server_lr, steps)

    def describe(self, base_lr: float) -> str:
        return f"peak client lr {base_lr:.3g}, server lr {self.server_lr:g}"

    def suspects(self, base_lr: float) -> str:
        return f"--server-lr (now {self.server_lr:g}) and --client-lr (now {base_lr:.3g})"

    @classmethod
    def hooks(cls, layout: GradientLayout, plan: TrainingPlan, controls: Any) -> LocalHooks:
        """What this strategy adds to the local steps: the plan's proximal term, if it has one (FedProx's; a plan
        of any local strategy may carry mu, and a learner follows it)."""
        return Proximal(plan.mu)

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
        return train_locally(model, layout, flat, batch_at, plan, cls.hooks(layout, plan, controls), backward)


class Proximal(LocalHooks):
    """The plan's proximal term (FedProx, Li et al. 2020): the gradient of mu/2 ||w - w0||^2 added to each local
    step's; nothing when mu is 0."""

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def after_backward(
        self,
        gradient: torch.Tensor,
        grads: Sequence[torch.Tensor],
        weights: Sequence[torch.Tensor],
        start: Sequence[torch.Tensor],
    ) -> None:
        if self.mu:
            for grad, weight, origin in zip(grads, weights, start):
                grad.add_(weight - origin, alpha=self.mu)


def bias_corrections(state: dict, *decays: float) -> list[float]:
    """Count a server step in a parameter's optimizer state; 1 - decay^t for each decay at that step t (Kingma and
    Ba 2015): a moment that started at zero and decays at that rate, divided by this, is unbiased."""
    state["step"] = state.get("step", 0) + 1
    return [1 - decay ** state["step"] for decay in decays]


class ServerOptimizer(torch.optim.Optimizer):
    """A local-training strategy's server step, parameter by parameter (LocalTraining.server_update), on the
    round's mean pseudo-gradient held in each parameter's .grad."""

    def __init__(self, params: list[torch.Tensor], strategy: LocalTraining) -> None:
        super().__init__(params, strategy.optimizer_settings())
        self.strategy = strategy

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self.strategy.server_update(parameter, parameter.grad, self.state[parameter], group)
