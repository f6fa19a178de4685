"""The metadata of every payload kind as a typed record, formatted and parsed here and nowhere else.

Payloads (wire.py) carry a string-to-string metadata map next to their tensors. A model state tells a learner
what it is and how to train the next round; an update says what it covers; a data shard whose it is. Fields
that FedSGD never needed are left out of its payloads, so that they stay byte for byte what the article's
peers send and expect; a missing field reads as its FedSGD value.
"""

import math
import re
from dataclasses import dataclass

import wire
from strategies import STRATEGIES, update_kind

MAX_LOSS = 1e6  # a claimed batch loss beyond this is not a cross-entropy of a real batch
# What a learner accepts in a training plan (the leader's flags are held to the same bounds)
MAX_CLIENT_LR, MAX_CLIENT_MOMENTUM, MAX_WEIGHT_DECAY, MAX_MU = 1e3, 0.999, 1.0, 1e3
MAX_LEARNERS = 4096  # the most learner ids a state may name as a round's participants
UPDATE_KINDS = ("gradient", "pseudo-gradient")


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _float(metadata: dict[str, str], key: str, default: float | None = None, low: float = 0.0,
           high: float = math.inf) -> float:
    """A finite number metadata field in [low, high]; PayloadError if malformed or (without default) absent."""
    text = metadata.get(key)
    if text is None and default is not None:
        return default
    try:
        value = float(text) if text is not None and len(text) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # false for NaN
        raise wire.PayloadError(f"metadata {key!r} must be a number from {low:g} to {high:g}, "
                                f"got {(text or '')[:32]!r}")
    return value


def _int(metadata: dict[str, str], key: str, default: int | None = None, minimum: int = 0) -> int:
    if key not in metadata and default is not None:
        return default
    return wire.metadata_int(metadata, key, minimum)


def _floats(metadata: dict[str, str], key: str) -> list[float]:
    parts = metadata.get(key, "").split(",")
    if len(parts) > 4:
        raise wire.PayloadError(f"metadata {key!r} must list at most 4 numbers")
    return [_float({key: part}, key, low=-math.inf) for part in parts]


@dataclass(frozen=True)
class TrainingPlan:
    """How learners train in the coming round. FedSGD: one gradient on one batch. Any other strategy:
    local_steps SGD steps with the client optimizer, then the pseudo-gradient."""

    strategy: str = "fedsgd"
    local_steps: int = 1
    client_lr: float = 0.0
    client_momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0  # FedProx's proximal weight
    participants: tuple[int, ...] | None = None  # None: every learner trains this round

    @property
    def update_kind(self) -> str:
        return update_kind(self.strategy)

    def takes_part(self, learner_id: int) -> bool:
        return self.participants is None or learner_id in self.participants

    def to_metadata(self) -> dict[str, str]:
        metadata = {} if self.participants is None else {"participants": ",".join(map(str, self.participants))}
        if self.strategy == "fedsgd":
            return metadata
        return {**metadata, "strategy": self.strategy, "local_steps": str(self.local_steps),
                "client_lr": repr(self.client_lr), "client_momentum": repr(self.client_momentum),
                "weight_decay": repr(self.weight_decay), "mu": repr(self.mu)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "TrainingPlan":
        participants = metadata.get("participants")
        if participants is not None and not re.fullmatch(r"([0-9]{1,9}(,[0-9]{1,9}){0,%d})?" % (MAX_LEARNERS - 1),
                                                         participants):
            raise wire.PayloadError("metadata 'participants' must list learner ids, separated by commas")
        chosen = None if participants is None else tuple(int(part) for part in participants.split(",") if part)
        strategy = metadata.get("strategy", "fedsgd")
        if strategy not in STRATEGIES:
            raise wire.PayloadError(f"unknown strategy {strategy[:32]!r}; this learner knows {', '.join(STRATEGIES)}")
        if strategy == "fedsgd":
            return cls(participants=chosen)
        return cls(strategy, _int(metadata, "local_steps", minimum=1), _float(metadata, "client_lr", high=MAX_CLIENT_LR),
                   _float(metadata, "client_momentum", high=MAX_CLIENT_MOMENTUM), _float(metadata, "weight_decay", high=MAX_WEIGHT_DECAY),
                   _float(metadata, "mu", high=MAX_MU), chosen)


@dataclass(frozen=True)
class StateInfo:
    """A model state pushed or served by the leader."""

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

    def to_metadata(self) -> dict[str, str]:
        return {"architecture": self.architecture, "num_classes": str(self.num_classes),
                "batch_size": str(self.batch_size), "seed": str(self.seed), "mean": ",".join(map(str, self.mean)),
                "std": ",".join(map(str, self.std)), "wire_dtype": self.wire_dtype, "round": str(self.round),
                "finished": _flag(self.finished), "stopped": _flag(self.stopped), **self.plan.to_metadata()}

    @classmethod
    def from_payload(cls, payload: wire.Payload) -> "StateInfo":
        """The state's metadata, checked; raises PayloadError."""
        metadata = payload.metadata
        return cls(metadata.get("architecture", ""), _int(metadata, "num_classes", minimum=1),
                   _int(metadata, "batch_size", minimum=1), _int(metadata, "seed"),
                   tuple(_floats(metadata, "mean")), tuple(_floats(metadata, "std")),
                   metadata.get("wire_dtype", "float32"), _int(metadata, "round"),
                   metadata.get("finished") == "1", metadata.get("stopped") == "1",
                   TrainingPlan.from_metadata(metadata))


def is_final(payload: wire.Payload) -> bool:
    """Whether a model state is the leader's last (training finished, or the leader was stopped)."""
    return payload.metadata.get("finished") == "1"


def round_of(payload: wire.Payload) -> int:
    return wire.metadata_int(payload.metadata, "round")


@dataclass(frozen=True)
class UpdateInfo:
    """What a learner's update claims to cover: its slot, the round, the examples and steps, the mean loss."""

    learner_id: int
    round: int
    samples: int
    loss: float
    kind: str = "gradient"  # or "pseudo-gradient": start weights minus weights after local training
    steps: int = 1

    def to_metadata(self) -> dict[str, str]:
        metadata = {"learner_id": str(self.learner_id), "round": str(self.round), "samples": str(self.samples),
                    "loss": repr(self.loss)}
        return metadata if self.kind == "gradient" else {**metadata, "kind": self.kind, "steps": str(self.steps)}

    @classmethod
    def from_payload(cls, payload: wire.Payload) -> "UpdateInfo":
        """The update's claims, each well formed (not yet checked against what the leader asked for)."""
        metadata = payload.metadata
        kind = metadata.get("kind", "gradient")
        if kind not in UPDATE_KINDS:
            raise wire.PayloadError(f"metadata 'kind' must be 'gradient' or 'pseudo-gradient', got {kind[:32]!r}")
        return cls(_int(metadata, "learner_id"), _int(metadata, "round"), _int(metadata, "samples", minimum=1),
                   _float(metadata, "loss", high=MAX_LOSS), kind, _int(metadata, "steps", 1, minimum=1))


@dataclass(frozen=True)
class ShardInfo:
    """A data shard sent by the leader."""

    learner_id: int
    num_classes: int
    dataset: str

    def to_metadata(self) -> dict[str, str]:
        return {"learner_id": str(self.learner_id), "num_classes": str(self.num_classes), "dataset": self.dataset}
