"""Composing the training config with Hydra, and Hydra's several-line errors as one line naming
the override (an unknown option lists the choices, an unknown key suggests the closest one)."""

from __future__ import annotations

import copy
import functools

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import CONFIG_MODULE, KEYS, OPEN_GROUPS, Key, unknown_key_message
from .errors import ConfigError


def compose_train(overrides: list[str]) -> DictConfig:
    """train.yaml with `overrides` (no sweep values), or ConfigError saying what is wrong in one line."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its search path is ours
            return compose(config_name="train", overrides=overrides)
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise hydra_error(e) from None


def train_defaults() -> DictConfig:
    """train.yaml without overrides: what a key is when the command line leaves it alone (composed
    once per process; every checkpoint read compares its config with it)."""
    return OmegaConf.create(copy.deepcopy(_composed_defaults()))


@functools.lru_cache(maxsize=1)
def _composed_defaults() -> dict:
    return OmegaConf.to_container(compose_train([]))


def hydra_error(e: Exception, program: str = "resnet-train", keys: dict[str, Key] = KEYS) -> ConfigError:
    """Hydra's multi-line composition errors as one line that names the override and the choices
    (an unknown key: `program` has no such key, and the closest of its `keys`)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(e).strip()
    if isinstance(e, OverrideParseException):
        reason = [line for line in e.message.splitlines() if line and not line.startswith(("Error parsing", "See "))]
        return ConfigError(f"{e.override}: cannot be parsed ({'; '.join(reason) or 'bad syntax'}); quote values "
                           "with special characters, e.g. 'key=\"a b\"'")
    missing = e.missing_cfg_file if isinstance(e, MissingConfigException) else None
    if missing and (e.options is not None or "/" in missing):
        group, _, option = missing.rpartition("/")
        options = e.options if e.options is not None else _options(group)  # (none given for one of a list)
        return ConfigError(f"{group}={option}: no such option; choose one of {', '.join(sorted(options))}")
    if text.startswith("Could not override '"):
        key = text.split("'")[1]
        value = text.split("use +", 1)[-1].split("=", 1)[-1].strip()
        return ConfigError(_no_such_key(key, value, program, keys))
    if text.startswith("Error merging override") and e.__cause__ is not None:
        cause = str(e.__cause__).strip().splitlines()[0]
        return ConfigError(f"{text.removeprefix('Error merging override ')}: {cause}")
    return ConfigError(text.split("\nConfig search path")[0].replace("\n", " ").strip())


def _options(group: str) -> list[str]:
    """The options of a config group (its YAML files)."""
    from importlib.resources import files

    folder = files(CONFIG_MODULE).joinpath(*group.split("/"))
    if not folder.is_dir():
        return []
    return [p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")]


def _no_such_key(key: str, value: str, program: str, keys: dict[str, Key]) -> str:
    if key.startswith("hydra.sweeper.params."):  # (its keys are dotted names Hydra cannot address)
        swept = key.removeprefix("hydra.sweeper.params.")
        return (f"{key}: a search space is given as a sweep of the key itself: '{swept}=tag(log, interval(0.001, "
                f"0.5))', 'label_smoothing=interval(0, 0.2)' or '{swept}=choice(a, b)' (Optuna's sweeper syntax)")
    group = key.split(".")[0]
    if keys is KEYS and group in OPEN_GROUPS and "." in key:
        return (f"{key}={value}: the chosen {group} has no argument {key.split('.', 1)[1]}; "
                f"add a new constructor argument with +{key}={value}")
    having = _datasets_with(key) if keys is KEYS and key.startswith("dataset.") else []
    if having:  # (keys only some datasets have)
        options = " or ".join(f"dataset={name}" for name in having)
        return f"{key}={value}: only {options} {'has' if len(having) == 1 else 'have'} {key}; add {options}"
    return unknown_key_message(key, value, program, keys)


def _datasets_with(key: str) -> list[str]:
    """The options of the dataset group that have `key` (dataset.<name>)."""
    from importlib.resources import files

    folder = files(CONFIG_MODULE) / "dataset"
    name = key.split(".", 1)[1]
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml")
                  and name in OmegaConf.create(entry.read_text()).keys())
