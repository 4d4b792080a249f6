"""resnet-predict: the top-k classes of image files, with a trained model's class names and preprocessing."""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from ..build import model_from_checkpoint
from ..config import PREDICT_KEYS, check_values
from ..data import BatchTransform, decode_resized
from ..device import describe, use_channels_last
from ..errors import ConfigError, DataError
from ..files import atomic_write, check_writable


@dataclass
class Prediction:
    path: Path
    classes: list[str]  # top-k, most probable first
    probabilities: list[float]


def collect_files(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every file named, and every (non-hidden) file under each folder named, in a stable order;
    plus (input, reason) for inputs that do not exist."""
    files, problems = [], []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            problems.append((item, "no such file or folder"))
    return files, problems


Scorer = Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, S, S, 3) images on the CPU -> float logits


@dataclass
class Predictor:
    score: Scorer
    classes: list[str]
    decode_size: int  # files are decoded to this size (CIFAR: 32, resized on the device as in training)
    exif_transpose: bool  # files turned upright first, as in training
    ran_as: str  # where and in what precision, for the user


@torch.inference_mode()
def predict_files(predictor: Predictor, files: list[Path], batch_size: int = 64,
                  topk: int = 3) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Top-k classes and probabilities for each readable file; (file, reason) for the others."""
    predictions, skipped, classes = [], [], predictor.classes
    for start in range(0, len(files), batch_size):
        images, paths = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(decode_resized(str(path), predictor.decode_size, predictor.exif_transpose).permute(1, 2, 0))
                paths.append(path)
            except DataError as e:
                skipped.append((str(path), str(e).split(": ", 1)[-1]))
        if not images:
            continue
        probabilities = predictor.score(torch.stack(images)).float().softmax(1)
        top = probabilities.topk(min(topk, len(classes)), dim=1)
        for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
            predictions.append(Prediction(path, [classes[i] for i in indices], values))
    return predictions, skipped


def checkpoint_predictor(cfg: DictConfig) -> Predictor:
    """A checkpoint's model on cfg.device, with the training preprocessing."""
    trained = model_from_checkpoint(cfg.checkpoint, cfg.device, cfg.precision)
    norm = trained.checkpoint["normalization"]
    transform = BatchTransform(norm["mean"], norm["std"], output_size=norm["image_size"],
                               channels_last=use_channels_last("auto", trained.device))

    def score(images: torch.Tensor) -> torch.Tensor:
        with trained.precision.autocast():
            return trained.model(transform(images.to(trained.device))).float()
    precision = trained.precision.name
    ran_as = (f"{trained.path} on {describe(trained.device)}, precision {precision}"
              + (" (autocast; precision=fp32 gives the answers of an exported file)" if trained.precision.dtype else ""))
    return Predictor(score, trained.classes, norm.get("stored_size", norm["image_size"]),
                     trained.exif_transpose, ran_as)


def exported_predictor(cfg: DictConfig) -> Predictor:
    """An exported file (resnet-export) with its own preprocessing; classes and size from its metadata."""
    from ..export import load_exported

    exported = load_exported(cfg.model_file)
    meta = exported.metadata
    return Predictor(exported, meta.classes, meta.input_size, meta.exif_transpose,
                     f"{cfg.model_file} on the CPU, precision fp32")


def write_csv(path: Path, predictions: list[Prediction], topk: int) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["file"] + [c for k in range(1, topk + 1) for c in (f"class_{k}", f"probability_{k}")])
    for p in predictions:
        writer.writerow([str(p.path)] + [v for c, pr in zip(p.classes, p.probabilities) for v in (c, f"{pr:.6f}")])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def predict(cfg: DictConfig) -> int:
    """Top-k predictions for files and folders; returns the exit status (1 if any input was unreadable)."""
    check_values(cfg, PREDICT_KEYS)
    inputs = list(cfg.inputs) if OmegaConf.is_list(cfg.inputs) else [str(cfg.inputs)]
    if (cfg.checkpoint is None) == (cfg.model_file is None):
        raise ConfigError("give checkpoint=<run dir or .pt> or model=<exported .onnx/.ts/.pt file>, one of them")
    if cfg.model_file is not None and (cfg.device not in ("auto", "cpu") or cfg.precision not in ("auto", "fp32")):
        raise ConfigError(f"device={cfg.device} precision={cfg.precision}: an exported model runs on the CPU in fp32 "
                          "here (onnxruntime or torch); device= and precision= apply to checkpoint=")
    check_writable(Path(cfg.output))
    files, skipped = collect_files(inputs)
    if not files:
        typed = f"[{','.join(inputs)}]"  # (as it is typed, not as a Python list)
        raise ConfigError(f"inputs={typed}: no files found" + "".join(f"; {i}: {why}" for i, why in skipped))
    predictor = checkpoint_predictor(cfg) if cfg.checkpoint is not None else exported_predictor(cfg)
    predictions, unreadable = predict_files(predictor, files, cfg.batch_size, cfg.topk)
    skipped += unreadable
    width = max((len(str(p.path)) for p in predictions), default=10)
    for p in predictions:
        print(f"{str(p.path):<{width}}  " + "  ".join(f"{c} {pr:.3f}" for c, pr in zip(p.classes, p.probabilities)))
    for item, reason in skipped:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    if not predictions:
        raise DataError(f"none of the {len(files)} file(s) could be read as an image; {cfg.output} not written")
    output = Path(cfg.output)
    write_csv(output, predictions, min(cfg.topk, len(predictor.classes)))
    print(f"\npredicted by {predictor.ran_as}")
    print(f"{len(predictions)} image(s) predicted, {len(skipped)} skipped; wrote {output}")
    return 1 if skipped or not predictions else 0
