"""The metadata of every payload kind as a typed record, formatted and parsed here and nowhere else.

Payloads (codec.py) carry a string-to-string metadata map next to their tensors. A model state tells a learner
what it is and how to train the next round; an update says what it covers; a data shard whose it is. Fields
that FedSGD never needed are left out of its payloads, so that they stay byte for byte what the article's
peers send and expect; a missing field reads as its FedSGD value.
"""

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import utils
from federated.core import compression, strategies
from federated.core.plan import (
    DP_MODES,
    MAX_CLIENT_LR,
    MAX_CLIENT_MOMENTUM,
    MAX_CLIP_RANGE,
    MAX_COMPRESS_RANK,
    MAX_DP_CLIP,
    MAX_DP_NOISE_MULTIPLIER,
    MAX_LEARNERS,
    MAX_LOCAL_EPOCHS,
    MAX_MU,
    MAX_SEED,
    MAX_WEIGHT_DECAY,
    MAX_WEIGHT_UNIT,
    SecureRound,
    TrainingPlan,
)
from federated.wire import codec
from model import MAX_CLASSES

if TYPE_CHECKING:
    from protos import leader_pb2

MAX_LOSS = 1e6  # a batch loss beyond this is no cross-entropy of a sane model: an update's claim is clamped to it
MAX_SAMPLES = 1 << 32  # the most images a learner may claim to hold
MIN_IMAGE_SIZE = 8  # smaller images do not survive a ResNet's downsampling
UPDATE_KINDS = ("gradient", "pseudo-gradient")
MASKED = "masked"  # the kind of a secure round's update: one I32 tensor, its values masked (privacy/secagg.py)
MASKED_TENSOR = "masked"
PARTICIPANTS = re.compile(rf"([0-9]{{1,9}}(,[0-9]{{1,9}}){{0,{MAX_LEARNERS - 1}}})?")  # learner ids, comma-separated


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _float(
    metadata: dict[str, str], key: str, default: float | None = None, low: float = 0.0, high: float = math.inf
) -> float:
    """A finite number metadata field in [low, high]; PayloadError if malformed or (without default) absent."""
    text = metadata.get(key)
    if text is None and default is not None:
        return default
    value = _number(text)
    if value is None or not low <= value <= high:  # false for NaN
        raise codec.PayloadError(
            f"metadata {key!r} must be a number from {low:g} to {high:g}, got {(text or '')[:32]!r}"
        )
    return value


def _number(text: str | None) -> float | None:
    """A metadata value as a float (NaN and the infinities included); None if it is no number."""
    try:
        return float(text) if text is not None and len(text) <= 40 else None
    except ValueError:
        return None


def _loss(metadata: dict[str, str]) -> float:
    """An update's claimed training loss, which only informs (the round's train_loss): clamped into 0..MAX_LOSS (a
    poisoned model gives honest learners huge losses), NaN kept as unknown; PayloadError only if it is no number."""
    loss = _number(metadata.get("loss"))
    if loss is None:
        raise codec.PayloadError(f"metadata 'loss' must be a number, got {metadata.get('loss', '')[:32]!r}")
    return loss if math.isnan(loss) else min(max(loss, 0.0), MAX_LOSS)


def _int(
    metadata: dict[str, str], key: str, default: int | None = None, minimum: int = 0, maximum: int | None = None
) -> int:
    if key not in metadata and default is not None:
        return default
    value = codec.metadata_int(metadata, key, minimum)
    if maximum is not None and value > maximum:
        raise codec.PayloadError(f"metadata {key!r} must be at most {maximum}, got {value}")
    return value


def _floats(metadata: dict[str, str], key: str) -> list[float]:
    parts = metadata.get(key, "").split(",")
    if len(parts) > 4:
        raise codec.PayloadError(f"metadata {key!r} must list at most 4 numbers")
    return [_float({key: part}, key, low=-math.inf) for part in parts]


def plan_to_metadata(plan: TrainingPlan) -> dict[str, str]:
    """A training plan as a state's metadata: FedSGD's carries only who takes part, whether to evaluate and
    (with --dp) the differential privacy learners apply."""
    metadata = {} if plan.participants is None else {"participants": ",".join(map(str, plan.participants))}
    metadata |= {"evaluate": "1"} if plan.evaluate else {}
    metadata |= _dp_to_metadata(plan)
    metadata |= secure_to_metadata(plan.secure) if plan.secure else {}
    metadata |= _compress_to_metadata(plan)
    if not strategies.named(plan.strategy).local:
        return metadata
    return {
        **metadata,
        "strategy": plan.strategy,
        "local_steps": str(plan.local_steps),
        "client_lr": repr(plan.client_lr),
        "client_momentum": repr(plan.client_momentum),
        "weight_decay": repr(plan.weight_decay),
        "mu": repr(plan.mu),
        **({"local_epochs": repr(plan.local_epochs)} if plan.local_epochs else {}),
    }


def plan_from_metadata(metadata: dict[str, str]) -> TrainingPlan:
    """The training plan a state's metadata gives, within the bounds a learner accepts; raises PayloadError."""
    participants = metadata.get("participants")
    if participants is not None and not PARTICIPANTS.fullmatch(participants):
        raise codec.PayloadError("metadata 'participants' must list learner ids, separated by commas")
    chosen = None if participants is None else tuple(int(part) for part in participants.split(",") if part)
    name, evaluate = metadata.get("strategy", "fedsgd"), metadata.get("evaluate") == "1"
    try:
        strategy = strategies.named(name)
    except ValueError:
        raise codec.PayloadError(
            f"unknown strategy {name[:32]!r}; this learner knows {', '.join(strategies.names())}"
        ) from None
    dp, compressed = _dp_from_metadata(metadata), _compress_from_metadata(metadata)
    secure = secure_from_metadata(metadata)
    if dp.get("dp") == "distributed" and secure is None:  # its noise is only ever added to a masked input
        raise codec.PayloadError(
            "metadata 'dp' is distributed without a secure round: the update would go to the leader in the clear, "
            "without noise"
        )
    if not strategy.local:
        return TrainingPlan(participants=chosen, evaluate=evaluate, secure=secure, **dp, **compressed)
    return TrainingPlan(
        name,
        _int(metadata, "local_steps", minimum=1),
        _float(metadata, "client_lr", high=MAX_CLIENT_LR),
        _float(metadata, "client_momentum", high=MAX_CLIENT_MOMENTUM),
        _float(metadata, "weight_decay", high=MAX_WEIGHT_DECAY),
        _float(metadata, "mu", high=MAX_MU),
        chosen,
        evaluate,
        _float(metadata, "local_epochs", 0.0, high=MAX_LOCAL_EPOCHS),
        secure,
        **dp,
        **compressed,
    )


def _dp_to_metadata(plan: TrainingPlan) -> dict[str, str]:
    """A plan's differential privacy fields: none without --dp, so that other runs' states stay byte for byte."""
    if plan.dp == "none":
        return {}
    return {
        "dp": plan.dp,
        "dp_clip": repr(plan.dp_clip),
        "dp_noise_multiplier": repr(plan.dp_noise_multiplier),
        "dp_delta": repr(plan.dp_delta),
    }


def _dp_from_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """A state's differential privacy fields as TrainingPlan's keyword arguments (none: absent)."""
    mode = metadata.get("dp", "none")
    if mode not in DP_MODES:
        raise codec.PayloadError(f"metadata 'dp' must be one of {', '.join(DP_MODES)}, got {mode[:32]!r}")
    if mode == "none":
        return {}
    return {
        "dp": mode,
        "dp_clip": _positive(metadata, "dp_clip", MAX_DP_CLIP),
        "dp_noise_multiplier": _positive(metadata, "dp_noise_multiplier", MAX_DP_NOISE_MULTIPLIER),
        "dp_delta": _positive(metadata, "dp_delta", math.nextafter(1.0, 0.0)),  # --dp-delta's bounds: (0, 1)
    }


def _compress_to_metadata(plan: TrainingPlan) -> dict[str, str]:
    """A plan's update compression: none without --compress, so that other runs' states stay byte for byte."""
    if plan.compress == "none":
        return {}
    return {
        "compress": plan.compress,
        "compress_ratio": repr(plan.compress_ratio),
        "compress_rank": str(plan.compress_rank),
    }


def _compress_from_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """A state's update compression as TrainingPlan's keyword arguments (none: absent); PayloadError for a codec
    this learner does not know, so that it refuses the plan rather than send what the leader cannot read."""
    name = metadata.get("compress", "none")
    if name == "none":
        return {}
    if name not in compression.CODECS:
        raise codec.PayloadError(
            f"unknown codec {name[:32]!r} in metadata 'compress'; this learner knows {', '.join(compression.CODECS)}"
        )
    return {
        "compress": name,
        "compress_ratio": _positive(metadata, "compress_ratio", 1.0),
        "compress_rank": _int(metadata, "compress_rank", minimum=1, maximum=MAX_COMPRESS_RANK),
    }


def _positive(metadata: dict[str, str], key: str, high: float) -> float:
    """A number field in (0, high]; PayloadError if malformed, absent or 0."""
    value = _float(metadata, key, high=high)
    if value == 0:
        raise codec.PayloadError(f"metadata {key!r} must be above 0")
    return value


def secure_to_metadata(secure: SecureRound) -> dict[str, str]:
    return {
        "secagg_clip_range": repr(secure.clip_range),
        "secagg_weight_unit": repr(secure.weight_unit),
        "secagg_summands": str(secure.summands),
    }


def secure_from_metadata(metadata: dict[str, str]) -> SecureRound | None:
    """A secure round's quantisation (None for a plain round), within the bounds a learner accepts."""
    if "secagg_clip_range" not in metadata:
        return None
    clip_range = _float(metadata, "secagg_clip_range", high=MAX_CLIP_RANGE)
    weight_unit = _float(metadata, "secagg_weight_unit", high=MAX_WEIGHT_UNIT)
    if clip_range <= 0 or weight_unit < 1:
        raise codec.PayloadError("metadata 'secagg_clip_range' must be positive and 'secagg_weight_unit' at least 1")
    return SecureRound(clip_range, weight_unit, _int(metadata, "secagg_summands", minimum=3, maximum=MAX_LEARNERS))


@dataclass(frozen=True)
class StateInfo:
    """A model state pushed or served by the leader. Fields beyond the article's (image_size, norm) travel
    only when they differ from what its peers assume; mean and std are empty until a leader without data has
    combined its learners' summaries."""

    architecture: str
    num_classes: int
    batch_size: int
    seed: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    wire_dtype: str
    round: int = 0
    finished: bool = False  # the leader's last state: learners exit
    stopped: bool = False  # ... because the leader was stopped early (it can be resumed)
    plan: TrainingPlan = TrainingPlan()
    image_size: int = utils.IMAGE_SIZE
    norm: str = "batch"
    discarded: int = 0  # rounds the leader discarded so far (SCAFFOLD: a learner's control moves only if applied)
    control_resets: int = 0  # times the leader reset SCAFFOLD's controls (its learners reset theirs)

    def to_metadata(self) -> dict[str, str]:
        normalisation = (
            {"mean": ",".join(map(str, self.mean)), "std": ",".join(map(str, self.std))} if self.mean else {}
        )
        controls = (
            {"discarded_rounds": str(self.discarded), "control_resets": str(self.control_resets)}
            if strategies.named(self.plan.strategy).controls
            else {}
        )
        return {
            "architecture": self.architecture,
            "num_classes": str(self.num_classes),
            "batch_size": str(self.batch_size),
            "seed": str(self.seed),
            **normalisation,
            "wire_dtype": self.wire_dtype,
            "round": str(self.round),
            "finished": _flag(self.finished),
            "stopped": _flag(self.stopped),
            **plan_to_metadata(self.plan),
            **({"image_size": str(self.image_size)} if self.image_size != utils.IMAGE_SIZE else {}),
            **({"norm": self.norm} if self.norm != "batch" else {}),
            **controls,
        }

    @classmethod
    def from_payload(cls, payload: codec.Payload) -> "StateInfo":
        """The state's metadata, checked; raises PayloadError."""
        return cls.from_metadata(payload.metadata)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "StateInfo":
        """A state's metadata (from its payload, or its header before the payload is buffered), checked; raises
        PayloadError."""
        mean, std = (tuple(_floats(metadata, key)) if key in metadata else () for key in ("mean", "std"))
        if (
            (len(mean), len(std)) not in ((0, 0), (3, 3))
            or not all(math.isfinite(value) for value in mean)
            or any(value < utils.MIN_STD for value in std)
        ):
            raise codec.PayloadError(
                "metadata 'mean' and 'std' must give 3 finite numbers each (or be absent), "
                f"std at least {utils.MIN_STD}"
            )
        num_classes, image_size = (
            _int(metadata, "num_classes", minimum=1),
            _int(metadata, "image_size", utils.IMAGE_SIZE),
        )
        if num_classes > MAX_CLASSES or not MIN_IMAGE_SIZE <= image_size <= utils.MAX_IMAGE_SIZE:
            raise codec.PayloadError(
                f"metadata 'num_classes' must be at most {MAX_CLASSES} and 'image_size' lie in "
                f"{MIN_IMAGE_SIZE}..{utils.MAX_IMAGE_SIZE}"
            )
        return cls(
            metadata.get("architecture", ""),
            num_classes,
            _int(metadata, "batch_size", minimum=1),
            _int(metadata, "seed", maximum=MAX_SEED),
            mean,
            std,
            metadata.get("wire_dtype", "float32"),
            _int(metadata, "round"),
            metadata.get("finished") == "1",
            metadata.get("stopped") == "1",
            plan_from_metadata(metadata),
            image_size,
            metadata.get("norm", "batch")[:16],
            _int(metadata, "discarded_rounds", 0),
            _int(metadata, "control_resets", 0),
        )


def is_final(payload: codec.Payload) -> bool:
    """Whether a model state is the leader's last (training finished, or the leader was stopped)."""
    return payload.metadata.get("finished") == "1"


def round_of(payload: codec.Payload) -> int:
    return codec.metadata_int(payload.metadata, "round")


STATE_HASH = re.compile(r"[0-9a-f]{32}")  # compression.delta.state_hash: BLAKE2b, 16 bytes, as hex
DELTA_ONLY = ("delta_from", "state_hash")  # the keys a delta adds to the state's metadata (DeltaInfo)


@dataclass(frozen=True)
class DeltaInfo:
    """How a state goes down under --compress-down (core/compression/delta.py): its codec and the codec's setting.
    A full state of the leader's replica says only that (the learner keeps it as its reference); a delta also
    names the version (round) it goes from and the hash of the state it makes."""

    codec: str
    ratio: float = 0.01
    rank: int = 2
    base: int | None = None  # a delta's: the round of the reference it applies to
    state_hash: str = ""  # a delta's: of the state it makes

    def to_metadata(self) -> dict[str, str]:
        metadata = {"delta_codec": self.codec}
        if self.codec in compression.SPARSE:
            metadata["delta_ratio"] = repr(self.ratio)
        if self.codec == "powersgd":
            metadata["delta_rank"] = str(self.rank)
        if self.base is not None:
            metadata |= {"delta_from": str(self.base), "state_hash": self.state_hash}
        return metadata

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "DeltaInfo | None":
        """A state's delta facts, checked (PayloadError); None for a state that says nothing of them."""
        name = metadata.get("delta_codec")
        if name is None:
            if any(key in metadata for key in DELTA_ONLY):
                raise codec.PayloadError("metadata 'delta_from' or 'state_hash' without 'delta_codec'")
            return None
        if name not in compression.CODECS or name == "none":
            raise codec.PayloadError(
                f"unknown codec {name[:32]!r} in metadata 'delta_codec'; this learner knows "
                f"{', '.join(name for name in compression.CODECS if name != 'none')}"
            )
        ratio = _positive(metadata, "delta_ratio", 1.0) if name in compression.SPARSE else cls.ratio
        rank = _int(metadata, "delta_rank", minimum=1, maximum=MAX_COMPRESS_RANK) if name == "powersgd" else cls.rank
        if "delta_from" not in metadata:
            return cls(name, ratio, rank)
        state_hash = metadata.get("state_hash", "")
        if not STATE_HASH.fullmatch(state_hash):
            raise codec.PayloadError(f"metadata 'state_hash' must be 32 hex digits, got {state_hash[:40]!r}")
        return cls(name, ratio, rank, _int(metadata, "delta_from"), state_hash)


@dataclass(frozen=True)
class UpdateInfo:
    """What a learner's update claims to cover: its slot, the round, the examples and steps, the mean loss."""

    learner_id: int
    round: int
    samples: int
    loss: float
    kind: str = "gradient"  # or "pseudo-gradient": start weights minus weights after local training
    steps: int = 1
    compress: str = "none"  # the codec its tensors travel in (core/compression: entries "NAME:PART"), or none

    def to_metadata(self) -> dict[str, str]:
        metadata = {
            "learner_id": str(self.learner_id),
            "round": str(self.round),
            "samples": str(self.samples),
            "loss": repr(self.loss),
        }
        if self.kind != "gradient":
            metadata |= {"kind": self.kind, "steps": str(self.steps)}
        return metadata if self.compress == "none" else {**metadata, "compress": self.compress}

    @classmethod
    def from_payload(cls, payload: codec.Payload) -> "UpdateInfo":
        """The update's claims, each well formed (not yet checked against what the leader asked for)."""
        metadata = payload.metadata
        kind = metadata.get("kind", "gradient")
        if kind not in UPDATE_KINDS:
            raise codec.PayloadError(f"metadata 'kind' must be 'gradient' or 'pseudo-gradient', got {kind[:32]!r}")
        compress = metadata.get("compress", "none")
        if compress not in compression.CODECS:
            raise codec.PayloadError(f"metadata 'compress' must name a codec, got {compress[:32]!r}")
        return cls(
            _int(metadata, "learner_id"),
            _int(metadata, "round"),
            _int(metadata, "samples", minimum=1),
            _loss(metadata),
            kind,
            _int(metadata, "steps", 1, minimum=1),
            compress,
        )


@dataclass(frozen=True)
class MaskedInfo:
    """What a secure round's masked input says in the clear: its slot and round, nothing else (its samples and loss
    are folded into the masked vector)."""

    learner_id: int
    round: int

    def to_metadata(self) -> dict[str, str]:
        return {"learner_id": str(self.learner_id), "round": str(self.round), "kind": MASKED}

    @classmethod
    def from_payload(cls, payload: codec.Payload) -> "MaskedInfo":
        """The masked input's claims, well formed: only learner_id, round and kind, one I32 tensor; PayloadError."""
        metadata = payload.metadata
        if set(metadata) != {"learner_id", "round", "kind"} or metadata["kind"] != MASKED:
            raise codec.PayloadError("a masked input's metadata is learner_id, round and kind 'masked', nothing else")
        tensor = payload.tensors.get(MASKED_TENSOR)
        if len(payload.tensors) != 1 or tensor is None or tensor.dtype != codec.DTYPES["I32"] or tensor.dim() != 1:
            raise codec.PayloadError(f"a masked input is one 1-D I32 tensor named {MASKED_TENSOR!r}")
        return cls(_int(metadata, "learner_id"), _int(metadata, "round"))


def is_masked(payload: codec.Payload) -> bool:
    """Whether an update is a secure round's masked input (its kind says so)."""
    return payload.metadata.get("kind") == MASKED


@dataclass(frozen=True)
class ShardInfo:
    """A data shard sent by the leader."""

    learner_id: int
    num_classes: int
    dataset: str

    def to_metadata(self) -> dict[str, str]:
        return {"learner_id": str(self.learner_id), "num_classes": str(self.num_classes), "dataset": self.dataset}


@dataclass(frozen=True)
class DataSummary:
    """What a learner with its own images tells the leader at registration (LearnerInfo.data): how many it
    trains and evaluates on, and its channel sums for the shared normalisation. Never the images."""

    train_samples: int
    eval_samples: int
    channel_sums: tuple[float, ...]  # R, G, B
    channel_square_sums: tuple[float, ...]

    @classmethod
    def of(cls, train: "utils.ImageSet", eval_samples: int) -> "DataSummary":
        sums, squares = utils.channel_sums(train.images)
        return cls(len(train), eval_samples, tuple(sums), tuple(squares))

    def to_proto(self, message: "leader_pb2.DataSummary") -> None:
        """Fill a leader_pb2.DataSummary."""
        message.train_samples, message.eval_samples = self.train_samples, self.eval_samples
        message.channel_sums[:], message.channel_square_sums[:] = self.channel_sums, self.channel_square_sums

    @classmethod
    def from_proto(cls, message: "leader_pb2.DataSummary", image_size: int) -> "DataSummary":
        """A registration's summary, checked for consistency with images of image_size: pixel values lie in
        0..1, so per channel 0 <= squares <= sums <= pixels and sums^2 <= squares * pixels; raises PayloadError."""
        sums, squares = tuple(message.channel_sums), tuple(message.channel_square_sums)
        train, held = message.train_samples, message.eval_samples
        if not 0 < train <= MAX_SAMPLES or not 0 <= held <= MAX_SAMPLES:
            raise codec.PayloadError(
                f"data.train_samples must lie in 1..{MAX_SAMPLES} and eval_samples in 0..{MAX_SAMPLES}"
            )
        if len(sums) != 3 or len(squares) != 3:
            raise codec.PayloadError("data.channel_sums and data.channel_square_sums need 3 values (R, G, B)")
        pixels = train * image_size * image_size
        for total, square in zip(sums, squares):
            if not (
                0 <= square <= total * (1 + 1e-9) <= pixels * (1 + 1e-9)
                and total * total <= square * pixels * (1 + 1e-6)
            ):
                raise codec.PayloadError(
                    f"data channel sums {total:.6g} and {square:.6g} are impossible for "
                    f"{train} images of {image_size}x{image_size} pixels in 0..1"
                )
        return cls(train, held, sums, squares)
