"""What learners have once they know the leader's first model state: the model the learners of a process share
(on its device, its update layout and vector, what a state must hold, the lock they take turns with), and each
learner's replica on it (the states it adopts, the strategy's control variates, its residuals and noise)."""

import logging
import threading
from collections.abc import Callable

import torch

import utils
from federated.common import runtime
from federated.core import compression, strategies
from federated.core.checks import TensorSpec
from federated.core.layout import GradientLayout, control_name, wire_state
from federated.core.plan import TrainingPlan
from federated.core.strategies.scaffold import Controls
from federated.core.training import Backward, Batch, Evaluation, evaluate
from federated.learner.spill import Spill, needs_state
from federated.privacy import local
from federated.wire import codec, messages
from model import build_model

log = logging.getLogger("learner")


def load_state(model: torch.nn.Module, payload: codec.Payload, take_over: bool = False) -> None:
    """Copy a checked state payload into the model. With take_over, the model instead takes the payload's
    tensors themselves where dtype and device match: they must be writable and used nowhere else,
    as codec.receive's are."""
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            received = payload.tensors[name]
            if take_over and received.dtype == tensor.dtype and received.device == tensor.device:
                tensor.data = received  # the same Parameter or buffer object, now over the received bytes
            else:
                tensor.copy_(received)


def adopt_state(model: torch.nn.Module, state: codec.Payload, spec: TensorSpec) -> None:
    """Check a state from fetch_model (its values were checked as it streamed in) and make it the model's."""
    codec.check_layout(state, spec)
    load_state(model, state, take_over=True)


def training_setup(
    info: messages.StateInfo, wire_dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.nn.Module, GradientLayout]:
    """The state's model on the device and its update layout (with SCAFFOLD's controls). The model moves before the
    layout is made: moving replaces a model's buffers, and the layout must hold the ones training updates (loading
    a state later copies into them in place, or takes over their .data). A run's strategy never changes."""
    try:
        model = build_model(info.architecture, info.num_classes, info.norm).to(device)
    except ValueError as error:  # the names come from the network
        raise codec.PayloadError(f"the leader's model state names a model this learner cannot build: {error}") from None
    return model, GradientLayout(model, wire_dtype, controls=strategies.named(info.plan.strategy).controls)


def wire_dtype_of(info: messages.StateInfo) -> torch.dtype:
    """The dtype a state's floating-point tensors travel in; PayloadError for one this learner does not know."""
    wire_dtype = codec.WIRE_DTYPES.get(info.wire_dtype)
    if wire_dtype is None:
        raise codec.PayloadError(f"unknown wire_dtype {info.wire_dtype[:32]!r}")
    return wire_dtype


def check_fits(described: TensorSpec, info: messages.StateInfo, wire_dtype: torch.dtype) -> torch.nn.Module:
    """Raise PayloadError unless a state's tensors (described: their names, dtypes and shapes) are exactly those of
    the model it names; that model, on the meta device. Checked there (shapes without memory) before the model is
    built for real, and before the state's bytes are buffered: a state that names a huge model but does not hold
    its weights costs this learner nothing."""
    with torch.device("meta"):
        model, _ = training_setup(info, wire_dtype, "meta")
    codec.check_described(described, state_spec(model, wire_dtype, strategies.named(info.plan.strategy).controls))
    return model


def state_spec(model: torch.nn.Module, wire_dtype: torch.dtype, controls: bool = False) -> TensorSpec:
    """What a model state from the leader must hold: wire_state's tensors (with SCAFFOLD's control)."""
    control = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad)) if controls else None
    return codec.spec_of(wire_state(model, wire_dtype, control))


def model_facts(info: messages.StateInfo) -> tuple:
    """What a state says of the model it is for: the learners sharing one model all train this one."""
    controls = strategies.named(info.plan.strategy).controls
    return info.architecture, info.num_classes, info.norm, info.wire_dtype, info.image_size, controls


class SharedModel:
    """The model the learners of a process share, built from the first state one of them fetched: the model on the
    device, its layout, the update vector its gradients are views of, the spec every state must meet, the facts
    that define the model, the per-example hooks of local DP, and the lock that whoever trains or evaluates holds.

    It holds one learner's weights at a time (holder): a Replica loads its own state into it, under the lock, when
    it trains or evaluates."""

    def __init__(self, state: codec.Payload, device: str, state_budget: int | None = None) -> None:
        """Raises PayloadError when the state does not hold the model it names. device: --device. state_budget:
        the bytes of its learners' state kept in memory (--state-budget; None: all of it)."""
        self.info = messages.StateInfo.from_payload(state)
        wire_dtype = wire_dtype_of(self.info)
        self.device = runtime.pick_device(device)
        check_fits(codec.spec_of(state.tensors), self.info, wire_dtype)
        self.model, self.layout = training_setup(self.info, wire_dtype, self.device)
        self.controls = strategies.named(self.info.plan.strategy).controls
        self.spec = state_spec(self.model, wire_dtype, self.controls)
        # The update vector holds the update of the learner that trained last, until the next one trains.
        self.gradient = torch.zeros(self.layout.size, device=self.device)
        self.layout.bind_gradients(self.gradient)  # (a state loaded later keeps the parameters, and so the views)
        self.examples: torch.nn.Module | None = None  # the model hooked for per-example gradients (local DP)
        self.lock = threading.RLock()  # (re-entrant: hooking the model for local DP takes it too, from adopt)
        self.holder: Replica | None = None  # whose weights the model holds
        self.loaded: codec.Payload | None = None  # the state it holds as loaded, untrained since
        self.spill = Spill(state_budget)  # its learners' state beyond the budget, on disk
        self.trained_by: Replica | None = None  # whose update the update vector holds: who trained last

    def check_facts(self, info: messages.StateInfo) -> None:
        """PayloadError unless a state is for this model (a learner of the process joined another run)."""
        if model_facts(info) != model_facts(self.info):
            raise codec.PayloadError(
                f"a state for {model_facts(info)}, but this process's learners share a model for "
                f"{model_facts(self.info)}"
            )

    def load(self, holder: "Replica", state: codec.Payload | None, take_over: bool) -> None:
        """Make the model hold holder's weights: its state (checked when adopted), unless the model holds it already
        untrained. None: the weights holder trained last (RuntimeError if another learner's are there since).
        take_over: the model may take the state's tensors over (load_state)."""
        if state is None:
            if self.holder is not holder:
                raise RuntimeError("the shared model holds another learner's weights, and this one has no state")
        elif self.loaded is not state:
            load_state(self.model, state, take_over)
        self.holder, self.loaded = holder, state

    def hook_examples(self) -> None:
        """Hook the model for DP-SGD's per-example gradients, once (under the lock: another learner may be
        training); PayloadError for a model that cannot give them."""
        with self.lock:
            if self.examples is not None:
                return
            try:
                self.examples = local.hook_examples(self.model)
            except ValueError as error:
                raise codec.PayloadError(f"the leader asks for local differential privacy: {error}") from None


class Replica:
    """One learner's side of the leader's model, on a SharedModel (its own, made from the first state, unless one is
    given): what the newest adopted state says (its round, plan and normalisation) and, until it trains on it, the
    state itself; SCAFFOLD's controls and the control change of its last update; its compressor's residuals; local
    DP's noise generator. What reads or writes the shared model or its update vector (local_update, evaluate,
    update_tensors, compressed, keep_change) runs with shared.lock held when learners share the model."""

    def __init__(self, state: codec.Payload, device: str, shared: SharedModel | None = None) -> None:
        """Raises PayloadError when the state does not hold the model it names (or not shared's). device: --device
        (shared's when given). A replica with a model of its own takes the first state's tensors over (GetModel's,
        its alone); on a shared model, states are never written into: learners may be given the same one."""
        self.shared = shared or SharedModel(state, device)
        self.info = messages.StateInfo.from_payload(state)  # the run's model, batch size and seed
        self.shared.check_facts(self.info)
        self.round, self.plan = self.info.round, self.info.plan
        self.mean, self.std = list(self.info.mean), list(self.info.std)
        layout = self.shared.layout
        self.controls = Controls(layout.parameter_count, self.device) if self.shared.controls else None
        # SCAFFOLD: the control change of the update sent last, until a later state settles it (adopt); a copy, as
        # the next learner to train overwrites the shared update vector
        self.change: torch.Tensor | None = None
        self.noise: torch.Generator | None = None  # local DP's noise, seeded by this learner alone
        # --compress: the codec's error-feedback residuals and PowerSGD's warm start, for the plan's settings
        self.compressor: compression.Compressor | None = None
        self.compressed_as: tuple[str, float, int] | None = None
        self.state: codec.Payload | None = None  # the state adopted, until this learner trains on it
        self.fetched = False  # whether it was fetched (GetModel's tensors, this learner's alone)
        # A model of its own may take a fetched state's tensors over; a shared one copies (the learners of a
        # process may be given one fetched state)
        self.takes_over = shared is None
        self.adopt(state)
        if shared is None:  # its own model holds the state from the start (its tensors: GetModel's, taken over)
            self.shared.load(self, state, take_over=True)

    @property
    def device(self) -> torch.device:
        return self.shared.device

    @property
    def model(self) -> torch.nn.Module:
        return self.shared.model

    @property
    def layout(self) -> GradientLayout:
        return self.shared.layout

    @property
    def gradient(self) -> torch.Tensor:
        """The shared update vector: this learner's update from its local_update until the next learner trains."""
        return self.shared.gradient

    @property
    def spec(self) -> TensorSpec:
        return self.shared.spec

    @needs_state
    def adopt(self, state: codec.Payload, fetched: bool = True) -> None:
        """Continue training from a model state: fetched (GetModel) or pushed (SyncModelState; checked there). Its
        facts count at once; its weights go into the shared model when this learner trains or evaluates (load).
        SCAFFOLD: its server control, and the leader's word on the control change of this learner's last update.
        PayloadError for a state of another norm: batch and renorm (and the group norms) hold the same tensors,
        so the spec passes it, but this model would go on training its own layer class."""
        info = messages.StateInfo.from_payload(state)  # parses the plan too: once a state
        if info.norm != self.info.norm:
            raise codec.PayloadError(f"the leader changed its norm from {self.info.norm} to {info.norm} during the run")
        if fetched:
            codec.check_layout(state, self.spec)
        self.state, self.fetched = state, fetched
        self.round, self.plan = info.round, info.plan
        self.mean, self.std = list(info.mean), list(info.std)  # empty until a leader without data settled them
        if strategies.named(self.plan.strategy).controls != (self.controls is not None):
            raise codec.PayloadError(f"the leader changed its strategy to {self.plan.strategy} during the run")
        if self.plan.dp == "local":  # refused at once for a model that cannot give it
            self.shared.hook_examples()
        if self.controls is not None:
            resets = self.controls.counts[1]
            committed = self.controls.adopt(
                torch.cat([state.tensors[control_name(name)].reshape(-1) for name, _ in self.layout.parameters]),
                info.round,
                (info.discarded, info.control_resets),
                self.change,
                fetched,
            )
            if self.controls.pending is None:  # settled (or never sent): nothing keeps it
                self.change = None
            if committed is False:
                log.info("round %d: the leader did not apply this learner's control change; it is dropped", info.round)
            if committed is False or self.controls.counts[1] != resets:
                self.forget_control_residuals()

    def load(self, training: bool) -> None:
        """Put this learner's weights into the shared model (held under its lock): the state adopted last, which
        training uses up (a fetched one's tensors may then become the model's own), else those it trained last."""
        state = self.state
        self.shared.load(self, state, take_over=training and self.fetched and self.takes_over)
        if training:
            self.state = None
            self.shared.loaded = None  # the model's weights are about to be trained

    def set_aside(self) -> None:
        """Drop the adopted state's weights: this learner does not train on it (left out of its round, or sitting
        it out) and has evaluated it if asked; what the state said (round, plan, normalisation) stays."""
        self.state = None

    @needs_state
    def forget_control_residuals(self) -> None:
        """Compressed SCAFFOLD: drop what error feedback still holds of the control changes (their residuals) when
        the change is dropped or the controls reset; else the dropped change would reach the server's c later."""
        if self.compressor is not None:
            self.compressor.forget_residuals([control_name(name) for name, _ in self.layout.parameters])

    def backward(self, plan: TrainingPlan) -> Backward:
        """How the round's steps compute their gradients: DP-SGD's when the plan asks for local differential
        privacy (the noise from a generator of this learner's own), else the mean loss's."""
        if plan.dp != "local":
            return Backward()
        self.shared.hook_examples()
        if self.noise is None:
            self.noise = local.fresh_generator(self.device)
        return local.ExampleGradients(plan.dp_clip, plan.dp_noise_multiplier, self.noise)

    def take_final(self, state: codec.Payload) -> None:
        """The leader's last state: its weights (loaded to evaluate) and normalisation (a learner sampling never
        drew may not have had it); it trains no more."""
        info = messages.StateInfo.from_payload(state)
        self.state, self.fetched = state, False
        self.mean, self.std = list(info.mean), list(info.std)

    @property
    def normalised(self) -> bool:
        """Whether the normalisation is settled: nobody trains or evaluates before a leader without data has it."""
        return bool(self.mean)

    @property
    def strategy(self) -> type[strategies.Strategy]:
        return strategies.named(self.plan.strategy)

    @needs_state
    def local_update(self, batch_at: Callable[[int], Batch], plan: TrainingPlan) -> float:
        """Fill the update vector with this round's update (the strategy's local_update from the state adopted
        last, following plan: the round's, as this learner's data makes it); the mean training loss. batch_at(k)
        is the round's k-th batch."""
        self.load(training=True)
        self.shared.trained_by = self
        return self.strategy.local_update(
            self.model, self.layout, self.gradient, batch_at, plan, self.controls, self.backward(plan)
        )

    def check_update_own(self) -> None:
        """RuntimeError when the shared update vector holds another learner's update (one of the process trained
        since this one did): a learner must never send another's."""
        if self.shared.trained_by is not None and self.shared.trained_by is not self:
            raise RuntimeError("the shared update vector holds another learner's update")

    @needs_state
    def keep_change(self) -> None:
        """SCAFFOLD: keep a copy of the update's control change, which a later state commits or drops (adopt): the
        next learner to train overwrites the update vector."""
        if self.controls is not None:
            change = self.gradient[self.layout.controls]
            self.change = change.clone() if self.change is None else self.change.copy_(change)

    def update_tensors(self) -> dict[str, torch.Tensor]:
        """The update vector as it travels."""
        return self.layout.wire_tensors(self.gradient)

    @needs_state
    def compressed(
        self, update: dict[str, torch.Tensor], plan: TrainingPlan, learner_id: int
    ) -> dict[str, torch.Tensor]:
        """An update's tensors (the update vector's float32 views) as the plan's codec sends them. The residuals
        live in this process: a learner starts from zero (restarted, its earlier ones are lost) and again when
        the leader changes the codec or its settings. Its draws (QSGD's rounding, random-k's seeds, PowerSGD's
        first start) come from the run's seed and the learner's id, so a run repeats; a new compressor (after a
        reset) draws them again from the start."""
        settings = (plan.compress, plan.compress_ratio, plan.compress_rank)
        if self.compressor is None or settings != self.compressed_as:
            seed = compression.derived_seed("compress", self.info.seed, learner_id)
            self.compressor = compression.Compressor(*settings, self.layout.shapes, seed=seed)
            self.compressed_as = settings
            log.info(
                "round %d: updates travel compressed (%s); error feedback starts from zero residuals",
                self.round,
                self.compressor.codec.label(),
            )
        return self.compressor.compress(update)

    @needs_state
    def forget_compression(self, why: str) -> None:
        """Forget the residuals and warm starts (saying why, once): they belong to the updates sent compressed
        since the last reset, and the next compressed round starts from zero."""
        if self.compressor is not None:
            log.info("round %d: %s; error feedback's residuals are dropped", self.round, why)
            self.compressor = self.compressed_as = None

    def update_taken(self, round_index: int) -> None:
        """SCAFFOLD: the leader took this round's update; its control change waits for a later state's word on
        whether the round was applied."""
        if self.controls is not None:
            self.controls.taken(round_index)

    @needs_state
    def forget_own_controls(self) -> None:
        """SCAFFOLD: a learner's control belongs to its slot's data; a new slot starts from zero."""
        if self.controls is not None:
            self.controls.own.zero_()

    def evaluate(self, held_out: utils.ImageSet) -> Evaluation:
        """The loss and accuracy of the state adopted last (or the weights trained last) on held-out images."""
        self.load(training=False)
        with torch.no_grad():
            return evaluate(self.model, utils.normalize(held_out.images, self.mean, self.std), held_out.labels)
