"""resnet-eval: a checkpoint's loss, accuracy, per-class accuracy and confusion matrix on a split."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ..build import load_data, model_from_checkpoint
from ..checkpoint import check_classes, load_checkpoint
from ..composing import compose_train, train_defaults
from ..config import EVAL_KEYS, check_values, override_key, validate
from ..device import describe
from ..errors import ConfigError, DataError
from ..evaluation import evaluate
from ..files import check_writable, write_json
from ..runs import find_checkpoint, run_dir_of
from ..stored_config import apply_command_line

# Where and how the training run ran says nothing about where it is evaluated: these start from
# `auto` again (resolved on this machine) unless given on resnet-eval's command line.
MACHINE_KEYS = {"device": "auto", "precision": "auto", "channels_last": "auto", "compile": False}


def evaluate_checkpoint(cfg: DictConfig, training_overrides: list[str]) -> dict:
    """Evaluate `cfg.checkpoint` on `cfg.split`; `training_overrides` replace keys of the run's
    config (data location, device, batch size; not the model). Writes and returns the report."""
    check_values(cfg, EVAL_KEYS)
    checkpoint = find_checkpoint(cfg.checkpoint, "best")
    ckpt = load_checkpoint(checkpoint)
    run_cfg = apply_command_line({**ckpt["config"], **MACHINE_KEYS}, compose_train(training_overrides),
                                 train_defaults(), training_overrides, lambda key: not key.startswith("model"),
                                 "the model is fixed by the checkpoint")
    validate(run_cfg, of_stored_run=True)
    if any(override_key(o) == "ema.evaluate" for o in training_overrides):  # which weights: raw or EMA
        if run_cfg.ema.evaluate and "ema" not in ckpt:
            raise ConfigError(f"ema.evaluate=true: {checkpoint} kept no EMA weights (its run had ema.decay=0)")
        ckpt["config"]["ema"]["evaluate"] = bool(run_cfg.ema.evaluate)
    output = Path(cfg.output) if cfg.output else run_dir_of(checkpoint) / "eval.json"
    check_writable(output)
    trained = model_from_checkpoint(checkpoint, run_cfg.device, run_cfg.precision, run_cfg.channels_last, ckpt)
    norm = ckpt["normalization"]
    # Only the split evaluated is read (and train/ only to hold validation images out of it); the
    # classes are the model's.
    data = load_data(run_cfg, trained.device, mean=norm["mean"], std=norm["std"], classes=trained.classes,
                     splits=(cfg.split,))
    check_classes(trained.classes, data.classes, str(checkpoint))
    loader = data.test if cfg.split == "test" else data.val
    if loader is None:
        raise DataError(f"dataset {run_cfg.dataset.name} at {run_cfg.dataset.root} has no {cfg.split} split")
    result = evaluate(trained.model, loader, trained.precision, len(data.classes), tta=run_cfg.tta,
                      desc=cfg.split, progress=run_cfg.progress)

    weights = "EMA weights" if trained.uses_ema else "weights"
    split = f"{cfg.split} split" + (" = the test split (dataset.val_size=0)"
                                    if cfg.split == "val" and data.val is data.test else "")
    print(f"checkpoint {checkpoint} ({weights} of epoch {ckpt.get('state', {}).get('epoch', '?')}), "
          f"{split}: {result.images:,} images on {describe(trained.device)}, precision "
          f"{trained.precision.name}, tta={run_cfg.tta}")
    print(f"loss {result.loss:.4f}  accuracy {result.accuracy:.2%}"
          + (f"  top-5 accuracy {result.top5_accuracy:.2%}" if result.top5_accuracy is not None else "") + "\n")
    print(format_per_class(data.classes, result.per_class(data.classes), result.confusion))
    report = {"checkpoint": str(checkpoint), "split": cfg.split, "images": result.images, "tta": run_cfg.tta,
              "weights": "ema" if trained.uses_ema else "model", "loss": result.loss, "accuracy": result.accuracy,
              "top5_accuracy": result.top5_accuracy, "classes": data.classes,
              "macro_f1": result.macro_f1, "per_class_accuracy": dict(zip(data.classes, result.per_class_accuracy)),
              "per_class": result.per_class(data.classes),
              "confusion_matrix": result.confusion.tolist()}
    write_json(output, report)
    print(f"\nwrote {output}")
    return report


def format_per_class(classes: list[str], per_class: dict[str, dict], confusion: torch.Tensor) -> str:
    """Per-class accuracy (= recall), precision, F1 and images, and the confusion matrix (rows: true
    class, columns: predicted) as text."""
    width = max(5, *(len(c) for c in classes)) + 4
    cell = max(4, len(str(int(confusion.max()))) + 1)
    lines = [f"{'class':<{width}}  accuracy  precision        F1   images"]
    lines += [f"{f'{i:>2} {c}':<{width}}  {m['accuracy']:8.2%}  {m['precision']:9.2%}  {m['f1']:8.4f}  {m['support']:7,}"
              for i, (c, m) in enumerate((c, per_class[c]) for c in classes)]
    lines += ["(accuracy of a class = its recall: the share of its images predicted as it)"]
    lines += ["", "confusion matrix (rows: true class, columns: predicted class, numbered as above)"]
    lines += [" " * width + "".join(f"{j:>{cell}}" for j in range(len(classes)))]
    lines += [f"{f'{i:>2} {c}':<{width}}" + "".join(f"{int(n):>{cell}}" for n in row)
              for i, (c, row) in enumerate(zip(classes, confusion))]
    return "\n".join(lines)
