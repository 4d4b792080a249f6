"""Writing an exported file: `export_model(model, metadata, fmt, output)` for onnx (the dynamo
exporter), torchscript (a trace) or state_dict (torch.save or safetensors), each written atomically
with its metadata."""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
from torch import nn

from ..checkpoint import atomic_save, unwrap
from ..config import EXPORT_FORMATS as FORMATS
from ..config import MIN_OPSET
from ..errors import ExportError
from ..files import atomic_write, storage_error
from ..models import stem_of_conv1
from .metadata import METADATA_KEY, ExportMetadata, metadata_path
from .preprocessing import WithPreprocessing

SUFFIXES = {"onnx": (".onnx",), "torchscript": (".ts", ".pt", ".pth"), "state_dict": (".pt", ".pth", ".safetensors")}
# torch's ONNX exporter writes opset 18 natively (its op library targets 18); higher opsets go through
# onnxscript's version converter, lower ones fail (no down-conversion of Pad) and silently stay at 18.
DEFAULT_OPSET = MIN_OPSET
INSTALL_HINT = 'pip install "resnet-train[export]"'
EXAMPLE_BATCH = 2  # trace/export with N=2: torch.export specializes a batch of 1 as a constant


def export_model(model: nn.Module, metadata: ExportMetadata, fmt: str, output: str | Path, *,
                 include_preprocessing: bool = True, opset: int | None = None) -> Path:
    """Write `model` (a copy: fp32, CPU, eval mode) as `fmt` to `output`, atomically; returns the path.
    `include_preprocessing` applies to onnx and torchscript (a state dict is weights only), `opset`
    to onnx (default 18). The metadata written records whether preprocessing is included."""
    output = Path(output).expanduser()
    check_format(fmt, output)
    model = inference_copy(model)
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


def check_format(fmt: str, output: Path) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    if output.suffix.lower() not in SUFFIXES[fmt]:
        raise ExportError(f"{output}: {fmt} files must end in {' or '.join(SUFFIXES[fmt])} "
                          "(resnet-predict and load_exported tell formats apart by it)")


def inference_copy(model: nn.Module) -> nn.Module:
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
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")  # the dynamo exporter translates with onnxscript's op library
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
def torchscript_quietly() -> Iterator[None]:
    """torch 2.14 marks torch.jit as deprecated (a FutureWarning on every call); TorchScript is still
    the one torch format that runs without the model's Python code, which is why it is offered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


def _export_torchscript(module: nn.Module, example: torch.Tensor, output: Path, metadata: ExportMetadata) -> None:
    # Tracing, not scripting: ResNet.forward picks stages with getattr(self, f"layer{i}"), which
    # TorchScript cannot compile; the traced graph has no shape-dependent control flow, so any batch works.
    with torch.no_grad(), torchscript_quietly():
        traced = torch.jit.trace(module, example, check_trace=False)  # parity_check compares properly
        try:
            atomic_write(output, lambda f: torch.jit.save(traced, f, _extra_files=metadata.to_dict()))
        except RuntimeError as e:  # torch's zip writer reports a full disk as a RuntimeError
            raise storage_error(output, e) from None


def _export_state_dict(model: nn.Module, output: Path, metadata: ExportMetadata) -> None:
    tensors = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    if output.suffix.lower() == ".safetensors":
        safetensors_torch = require("safetensors.torch", "A .safetensors state dict")
        data = safetensors_torch.save(tensors, metadata=metadata.to_dict())
        atomic_write(output, lambda f: f.write(data))
    else:
        atomic_save(tensors, output)
    atomic_write(metadata_path(output), lambda f: f.write((metadata.to_json(indent=2) + "\n").encode()))


def check_installed(fmt: str, output: Path | None) -> None:
    """ExportError now, before the checkpoint and the parity images are read, when writing `fmt` (to
    `output`) or checking its parity needs a package that is not installed."""
    if fmt == "onnx":
        needed, purpose = ("onnx", "onnxscript", "onnxruntime"), "ONNX export"
    elif output is not None and output.suffix.lower() == ".safetensors":
        needed, purpose = ("safetensors.torch",), "A .safetensors state dict"
    else:
        return
    for module in needed:
        require(module, purpose)


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or ExportError naming it and the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{purpose} needs the {module.split('.')[0]} package, which is not installed: "
                          f"{INSTALL_HINT}") from None
