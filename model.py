"""Models by architecture name (the CIFAR ResNets, or torchvision's classifiers) and initial weights from a file;
the only model code: weights travel, code never does."""

import functools
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# GroupNorm's groups in the CIFAR ResNets' "group" norm. Two, as federated work on CIFAR ResNets following Hsieh
# et al. (2020) commonly uses: it divides every width here (16 to 512), and ResNet-20's 16-channel layers keep 8
# channels a group, where GroupNorm's ImageNet default of 32 groups would not even divide them.
GROUPS = 2
# "group-ws": more groups, which with weight standardisation train closer to BatchNorm (Qiao et al. 2019); 8
# divides every width here and leaves ResNet-20's first stage 2 channels a group.
WS_GROUPS = 8
# Batch renormalisation (Ioffe 2017): the batch's statistics, corrected towards the running ones by r (their
# standard deviations' ratio) and d (their means' distance), clipped to these bounds. Ioffe's values after warm-up.
RENORM_R_MAX = 3.0
RENORM_D_MAX = 5.0
# Batches, as the running statistics count them (num_batches_tracked: in FedSGD one per round), before batch
# renormalisation corrects: before that the running statistics are still near their initial 0 and 1, and the
# layer is plain BatchNorm. Momentum 0.1 forgets the initial values to 1 % in 44 batches.
RENORM_WARMUP = 50
WS_EPSILON = 1e-5


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch renormalisation (Ioffe 2017): in training, the batch's normalisation times r plus d, constants that
    make it the running statistics' normalisation within RENORM_R_MAX and RENORM_D_MAX. A learner whose batch holds
    a few classes thus trains with nearly the statistics the model is evaluated with (the federation's, averaged);
    where they agree it is BatchNorm. The same buffers as BatchNorm: its statistics travel and average alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_so_far, variance_so_far, batches = self.running_mean, self.running_var, self.num_batches_tracked
        # (built with BatchNorm's defaults: running statistics tracked, momentum 0.1)
        assert mean_so_far is not None and variance_so_far is not None and batches is not None and self.momentum
        if not self.training:
            return super().forward(x)
        mean = x.mean((0, 2, 3))
        variance = x.var((0, 2, 3), unbiased=False)
        std = (variance + self.eps).sqrt()
        with torch.no_grad():  # r and d as tensors, never Python numbers: a check on the meta device has no values
            running_std = (variance_so_far + self.eps).sqrt()
            warm = batches >= RENORM_WARMUP  # before, r = 1 and d = 0: BatchNorm
            r = torch.where(warm, (std / running_std).clamp(1 / RENORM_R_MAX, RENORM_R_MAX), 1.0)
            d = torch.where(warm, ((mean - mean_so_far) / running_std).clamp(-RENORM_D_MAX, RENORM_D_MAX), 0.0)
            count = x.numel() / x.shape[1]
            mean_so_far.lerp_(mean, self.momentum)  # as BatchNorm updates them: with the unbiased variance
            variance_so_far.lerp_(variance * count / max(count - 1, 1), self.momentum)
            batches += 1
        scale, shift = r / std, d - r * mean / std
        return x * _channels(scale * self.weight) + _channels(shift * self.weight + self.bias)


def _channels(values: torch.Tensor) -> torch.Tensor:
    return values[None, :, None, None]


class StandardisedConv2d(nn.Conv2d):
    """A convolution whose filters are standardised (zero mean, unit variance over each output channel's inputs)
    before use: weight standardisation (Qiao et al. 2019, who found that it lets GroupNorm train about as fast as
    BatchNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        mean, variance = weight.mean((1, 2, 3), keepdim=True), weight.var((1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (weight - mean) / (variance + WS_EPSILON).sqrt(), self.bias)


@dataclass(frozen=True)
class Norm:
    """One normalisation of the CIFAR ResNets: its layer (given the channel count) and the convolutions it needs."""

    layer: Callable[[int], nn.Module]
    conv: type[nn.Conv2d] = nn.Conv2d


# The CIFAR ResNets' normalisations (docs/data.md, "Normalisation under label skew", measures them). Group
# norms keep no running statistics: each image is normalised by itself, so learners with skewed labels no longer
# train on, and average, statistics of unlike batches (Hsieh et al. 2020); batch renorm keeps BatchNorm's.
NORM_LAYERS: dict[str, Norm] = {
    "batch": Norm(nn.BatchNorm2d),
    "group": Norm(functools.partial(nn.GroupNorm, GROUPS)),
    "group-ws": Norm(functools.partial(nn.GroupNorm, WS_GROUPS), StandardisedConv2d),
    "layer-ws": Norm(functools.partial(nn.GroupNorm, 1), StandardisedConv2d),
    "renorm": Norm(BatchRenorm2d),
}
NORMS = tuple(NORM_LAYERS)
# The leader's --norm auto for a partition with label skew (docs/data.md, "Normalisation under label skew").
SKEWED_NORM = "renorm"


class ShortcutA(nn.Module):
    """Parameter-free shortcut of He et al. (option A): subsample and zero-pad the channels."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, self.extra_channels - pad))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, each normalised, and a residual connection."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        projection_shortcut: bool,
        norm: Norm,
    ) -> None:
        super().__init__()
        self.conv1 = norm.conv(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm.layer(planes)
        self.conv2 = norm.conv(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm.layer(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if projection_shortcut:
                self.shortcut = nn.Sequential(norm.conv(in_planes, planes, 1, stride, bias=False), norm.layer(planes))
            else:
                self.shortcut = ShortcutA(planes - in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a 3x3 stem (no max-pool), stages of basic blocks, global pooling."""

    def __init__(
        self, widths: list[int], blocks: list[int], num_classes: int, projection_shortcut: bool, norm: str = "batch"
    ) -> None:
        super().__init__()
        # The modules keep their names (bn1, bn2) with every norm: the weights are named alike, and files of the
        # batch norms (batch, renorm) and the group norms tell apart by the running statistics only the former have
        # (files of norms of one kind load into each other: they differ in how they compute, not in what they hold).
        chosen = NORM_LAYERS[norm]
        self.conv1 = chosen.conv(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = chosen.layer(widths[0])
        stages, in_planes = [], widths[0]
        for index, (planes, count) in enumerate(zip(widths, blocks)):
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(in_planes, planes, stride, projection_shortcut, chosen))
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet20(num_classes: int = 10, norm: str = "batch") -> CifarResNet:
    """The CIFAR ResNet-20 of He et al. (2016): 3 stages of 3 blocks, 16/32/64 channels, ~0.27 M parameters."""
    return CifarResNet([16, 32, 64], [3, 3, 3], num_classes, projection_shortcut=False, norm=norm)


def resnet18(num_classes: int = 10, norm: str = "batch") -> CifarResNet:
    """ResNet-18 with a CIFAR stem: 4 stages of 2 blocks, 64-512 channels, ~11.2 M parameters (45 MB)."""
    return CifarResNet([64, 128, 256, 512], [2, 2, 2, 2], num_classes, projection_shortcut=True, norm=norm)


ARCHITECTURES: dict[str, Callable[..., CifarResNet]] = {"resnet20": resnet20, "resnet18": resnet18}

TORCHVISION_PREFIX = "torchvision:"
MAX_NAME_LENGTH = 64  # the longest torchvision name has 22 characters; a name from the network may be anything
MAX_CLASSES = 100_000  # past ImageNet-21k's 21,843: a classifier row per class, so this bounds what a name can cost
# Classifiers of torchvision that cannot take the project's 32x32 images (utils.IMAGE_SIZE), measured by
# tests/unit/test_model.py at 32 and 64 pixels; every other one of torchvision's registry can.
TOO_SMALL_INPUTS = {
    "alexnet": "its last max-pool needs inputs of at least 63x63 pixels",
    "inception_v3": "its stem needs inputs of at least 75x75 pixels",
    "maxvit_t": "it is built for one input size (224x224 pixels)",
    **dict.fromkeys(
        ("vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32"), "it is built for one input size (224x224 pixels)"
    ),
}
# Builder arguments that make a forward pass return plain logits in training mode too (GoogLeNet's auxiliary
# classifiers would return a tuple), and keep torchvision's current initialisation without its warning.
BUILDER_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": True}}


@functools.cache
def torchvision_models() -> frozenset[str]:
    """Names of torchvision's image classifiers (no detection, segmentation, video or quantized models).
    Imported on first use: torchvision.models takes about 2 s to import, which a learner of the CIFAR ResNets
    need not pay at every start."""
    import torchvision.models

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def architectures() -> list[str]:
    """Every name build_model accepts: the CIFAR ResNets, then torchvision:NAME for the classifiers that fit."""
    usable = sorted(torchvision_models() - TOO_SMALL_INPUTS.keys())
    return [*ARCHITECTURES, *(TORCHVISION_PREFIX + name for name in usable)]


def build_model(architecture: str, num_classes: int = 10, norm: str = "batch") -> nn.Module:
    """The named architecture, freshly initialised, whose forward pass returns [N, num_classes] logits in
    training and evaluation mode: "resnet20" or "resnet18" (with one of NORMS), or "torchvision:NAME" for
    one of torchvision's classifiers (its own normalisation only, no pretrained weights). The name may come from
    the network: it is only ever looked up in these lists. Raises ValueError."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be from 1 to {MAX_CLASSES}, got {num_classes}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm[:32]!r}; choose one of {', '.join(NORMS)}")
    if architecture in ARCHITECTURES:
        return ARCHITECTURES[architecture](num_classes, norm)
    if len(architecture) <= MAX_NAME_LENGTH and architecture.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(architecture.removeprefix(TORCHVISION_PREFIX), num_classes, norm)
    raise ValueError(
        f"unknown architecture {architecture[:32]!r}; choose {' or '.join(ARCHITECTURES)}, or "
        f"{TORCHVISION_PREFIX}NAME for a classifier of torchvision (python -c "
        "'import model; print(*model.architectures())' lists them all)"
    )


def _torchvision_model(name: str, num_classes: int, norm: str) -> nn.Module:
    if name not in torchvision_models():
        raise ValueError(
            f"{name[:32]!r} is not a classifier of torchvision; python -c "
            "'import model; print(*model.architectures())' lists the architectures"
        )
    if name in TOO_SMALL_INPUTS:
        raise ValueError(f"{TORCHVISION_PREFIX}{name} cannot classify 32x32 images: {TOO_SMALL_INPUTS[name]}")
    if norm != "batch":  # each model's widths would need their own group count: not offered yet
        raise ValueError(
            f"norm={norm!r} is for {' and '.join(ARCHITECTURES)}; torchvision's models keep their own "
            "normalisation (norm='batch')"
        )
    import torchvision.models

    # get_model looks the name up in torchvision's registry (a dict), never as an attribute
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **BUILDER_OPTIONS.get(name, {}))


# Where checkpoints commonly keep their weights (the leader's checkpoint.pt: "model"); model.pt is the weights.
WRAPPER_KEYS = ("model", "state_dict")
# Tensors a file may hold in another shape, keeping the model's fresh initialisation: a classifier's weight and
# bias (the file is for another number of classes). More than that is another architecture.
MAX_RESHAPED = 2


def load_initial_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Copy the weights saved in a file into model: a state_dict (a run's model.pt), or one under "model" or
    "state_dict" (a run's checkpoint.pt, most training scripts' checkpoints), read with weights_only. Names must
    match the model's (BatchNorm's batch counters may be missing); up to MAX_RESHAPED tensors of another shape
    keep their fresh initialisation, logged as a warning. Returns their names. Raises ValueError for a file
    that cannot be read, holds other objects than tensors, or is for another architecture or norm."""
    saved, own = _read_state_dict(path), model.state_dict()
    _check_names(saved, own, path)
    reshaped = [name for name, tensor in own.items() if name in saved and saved[name].shape != tensor.shape]
    if len(reshaped) > MAX_RESHAPED:
        raise ValueError(
            f"{path} does not fit this architecture: {len(reshaped)} tensors have other shapes "
            f"({_describe(reshaped[:3], saved, own)}); is it for another model?"
        )
    with torch.no_grad():
        for name, tensor in own.items():
            if name in saved and name not in reshaped:  # a counter the file lacks keeps the model's
                tensor.copy_(saved[name])  # state_dict's tensors share the model's storage
    if reshaped:
        log.warning(
            "%s: %s keep their fresh initialisation: the file's shapes differ (another number of classes?)",
            path,
            _describe(reshaped, saved, own),
        )
    return reshaped


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors by name, unwrapped from a checkpoint's dict, without a DataParallel "module." prefix."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails as a damaged or foreign file happens to make it fail
        text = str(error)
        refused = re.search(r"GLOBAL (\S+)", text)  # a class or function weights_only would not call
        if refused:
            raise ValueError(
                f"{path} holds objects other than tensors ({refused[1]}), which are never unpickled: "
                "save the weights alone, with torch.save(model.state_dict(), path)"
            ) from error
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # its reason, past its advice to trust the file
        raise ValueError(
            f"cannot read {path} ({reason[1] if reason else f'{type(error).__name__}: {text[:200]}'}); "
            "give a file of torch.save(model.state_dict(), path), such as a run's model.pt"
        ) from error
    if isinstance(loaded, Mapping) and not _is_state_dict(loaded):
        loaded = next((loaded[key] for key in WRAPPER_KEYS if _is_state_dict(loaded.get(key))), loaded)
    if not _is_state_dict(loaded):
        raise ValueError(
            f"{path} holds no state_dict (a dict of tensors by name, alone or under "
            f"{' or '.join(map(repr, WRAPPER_KEYS))}); save one with torch.save(model.state_dict(), path)"
        )
    if all(name.startswith("module.") for name in loaded):  # saved from a DataParallel wrapper
        loaded = {name.removeprefix("module."): tensor for name, tensor in loaded.items()}
    broken = next(
        (name for name, tensor in loaded.items() if tensor.is_floating_point() and not tensor.isfinite().all()), None
    )
    if broken:
        raise ValueError(f"{path} holds NaN or Inf in {broken}: a run cannot start from it")
    return dict(loaded)


def _is_state_dict(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in value.items())
    )


def _check_names(saved: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Raise ValueError unless the file names the model's tensors, no more and no fewer. Strict, because a name
    that does not match means a file for another model: starting from the part that matches would start a run
    from a mixture. Only BatchNorm's batch counters may be missing (files of PyTorch before 0.4.1 lack them)."""
    missing = [name for name in own if name not in saved and not name.endswith("num_batches_tracked")]
    unexpected = [name for name in saved if name not in own]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this architecture: it lacks {len(missing)} of the model's tensors "
            f"{missing[:3]} and has {len(unexpected)} others {unexpected[:3]}; is it for another model, "
            "or the other norm?"
        )


def _describe(names: list[str], saved: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} (file {list(saved[name].shape)}, model {list(own[name].shape)})" for name in names)
