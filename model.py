"""Models by architecture name (the CIFAR ResNets, or torchvision's classifiers): the only model code; weights
travel, code never does."""

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# GroupNorm's groups in the CIFAR ResNets. Two, as federated work on CIFAR ResNets following Hsieh et al. (2020)
# commonly uses: it divides every width here (16 to 512), and ResNet-20's 16-channel layers keep 8 channels a
# group, where GroupNorm's ImageNet default of 32 groups would not even divide them.
GROUPS = 2
# The CIFAR ResNets' normalisation. Group norm keeps no running statistics: each image is normalised by itself, so
# learners with skewed labels no longer train on, and average, statistics of unlike batches (Hsieh et al. 2020).
NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {"batch": nn.BatchNorm2d,
                                                      "group": functools.partial(nn.GroupNorm, GROUPS)}
NORMS = tuple(NORM_LAYERS)


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

    def __init__(self, in_planes: int, planes: int, stride: int, projection_shortcut: bool,
                 norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if projection_shortcut:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), norm_layer(planes)
                )
            else:
                self.shortcut = ShortcutA(planes - in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a 3x3 stem (no max-pool), stages of basic blocks, global pooling."""

    def __init__(self, widths: list[int], blocks: list[int], num_classes: int, projection_shortcut: bool,
                 norm: str = "batch") -> None:
        super().__init__()
        # The modules keep their names (bn1, bn2) with group norm: the weights are named alike, and files of the
        # two norms still tell apart by the running statistics only batch norm has.
        norm_layer = NORM_LAYERS[norm]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = norm_layer(widths[0])
        stages, in_planes = [], widths[0]
        for index, (planes, count) in enumerate(zip(widths, blocks)):
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(in_planes, planes, stride, projection_shortcut, norm_layer))
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
# tests/test_model.py at 32 and 64 pixels; every other one of torchvision's registry can.
TOO_SMALL_INPUTS = {
    "alexnet": "its last max-pool needs inputs of at least 63x63 pixels",
    "inception_v3": "its stem needs inputs of at least 75x75 pixels",
    "maxvit_t": "it is built for one input size (224x224 pixels)",
    **{name: "it is built for one input size (224x224 pixels)"
       for name in ("vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32")},
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
    training and evaluation mode: "resnet20" or "resnet18" (with batch or group norm), or "torchvision:NAME" for
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
    raise ValueError(f"unknown architecture {architecture[:32]!r}; choose {' or '.join(ARCHITECTURES)}, or "
                     f"{TORCHVISION_PREFIX}NAME for a classifier of torchvision (python -c "
                     "'import model; print(*model.architectures())' lists them all)")


def _torchvision_model(name: str, num_classes: int, norm: str) -> nn.Module:
    if name not in torchvision_models():
        raise ValueError(f"{name[:32]!r} is not a classifier of torchvision; python -c "
                         "'import model; print(*model.architectures())' lists the architectures")
    if name in TOO_SMALL_INPUTS:
        raise ValueError(f"{TORCHVISION_PREFIX}{name} cannot classify 32x32 images: {TOO_SMALL_INPUTS[name]}")
    if norm != "batch":  # each model's widths would need their own group count: not offered yet
        raise ValueError(f"norm={norm!r} is for {' and '.join(ARCHITECTURES)}; torchvision's models keep their own "
                         "normalisation (norm='batch')")
    import torchvision.models

    # get_model looks the name up in torchvision's registry (a dict), never as an attribute
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **BUILDER_OPTIONS.get(name, {}))

