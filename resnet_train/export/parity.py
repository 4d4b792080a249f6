"""Does the exported file give the PyTorch model's answers? `parity_check` runs both on the same
images and raises `ParityError` beyond 1e-4 on any logit (or a different top-1 class); the
`ParityReport` is printed and saved beside the file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import BatchTransform
from ..errors import ExportError
from ..files import atomic_write
from .formats import inference_copy
from .loading import load_exported
from .metadata import ExportMetadata
from .preprocessing import as_image_batch

DEFAULT_ATOL = 1e-4


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

    def format(self, images: str = "") -> str:
        """The report in one line; `images` says where the images came from (default: how many)."""
        agreeing = round(self.top1_agreement * self.images)
        ties = f", {self.near_ties} near-tie(s)" if self.near_ties else ""
        tolerance = f"{self.atol:.0e}" + (f" + {self.rtol:.0e}·|logit|" if self.rtol else "")
        return (f"parity of {self.file} ({self.fmt}, {self.runtime}) with the PyTorch model on "
                f"{images or f'{self.images} images'}: "
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
    model = inference_copy(model)
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


def random_images(n: int, image_size: int, seed: int = 0) -> np.ndarray:
    """n uint8 RGB noise images (N, S, S, 3): inputs for a parity check when no data is at hand."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
