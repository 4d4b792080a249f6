"""Class predictions for image files with a trained checkpoint (`resnet-predict`)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_write
from .data import BatchTransform, DataError, decode_resized
from .device import Precision


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


@torch.inference_mode()
def predict_files(model: nn.Module, files: list[Path], classes: list[str], transform: BatchTransform,
                  decode_size: int, precision: Precision, device: torch.device, batch_size: int = 64,
                  topk: int = 3) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Top-k classes and probabilities for each readable file; (file, reason) for the others."""
    model.eval()
    predictions, skipped = [], []
    for start in range(0, len(files), batch_size):
        images, paths = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(decode_resized(str(path), decode_size).permute(1, 2, 0))
                paths.append(path)
            except DataError as e:
                skipped.append((str(path), str(e).split(": ", 1)[-1]))
        if not images:
            continue
        batch = transform(torch.stack(images).to(device))
        with precision.autocast():
            probabilities = model(batch).float().softmax(1)
        top = probabilities.topk(min(topk, len(classes)), dim=1)
        for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
            predictions.append(Prediction(path, [classes[i] for i in indices], values))
    return predictions, skipped


def write_csv(path: Path, predictions: list[Prediction], topk: int) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["file"] + [c for k in range(1, topk + 1) for c in (f"class_{k}", f"probability_{k}")])
    for p in predictions:
        writer.writerow([str(p.path)] + [v for c, pr in zip(p.classes, p.probabilities) for v in (c, f"{pr:.6f}")])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
