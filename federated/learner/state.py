"""What a learner has once it knows the leader's first model state: the model on its device, its update layout
and vector, the strategy's control variates, what a state must hold, and the adoption of later states."""

import logging
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
) -> tuple[torch.nn.Module, GradientLayout, Controls | None]:
    """The state's model on the device, its update layout and (SCAFFOLD) its control variates. The model moves
    before the layout is made: moving replaces a model's buffers, and the layout must hold the ones training
    updates (adopting a state later copies into them in place). A run's strategy never changes."""
    try:
        model = build_model(info.architecture, info.num_classes, info.norm).to(device)
    except ValueError as error:  # the names come from the network
        raise codec.PayloadError(f"the leader's model state names a model this learner cannot build: {error}") from None
    controls = strategies.named(info.plan.strategy).controls
    layout = GradientLayout(model, wire_dtype, controls=controls)
    return model, layout, Controls(layout.parameter_count, device) if controls else None


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
        model, _, controls = training_setup(info, wire_dtype, "meta")
    codec.check_described(described, state_spec(model, wire_dtype, controls is not None))
    return model


def state_spec(model: torch.nn.Module, wire_dtype: torch.dtype, controls: bool = False) -> TensorSpec:
    """What a model state from the leader must hold: wire_state's tensors (with SCAFFOLD's control)."""
    control = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad)) if controls else None
    return codec.spec_of(wire_state(model, wire_dtype, control))


class Replica:
    """This learner's copy of the leader's model, built from the first state it fetched: the model on the device,
    its layout, the update vector its gradients are views of, SCAFFOLD's controls, the spec every later state
    must meet, and what the newest adopted state says (its round, plan and normalisation)."""

    def __init__(self, state: codec.Payload, device: str) -> None:
        """Raises PayloadError when the state does not hold the model it names. device: --device."""
        self.info = messages.StateInfo.from_payload(state)  # the run's model, batch size and seed
        wire_dtype = wire_dtype_of(self.info)
        self.device = runtime.pick_device(device)
        check_fits(codec.spec_of(state.tensors), self.info, wire_dtype)
        self.model, self.layout, self.controls = training_setup(self.info, wire_dtype, self.device)
        self.spec = state_spec(self.model, wire_dtype, self.controls is not None)
        self.round, self.plan = self.info.round, self.info.plan
        self.mean, self.std = list(self.info.mean), list(self.info.std)
        # The update vector keeps the last update until the next local update, which comes after the state that
        # settles its SCAFFOLD control change (adopt).
        self.gradient = torch.zeros(self.layout.size, device=self.device)
        self.examples: torch.nn.Module | None = None  # the model hooked for per-example gradients (local DP)
        self.noise: torch.Generator | None = None  # local DP's noise, seeded by this learner alone
        # --compress: the codec's error-feedback residuals and PowerSGD's warm start, for the plan's settings
        self.compressor: compression.Compressor | None = None
        self.compressed_as: tuple[str, float, int] | None = None
        self.adopt(state)
        self.layout.bind_gradients(self.gradient)  # after adopting: it took the state's tensors over

    def adopt(self, state: codec.Payload, fetched: bool = True) -> None:
        """Continue training from a model state: fetched (GetModel) or pushed (SyncModelState; checked there).
        SCAFFOLD: its server control, and the leader's word on the control change of this learner's last update.
        PayloadError for a state of another norm: batch and renorm (and the group norms) hold the same tensors,
        so the spec passes it, but this model would go on training its own layer class."""
        info = messages.StateInfo.from_payload(state)  # parses the plan too: once a state
        if info.norm != self.info.norm:
            raise codec.PayloadError(f"the leader changed its norm from {self.info.norm} to {info.norm} during the run")
        if fetched:
            adopt_state(self.model, state, self.spec)
        else:
            load_state(self.model, state)
        self.round, self.plan = info.round, info.plan
        self.mean, self.std = list(info.mean), list(info.std)  # empty until a leader without data settled them
        if strategies.named(self.plan.strategy).controls != (self.controls is not None):
            raise codec.PayloadError(f"the leader changed its strategy to {self.plan.strategy} during the run")
        if self.plan.dp == "local":  # refused at once for a model that cannot give it
            self.hook_examples()
        if self.controls is not None:
            resets = self.controls.counts[1]
            committed = self.controls.adopt(
                torch.cat([state.tensors[control_name(name)].reshape(-1) for name, _ in self.layout.parameters]),
                info.round,
                (info.discarded, info.control_resets),
                self.gradient[self.layout.controls],
                fetched,
            )
            if committed is False:
                log.info("round %d: the leader did not apply this learner's control change; it is dropped", info.round)
            if committed is False or self.controls.counts[1] != resets:
                self.forget_control_residuals()

    def forget_control_residuals(self) -> None:
        """Compressed SCAFFOLD: drop what error feedback still holds of the control changes (their residuals) when
        the change is dropped or the controls reset; else the dropped change would reach the server's c later."""
        if self.compressor is not None:
            self.compressor.forget_residuals([control_name(name) for name, _ in self.layout.parameters])

    def hook_examples(self) -> None:
        """Hook the model for DP-SGD's per-example gradients, once; PayloadError for a model that cannot give them."""
        if self.examples is not None:
            return
        try:
            self.examples = local.hook_examples(self.model)
        except ValueError as error:
            raise codec.PayloadError(f"the leader asks for local differential privacy: {error}") from None

    def backward(self, plan: TrainingPlan) -> Backward:
        """How the round's steps compute their gradients: DP-SGD's when the plan asks for local differential
        privacy (the noise from a generator of this learner's own), else the mean loss's."""
        if plan.dp != "local":
            return Backward()
        self.hook_examples()
        if self.noise is None:
            self.noise = local.fresh_generator(self.device)
        return local.ExampleGradients(plan.dp_clip, plan.dp_noise_multiplier, self.noise)

    def take_final(self, state: codec.Payload) -> None:
        """The leader's last state: its weights and normalisation (a learner sampling never drew may not have had
        it), to evaluate; it trains no more."""
        load_state(self.model, state)
        info = messages.StateInfo.from_payload(state)
        self.mean, self.std = list(info.mean), list(info.std)

    @property
    def normalised(self) -> bool:
        """Whether the normalisation is settled: nobody trains or evaluates before a leader without data has it."""
        return bool(self.mean)

    @property
    def strategy(self) -> type[strategies.Strategy]:
        return strategies.named(self.plan.strategy)

    def local_update(self, batch_at: Callable[[int], Batch], plan: TrainingPlan) -> float:
        """Fill the update vector with this round's update (the strategy's local_update from the model, following
        plan: the round's, as this learner's data makes it); the mean training loss. batch_at(k) is the round's
        k-th batch."""
        return self.strategy.local_update(
            self.model, self.layout, self.gradient, batch_at, plan, self.controls, self.backward(plan)
        )

    def update_tensors(self) -> dict[str, torch.Tensor]:
        """The update vector as it travels."""
        return self.layout.wire_tensors(self.gradient)

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

    def forget_own_controls(self) -> None:
        """SCAFFOLD: a learner's control belongs to its slot's data; a new slot starts from zero."""
        if self.controls is not None:
            self.controls.own.zero_()

    def evaluate(self, held_out: utils.ImageSet) -> Evaluation:
        """The model's loss and accuracy on held-out images."""
        with torch.no_grad():
            return evaluate(self.model, utils.normalize(held_out.images, self.mean, self.std), held_out.labels)
