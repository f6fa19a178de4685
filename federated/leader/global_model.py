"""The global model: its weights, the optimizer that applies each round's aggregate, and the encoded state
learners fetch (GetModel) or are pushed (SyncModelState)."""

import dataclasses

import torch

from federated.core.layout import GradientLayout, wire_state
from federated.core.plan import TrainingPlan
from federated.core.steps import GuardedStep
from federated.core.strategies import Strategy
from federated.leader.config import LeaderConfig
from federated.wire import codec, framing
from federated.wire.messages import StateInfo
from model import build_model, load_initial_weights


class GlobalModel:
    """The global model, its optimizer (FedSGD's, or a strategy's server optimizer), the aggregate update it
    applies (mean_gradient, which backs the parameters' .grad) and the encoded state learners take."""

    def __init__(
        self,
        config: LeaderConfig,
        num_classes: int,
        strategy: Strategy,
        normalisation: tuple[list[float], list[float]] = ([], []),
    ) -> None:
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, num_classes, config.norm)
        if config.init and not config.resume:  # a resume starts from its checkpoint's weights
            try:
                load_initial_weights(self.model, config.init)
            except ValueError as error:
                raise SystemExit(f"--init {config.init}: {error}") from None
        self.strategy = strategy
        self.wire_dtype = codec.WIRE_DTYPES[config.wire_dtype]
        self.layout = GradientLayout(self.model, self.wire_dtype, controls=strategy.controls)
        self.mean_gradient = torch.zeros(self.layout.size)
        self.layout.bind_gradients(self.mean_gradient)
        self.optimizer = strategy.make_optimizer(self.model)
        strategy.bind(self.layout)
        self.step_safely = GuardedStep(self.model, self.layout, self.optimizer)
        mean, std = normalisation
        self.info = StateInfo(
            config.model,
            num_classes,
            config.batch_size,
            config.seed,
            tuple(mean),
            tuple(std),
            config.wire_dtype,
            image_size=config.image_size,
            norm=config.norm,
        )
        self.encoded_state = b""
        self._messages: tuple[bytes, list[bytes]] = (b"", [])
        self.publish(round_index=0, finished=False)

    def adopt_normalisation(self, mean: list[float], std: list[float]) -> None:
        """A leader without data learns the normalisation from its learners (sent with every later state)."""
        self.info = dataclasses.replace(self.info, mean=tuple(mean), std=tuple(std))

    def publish(
        self, round_index: int, finished: bool, stopped: bool = False, plan: TrainingPlan = TrainingPlan()
    ) -> bytes:
        """Encode the state after round_index with everything a learner needs to train the next round (plan);
        GetModel serves it from now on. `finished` tells learners to exit, `stopped` that the leader was stopped
        early (it can be resumed). Returns the state as one serialised ModelState, ready to push to learners."""
        info = dataclasses.replace(self.info, round=round_index, finished=finished, stopped=stopped, plan=plan)
        tensors = wire_state(self.model, self.wire_dtype, self.strategy.control)
        self.encoded_state = codec.encode(tensors, info.to_metadata())
        return framing.chunk_message(self.encoded_state)

    def model_messages(self) -> list[bytes]:
        """The current state as serialised ModelChunk messages, built once per state for all GetModel calls."""
        state = self.encoded_state
        cached_state, messages = self._messages
        if cached_state is not state:
            messages = list(framing.chunk_messages(state))
            self._messages = (state, messages)
        return messages

    def gradient_payload_bytes(self) -> int:
        """Size of a learner's update payload, to bound incoming messages."""
        return len(codec.encode(self.layout.wire_tensors(self.mean_gradient), {"learner_id": "0"}))

    def step(self, lr: float, steps: int = 1, participants: int = 1, learners: int = 1) -> str | None:
        """Apply the round's aggregate update (in mean_gradient) the strategy's way; the round had steps local
        steps at learning rate lr, from participants of the run's learners. None, or why the model was left as it
        was (non-finite or absurd: steps.GuardedStep)."""
        return self.strategy.apply(self.step_safely, self.mean_gradient, lr, steps, participants, learners)
