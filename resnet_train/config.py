"""The config schema and its checks: every key a command understands, in one table per command,
and every value an enumerated key may take.

`KEYS` names each key of the composed training config with the test its value must pass and its
role. Everything else is derived from it, never listed again: `validate` (types, ranges, unknown
keys), `RESUMABLE` (keys a resumed run may change) and the HParams shown in TensorBoard.
`EVAL_KEYS`, `PREDICT_KEYS` and `EXPORT_KEYS` are resnet-eval's, resnet-predict's and
resnet-export's own keys (`check_values`), so their errors read like resnet-train's.
The enumerations below (datasets, architectures, precisions, crops, policies, ...) are the only
lists of their names: the modules that act on them import them from here.
`composing.py` composes train.yaml with Hydra; `stored_config.py` compares a resume's command line
with the run it continues.

The optimizer and scheduler groups are open: any constructor argument of the optimizer or schedule
can be set, so their extra keys are checked by building them (`build.check_buildable`), not here.
Nothing here imports torch (config errors answer in milliseconds).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

CONFIG_MODULE = "resnet_train.configs"

# The values an enumerated key may take (the first is the default where there is one)
CIFAR_DATASETS = ("cifar10", "cifar100")
IMAGE_SOURCES = ("image_folder", "manifest", "hf")  # images decoded from files or rows, kept in memory or streamed
DATASETS = (*CIFAR_DATASETS, *IMAGE_SOURCES, "webdataset")
CIFAR_IMAGE_SIZE = 32  # CIFAR is stored (and augmented) at 32px, whatever size the model sees
LOADERS = ("auto", "memory", "stream")
PATTERN_KEYS = ("dataset.train", "dataset.val", "dataset.test")  # shard patterns (dataset=webdataset)
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # torchvision's, with weights
CIFAR_ARCHS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")  # He et al.'s CIFAR family
STEMS = ("auto", "cifar", "imagenet")
FREEZE_POINTS = ("none", "backbone", "stem", "layer1", "layer2", "layer3", "layer4")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CROPS = ("pad", "resized", "none")
POLICIES = ("none", "trivialaugment", "randaugment", "autoaugment")
TTA_MODES = ("none", "flip", "flip_translate")
SAMPLERS = ("shuffle", "balanced")
EARLY_STOPPING_METRICS = ("val_accuracy", "val_loss")
EVAL_SPLITS = ("test", "val")
EXPORT_FORMATS = ("onnx", "torchscript", "state_dict")
MIN_OPSET = 18  # the dynamo ONNX exporter's oldest opset
LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")  # the logger group's options (several at once)
WANDB_MODES = ("online", "offline", "disabled")


# --------------------------------------------------------------------------------------------
# Value tests
# --------------------------------------------------------------------------------------------


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): inf and nan are never valid settings."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v: Any) -> bool:
    return is_int(v) and v >= 1


def non_negative_int(v: Any) -> bool:
    return is_int(v) and v >= 0


def boolean(v: Any) -> bool:
    return isinstance(v, bool)


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda v: v in choices


def either(choices: Iterable[Any]) -> str:
    """`a, b or c`, as an error names the choices (booleans as typed: true, false)."""
    names = [str(c).lower() if isinstance(c, bool) else str(c) for c in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> Callable[[Any], bool]:
    return lambda v: is_number(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)


def text(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def positive_number(v: Any) -> bool:
    return is_number(v) and v > 0


def optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or test(v)


def three_numbers(positive: bool) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) == 3 and all(is_number(x) and (x > 0 or not positive) for x in v)


def increasing_epochs(v: Any) -> bool:
    return isinstance(v, list) and all(is_number(x) and x > 0 for x in v) and v == sorted(v)


def area_range(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(is_number(x) for x in v) and 0 < v[0] <= v[1] <= 1


def duration_seconds(value: Any) -> float | None:
    """A time budget as seconds: a number of seconds, or text like 600s, 10m, 1h30m, 1.5h; None if
    it is none of these."""
    if is_number(value) and value > 0:
        return float(value)
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*",
                         str(value)) if isinstance(value, str) and value.strip() else None
    if match is None or not any(match.groups()):
        return None
    hours, minutes, seconds = (float(g or 0) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    return total if total > 0 else None


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One config key: what its value must be, and what role it plays."""

    test: Callable[[Any], bool]
    expected: str  # said in the error when the test fails
    resumable: bool = False  # may differ when resuming: where, how fast or how long the run goes
    hparam: str | None = None  # its name in TensorBoard's HPARAMS tab
    required: bool = True  # False: only checked where the chosen option has it (optimizer arguments)


def choice(choices: Iterable[Any], **role: Any) -> Key:
    """A key whose value is one of `choices`."""
    choices = tuple(choices)
    return Key(one_of(*choices), either(choices), **role)


def tracker_key(test: Callable[[Any], bool], expected: str) -> Key:
    """A key of one option of the logger group: there when that tracker is chosen, changeable on resume."""
    return Key(test, expected, resumable=True, required=False)


YES_NO = "true or false"
KEYS: dict[str, Key] = {
    # the run
    "epochs": Key(lambda v: positive_int(v) or v == "auto", "a positive integer, or auto with time_budget",
                  resumable=True, hparam="epochs"),
    "time_budget": Key(lambda v: v is None or duration_seconds(v) is not None, "null, seconds or a duration "
                       "like 10m or 1h30m"),
    "batch_size": Key(positive_int, "a positive integer", hparam="batch_size"),
    "eval_batch_size": Key(optional(positive_int), "a positive integer or null", resumable=True),
    "seed": Key(non_negative_int, "a non-negative integer", hparam="seed"),
    "label_smoothing": Key(number_in(0, 1), "a number in [0, 1)", hparam="label_smoothing"),
    "loss.class_weights": Key(lambda v: v in (None, "balanced") or (isinstance(v, list) and len(v) >= 2 and all(
        is_number(x) and x > 0 for x in v)), "null, balanced or a list of positive numbers, one per class",
        hparam="class_weights"),
    "sampler": choice(SAMPLERS, hparam="sampler"),
    "mix.mixup_alpha": Key(number_in(0, math.inf), "a number >= 0 (0: off)", hparam="mixup_alpha"),
    "mix.cutmix_alpha": Key(number_in(0, math.inf), "a number >= 0 (0: off)", hparam="cutmix_alpha"),
    "mix.prob": Key(number_in(0, 1, high_open=False), "a number in [0, 1]"),
    "mix.switch_prob": Key(number_in(0, 1, high_open=False), "a number in [0, 1]"),
    "ema.decay": Key(number_in(0, 1), "a number in [0, 1) (0: off)", hparam="ema_decay"),
    "ema.warmup": Key(boolean, YES_NO),
    "ema.evaluate": Key(boolean, YES_NO),
    "tta": choice(TTA_MODES, hparam="tta"),
    "grad_clip_norm": Key(optional(positive_number), "null or a positive number", hparam="grad_clip_norm"),
    "accumulate_grad_batches": Key(positive_int, "a positive integer", hparam="accumulate_grad_batches"),
    "early_stopping.patience": Key(non_negative_int, "a non-negative integer (0: off)"),
    "early_stopping.min_epochs": Key(non_negative_int, "a non-negative integer"),
    "early_stopping.metric": choice(EARLY_STOPPING_METRICS),
    "early_stopping.min_delta": Key(number_in(0, math.inf), "a number >= 0"),
    "resume": Key(optional(lambda v: isinstance(v, str) and v != ""), "a checkpoint, a run dir, latest or auto"),
    # where and how fast it runs
    "device": Key(lambda v: isinstance(v, str), "auto, cpu, cuda, cuda:N or mps", resumable=True),
    "precision": choice(PRECISIONS, resumable=True),
    "channels_last": choice(("auto", True, False), resumable=True),
    "compile": Key(boolean, YES_NO, resumable=True),
    "deterministic": Key(boolean, YES_NO, resumable=True),
    "num_workers": Key(non_negative_int, "a non-negative integer", resumable=True),
    "progress": Key(optional(boolean), "true, false or null", resumable=True),
    "collective_timeout": Key(lambda v: duration_seconds(v) is not None, "seconds or a duration like 10m",
                              resumable=True),
    "log_every_n_steps": Key(positive_int, "a positive integer", resumable=True),
    "checkpoint.every_n_steps": Key(non_negative_int, "a non-negative integer", resumable=True),
    "tensorboard.images": Key(boolean, YES_NO, resumable=True),
    "tensorboard.confusion_every_n_epochs": Key(non_negative_int, "a non-negative integer", resumable=True),
    "tensorboard.histograms_every_n_epochs": Key(non_negative_int, "a non-negative integer", resumable=True),
    "tensorboard.mistakes": Key(non_negative_int, "a non-negative integer", resumable=True),
    # trackers (the logger group, several at once: only the chosen ones' keys are there)
    "logger.tensorboard": tracker_key(lambda v: v == {}, "no keys (TensorBoard's settings are tensorboard.*)"),
    "logger.csv": tracker_key(lambda v: v == {}, "no keys (the file is <run dir>/metrics.csv)"),
    "logger.mlflow.tracking_uri": tracker_key(optional(text), "null or a tracking URI, e.g. http://127.0.0.1:5000"),
    "logger.mlflow.experiment": tracker_key(text, "an experiment name"),
    "logger.mlflow.log_checkpoint": tracker_key(boolean, YES_NO),
    "logger.wandb.project": tracker_key(text, "a project name"),
    "logger.wandb.entity": tracker_key(optional(text), "null or a W&B entity (a user or team)"),
    "logger.wandb.mode": tracker_key(one_of(*WANDB_MODES), either(WANDB_MODES)),
    "logger.wandb.log_checkpoint": tracker_key(boolean, YES_NO),
    # the model
    "model._target_": Key(lambda v: isinstance(v, str), "a model factory", hparam="model"),
    "model.stem": choice(STEMS, hparam="stem"),
    "model.dropout": Key(number_in(0, 1), "a number in [0, 1)", hparam="dropout"),
    "model.zero_init_residual": Key(boolean, YES_NO),
    "model.pretrained": Key(optional(lambda v: isinstance(v, str) and v != ""), "null, imagenet or a file path"),
    "model.freeze": Key(one_of(*FREEZE_POINTS), "none, backbone, stem or layer1..layer4"),
    "model.sync_bn": Key(boolean, YES_NO),
    # the data
    "dataset.name": choice(DATASETS, hparam="dataset"),
    "dataset.root": Key(text, "a directory path", resumable=True, required=False),
    "dataset.download": Key(boolean, YES_NO, resumable=True),
    "dataset.image_size": Key(lambda v: is_int(v) and v >= 8, "an integer >= 8 (pixels)", hparam="image_size"),
    "dataset.normalize": Key(boolean, YES_NO),
    "dataset.mean": Key(optional(three_numbers(positive=False)), "null or a list of 3 numbers"),
    "dataset.std": Key(optional(three_numbers(positive=True)), "null or a list of 3 positive numbers"),
    "dataset.val_size": Key(lambda v: non_negative_int(v) or (isinstance(v, float) and 0 < v < 1),
                            "a count >= 0 or a fraction between 0 and 1"),
    "dataset.split_seed": Key(non_negative_int, "a non-negative integer"),
    "dataset.loader": choice(LOADERS, resumable=True),
    "dataset.exif_transpose": Key(boolean, YES_NO, required=False),  # (image sources only)
    "dataset.classes": Key(optional(lambda v: isinstance(v, list) and len(v) >= 2 and all(text(str(x)) for x in v)
                                    and len(set(map(str, v))) == len(v)),
                           "null or a list of 2 or more distinct class names", required=False),
    # (manifests: files; shards: brace patterns)
    "dataset.train": Key(optional(text), "null, a manifest (.csv, .tsv or .jsonl) or shards: a brace pattern like "
                         "'shards/train-{000000..000099}.tar'", resumable=True, required=False),
    "dataset.val": Key(optional(text), "null, a manifest or shards", resumable=True, required=False),
    "dataset.test": Key(optional(text), "null, a manifest or shards", resumable=True, required=False),
    # (manifests and Hugging Face datasets only)
    "dataset.path_column": Key(text, "a column name", required=False),
    "dataset.label_column": Key(text, "a column name", required=False),
    "dataset.split_column": Key(text, "a column name", required=False),
    "dataset.path": Key(optional(text), "a dataset folder (save_to_disk, parquet or arrow files) or a Hub name",
                        resumable=True, required=False),
    "dataset.image_column": Key(text, "a column name", required=False),
    # (webdataset shards only)
    "dataset.image_key": Key(lambda v: text(v) or (isinstance(v, list) and bool(v) and all(text(x) for x in v)),
                             "an extension or a list of them, e.g. [jpg, png]", required=False),
    "dataset.label_key": Key(text, "an extension, e.g. cls", required=False),
    "dataset.num_classes": Key(optional(lambda v: is_int(v) and v >= 2), "null or an integer >= 2", required=False),
    "dataset.shuffle_buffer": Key(positive_int, "a positive integer (samples)", required=False),
    # augmentation (training batches only)
    "augment.crop": choice(CROPS),
    "augment.crop_padding": Key(non_negative_int, "a non-negative integer (pixels)"),
    "augment.crop_scale": Key(area_range, "[min, max] shares of the image area, 0 < min <= max <= 1"),
    "augment.hflip": Key(boolean, YES_NO),
    "augment.policy": choice(POLICIES, hparam="augment"),
    "augment.num_ops": Key(lambda v: is_int(v) and 1 <= v <= 14, "an integer in 1..14"),
    "augment.magnitude": Key(lambda v: is_int(v) and 0 <= v <= 30, "an integer in 0..30 (a magnitude bin)"),
    "augment.color_jitter": Key(number_in(0, 1), "a number in [0, 1) (0: off)"),
    "augment.cutout": Key(non_negative_int, "a non-negative integer (pixels; 0: off)"),
    "augment.erasing": Key(number_in(0, 1, high_open=False), "a probability in [0, 1] (0: off)"),
    # the optimizer (open group: these are checked where the chosen optimizer has them)
    "optim._target_": Key(lambda v: isinstance(v, str), "an optimizer class", hparam="optim"),
    "optim.lr": Key(positive_number, "a positive number", hparam="optim.lr"),
    "optim.weight_decay": Key(number_in(0, math.inf), "a number >= 0", hparam="optim.weight_decay", required=False),
    "optim.momentum": Key(number_in(0, 1), "a number in [0, 1)", hparam="optim.momentum", required=False),
    "optim.decay_norm_and_bias": Key(boolean, YES_NO, required=False),
    "optim.backbone_lr_scale": Key(positive_number, "a positive number", required=False),
    # the schedule (open group)
    "scheduler._target_": Key(lambda v: isinstance(v, str), "a schedule", hparam="scheduler"),
    "scheduler.warmup_epochs": Key(number_in(0, math.inf), "a number of epochs >= 0", hparam="warmup_epochs"),
    "scheduler.milestones": Key(increasing_epochs, "an increasing list of epochs", required=False),
    "scheduler.step_size": Key(positive_number, "a positive number of epochs", required=False),
    "scheduler.gamma": Key(number_in(0, 1, low_open=True, high_open=False), "a number in (0, 1]", required=False),
    "scheduler.factor": Key(number_in(0, 1, low_open=True), "a number in (0, 1)", required=False),
    "scheduler.patience": Key(non_negative_int, "a non-negative integer", required=False),
    "scheduler.pct_start": Key(number_in(0, 1, low_open=True), "a number in (0, 1)", required=False),
}
CHOSEN_GROUPS = ("model", "dataset", "optim", "scheduler")  # keys differ between options
LIST_GROUPS = ("logger",)  # several options at once: logger=[tensorboard,mlflow]
CONFIG_GROUPS = (*CHOSEN_GROUPS, "augment", "experiment", "hparams_search", *LIST_GROUPS)  # the folders of configs/
OPEN_GROUPS = ("optim", "scheduler")  # any constructor argument may be added (+optim.betas=...)
RESUMABLE = frozenset(k for k, v in KEYS.items() if v.resumable)


def paths(v: Any) -> bool:
    """A file or folder, or a list of them."""
    return text(v) or (isinstance(v, list) and bool(v) and all(text(x) for x in v))


# The other commands' own keys. (resnet-eval's other KEY=VALUEs are keys of the training config.)
A_CHECKPOINT = "a checkpoint file or a run dir"
EVAL_KEYS: dict[str, Key] = {
    "checkpoint": Key(text, A_CHECKPOINT),
    "split": choice(EVAL_SPLITS),
    "output": Key(optional(text), "null or a file path"),
}
PREDICT_KEYS: dict[str, Key] = {
    "checkpoint": Key(optional(text), f"null, {A_CHECKPOINT}"),
    "model_file": Key(optional(text), "null or an exported model file"),
    "inputs": Key(paths, "a file or folder, or a list of them: inputs=[cat.png,photos/]"),
    "topk": Key(positive_int, "a positive integer"),
    "batch_size": Key(positive_int, "a positive integer"),
    "output": Key(text, "a file path"),
    "device": KEYS["device"],
    "precision": KEYS["precision"],
}
EXPORT_KEYS: dict[str, Key] = {
    "checkpoint": Key(text, A_CHECKPOINT),
    "format": choice(EXPORT_FORMATS),
    "output": Key(optional(text), "null or a file path"),
    "include_preprocessing": Key(boolean, YES_NO),
    "opset": Key(optional(lambda v: is_int(v) and v >= MIN_OPSET), f"null or an integer >= {MIN_OPSET}"),
    "parity_images": Key(positive_int, "a positive integer"),
    "atol": Key(number_in(0, math.inf), "a number >= 0"),
    "rtol": Key(number_in(0, math.inf), "a number >= 0"),
}

_ABSENT = object()


def _expected(group: DictConfig, name: str) -> str:
    """What argument `name` of the group's target takes, by its default (true or false for a flag)."""
    import inspect

    from hydra.utils import get_class

    try:  # (imports the target, torch with it: only when a value is already wrong)
        default = inspect.signature(get_class(group._target_)).parameters[name].default
    except Exception:
        default = None
    if isinstance(default, bool):
        return f"true or false ({group._target_.rsplit('.', 1)[-1]}'s {name} is a flag)"
    return "a finite number"


def validate(cfg: DictConfig, of_stored_run: bool = False) -> None:
    """Raise ConfigError naming the first key that is unknown, missing, mistyped or out of range.
    `of_stored_run`: a resumed or evaluated run: its model.pretrained file is not needed, and its
    stored config (validated once merged) may hold what the command line leaves out (time_budget)."""
    for path, value in leaves(cfg).items():
        if path not in KEYS and path.split(".")[0] not in OPEN_GROUPS:
            raise ConfigError(unknown_key_message(path, value))
    check_values(cfg, KEYS)
    for group in OPEN_GROUPS:  # arguments without a rule still must be numbers, booleans or lists of them
        for name, value in cfg[group].items():
            items = value if OmegaConf.is_list(value) else [value]
            if not name.startswith("_") and not all(is_number(v) or isinstance(v, bool) for v in items):
                raise ConfigError(f"{group}.{name}={value!r} is invalid: expected {_expected(cfg[group], name)}")
    check_model_options(cfg, of_stored_run)
    check_augment_sizes(cfg)
    check_class_balance(cfg)
    if cfg.epochs == "auto" and cfg.time_budget is None and not of_stored_run:
        raise ConfigError("epochs=auto needs time_budget: time_budget=10m epochs=auto trains as many epochs as "
                          "fit in 10 minutes")


def check_values(cfg: DictConfig, keys: dict[str, Key]) -> None:
    """Raise ConfigError naming the first key of `keys` that is missing or whose value fails its test."""
    for path, key in keys.items():
        try:
            value = OmegaConf.select(cfg, path, default=_ABSENT, throw_on_missing=True)
        except OmegaConfBaseException:
            raise ConfigError(f"{path} is required (e.g. {path}=...)") from None
        if value is _ABSENT:
            if key.required:
                raise ConfigError(f"{path} is required (e.g. {path}=...)")
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not key.test(value):
            shown = "null" if value is None else repr(value)  # (as it is typed on the command line)
            raise ConfigError(f"{path}={shown} is invalid: expected {key.expected}")


def leaves(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a config as {dotted.path: value} (lists are leaves), without hydra's node."""
    node = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    out = {}
    for name, value in node.items():
        path = f"{prefix}{name}"
        if path == "hydra":
            continue
        if isinstance(value, dict) and value:
            out.update(leaves(value, path + "."))
        else:
            out[path] = value
    return out


def unknown_key_message(path: str, value: Any, program: str = "resnet-train", keys: Iterable[str] = KEYS) -> str:
    close = difflib.get_close_matches(path, list(keys), n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; `{program} --help` lists the keys"
    return f"{path}={value}: {program} has no key {path}{hint}"


def arch_of(cfg: DictConfig | dict) -> str:
    """The model's architecture name, e.g. resnet20 (from its factory's `_target_`)."""
    return cfg["model"]["_target_"].rsplit(".", 1)[-1]


def check_model_options(cfg: DictConfig, of_stored_run: bool = False) -> None:
    """What the model's family allows: ImageNet weights and a layer4 exist for resnet18..152 only."""
    arch = arch_of(cfg)
    if arch in CIFAR_ARCHS and cfg.model.freeze == "layer4":
        raise ConfigError(f"model.freeze=layer4: {arch} has three stages (layer1..layer3)")
    pretrained = cfg.model.pretrained
    if pretrained == "imagenet" and arch not in IMAGENET_ARCHS:
        raise ConfigError(f"model.pretrained=imagenet: torchvision has ImageNet weights for resnet18..152, not {arch}")
    missing = pretrained not in (None, "imagenet") and not Path(pretrained).expanduser().is_file()
    if missing and not of_stored_run:
        raise ConfigError(f"model.pretrained={pretrained}: no such file (expected imagenet or a state dict file)")
    if pretrained == "imagenet" and cfg.model.stem == "cifar":
        raise ConfigError("model.pretrained=imagenet was trained with the imagenet stem (7x7 conv + max-pool); "
                          "leave model.stem=auto or set model.stem=imagenet")


def check_class_balance(cfg: DictConfig) -> None:
    """Balancing by class counts needs them before training: streamed shards give none (and are read
    in order, not drawn by index)."""
    if cfg.dataset.name != "webdataset":
        return
    if cfg.sampler == "balanced":
        raise ConfigError("sampler=balanced: shards are read in order, not drawn by index; weigh the classes with "
                          "loss.class_weights=[...] instead")
    if cfg.loss.class_weights == "balanced":
        raise ConfigError("loss.class_weights=balanced needs each class's count, which shards do not give before "
                          "training: give the weights, loss.class_weights=[...]")


def check_class_weights(cfg: DictConfig, num_classes: int) -> None:
    """A list of class weights has one weight per class (known once the data is read)."""
    given = cfg.loss.class_weights
    if isinstance(given, (list, tuple)) or OmegaConf.is_list(given):
        if len(given) != num_classes:
            raise ConfigError(f"loss.class_weights has {len(given)} weights for {num_classes} classes")


def stored_image_size(dataset: str, image_size: int) -> int:
    """The size images are decoded to, kept and augmented at: CIFAR's own 32px (resized per batch
    to the size the model sees), a folder's images at `image_size`."""
    return CIFAR_IMAGE_SIZE if dataset in CIFAR_DATASETS else image_size


def check_augment_sizes(cfg: DictConfig) -> None:
    """Crop padding and the Cutout square against the images they apply to (at their stored size)."""
    stored = stored_image_size(cfg.dataset.name, cfg.dataset.image_size)
    for key in ("crop_padding", "cutout"):
        if cfg.augment[key] > stored:
            raise ConfigError(f"augment.{key}={cfg.augment[key]} is larger than the {stored}px images it applies to")


def stem_of(cfg: DictConfig) -> str:
    """model.stem with auto resolved: the stem of pretrained weights (imagenet for torchvision's;
    `auto` is kept for a weights file, whose first convolution decides when it is loaded), else
    cifar for images up to 64px and imagenet above."""
    if cfg.model.stem != "auto":
        return cfg.model.stem
    if cfg.model.pretrained == "imagenet":
        return "imagenet"
    if cfg.model.pretrained:
        return "auto"
    return "cifar" if cfg.dataset.image_size <= 64 else "imagenet"


def override_key(arg: str) -> str:
    """The config key a command-line override sets: `+optim.lr=0.1` -> `optim.lr`."""
    return arg.split("=", 1)[0].lstrip("+~")


def hparam_values(cfg: DictConfig, precision: str, swept: Iterable[str] = ()) -> dict[str, Any]:
    """The HPARAMS tab's columns: every key the schema marks as a hyperparameter (`_target_`s shown
    by their class or function name), the swept keys first -- what a sweep compares."""
    flat = leaves(cfg)
    values = {key.hparam: flat[path] for path, key in KEYS.items() if key.hparam and path in flat}
    values["precision"] = precision
    for name in ("model", "optim", "scheduler"):
        values[name] = str(values[name]).rsplit(".", 1)[-1]
    first = {}
    for key in swept:  # a group (optim=adam) has a column of its own name; a key, its hparam name or path
        name = key if key in values else (KEYS[key].hparam if key in KEYS else None) or key
        if name in values or key in flat:
            first[name] = values.get(name, flat.get(key))
    values = {**first, **{k: v for k, v in values.items() if k not in first}}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
