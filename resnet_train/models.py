"""ResNets with torchvision's parameter names.

Two families share one `ResNet` class:
- ImageNet-style resnet18/34/50/101/152 (He et al. 2016, widths 64..512, 1x1-projection shortcuts,
  "option B"); with `stem="imagenet"` their state dicts are interchangeable with torchvision's.
- CIFAR-style resnet20/32/44/56/110 (He et al. 2016, section 4.2: widths 16/32/64, 6n+2 layers)
  with the paper's parameter-free "option A" shortcuts (stride-2 subsampling plus zero channels).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Stem = Literal["cifar", "imagenet"]
Shortcut = Literal["A", "B"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: subsample spatially and append zero channels (no parameters)."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride, self.extra_channels = stride, extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def make_shortcut(in_planes: int, out_planes: int, stride: int, kind: Shortcut) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None  # identity
    if kind == "A":
        return ZeroPadShortcut(stride, out_planes - in_planes)
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "B"):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "B"):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(in_planes, out_planes, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        widths: list[int],
        num_classes: int = 10,
        stem: Stem = "cifar",
        shortcut: Shortcut = "B",
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if len(layers) != len(widths):
            raise ValueError("layers and widths must have the same length")
        self.in_planes = widths[0]
        if stem == "imagenet":  # 7x7 stride 2 + max-pool: 224px images
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:  # 3x3 stride 1, no pooling: 32px images
            self.conv1 = conv3x3(3, widths[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        for i, (n_blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(self.in_planes, width, stride if j == 0 else 1, shortcut))
                self.in_planes = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.in_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


IMAGENET_WIDTHS = [64, 128, 256, 512]
CIFAR_WIDTHS = [16, 32, 64]


def _imagenet_family(block, layers):
    def factory(num_classes: int = 10, stem: Stem = "cifar", dropout: float = 0.0,
                zero_init_residual: bool = False) -> ResNet:
        return ResNet(block, layers, IMAGENET_WIDTHS, num_classes, stem, "B", dropout, zero_init_residual)
    return factory


def _cifar_family(depth: int):
    n = (depth - 2) // 6

    def factory(num_classes: int = 10, stem: Stem = "cifar", dropout: float = 0.0,
                zero_init_residual: bool = False) -> ResNet:
        return ResNet(BasicBlock, [n] * 3, CIFAR_WIDTHS, num_classes, stem, "A", dropout, zero_init_residual)
    return factory


resnet18 = _imagenet_family(BasicBlock, [2, 2, 2, 2])
resnet34 = _imagenet_family(BasicBlock, [3, 4, 6, 3])
resnet50 = _imagenet_family(Bottleneck, [3, 4, 6, 3])
resnet101 = _imagenet_family(Bottleneck, [3, 4, 23, 3])
resnet152 = _imagenet_family(Bottleneck, [3, 8, 36, 3])
resnet20 = _cifar_family(20)
resnet32 = _cifar_family(32)
resnet44 = _cifar_family(44)
resnet56 = _cifar_family(56)
resnet110 = _cifar_family(110)

ARCHITECTURES = {
    name: globals()[name]
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                 "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
}
