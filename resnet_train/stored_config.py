"""A stored run's config meeting today's code and a new command line: `in_current_schema` reads a
checkpoint of an earlier version in today's schema; `apply_command_line` applies a resume's or
resnet-eval's command line to it, refusing changes to keys that may not change and naming both
values."""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from .composing import train_defaults
from .config import CHOSEN_GROUPS, LIST_GROUPS, is_int, leaves, override_key
from .errors import ConfigError

_ABSENT = object()


def in_current_schema(stored: dict) -> dict:
    """A checkpoint's config in today's schema, so that runs of earlier versions still evaluate,
    predict, export and resume: keys that moved are moved (`dataset.augment` became the `augment`
    group), keys added since take their defaults (every new feature's default is off)."""
    config = OmegaConf.to_container(OmegaConf.create(stored))  # (a copy)
    if "augment" not in config and isinstance(config.get("dataset", {}).get("augment"), dict):
        config["augment"] = config["dataset"].pop("augment")
    dataset = config.get("dataset")
    if isinstance(dataset, dict) and dataset.get("name") == "image_folder":
        dataset.setdefault("exif_transpose", False)  # (earlier versions decoded files as stored)
    defaults = OmegaConf.to_container(train_defaults())
    for key, default in defaults.items():
        if key == "hydra":
            continue
        if key not in config:
            config[key] = default
        elif isinstance(default, dict) and key not in CHOSEN_GROUPS + LIST_GROUPS:  # (a group's keys: its choice's)
            config[key] = {**default, **config[key]}
    return config


def apply_command_line(stored: dict, given: DictConfig, defaults: DictConfig, overrides: list[str],
                       may_change: Callable[[str], bool], why_not: str) -> DictConfig:
    """The stored config, with the keys the command line sets taken from `given` (train.yaml plus
    that command line). A key the command line sets to the value the run already has is fine; a
    different value is taken if `may_change(key)`, else refused, naming both values.

    The keys the command line sets are those named in an override (`optim.lr=...`, every key of a
    group for `optim=adam`) and those where `given` differs from `defaults` (what recipes such
    as `experiment=...` set). Values the run derived itself (computed mean/std, the resolved stem)
    match the defaults they came from."""
    cfg = OmegaConf.create(stored)
    have, want, base = leaves(cfg), leaves(given), leaves(defaults)
    named = [override_key(o) for o in overrides if not override_key(o).startswith("hydra") and "=" in o]
    touched = {k for k in want if k != "resume" and (want[k] != base.get(k, _ABSENT) or _under(k, named))}
    for key in sorted(touched):
        old, new = have.get(key, _ABSENT), want[key]
        if old == new or derived_from(key, new, old, given):
            continue
        if not may_change(key):
            raise ConfigError(f"{_shown_key(key)}: the run has {_shown_value(key, old)}, the command line gives "
                              f"{_shown_value(key, new)}; {why_not}")
        OmegaConf.update(cfg, key, new, merge=False, force_add=True)
    return cfg


def _shown_key(key: str) -> str:
    return key.removesuffix("._target_")  # model._target_ is what model=... chooses


def _shown_value(key: str, value: Any) -> str:
    if value is _ABSENT:
        return "nothing"
    return value.rsplit(".", 1)[-1] if key.endswith("._target_") else repr(value)


def _under(key: str, named: list[str]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in named)


def derived_from(key: str, given: Any, stored: Any, cfg: DictConfig) -> bool:
    """A stored value the run worked out from the given one: statistics computed for a null
    mean/std, the stem chosen for model.stem=auto, the epochs chosen for epochs=auto."""
    if key in ("dataset.mean", "dataset.std"):
        return given is None
    if key == "model.stem":
        return given == "auto" and stored in ("cifar", "imagenet")
    if key == "epochs":  # the number time_budget chose
        return given == "auto" and is_int(stored)
    return False
