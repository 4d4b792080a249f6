"""Export a trained model for deployment: ONNX, TorchScript or a plain state dict.

Formats (`export_model(model, metadata, fmt, output)`):
  onnx         torch.onnx.export with the dynamo exporter (torch.export + onnxscript), opset 18 unless
               asked otherwise, a dynamic batch axis; runs with onnxruntime alone.
  torchscript  torch.jit.trace; loads with `torch.jit.load` and nothing of ours installed.
  state_dict   the weights as a plain dict of tensors with torchvision's names (`torch.save`, or
               safetensors when the file name ends in .safetensors); never includes preprocessing.

ONNX and TorchScript exports include the preprocessing by default (`WithPreprocessing`): the graph
takes uint8 RGB images (N, S, S, 3) and returns float32 logits (N, classes), so a deployer needs no
mean or std. S is the size training stored its images at: image_size, or 32 for CIFAR trained at
another size, with the resize to image_size (bilinear, as training did it on the device) inside the
graph. Every export carries `ExportMetadata` (classes, image size, mean/std, architecture, ...) as
one JSON string under the key "resnet_train": in the ONNX model's metadata_props, in the TorchScript
archive's extra files, and for state dicts in `<file>.metadata.json` beside the weights (and in the
safetensors header).

What a state dict means outside resnet-train (`torchvision_compatibility`, also in the metadata):
  resnet18..152, imagenet stem  loads into torchvision.models.resnetNN(num_classes=K), strict.
  resnet18..152, cifar stem     the same names, but torchvision's model needs
                                conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), maxpool = nn.Identity().
  resnet20..110                 not a torchvision architecture (widths 16/32/64, parameter-free
                                option-A shortcuts): build it with resnet_train.models.

`parity_check` runs the exported file (onnxruntime, torch.jit.load, or a fresh model loading the
state dict) and the PyTorch model on the same images and raises `ParityError` beyond 1e-4 on any
logit. `load_exported` opens an exported file for prediction.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import logging
import warnings
import zipfile
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .build import TrainedModel
from .checkpoint import atomic_save, check_model_state, unwrap
from .config import arch_of
from .data import BatchTransform
from .errors import CheckpointError, ExportError
from .files import atomic_write, storage_error
from .models import ARCHITECTURES, IMAGENET_FAMILY, stem_of_conv1

FORMATS = ("onnx", "torchscript", "state_dict")
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".ts", ".pt", ".pth"), "state_dict": (".pt", ".pth", ".safetensors")}
METADATA_KEY = "resnet_train"  # ONNX metadata_props key, TorchScript extra file name, safetensors header key
METADATA_VERSION = 1
# torch's ONNX exporter writes opset 18 natively (its op library targets 18); higher opsets go through
# onnxscript's version converter, lower ones fail (no down-conversion of Pad) and silently stay at 18.
DEFAULT_OPSET = 18
MIN_OPSET = 18
INSTALL_HINT = 'pip install "resnet-train[export]"'
DEFAULT_ATOL = 1e-4
EXAMPLE_BATCH = 2  # trace/export with N=2: torch.export specializes a batch of 1 as a constant


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


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


def read_metadata(props: Mapping[str, str | bytes], path: Path) -> ExportMetadata:
    """Our metadata from a file's key/value properties, or ExportError naming the file."""
    if not props.get(METADATA_KEY):
        raise ExportError(f"{path} has no resnet-train metadata (no {METADATA_KEY!r} entry): "
                          "it was not written by resnet-train's export")
    try:
        return ExportMetadata.from_dict(props)
    except (ValueError, KeyError, TypeError) as e:  # ExportError is a ValueError: its message is kept
        raise ExportError(f"{path}: unreadable resnet-train metadata ({_first_line(e)})") from None


def metadata_path(output: str | Path) -> Path:
    """Where a state dict's metadata goes: `<file>.metadata.json` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".metadata.json")


def parity_report_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parity.json")


def torchvision_compatibility(arch: str, stem: str) -> str:
    """What a state dict of `arch` with `stem` is outside resnet-train, in one sentence."""
    if arch not in IMAGENET_FAMILY:
        return (f"{arch} is not a torchvision architecture (widths 16/32/64, parameter-free option-A shortcuts); "
                f"build it with resnet_train.models.{arch}(num_classes=K, stem='{stem}')")
    loads = f"loads into torchvision.models.{arch}(num_classes=K) with strict=True"
    if stem == "imagenet":
        return loads
    return (f"{loads} after model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and model.maxpool = nn.Identity() "
            "(the CIFAR stem: a 3x3 stride-1 convolution and no max-pool)")


def torchvision_model(arch: str, num_classes: int, stem: str) -> nn.Module | None:
    """The torchvision model a state dict of `arch` loads into (strict), or None for resnet20..110."""
    if arch not in IMAGENET_FAMILY:
        return None
    import torchvision

    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def normalization_constants(mean: Sequence[float] | None,
                            std: Sequence[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset, divisor) on the 0..255 scale, shaped (1, 3, 1, 1): x_normalized = (x - offset) / divisor.
    The same numbers data.BatchTransform uses; without mean/std it is x / 255."""
    if mean is None or std is None:
        return torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1, 1), 255.0)
    return (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255,
            torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)


def _normalize(images: torch.Tensor, offset: torch.Tensor, divisor: torch.Tensor,
               size: int | None = None) -> torch.Tensor:
    """What data.BatchTransform does to evaluation batches: NCHW float, resized to `size` when given
    (bilinear; antialiased only when shrinking), normalized."""
    x = images.permute(0, 3, 1, 2).float()
    if size is not None and size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=size < x.shape[-1])
    return (x - offset) / divisor


def preprocess(images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None,
               size: int | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) → normalized float32 (N, 3, size, size), as in training."""
    return _normalize(images, *normalization_constants(mean, std), size)


class WithPreprocessing(nn.Module):
    """`model` with the training-time preprocessing in front: takes uint8 RGB images (N, H, W, 3),
    scales, resizes to `size` (when given), normalizes and transposes them to NCHW itself, so an
    exported graph needs no mean/std."""

    def __init__(self, model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None,
                 size: int | None = None):
        super().__init__()
        self.model, self.size = model, size
        offset, divisor = normalization_constants(mean, std)
        self.register_buffer("offset", offset)
        self.register_buffer("divisor", divisor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_normalize(images, self.offset, self.divisor, self.size))


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_model(model: nn.Module, metadata: ExportMetadata, fmt: str, output: str | Path, *,
                 include_preprocessing: bool = True, opset: int | None = None) -> Path:
    """Write `model` (a copy: fp32, CPU, eval mode) as `fmt` to `output`, atomically; returns the path.
    `include_preprocessing` applies to onnx and torchscript (a state dict is weights only), `opset`
    to onnx (default 18). The metadata written records whether preprocessing is included."""
    output = Path(output).expanduser()
    _check_format(fmt, output)
    model = _inference_copy(model)
    _check_fits(model, metadata)
    metadata = replace(metadata, preprocessing_included=include_preprocessing and fmt != "state_dict")
    if fmt == "state_dict":
        _export_state_dict(model, output, metadata)
        return output
    size = metadata.image_size
    if metadata.preprocessing_included:
        resize = size if metadata.stored_size else None
        module: nn.Module = WithPreprocessing(model, metadata.mean, metadata.std, resize).eval()
        given = metadata.input_size
        example = torch.randint(0, 256, (EXAMPLE_BATCH, given, given, 3), dtype=torch.uint8)
    else:
        module, example = model, torch.rand(EXAMPLE_BATCH, 3, size, size)
    if fmt == "onnx":
        _export_onnx(module, example, output, metadata, DEFAULT_OPSET if opset is None else opset)
    else:
        _export_torchscript(module, example, output, metadata)
    return output


def _check_format(fmt: str, output: Path) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    if output.suffix.lower() not in SUFFIXES[fmt]:
        raise ExportError(f"{output}: {fmt} files must end in {' or '.join(SUFFIXES[fmt])} "
                          "(load_exported tells formats apart by it)")


def _inference_copy(model: nn.Module) -> nn.Module:
    """A copy of the bare model (no DDP/compile wrapper) in fp32 on the CPU in eval mode; the
    caller's model (maybe training on a GPU) is left as it is."""
    model = copy.deepcopy(unwrap(model)).float().cpu().to(memory_format=torch.contiguous_format)
    return model.eval().requires_grad_(False)


def _check_fits(model: nn.Module, metadata: ExportMetadata) -> None:
    """The metadata describes this model: as many classes as outputs, the same stem."""
    fc, conv1 = getattr(model, "fc", None), getattr(model, "conv1", None)
    if not isinstance(fc, nn.Linear) or not isinstance(conv1, nn.Conv2d):
        raise ExportError(f"export expects a resnet-train ResNet (with conv1 and fc), got {type(model).__name__}")
    if fc.out_features != len(metadata.classes):
        raise ExportError(f"the model has {fc.out_features} outputs but the metadata names "
                          f"{len(metadata.classes)} classes")
    if stem_of_conv1(conv1.weight) != metadata.stem:
        raise ExportError(f"the model has the {stem_of_conv1(conv1.weight)} stem but the metadata says {metadata.stem}")


def _export_onnx(module: nn.Module, example: torch.Tensor, output: Path, metadata: ExportMetadata, opset: int) -> None:
    onnx = _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")  # the dynamo exporter translates with onnxscript's op library
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset={opset} is not supported here: choose {MIN_OPSET}..{newest} "
                          f"(default {DEFAULT_OPSET}, the exporter's own; higher ones are converted from it)")
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), _onnx_quietly():
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset, verbose=False,
                                    input_names=["images" if metadata.preprocessing_included else "inputs"],
                                    output_names=["logits"], dynamic_shapes=({0: batch},))
    proto = program.model_proto  # weights inline (one file): resnet152 is ~240 MB, far below protobuf's 2 GB
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # the exporter falls back to its own opset when a conversion fails
        raise ExportError(f"the ONNX exporter could not write opset {opset} (it wrote {written}); "
                          f"use opset={DEFAULT_OPSET}")
    onnx.helper.set_model_props(proto, metadata.to_dict())
    proto.doc_string = (f"resnet-train {metadata.arch}: {metadata.input_description()} -> logits for "
                        f"{len(metadata.classes)} classes; metadata_props['{METADATA_KEY}'] has the details")
    atomic_write(output, lambda f: f.write(proto.SerializeToString()))


@contextlib.contextmanager
def _onnx_quietly() -> Iterator[None]:
    """onnxscript's optimizer logs ~30 INFO lines of its own work ("Replaced initializer ...") and the
    exporter prints its progress; a user needs neither (errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _torchscript_quietly() -> Iterator[None]:
    """torch 2.14 marks torch.jit as deprecated (a FutureWarning on every call); TorchScript is still
    the one torch format that runs without the model's Python code, which is why it is offered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


def _export_torchscript(module: nn.Module, example: torch.Tensor, output: Path, metadata: ExportMetadata) -> None:
    # Tracing, not scripting: ResNet.forward picks stages with getattr(self, f"layer{i}"), which
    # TorchScript cannot compile; the traced graph has no shape-dependent control flow, so any batch works.
    with torch.no_grad(), _torchscript_quietly():
        traced = torch.jit.trace(module, example, check_trace=False)  # parity_check compares properly
        try:
            atomic_write(output, lambda f: torch.jit.save(traced, f, _extra_files=metadata.to_dict()))
        except RuntimeError as e:  # torch's zip writer reports a full disk as a RuntimeError
            raise storage_error(output, e) from None


def _export_state_dict(model: nn.Module, output: Path, metadata: ExportMetadata) -> None:
    tensors = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    if output.suffix.lower() == ".safetensors":
        safetensors_torch = _require("safetensors.torch", "A .safetensors state dict")
        data = safetensors_torch.save(tensors, metadata=metadata.to_dict())
        atomic_write(output, lambda f: f.write(data))
    else:
        atomic_save(tensors, output)
    atomic_write(metadata_path(output), lambda f: f.write((metadata.to_json(indent=2) + "\n").encode()))


# --------------------------------------------------------------------------------------------
# Loading an exported file
# --------------------------------------------------------------------------------------------


class ExportedModel:
    """An exported file ready to predict: `model(images)` takes uint8 RGB images (N, S, S, 3) with
    S = metadata.input_size (numpy array or tensor) and returns float32 logits (N, classes) on the CPU."""

    def __init__(self, path: Path, fmt: str, metadata: ExportMetadata, run: Callable[[torch.Tensor], torch.Tensor],
                 runtime: str):
        self.path, self.fmt, self.metadata, self.runtime = path, fmt, metadata, runtime
        self._run = run

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        batch = as_image_batch(images, self.metadata.input_size, str(self.path))
        if not self.metadata.preprocessing_included:
            batch = preprocess(batch, self.metadata.mean, self.metadata.std, self.metadata.image_size)
        return self._run(batch).float()

    def __repr__(self) -> str:
        classes = len(self.metadata.classes)
        return f"ExportedModel({str(self.path)!r}, {self.fmt}, {self.metadata.arch}, {classes} classes)"


def load_exported(path: str | Path, fmt: str | None = None) -> ExportedModel:
    """Open an exported .onnx (onnxruntime, CPU), TorchScript .ts/.pt or state dict .pt/.safetensors
    (with its .metadata.json) for prediction; anything else raises ExportError naming the file.
    TorchScript archives can carry code: load only files you trust (ONNX cannot run code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ExportError(f"no exported model file at {path}")
    fmt = fmt or format_of(path)
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    return {"onnx": _open_onnx, "torchscript": _open_torchscript, "state_dict": _open_state_dict}[fmt](path)


def format_of(path: Path) -> str:
    """The export format of a file, from its suffix (and for .pt/.pth, whether it is a TorchScript archive)."""
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        if _is_torchscript_archive(path):
            return "torchscript"
        if metadata_path(path).is_file():
            return "state_dict"
        if zipfile.is_zipfile(path):
            raise ExportError(f"{path} is a torch.save file, not TorchScript, and has no {metadata_path(path).name} "
                              "beside it as an exported state dict has (a checkpoint is not an exported model)")
        return "torchscript"  # neither: torch.jit.load will say what is wrong with it
    formats = {".onnx": "onnx", ".ts": "torchscript", ".safetensors": "state_dict"}
    if suffix not in formats:
        raise ExportError(f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r} "
                          "(expected .onnx, .ts, .pt, .pth or .safetensors)")
    return formats[suffix]


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives hold the model's code under <archive>/code/; torch.save files do not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _open_onnx(path: Path) -> ExportedModel:
    ort = _require("onnxruntime", "Running an ONNX model")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a bad file is reported by our exception
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...), all bare Exceptions
        raise ExportError(f"{path} is not a readable ONNX model (truncated, corrupt or not ONNX): "
                          f"{_first_line(e)}") from None
    metadata = read_metadata(session.get_modelmeta().custom_metadata_map, path)
    input_name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: np.ascontiguousarray(batch.numpy())})[0])
    return ExportedModel(path, "onnx", metadata, run, f"onnxruntime {ort.__version__} (CPUExecutionProvider)")


def _open_torchscript(path: Path) -> ExportedModel:
    extra_files = {METADATA_KEY: ""}
    try:
        with _torchscript_quietly():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    except Exception as e:  # RuntimeError for most damage, but zip and pickle errors pass through too
        raise ExportError(f"{path} is not a readable TorchScript model (truncated, corrupt or another kind of "
                          f"file): {_first_line(e)}") from None
    metadata = read_metadata(extra_files, path)
    module.eval()
    return ExportedModel(path, "torchscript", metadata, _torch_runner(module), f"torch.jit {torch.__version__}")


def _open_state_dict(path: Path) -> ExportedModel:
    sidecar = metadata_path(path)
    if not sidecar.is_file():
        raise ExportError(f"{path}: no {sidecar.name} beside it (a state dict's classes and normalization live there)")
    try:
        metadata = ExportMetadata.from_json(sidecar.read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{sidecar}: unreadable resnet-train metadata ({_first_line(e)})") from None
    model, runtime = state_dict_model(metadata)
    state = read_state_dict(path)
    try:
        check_model_state(model, state, str(path))  # (names the first key or shape that differs)
    except CheckpointError as e:
        raise ExportError(f"{e} ({metadata.arch} with {len(metadata.classes)} classes, as its metadata says)") from None
    model.load_state_dict(state, strict=True)
    return ExportedModel(path, "state_dict", metadata, _torch_runner(model.eval()), runtime)


def state_dict_model(metadata: ExportMetadata) -> tuple[nn.Module, str]:
    """A fresh model for the state dict: torchvision's (patched for the cifar stem) where one exists,
    which also proves the compatibility the metadata claims; ours for resnet20..110."""
    num_classes = len(metadata.classes)
    model = torchvision_model(metadata.arch, num_classes, metadata.stem)
    if model is not None:
        return model, f"torchvision.models.{metadata.arch}"
    if metadata.arch not in ARCHITECTURES:
        raise ExportError(f"metadata: unknown architecture {metadata.arch!r} "
                          f"(expected one of {', '.join(ARCHITECTURES)})")
    model = ARCHITECTURES[metadata.arch](num_classes=num_classes, stem=metadata.stem)
    return model, f"resnet_train.models.{metadata.arch}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict file (torch.save with weights_only, or safetensors) as names → tensors."""
    try:
        if path.suffix.lower() == ".safetensors":
            state = _require("safetensors.torch", "A .safetensors state dict").load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ExportError:
        raise
    except Exception as e:  # torch.load and safetensors raise many kinds for a damaged file
        raise ExportError(f"{path} is not a readable state dict file: {_first_line(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path} does not hold a state dict (names -> tensors)")
    return state


def _torch_runner(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(batch)
    return run


def as_image_batch(images: np.ndarray | torch.Tensor, image_size: int, culprit: str) -> torch.Tensor:
    """uint8 (N, S, S, 3) as a contiguous CPU tensor, or ExportError saying what `culprit` expects."""
    batch = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    expected = (image_size, image_size, 3)
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or batch.dim() != 4 \
            or tuple(batch.shape[1:]) != expected or len(batch) == 0:
        got = f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
        raise ExportError(f"{culprit} takes uint8 images of shape (N, {image_size}, {image_size}, 3), got {got}")
    return batch.cpu().contiguous()


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


@dataclass
class ParityReport:
    """The exported file against the PyTorch model on the same images."""

    file: str
    fmt: str
    runtime: str  # what ran the exported file
    images: int
    max_abs_diff: float  # max |logit_exported - logit_pytorch| over images and classes
    mean_abs_diff: float
    max_abs_logit: float  # the scale the differences are on: fp32 rounding grows with it
    top1_agreement: float  # fraction of images with the same top-1 class
    near_ties: int  # disagreements where PyTorch's top two logits are within twice the tolerance
    atol: float  # a logit passes when |Δ| <= atol + rtol * |logit|
    rtol: float
    passed: bool

    def format(self) -> str:
        agreeing = round(self.top1_agreement * self.images)
        ties = f", {self.near_ties} near-tie(s)" if self.near_ties else ""
        tolerance = f"{self.atol:.0e}" + (f" + {self.rtol:.0e}·|logit|" if self.rtol else "")
        return (f"parity of {self.file} ({self.fmt}, {self.runtime}) with the PyTorch model on {self.images} images: "
                f"max |Δlogit| {self.max_abs_diff:.2e} (tolerance {tolerance}; logits up to "
                f"{self.max_abs_logit:.3g}), mean {self.mean_abs_diff:.2e}, top-1 agreement "
                f"{self.top1_agreement:.2%} ({agreeing}/{self.images}{ties}): {'passed' if self.passed else 'FAILED'}")

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps({"file": data.pop("file"), "format": data.pop("fmt"), **data}, indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write(path, lambda f: f.write((self.to_json() + "\n").encode()))
        return path


class ParityError(ExportError):
    """The exported file does not give the PyTorch model's logits; `.report` has the numbers."""

    def __init__(self, report: ParityReport, note: str = ""):
        super().__init__(report.format() + note)
        self.report = report


def parity_check(exported_path: str | Path, fmt: str, torch_model: nn.Module,
                 images_uint8_nhwc: np.ndarray | torch.Tensor, metadata: ExportMetadata,
                 atol: float = DEFAULT_ATOL, rtol: float = 0.0) -> ParityReport:
    """Run the exported file and `torch_model` (with the training preprocessing from `metadata`) on
    the same images; raise ParityError if any logit differs by more than atol + rtol * |logit| or a
    top-1 class differs (other than between two logits that PyTorch itself puts within tolerance).
    rtol=0 is the fp32 contract (1e-4 absolute); deep nets with large logits may need rtol ~1e-5."""
    exported = load_exported(exported_path, fmt)
    images = as_image_batch(images_uint8_nhwc, metadata.input_size, "parity_check")
    reference = reference_logits(torch_model, images, metadata)
    got = torch.cat([exported(chunk) for chunk in images.split(32)])
    if got.shape != reference.shape:
        raise ExportError(f"{exported_path} gives logits of shape {tuple(got.shape)}, "
                          f"the model {tuple(reference.shape)}")
    report = compare_logits(reference, got, atol, rtol, str(exported_path), exported.fmt, exported.runtime)
    if not report.passed:
        raise ParityError(report)
    return report


def reference_logits(model: nn.Module, images: torch.Tensor, metadata: ExportMetadata) -> torch.Tensor:
    """The PyTorch model's logits with the preprocessing training and resnet-predict use (data.BatchTransform)."""
    model = _inference_copy(model)
    transform = BatchTransform(metadata.mean, metadata.std, output_size=metadata.image_size, channels_last=False)
    with torch.inference_mode():
        return torch.cat([model(transform(chunk)) for chunk in images.split(32)])


def compare_logits(reference: torch.Tensor, got: torch.Tensor, atol: float, rtol: float, file: str, fmt: str,
                   runtime: str) -> ParityReport:
    """The numbers of a ParityReport for exported logits `got` against the PyTorch model's."""
    reference, got = reference.double(), got.double()
    diff = (got - reference).abs()
    within = bool((diff <= atol + rtol * reference.abs()).all())  # NaN fails
    disagree = got.argmax(1) != reference.argmax(1)
    top2 = reference.topk(min(2, reference.shape[1]), dim=1).values
    # two logits within tolerance of each other may swap places by rounding alone
    tie = (top2[:, 0] - top2[:, -1]) <= 2 * (atol + rtol * top2[:, 0].abs())
    passed = within and not bool((disagree & ~tie).any())
    return ParityReport(file, fmt, runtime, len(reference), float(diff.max()), float(diff.mean()),
                        float(reference.abs().max()), 1 - float(disagree.float().mean()),
                        int((disagree & tie).sum()), atol, rtol, passed)


# --------------------------------------------------------------------------------------------
# From a checkpoint
# --------------------------------------------------------------------------------------------


def metadata_of(trained: TrainedModel, preprocessing_included: bool = True) -> ExportMetadata:
    """The export metadata of a trained model (build.model_from_checkpoint: the weights the run
    selected, its EMA weights where it kept and selects them)."""
    norm = trained.checkpoint["normalization"]
    size, stored = int(norm["image_size"]), int(norm.get("stored_size") or norm["image_size"])
    return ExportMetadata(arch_of(trained.config), trained.config.model.stem, list(trained.classes), size,
                          norm.get("mean"), norm.get("std"), str(trained.path), preprocessing_included,
                          stored_size=stored if stored != size else None)


def random_images(n: int, image_size: int, seed: int = 0) -> np.ndarray:
    """n uint8 RGB noise images (N, S, S, 3): inputs for a parity check when no data is at hand."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or ExportError naming it and the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{purpose} needs the {module.split('.')[0]} package, which is not installed: "
                          f"{INSTALL_HINT}") from None


def _first_line(e: BaseException) -> str:
    """The gist of an exception from a library: its first line, cut to the first sentence if long."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(text) > 160 and ". " in text:
        text = text.split(". ")[0] + "."
    return text[:200]
