"""resnet-summary: a per-layer table of a model, as torchsummary prints it in the tutorials: output
shape, parameters, trainable or frozen, and multiply-accumulates per image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from ..build import build_model, model_from_checkpoint
from ..composing import compose_train
from ..config import arch_of, validate
from ..errors import ConfigError


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    trainable: bool
    macs: int


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call for one image (convolutions and linear layers)."""
    if isinstance(module, nn.Conv2d):
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        return output[0].numel() * per_output
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


@torch.no_grad()
def layer_rows(model: nn.Module, image_size: int) -> list[LayerRow]:
    """One row per call of each leaf module during a forward pass of one image."""
    rows: list[LayerRow] = []
    seen: set[int] = set()  # parameters are counted at a module's first call only

    def hook(name: str):
        def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
            own = list(module.parameters(recurse=False))
            params = 0 if id(module) in seen else sum(p.numel() for p in own)
            seen.add(id(module))
            trainable = any(p.requires_grad for p in own) if own else True
            rows.append(LayerRow(name, type(module).__name__, tuple(output.shape[1:]), params, trainable,
                                 layer_macs(module, output)))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if not list(m.children())]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows


def format_table(rows: list[LayerRow], model: nn.Module, image_size: int) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    width = max(len(r.name) for r in rows) + 2
    header = f"{'layer':<{width}}{'type':<18}{'output shape':<20}{'params':>12}  {'':9}{'MACs':>14}"
    lines = [header, "-" * (width + 80)]
    for r in rows:
        shape = "x".join(map(str, r.output_shape))
        status = "" if not r.params else ("trainable" if r.trainable else "frozen")
        lines.append(f"{r.name:<{width}}{r.kind:<18}{shape:<20}{r.params:>12,}  {status:<9}{r.macs:>14,}")
    macs = sum(r.macs for r in rows)
    lines += ["-" * (width + 80),
              f"input: 1x3x{image_size}x{image_size}",
              f"parameters: {total:,} ({trainable:,} trainable, {total - trainable:,} frozen)",
              f"multiply-accumulates per image: {macs:,} ({macs / 1e9:.2f} GMACs)",
              f"parameter memory: {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.1f} MiB"]
    return "\n".join(lines)


def summary_table(args: list[str]) -> str:
    """The table for a checkpoint (`checkpoint=PATH`) or for the model any resnet-train keys describe."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("checkpoint=")]
    if given:
        trained = model_from_checkpoint(given[-1], "cpu", "fp32", channels_last=False)
        cfg, model = trained.config, trained.model
    else:
        cfg = compose_train(args)
        cfg.model.pretrained = None  # the table needs the shapes, not the weights
        validate(cfg)
        model = build_model(cfg, _num_classes(cfg), torch.device("cpu"), load_pretrained=False)
    num_classes, image_size = model.fc.out_features, cfg.dataset.image_size
    header = (f"{arch_of(cfg)} ({cfg.model.stem} stem, {num_classes} classes, "
              f"model.freeze={cfg.model.freeze}), {image_size}x{image_size} input\n")
    return header + format_table(layer_rows(model, image_size), model, image_size)


def _num_classes(cfg: DictConfig) -> int:
    from ..data import scan_image_folder

    known = {"cifar10": 10, "cifar100": 100}.get(cfg.dataset.name)
    if cfg.dataset.name == "webdataset":  # (shards: the classes are configured, not found)
        known = len(cfg.dataset.classes) if cfg.dataset.classes else cfg.dataset.num_classes
        if not known:
            raise ConfigError("dataset=webdataset needs dataset.classes=[...] or dataset.num_classes=N")
    return known or len(scan_image_folder(Path(cfg.dataset.root).expanduser() / "train", log=lambda line: None).classes)
