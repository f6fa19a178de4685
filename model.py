"""CIFAR ResNets by architecture name: the only model code; weights travel, code never does."""

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ShortcutA(nn.Module):
    """Parameter-free shortcut of He et al. (option A): subsample and zero-pad the channels."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, self.extra_channels - pad))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int, projection_shortcut: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if projection_shortcut:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:
                self.shortcut = ShortcutA(planes - in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a 3x3 stem (no max-pool), stages of basic blocks, global pooling."""

    def __init__(
        self, widths: list[int], blocks: list[int], num_classes: int, projection_shortcut: bool
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for index, (planes, count) in enumerate(zip(widths, blocks)):
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(in_planes, planes, stride, projection_shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """The CIFAR ResNet-20 of He et al. (2016): 3 stages of 3 blocks, 16/32/64 channels, ~0.27 M parameters."""
    return CifarResNet([16, 32, 64], [3, 3, 3], num_classes, projection_shortcut=False)


def resnet18(num_classes: int = 10) -> CifarResNet:
    """ResNet-18 with a CIFAR stem: 4 stages of 2 blocks, 64-512 channels, ~11.2 M parameters (45 MB)."""
    return CifarResNet([64, 128, 256, 512], [2, 2, 2, 2], num_classes, projection_shortcut=True)


ARCHITECTURES: dict[str, Callable[[int], CifarResNet]] = {"resnet20": resnet20, "resnet18": resnet18}


def build_model(architecture: str, num_classes: int = 10) -> CifarResNet:
    """The named architecture, freshly initialised; raises ValueError for an unknown name."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](num_classes)
