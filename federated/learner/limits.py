"""What a learner takes on for its leader, bounded by its own flags (--max-image-size, --max-batch-size,
--max-local-steps, --max-memory): checked on a model state's or a shard's header, before its bytes are buffered
and before a model is built or an image resized, so that a hostile leader's plan is refused in words (exit 2)
instead of exhausting the learner."""

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from federated.common import runtime
from federated.core.checks import TensorSpec
from federated.core.plan import TrainingPlan
from federated.learner.config import LearnerConfig
from federated.learner.state import check_fits, model_facts, wire_dtype_of
from federated.wire import codec, messages

GIB = 1 << 30
# The most a learner buffers of one model state or shard, whatever --max-memory allows: a payload lives in host
# memory, which --max-memory's default (the machine's, plus a GPU's) overstates, and a final state's tensors are
# not checked against its model (learner/session.py's receive_stream).
MAX_BUFFER_BYTES = 4 * GIB
# Float32 copies of the parameters a learner holds while it trains: the weights, the update vector their gradients
# are views of, the round's starting point and the client optimizer's momentum (SCAFFOLD's controls come on top).
PARAMETER_COPIES = 4


def gib(size: int) -> str:
    """A size in bytes, in GiB (in MiB below one)."""
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class Need:
    """The bytes training for a leader takes, at least: the parameters' copies, the activations a batch keeps for
    the backward pass, and the images (its own at the leader's size, or the shard)."""

    parameters: int
    activations: int
    images: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.activations + self.images

    def __str__(self) -> str:
        return f"{gib(self.parameters)} parameters, {gib(self.activations)} activations, {gib(self.images)} images"


def activation_bytes(model: nn.Module, image_size: int) -> int:
    """The bytes of every layer's output for one image of image_size pixels (what a batch keeps for the backward
    pass, per image, at least), from a forward pass on the meta device: shapes, no memory and no arithmetic.
    model is on the meta device; PayloadError if it cannot take such images."""
    total = 0

    def count(module: nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    layers = [module for module in model.modules() if next(module.children(), None) is None]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    try:  # two images: batch normalisation in training needs more than one value per channel
        model(torch.empty(2, 3, image_size, image_size, device="meta"))
    except (RuntimeError, ValueError) as error:  # too small for its pooling, or built for another size
        raise codec.PayloadError(
            f"the leader's model cannot take images of {image_size}x{image_size} pixels: {str(error)[:200]}"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
    return total // 2


class LastNeed:
    """The last training_need worked out in this process, with what it was worked out from (one tuple, replaced
    whole: threads may ask at once): the learners of a pool (--virtual N) ask it of the same model each, and a pass
    on the meta device took 36 ms (a pool of 1,000 spent 36 s of its registrations on it)."""

    last: "tuple[tuple, Need] | None" = None


def training_need(info: messages.StateInfo, described: TensorSpec) -> Need:
    """What training the model a state names takes, at least, for a batch of the state's size (its images aside);
    PayloadError unless described (the state's tensors) holds exactly that model."""
    key = (model_facts(info), info.batch_size, tuple(described.items()))
    last = LastNeed.last
    if last is not None and last[0] == key:
        return last[1]
    model = check_fits(described, info, wire_dtype_of(info))  # on the meta device
    parameters = sum(parameter.numel() for parameter in model.parameters()) * 4 * PARAMETER_COPIES
    need = Need(parameters, info.batch_size * activation_bytes(model, info.image_size))
    LastNeed.last = (key, need)
    return need


def machine_memory(device: torch.device) -> int:
    """This machine's physical memory, and the GPU's when device is one (activations live there): --max-memory's
    default, which refuses only what cannot fit at all."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return ram + (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0)


def payload_bytes(described: TensorSpec) -> int:
    """The bytes of the tensors a payload's header describes."""
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in described.values())


def image_bytes(count: int, image_size: int) -> int:
    """The bytes of count images of image_size pixels: uint8 pixels and an int64 label each."""
    return count * (3 * image_size * image_size + 8)


@dataclass
class Limits:
    """This learner's bounds on what its leader asks of it (its --max-* flags), the images of its own it will
    load at the leader's size, and the training images it holds once it knows them (held)."""

    image_size: int
    batch_size: int
    local_steps: int
    memory: int  # bytes
    local_images: int = 0
    training_images: int = 0  # its own training images or its shard's (0: not known yet), set by held

    @classmethod
    def of(cls, config: LearnerConfig, local_images: int = 0) -> "Limits":
        return cls(
            config.max_image_size,
            config.max_batch_size,
            config.max_local_steps,
            int(config.max_memory * GIB) if config.max_memory else machine_memory(runtime.pick_device(config.device)),
            local_images,
        )

    @property
    def buffer(self) -> int:
        """The most bytes to buffer of one model state or shard."""
        return min(self.memory, MAX_BUFFER_BYTES)

    def held(self, training_images: int) -> None:
        """The training images this learner holds are known: plans are checked on them from now on."""
        self.training_images = training_images

    def check_plan(self, plan: TrainingPlan, batch_size: int) -> None:
        """PayloadError when a round's plan asks for more local steps than this learner takes: with the leader's
        local epochs, as many as they make on the training images it holds (once it knows them)."""
        unknown = plan.local_epochs and not self.training_images  # checked once held
        steps = 0 if unknown else plan.for_shard(self.training_images, batch_size).local_steps
        epochs = f" ({plan.local_epochs:g} passes over its {self.training_images} images)" if plan.local_epochs else ""
        beyond(steps, self.local_steps, f"{steps} local steps a round{epochs}", "--max-local-steps")

    def check_memory(self, need: Need, what: str) -> None:
        """PayloadError when what the leader asks (what) needs more memory than this learner may use."""
        if need.total > self.memory:
            raise codec.PayloadError(
                f"{what} needs at least {gib(need.total)} ({need}); this learner may use {gib(self.memory)} "
                "(--max-memory raises it)"
            )

    def admit_state(self, metadata: dict[str, str], described: TensorSpec) -> None:
        """A model state's header (codec.Admit, for GetModel): its metadata well formed, within this learner's
        bounds, its tensors exactly those of the model it names, and training that model on a batch (and on this
        learner's own images at the state's size) within --max-memory; PayloadError otherwise. The leader's last
        state is only evaluated, not trained on: only its metadata is checked."""
        info = messages.StateInfo.from_metadata(metadata)
        if info.finished:
            return
        size = info.image_size
        beyond(size, self.image_size, f"images of {size}x{size} pixels", "--max-image-size")
        beyond(info.batch_size, self.batch_size, f"batches of {info.batch_size} images", "--max-batch-size")
        self.check_plan(info.plan, info.batch_size)
        need = training_need(info, described)
        own = f" on its {self.local_images} images" if self.local_images else ""
        self.check_memory(
            Need(need.parameters, need.activations, image_bytes(self.local_images, size)),
            f"training the leader's {info.architecture[:64]} in batches of {info.batch_size} at {size}x{size} "
            f"pixels{own}",
        )

    def shard_admission(self, info: messages.StateInfo, state: TensorSpec) -> codec.Admit:
        """The check of a shard's header (codec.Admit, for GetData): training the state's model (state: its tensors)
        on a batch, and the shard itself, within --max-memory."""
        need = training_need(info, state)

        def admit(metadata: dict[str, str], described: TensorSpec) -> None:
            self.check_memory(
                Need(need.parameters, need.activations, payload_bytes(described)),
                f"training the leader's {info.architecture[:64]} in batches of {info.batch_size} on its shard",
            )

        return admit


def beyond(asked: int, most: int, what: str, flag: str) -> None:
    """PayloadError when the leader asks for more than most: what it asks for (what) and the flag that allows it."""
    if asked > most:
        raise codec.PayloadError(f"the leader asks for {what}; this learner takes at most {most} ({flag} raises it)")
