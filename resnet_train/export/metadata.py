"""What an exported file says about itself: `ExportMetadata` (classes, input size, normalization,
architecture), where it is stored beside or inside each format, and what a state dict is outside
resnet-train (`torchvision_compatibility`)."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from .. import __version__
from ..config import IMAGENET_ARCHS, arch_of
from ..errors import ExportError, first_line

if TYPE_CHECKING:  # (build imports the data and training stack: not needed to read metadata)
    from ..build import TrainedModel

METADATA_KEY = "resnet_train"  # ONNX metadata_props key, TorchScript extra file name, safetensors header key
METADATA_VERSION = 1


@dataclass(frozen=True)
class ExportMetadata:
    """What a deployer needs besides the weights. mean/std are per channel on the 0..1 scale, as in
    the checkpoint (None: the model was trained on images / 255 only)."""

    arch: str  # resnet18 ... resnet152, resnet20 ... resnet110
    stem: str  # cifar | imagenet
    classes: list[str]  # logit i is classes[i]
    image_size: int  # the model sees image_size x image_size images
    mean: list[float] | None
    std: list[float] | None
    source_checkpoint: str = ""
    preprocessing_included: bool = True  # the graph takes uint8 NHWC images and normalizes itself
    stored_size: int | None = None  # training stored images at this size and resized them to image_size
    # Training turned image files upright as their EXIF orientation says (files exported by earlier
    # versions, which have no such field, were not).
    exif_transpose: bool = False

    @property
    def input_size(self) -> int:
        """The side of the images the exported model takes (with preprocessing: uint8 NHWC)."""
        return self.stored_size or self.image_size

    def __post_init__(self) -> None:
        # plain lists, as JSON gives them back, so a round trip compares equal (tuples from a caller)
        object.__setattr__(self, "classes", list(self.classes))
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, [float(v) for v in getattr(self, name)])
        if self.stem not in ("cifar", "imagenet"):
            raise ExportError(f"metadata: stem={self.stem!r} is not cifar or imagenet")
        if not self.classes or not all(isinstance(c, str) for c in self.classes):
            raise ExportError("metadata: classes must be a non-empty list of names")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ExportError(f"metadata: image_size={self.image_size!r} is not a positive integer")
        if self.stored_size is not None and (not isinstance(self.stored_size, int) or self.stored_size < 1):
            raise ExportError(f"metadata: stored_size={self.stored_size!r} is not a positive integer")
        if (self.mean is None) != (self.std is None) or (self.mean is not None and not (
                len(self.mean) == len(self.std) == 3 and all(s > 0 for s in self.std))):
            raise ExportError(f"metadata: mean={self.mean} std={self.std} must both be None or 3 values (std > 0)")

    def describe(self) -> dict:
        """The fields plus what they mean for a deployer (input, output, torchvision compatibility)."""
        return {**asdict(self), "input_size": self.input_size, "metadata_version": METADATA_VERSION,
                "input": self.input_description(),
                "output": f"float32 logits (N, {len(self.classes)}); logit i is classes[i] (softmax: probabilities)",
                "torchvision": torchvision_compatibility(self.arch, self.stem),
                "exported_with": f"resnet-train {__version__}, torch {torch.__version__}"}

    def input_description(self) -> str:
        return self._tensor_description() + (
            "; image files decoded as in training: turned upright as their EXIF orientation says "
            "(PIL.ImageOps.exif_transpose), then the shorter side resized and center-cropped"
            if self.exif_transpose else "; image files decoded as in training: EXIF orientation ignored")

    def _tensor_description(self) -> str:
        size, given = self.image_size, self.input_size
        resize = f"a bilinear resize from {given}x{given} to {size}x{size} (as in training)" if self.stored_size else ""
        if self.preprocessing_included:
            return (f"uint8 RGB images (N, {given}, {given}, 3), values 0..255; "
                    f"{resize + ' and ' if resize else ''}normalization {'are' if resize else 'is'} part of the model")
        formula = "RGB / 255" if self.mean is None else "(RGB / 255 - mean) / std"
        return (f"float32 (N, 3, {size}, {size}) = {formula}, RGB in 0..255"
                + (f", after {resize} of the uint8 images" if resize else ""))

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.describe(), indent=indent)

    def to_dict(self) -> dict[str, str]:
        """One JSON string under METADATA_KEY: the form ONNX metadata_props and TorchScript extra files take."""
        return {METADATA_KEY: self.to_json()}

    @classmethod
    def from_json(cls, text: str | bytes) -> ExportMetadata:
        """Raises ValueError, KeyError or TypeError (or ExportError) for text that is not our metadata."""
        data = json.loads(text)  # extra (descriptive) keys are ignored; later fields may be absent (older files)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data or f.default is MISSING})

    @classmethod
    def from_dict(cls, props: Mapping[str, str | bytes]) -> ExportMetadata:
        return cls.from_json(props[METADATA_KEY])


def metadata_of(trained: TrainedModel, preprocessing_included: bool = True) -> ExportMetadata:
    """The export metadata of a trained model (build.model_from_checkpoint: the weights the run
    selected, its EMA weights where it kept and selects them)."""
    norm = trained.checkpoint["normalization"]
    size, stored = int(norm["image_size"]), int(norm.get("stored_size") or norm["image_size"])
    return ExportMetadata(arch_of(trained.config), trained.config.model.stem, list(trained.classes), size,
                          norm.get("mean"), norm.get("std"), str(trained.path), preprocessing_included,
                          stored_size=stored if stored != size else None,
                          exif_transpose=trained.exif_transpose)


def read_metadata(props: Mapping[str, str | bytes], path: Path) -> ExportMetadata:
    """Our metadata from a file's key/value properties, or ExportError naming the file."""
    if not props.get(METADATA_KEY):
        raise ExportError(f"{path} has no resnet-train metadata (no {METADATA_KEY!r} entry): "
                          "it was not written by resnet-train's export")
    try:
        return ExportMetadata.from_dict(props)
    except (ValueError, KeyError, TypeError) as e:  # ExportError is a ValueError: its message is kept
        raise ExportError(f"{path}: unreadable resnet-train metadata ({first_line(e)})") from None


def metadata_path(output: str | Path) -> Path:
    """Where a state dict's metadata goes: `<file>.metadata.json` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".metadata.json")


def parity_report_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parity.json")


def torchvision_compatibility(arch: str, stem: str) -> str:
    """What a state dict of `arch` with `stem` is outside resnet-train, in one sentence."""
    if arch not in IMAGENET_ARCHS:
        return (f"{arch} is not a torchvision architecture (widths 16/32/64, parameter-free option-A shortcuts); "
                f"build it with resnet_train.models.{arch}(num_classes=K, stem='{stem}')")
    loads = f"loads into torchvision.models.{arch}(num_classes=K) with strict=True"
    if stem == "imagenet":
        return loads
    return (f"{loads} after model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and model.maxpool = nn.Identity() "
            "(the CIFAR stem: a 3x3 stride-1 convolution and no max-pool)")


def torchvision_model(arch: str, num_classes: int, stem: str) -> nn.Module | None:
    """The torchvision model a state dict of `arch` loads into (strict), or None for resnet20..110."""
    if arch not in IMAGENET_ARCHS:
        return None
    import torchvision

    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model
