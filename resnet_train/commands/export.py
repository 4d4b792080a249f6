"""resnet-export: a trained model as an ONNX, TorchScript or state-dict file, checked against the
checkpoint on the run's own images (or generated ones when its data is not at hand)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from .. import export
from ..build import TrainedModel, load_data, model_from_checkpoint
from ..config import EXPORT_KEYS, check_values
from ..errors import ConfigError, ExportError, UserError
from ..files import check_writable, storage_error
from ..runs import run_dir_of

DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts", "state_dict": "state_dict.pt"}


def export_command(cfg: DictConfig) -> Path:
    """Export `cfg.checkpoint` as `cfg.format`, run the parity check, write its report beside the file."""
    check_values(cfg, EXPORT_KEYS)
    if cfg.output:  # (its suffix, before the checkpoint is read)
        _check_suffix(cfg.format, Path(cfg.output).expanduser(), f"output={cfg.output}")
    export.check_installed(cfg.format, Path(cfg.output) if cfg.output else None)
    trained = model_from_checkpoint(cfg.checkpoint, "cpu", "fp32", channels_last=False)
    output = Path(cfg.output).expanduser() if cfg.output else run_dir_of(trained.path) / DEFAULT_NAMES[cfg.format]
    check_writable(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(output, e) from None
    metadata = export.metadata_of(trained, cfg.include_preprocessing and cfg.format != "state_dict")
    images, source = parity_images(trained, cfg.parity_images)
    # Exported beside the output under a temporary name and moved into place only once it passed:
    # a failing export never replaces a good file, and a failed one is kept apart for a look.
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    except OSError as e:
        raise storage_error(output, e) from None
    try:
        staged = export.export_model(trained.model, metadata, cfg.format, staging / output.name,
                                     include_preprocessing=cfg.include_preprocessing, opset=cfg.opset)
        try:
            report = export.parity_check(staged, cfg.format, trained.model, images, metadata, cfg.atol, cfg.rtol)
        except export.ParityError as e:
            failed = _move_export(staged, output.with_name(f"{output.stem}.failed{output.suffix}"), cfg.format)
            report = replace(e.report, file=str(failed))
            report.save(export.parity_report_path(failed))
            kept = f"; {output} was left as it was" if output.exists() else ""
            if report.top1_agreement == 1 and report.max_abs_diff <= 1e-5 * report.max_abs_logit:
                atol = 10 ** math.ceil(math.log10(2 * report.max_abs_diff))
                kept += (f" (fp32 rounding, small next to logits up to {report.max_abs_logit:.3g}: "
                         f"atol={atol:g} accepts it)")
            raise export.ParityError(report, kept) from None
        path = _move_export(staged, output, cfg.format)
        report = replace(report, file=str(path))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.save(export.parity_report_path(path))
    weights = "EMA weights" if trained.uses_ema else "weights"
    print(f"exported the {weights} of {trained.path} ({metadata.arch}, {len(metadata.classes)} classes, "
          f"{metadata.image_size}px) as {cfg.format}: {path}")
    print(f"input: {metadata.input_description()}")
    print(report.format(source))
    print(f"wrote {path}, {export.parity_report_path(path)}"
          + (f", {export.metadata_path(path)}" if cfg.format == "state_dict" else ""))
    return path


def _move_export(staged: Path, destination: Path, fmt: str) -> Path:
    """Move an exported file (and a state dict's metadata beside it) to `destination`."""
    if fmt == "state_dict":
        os.replace(export.metadata_path(staged), export.metadata_path(destination))
    os.replace(staged, destination)
    return destination


def _check_suffix(fmt: str, output: Path, shown: str) -> None:
    """The output's suffix fits the format, or one line naming it as typed (`shown`)."""
    try:
        export.check_format(fmt, output)
    except ExportError as e:
        raise ConfigError(str(e).replace(str(output), shown, 1)) from None


def parity_images(trained: TrainedModel, n: int) -> tuple[np.ndarray, str]:
    """Up to `n` uint8 (N, S, S, 3) images of the run's test (else validation) split at the size the
    run stored them (the exported model's input), and what they are; generated noise images when the
    run's data cannot be read."""
    norm = trained.checkpoint["normalization"]
    size = int(norm.get("stored_size") or norm["image_size"])
    try:  # (streamed: only the n files are decoded, not the whole folder)
        data = load_data(trained.config, torch.device("cpu"), loader="stream", mean=norm["mean"], std=norm["std"],
                         classes=trained.classes, splits=("test", "val"))
    except UserError:
        return export.random_images(n, size), f"{n} generated images (the run's data is not at hand)"
    for name, loader in (("test", data.test), ("validation", data.val)):
        if loader is None:
            continue
        if getattr(loader, "images", None) is not None:
            images = loader.images[:n]
        else:  # streamed (files, rows or shards): decode the first images
            images = loader.first_images(n)
        return images.contiguous().numpy(), f"{len(images)} {name} images of the run"
    return export.random_images(n, size), f"{n} generated images (the run has no test or validation split)"
