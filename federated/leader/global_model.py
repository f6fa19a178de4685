"""The global model: its weights, the optimizer that applies each round's aggregate, and the encoded state
learners fetch (GetModel) or are pushed (SyncModelState)."""

import dataclasses
from dataclasses import dataclass

import torch

from federated.core.layout import GradientLayout, wire_state
from federated.core.plan import TrainingPlan
from federated.core.steps import GuardedStep
from federated.core.strategies import Strategy
from federated.leader.config import LeaderConfig
from federated.leader.downlink import Downlink
from federated.wire import codec, framing
from federated.wire.messages import StateInfo
from model import build_model, load_initial_weights

# Step refusals in a row after which the leader acts: it resets what the strategy keeps beside the model (SCAFFOLD's
# control, which a hostile round may have poisoned so that every honest update is refused), or stops when there is
# nothing to reset. Honest runs discard no round at all; 5 in a row lose little of a run and are no accident.
MAX_DISCARDED_ROUNDS = 5


class Diverged(Exception):
    """Rounds keep being discarded and nothing can be reset: the leader checkpoints and stops, to be resumed later."""


@dataclass(frozen=True)
class Recovery:
    """What the leader does after MAX_DISCARDED_ROUNDS refused steps in a row: what it reset, or (stops) why it
    stops."""

    message: str
    stops: bool = False


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
        self.model = build_model(config.model, num_classes, config.model_norm)
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
            norm=config.model_norm,
        )
        self.discarded = 0  # rounds discarded so far: a SCAFFOLD learner commits its control change only if applied
        self.refused = 0  # steps refused in a row
        self.control_resets = 0
        # --compress-down: the replica learners in step hold, and the deltas that move it
        self.downlink = (
            Downlink(config.compress_down, config.compress_ratio, config.compress_rank, config.seed)
            if config.compress_down != "none"
            else None
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
        early (it can be resumed). Returns the state as one serialised ModelState, ready to push to learners. With
        --compress-down, a state before the last is the downlink's replica (and its delta: Downlink.requests)."""
        info = dataclasses.replace(
            self.info,
            round=round_index,
            finished=finished,
            stopped=stopped,
            plan=plan,
            discarded=self.discarded,
            control_resets=self.control_resets,
        )
        tensors, metadata = wire_state(self.model, self.wire_dtype, self.strategy.control), info.to_metadata()
        if self.downlink is not None and finished:  # the last state is the model's own, whole
            self.downlink.publish_final()
        elif self.downlink is not None:  # learners train on the replica (the model may differ by what is unsent)
            tensors = self.downlink.advance(round_index, tensors)
            metadata = self.downlink.publish(metadata)
        self.encoded_state = codec.encode(tensors, metadata)
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

    def count_round(self, discarded: str | None, stepped: bool, secure: bool = False) -> Recovery | None:
        """Count a closed round: discarded (why, or None if applied), stepped (False: too few updates to try a step),
        secure (a secure round discarded: it gave no sum). After MAX_DISCARDED_ROUNDS refused steps in a row, reset
        the strategy's state (Strategy.recover), or say why the run must stop when nothing could be reset (nor
        can anything mend secure rounds that give no sum)."""
        if discarded:
            self.discarded += 1
        if not stepped:  # a round too small to step says nothing about the updates
            return None
        self.refused = self.refused + 1 if discarded else 0
        if self.refused < MAX_DISCARDED_ROUNDS:
            return None
        self.refused = 0  # the reset, or a resume, gets MAX_DISCARDED_ROUNDS more
        why = f"{MAX_DISCARDED_ROUNDS} rounds in a row were discarded, the last because {discarded}"
        if secure:
            return Recovery(
                f"{why}: secure aggregation gives no sum (a hostile or broken learner? see the leader's and the "
                "learners' secure aggregation warnings); stopping",
                stops=True,
            )
        reset = self.strategy.recover()
        if reset is None:
            return Recovery(
                f"{why}: the learners' updates make no sane step from this model (a hostile or broken learner? "
                "against hostile ones use a robust --aggregator); stopping",
                stops=True,
            )
        self.control_resets += 1
        return Recovery(f"{why}: {reset}")

    def checkpoint(self) -> dict:
        """What a checkpoint holds beside the model and optimizer: the strategy's own state, the discard counts and
        the downlink's replica."""
        counts = {"total": self.discarded, "in_a_row": self.refused, "control_resets": self.control_resets}
        downlink = {"downlink": self.downlink.checkpoint()} if self.downlink is not None else {}
        return {**self.strategy.checkpoint(), "discards": counts, **downlink}

    def restore(self, saved: dict) -> None:
        """Take back what checkpoint() saved (an older checkpoint has no discard counts)."""
        self.strategy.restore(saved)
        counts = saved.get("discards", {})
        self.discarded, self.refused = counts.get("total", 0), counts.get("in_a_row", 0)
        self.control_resets = counts.get("control_resets", 0)
        if self.downlink is not None and "downlink" in saved:  # (a checkpoint from before --compress-down: none)
            self.downlink.restore(saved["downlink"])
