"""Opening an exported file for prediction: `load_exported(path)` gives an `ExportedModel` that
takes uint8 images and returns logits, run by onnxruntime, torch.jit or a fresh model loading the
state dict (torchvision's where one exists)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..checkpoint import check_model_state
from ..errors import CheckpointError, ExportError, first_line
from ..models import ARCHITECTURES
from .formats import FORMATS, require, torchscript_quietly
from .metadata import METADATA_KEY, ExportMetadata, metadata_path, read_metadata, torchvision_model
from .preprocessing import as_image_batch, preprocess


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
    ort = require("onnxruntime", "Running an ONNX model")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a bad file is reported by our exception
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...), all bare Exceptions
        raise ExportError(f"{path} is not a readable ONNX model (truncated, corrupt or not ONNX): "
                          f"{first_line(e)}") from None
    metadata = read_metadata(session.get_modelmeta().custom_metadata_map, path)
    input_name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: np.ascontiguousarray(batch.numpy())})[0])
    return ExportedModel(path, "onnx", metadata, run, f"onnxruntime {ort.__version__} (CPUExecutionProvider)")


def _open_torchscript(path: Path) -> ExportedModel:
    extra_files = {METADATA_KEY: ""}
    try:
        with torchscript_quietly():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    except Exception as e:  # RuntimeError for most damage, but zip and pickle errors pass through too
        raise ExportError(f"{path} is not a readable TorchScript model (truncated, corrupt or another kind of "
                          f"file): {first_line(e)}") from None
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
        raise ExportError(f"{sidecar}: unreadable resnet-train metadata ({first_line(e)})") from None
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
            state = require("safetensors.torch", "A .safetensors state dict").load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ExportError:
        raise
    except Exception as e:  # torch.load and safetensors raise many kinds for a damaged file
        raise ExportError(f"{path} is not a readable state dict file: {first_line(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path} does not hold a state dict (names -> tensors)")
    return state


def _torch_runner(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(batch)
    return run
