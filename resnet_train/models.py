"""ResNets with torchvision's parameter names.

Two families share one `ResNet` class:
- ImageNet-style resnet18/34/50/101/152 (He et al. 2016, widths 64..512, 1x1-projection shortcuts,
  "option B"); with `stem="imagenet"` their state dicts are interchangeable with torchvision's.
- CIFAR-style resnet20/32/44/56/110 (He et al. 2016, section 4.2: widths 16/32/64, 6n+2 layers)
  with the paper's parameter-free "option A" shortcuts (stride-2 subsampling plus zero channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import CIFAR_ARCHS, IMAGENET_ARCHS
from .errors import ModelError

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
        self.in_planes, self.stem = widths[0], stem
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
        self.frozen: list[str] = []  # names of frozen submodules (set by `freeze`), kept in eval mode
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

    def train(self, mode: bool = True) -> ResNet:
        """Frozen parts stay in eval mode: their BatchNorm statistics do not move."""
        super().train(mode)
        for name in self.frozen:  # by name: SyncBatchNorm conversion replaces module objects
            getattr(self, name).eval()
        return self

    def stages(self) -> list[tuple[str, list[str]]]:
        """The network in order, as submodule names: stem, layer1..layerN, fc."""
        return [("stem", ["conv1", "bn1"]),
                *((f"layer{i}", [f"layer{i}"]) for i in range(1, self.num_stages + 1)),
                ("fc", ["fc"])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def freeze(model: ResNet, upto: str) -> None:
    """Freeze `upto` = none | backbone (all but fc) | stem | layer1..layerN (the stem through it):
    no gradients for their parameters, and their BatchNorm layers stay in eval mode."""
    if upto == "none":
        return
    names = [name for name, _ in model.stages()]
    last = "layer" + str(model.num_stages) if upto == "backbone" else upto
    if last not in names[:-1]:
        raise ModelError(f"model.freeze={upto} is not one of none, backbone, {', '.join(names[:-1])}")
    for _, modules in model.stages()[:names.index(last) + 1]:
        for name in modules:
            getattr(model, name).requires_grad_(False)
            model.frozen.append(name)
    model.train(model.training)


def pretrained_state_dict(arch: str, source: str) -> dict[str, torch.Tensor]:
    """`imagenet`: torchvision's ImageNet weights for `arch` (downloaded once into TORCH_HOME);
    otherwise a path to a state dict with torchvision's names (or a resnet-train checkpoint)."""
    if source == "imagenet":
        import torchvision

        if arch not in IMAGENET_ARCHS:
            raise ModelError(f"torchvision has no ImageNet weights for {arch}; use one of {', '.join(IMAGENET_ARCHS)}")
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        try:
            return weights.get_state_dict(progress=True)
        except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), or a broken download
            raise ModelError(f"could not load ImageNet weights for {arch} ({getattr(e, 'reason', e)}). Offline, "
                             f"download {weights.url} elsewhere and put it at {cached}, or pass "
                             "model.pretrained=/path/to/state_dict.pth") from None
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelError(f"model.pretrained={source}: no such file (expected imagenet or a state dict file)")
    from .checkpoint import CheckpointError, read_torch_file

    try:
        state = read_torch_file(path)
    except CheckpointError as e:
        raise ModelError(f"model.pretrained: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a resnet-train checkpoint
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model.pretrained={source} does not hold a state dict (names -> tensors)")
    return state


def load_backbone(model: ResNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy every weight but the classifier's from `state`; fc stays freshly initialized for this
    data set's classes."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    theirs = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = sorted(own.keys() - theirs.keys()), sorted(theirs.keys() - own.keys())
    mismatched = [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    if missing or unexpected or mismatched:
        first = mismatched[0] if mismatched else None
        detail = (f"{first} is {tuple(theirs[first].shape)} there, {tuple(own[first].shape)} here"
                  if mismatched else f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
        raise ModelError(f"the weights of {source} do not fit this model ({detail}); pretrained weights need the "
                         "same architecture with the imagenet stem (model.stem=imagenet)")
    model.load_state_dict(theirs, strict=False)


def stem_of_conv1(weight: torch.Tensor) -> Stem:
    """The stem a first convolution belongs to: 7x7 (stride 2, then max-pool) imagenet, 3x3 cifar."""
    return "imagenet" if weight.shape[-1] == 7 else "cifar"


@dataclass(frozen=True)
class Architecture:
    """One named ResNet: its blocks, blocks per stage, stage widths and shortcut kind."""

    name: str
    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    shortcut: Shortcut  # B: 1x1 projections (torchvision's); A: parameter-free (the CIFAR family)


IMAGENET_WIDTHS, CIFAR_WIDTHS = (64, 128, 256, 512), (16, 32, 64)
IMAGENET_LAYERS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
                   "resnet50": (Bottleneck, (3, 4, 6, 3)), "resnet101": (Bottleneck, (3, 4, 23, 3)),
                   "resnet152": (Bottleneck, (3, 8, 36, 3))}
ARCHITECTURE_OF = {
    **{name: Architecture(name, *IMAGENET_LAYERS[name], IMAGENET_WIDTHS, "B") for name in IMAGENET_ARCHS},
    # He et al. 2016, section 4.2: 6n+2 layers, n basic blocks in each of three stages
    **{name: Architecture(name, BasicBlock, ((int(name.removeprefix("resnet")) - 2) // 6,) * 3, CIFAR_WIDTHS, "A")
       for name in CIFAR_ARCHS},
}


def build(arch: Architecture, num_classes: int, stem: Stem | Literal["auto"], dropout: float = 0.0,
          zero_init_residual: bool = False, pretrained: str | None = None, freeze_upto: str = "none") -> ResNet:
    """`arch` with `num_classes` outputs; `pretrained` weights (imagenet or a file) for its backbone;
    `stem="auto"` takes the stem of those weights' first convolution."""
    state = pretrained_state_dict(arch.name, pretrained) if pretrained else None
    if stem == "auto":
        if state is None or "conv1.weight" not in state:
            raise ModelError(f"model.stem=auto follows pretrained weights, and {pretrained or 'none'} has no conv1; "
                             "set model.stem=cifar or imagenet")
        stem = stem_of_conv1(state["conv1.weight"])
    model = ResNet(arch.block, list(arch.layers), list(arch.widths), num_classes, stem, arch.shortcut, dropout,
                   zero_init_residual)
    if state is not None:
        load_backbone(model, state, pretrained)
    freeze(model, freeze_upto)
    return model


def _factory(arch: Architecture):
    """The model factory the model configs name (`_target_: resnet_train.models.resnet18`)."""
    def factory(num_classes: int = 10, stem: Stem | Literal["auto"] = "cifar", dropout: float = 0.0,
                zero_init_residual: bool = False, pretrained: str | None = None, freeze: str = "none") -> ResNet:
        return build(arch, num_classes, stem, dropout, zero_init_residual, pretrained, freeze)
    factory.__name__ = factory.__qualname__ = arch.name
    factory.__doc__ = f"{arch.name}: a ResNet with {sum(arch.layers)} {arch.block.__name__}s in {len(arch.layers)} stages."
    return factory


ARCHITECTURES = {name: _factory(arch) for name, arch in ARCHITECTURE_OF.items()}
resnet18, resnet34, resnet50, resnet101, resnet152 = (ARCHITECTURES[a] for a in IMAGENET_ARCHS)
resnet20, resnet32, resnet44, resnet56, resnet110 = (ARCHITECTURES[a] for a in CIFAR_ARCHS)
