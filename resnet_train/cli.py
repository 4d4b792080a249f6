"""Command-line entry points: Hydra config → checked values → objects → `engine.fit` / `engine.evaluate`.

The only module that knows Hydra. `train(cfg)` and `evaluate_checkpoint(cfg)` take a composed
config; `train_main` and `eval_main` are the console scripts, which prepare the command line
(`resume=`, resnet-eval's training-config overrides) before Hydra parses it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# torch, torchvision and tensorboard take seconds to import; the functions that need them import
# them (and the modules built on them) when called, so `--help` and config errors answer at once.
if TYPE_CHECKING:
    import torch

    from .data import Data
    from .device import Precision

CONFIG_PATH = "pkg://resnet_train.configs"
log = logging.getLogger("resnet_train")


class ConfigError(ValueError):
    """A config value is of the wrong type or out of range."""


# --------------------------------------------------------------------------------------------
# Checking the config: every bad value fails here, before any data is read
# --------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# key → (test, what the value must be)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "eval_batch_size": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or null"),
    "device": (lambda v: isinstance(v, str), "auto, cpu, cuda, cuda:N or mps"),
    "channels_last": (lambda v: isinstance(v, bool), "true or false"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "seed": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "num_workers": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "label_smoothing": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "log_every_n_steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "progress": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "checkpoint.every_n_steps": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "tensorboard.images": (lambda v: isinstance(v, bool), "true or false"),
    "tensorboard.confusion_every_n_epochs": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "tensorboard.histograms_every_n_epochs": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "tensorboard.mistakes": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "resume": (lambda v: v is None or isinstance(v, str), "a checkpoint, a run dir or latest"),
    "model.stem": (lambda v: v in ("auto", "cifar", "imagenet"), "auto, cifar or imagenet"),
    "model.dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.zero_init_residual": (lambda v: isinstance(v, bool), "true or false"),
    "model.pretrained": (lambda v: v is None or (isinstance(v, str) and v != ""), "null, imagenet or a file path"),
    "model.sync_bn": (lambda v: isinstance(v, bool), "true or false"),
    "model.freeze": (lambda v: v in ("none", "backbone", "stem", "layer1", "layer2", "layer3", "layer4"),
                     "none, backbone, stem or layer1..layer4"),
    "optim.backbone_lr_scale": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "dataset.root": (lambda v: isinstance(v, str) and v != "", "a directory path"),
    "dataset.download": (lambda v: isinstance(v, bool), "true or false"),
    "dataset.image_size": (lambda v: _is_int(v) and v >= 8, "an integer >= 8 (pixels)"),
    "dataset.normalize": (lambda v: isinstance(v, bool), "true or false"),
    "dataset.mean": (lambda v: v is None or (len(v) == 3 and all(_is_number(x) for x in v)),
                     "null or a list of 3 numbers"),
    "dataset.std": (lambda v: v is None or (len(v) == 3 and all(_is_number(x) and x > 0 for x in v)),
                    "null or a list of 3 positive numbers"),
    "dataset.augment.crop_padding": (lambda v: _is_int(v) and v >= 0, "a non-negative integer (pixels)"),
    "dataset.augment.hflip": (lambda v: isinstance(v, bool), "true or false"),
    "dataset.val_size": (lambda v: (_is_int(v) and v >= 0) or (isinstance(v, float) and 0 < v < 1),
                         "a count >= 0 or a fraction between 0 and 1"),
    "dataset.split_seed": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "dataset.loader": (lambda v: v in ("auto", "memory", "stream"), "auto, memory or stream"),
    "optim.lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "optim.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "optim.momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.decay_norm_and_bias": (lambda v: isinstance(v, bool), "true or false"),
    "scheduler.warmup_epochs": (lambda v: _is_number(v) and v >= 0, "a number of epochs >= 0"),
    "scheduler.milestones": (lambda v: all(_is_number(x) and x > 0 for x in v) and list(v) == sorted(v),
                             "an increasing list of epochs"),
    "scheduler.step_size": (lambda v: _is_number(v) and v > 0, "a positive number of epochs"),
    "scheduler.gamma": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "scheduler.factor": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "scheduler.patience": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "scheduler.pct_start": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
}


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value is missing, mistyped or out of range."""
    for key, (test, expected) in RULES.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        except OmegaConfBaseException:
            raise ConfigError(f"{key} is required (e.g. {key}=...)") from None
        if value is _ABSENT:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        try:
            ok = test(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")
    check_model_options(cfg)
    # Optimizer and scheduler arguments without a rule still must be numbers, booleans or lists of them.
    for group in ("optim", "scheduler"):
        for key, value in cfg[group].items():
            if key.startswith("_"):
                continue
            items = value if OmegaConf.is_list(value) else [value]
            if not all(_is_number(v) or isinstance(v, bool) for v in items):
                raise ConfigError(f"{group}.{key}={value!r} is invalid: expected a number")


_ABSENT = object()


def arch_of(cfg: DictConfig) -> str:
    """The model's architecture name, e.g. resnet20 (from its factory's `_target_`)."""
    return cfg.model._target_.rsplit(".", 1)[-1]


def check_model_options(cfg: DictConfig) -> None:
    """What the model's family allows: ImageNet weights and a layer4 exist for resnet18..152 only."""
    arch = arch_of(cfg)
    cifar_family = arch in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
    if cifar_family and cfg.model.get("freeze") == "layer4":
        raise ConfigError(f"model.freeze=layer4: {arch} has three stages (layer1..layer3)")
    pretrained = cfg.model.get("pretrained")
    if pretrained == "imagenet" and cifar_family:
        raise ConfigError(f"model.pretrained=imagenet: torchvision has ImageNet weights for resnet18..152, not {arch}")
    if pretrained not in (None, "imagenet") and not Path(pretrained).expanduser().is_file():
        raise ConfigError(f"model.pretrained={pretrained}: no such file (expected imagenet or a state dict file)")
    if pretrained and stem_of(cfg) == "cifar":
        raise ConfigError("model.pretrained needs model.stem=imagenet (the stem the weights were trained with); "
                          "set model.stem=imagenet or dataset.image_size above 64")


def stem_of(cfg: DictConfig) -> str:
    """model.stem, with auto → cifar for small images (up to 64px), imagenet for larger ones."""
    if cfg.model.stem == "auto":
        return "cifar" if cfg.dataset.image_size <= 64 else "imagenet"
    return cfg.model.stem


def resolve_stem(cfg: DictConfig) -> None:
    cfg.model.stem = stem_of(cfg)


# --------------------------------------------------------------------------------------------
# Building the pieces of a run
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def pick_device_and_precision(cfg: DictConfig, local_rank: int = 0) -> tuple[torch.device, Precision]:
    """With several processes on a machine (`local_rank`), device=auto|cuda means each its own GPU."""
    from . import device as devices

    device = devices.pick_device(cfg.device)
    if device.type == "cuda" and local_rank and cfg.device in ("auto", "cuda"):
        device = devices.pick_device(f"cuda:{local_rank % devices.cuda_device_count()}")
    precision = devices.Precision(devices.pick_precision(cfg.precision, device), device.type)
    return device, precision


def load_data(cfg: DictConfig, device: torch.device, shard: Any = None, **overrides) -> Data:
    from .data import Shard, build_data

    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    dataset.update(overrides)
    return build_data(
        **dataset, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
        device=device, seed=cfg.seed, num_workers=cfg.num_workers, channels_last=cfg.channels_last,
        shard=shard or Shard(), log=log.info)


def build_model(cfg: DictConfig, num_classes: int, device: torch.device, pretrained: bool = True) -> torch.nn.Module:
    """The configured model on `device`; `pretrained=False` skips loading model.pretrained (when
    the weights come from a checkpoint anyway)."""
    import torch

    extra = {} if pretrained else {"pretrained": None}
    model = instantiate(_without(cfg.model, "sync_bn"), num_classes=num_classes, **extra)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format)


def _without(node: DictConfig, *keys: str) -> dict:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in keys}


def build_optimizer_and_scheduler(cfg: DictConfig, model: torch.nn.Module, steps_per_epoch: int):
    from .optim import Scheduler, build_optimizer

    try:
        factory = instantiate(_without(cfg.optim, "decay_norm_and_bias", "backbone_lr_scale"))
        optimizer = build_optimizer(model, factory, cfg.optim.get("weight_decay", 0.0),
                                    cfg.optim.get("decay_norm_and_bias", True), cfg.optim.get("backbone_lr_scale", 1.0),
                                    cfg.optim.lr)
        schedule = instantiate(_without(cfg.scheduler, "warmup_epochs"))(epochs=cfg.epochs)
    except (TypeError, ValueError) as e:  # an argument the optimizer or schedule does not take
        raise ConfigError(f"optim/scheduler: {e}") from None
    return optimizer, Scheduler(optimizer, schedule, steps_per_epoch, cfg.scheduler.warmup_epochs)


def hparam_values(cfg: DictConfig, precision: str) -> dict[str, Any]:
    """The hyperparameters shown in TensorBoard's HPARAMS tab (scalars and strings only)."""
    values = {
        "model": arch_of(cfg), "stem": cfg.model.stem,
        "dataset": cfg.dataset.name, "optim": cfg.optim._target_.rsplit(".", 1)[-1],
        "scheduler": cfg.scheduler._target_.rsplit(".", 1)[-1].lower(),
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "precision": precision, "seed": cfg.seed,
        "label_smoothing": cfg.label_smoothing, "warmup_epochs": cfg.scheduler.warmup_epochs,
    }
    for key in ("lr", "weight_decay", "momentum"):
        if key in cfg.optim:
            values[f"optim.{key}"] = cfg.optim[key]
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


# --------------------------------------------------------------------------------------------
# resnet-train
# --------------------------------------------------------------------------------------------


class CheckBeforeRun(Callback):
    """Before Hydra creates the run dir: check the config and the device, and refuse a run dir
    that already holds a run, so a typo leaves no stray folder and nothing earlier is overwritten."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            validate(task_cfg)
            pick_device_and_precision(task_cfg)
        except ValueError as e:  # ConfigError or DeviceError
            _fail(str(e))
        run_dir = Path(config.hydra.run.dir)
        if task_cfg.resume:
            return
        try:  # claim the run dir atomically: two runs started in the same second cannot share it
            run_dir.mkdir(parents=True)
        except FileExistsError:
            if any(run_dir.iterdir()):
                _fail(f"{run_dir} already holds a run; pick a new hydra.run.dir so earlier results are not "
                      f"overwritten" + (f", or continue it with resume={run_dir}"
                                        if (run_dir / "checkpoints").exists() else ""))


class SweepSummary(Callback):
    """After each job of a sweep (`-m`): the job's status goes to <job dir>/job_status.json and
    <sweep dir>/summary.csv is rebuilt from all of them (best validation accuracy first, failed
    jobs last with their error); after the last job the table is printed as markdown. Built from
    files, so it also works when jobs run elsewhere (e.g. on SLURM through the submitit launcher)."""

    COLUMNS = ("job", "overrides", "status", "best_val_accuracy", "test_accuracy", "best_epoch", "epochs",
               "wall_seconds", "error", "job_dir")

    def __init__(self) -> None:
        self.printed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from .logging import write_json

        swept, jobs = _swept_keys(config)
        write_json(Path(config.hydra.sweep.dir) / "sweep.json", {"swept": sorted(swept), "jobs": jobs})

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        from . import distributed
        from .logging import write_json

        if str(config.hydra.mode) != "RunMode.MULTIRUN" or not distributed.from_environment().is_main:
            return
        sweep_dir, job_dir = Path(config.hydra.sweep.dir), Path(config.hydra.runtime.output_dir)
        info = _read_json(sweep_dir / "sweep.json")
        metrics = _read_json(job_dir / "metrics.json")
        failed = job_return.status != JobStatus.COMPLETED
        error = getattr(job_return, "_return_value", None) if failed else None
        swept = [o for o in config.hydra.overrides.task if _override_key(o) in info.get("swept", [])]
        write_json(job_dir / "job_status.json", {
            "job": config.hydra.job.num, "overrides": ",".join(swept) or config.hydra.job.override_dirname,
            "status": "failed" if failed else "ok",
            **{k: metrics.get(k) for k in ("best_val_accuracy", "test_accuracy", "best_epoch", "epochs", "wall_seconds")},
            "error": (str(error).strip().splitlines() or [type(error).__name__])[0][:300] if failed else "",
            "job_dir": str(job_dir.relative_to(sweep_dir)) if job_dir != sweep_dir else ".",
        })
        rows = self._write_summary(sweep_dir)
        if info.get("jobs") and len(rows) >= info["jobs"]:
            self._print(sweep_dir, rows)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = self._write_summary(Path(config.hydra.sweep.dir))
        if rows and not self.printed:
            self._print(Path(config.hydra.sweep.dir), rows)

    def _write_summary(self, sweep_dir: Path) -> list[dict]:
        from .checkpoint import atomic_write

        rows = [_read_json(p) for p in sweep_dir.glob("**/job_status.json")]
        rows.sort(key=lambda r: (r["status"] != "ok", -(r["best_val_accuracy"] or -1), r["job"]))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        if rows:
            atomic_write(sweep_dir / "summary.csv", lambda f: f.write(text.getvalue().encode()))
        return rows

    def _print(self, sweep_dir: Path, rows: list[dict]) -> None:
        self.printed = True
        pct = lambda v: "" if v is None else f"{v:.2%}"  # noqa: E731
        lines = ["| overrides | best val acc | test acc | best epoch | wall time | status |", "|---|---:|---:|---:|---:|---|"]
        for r in rows:
            wall = "" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}s"
            status = r["status"] if r["status"] == "ok" else f"failed: {r['error']}"
            lines.append(f"| {r['overrides']} | {pct(r['best_val_accuracy'])} | {pct(r['test_accuracy'])} | "
                         f"{r['best_epoch'] or ''} | {wall} | {status} |")
        print(f"\nSweep summary ({sweep_dir / 'summary.csv'}):\n" + "\n".join(lines), flush=True)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _swept_keys(config: DictConfig) -> tuple[set[str], int | None]:
    """The keys a sweep varies, and how many jobs the basic sweeper will run (the product of the
    swept values' counts; None for other sweepers, e.g. Optuna, whose n_trials decides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys, size = set(), 1
    for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        if override.is_sweep_override():
            keys.add(override.get_key_element().lstrip("+~"))
            size *= len(list(override.sweep_string_iterator()))
    for key in config.hydra.sweeper.get("params") or {}:  # sweepers that take their search space as params
        keys.add(key)
    basic = "BasicSweeper" in str(config.hydra.sweeper.get("_target_", ""))
    return keys, size if basic else None


# Keys that may change when a run is resumed: where and how fast it runs, and how long. Anything
# else would change the model, the data or the optimization of a half-finished run.
RESUMABLE = {"epochs", "device", "precision", "compile", "num_workers", "progress", "log_every_n_steps",
             "eval_batch_size", "checkpoint.every_n_steps", "dataset.root", "dataset.download", "dataset.loader",
             "tensorboard.images", "tensorboard.confusion_every_n_epochs", "tensorboard.histograms_every_n_epochs",
             "tensorboard.mistakes"}
RESUME_REFUSAL = ("cannot change when resuming (it would change the model, the data or the optimization of the "
                  "run); start a new run instead")


def _override_key(arg: str) -> str:
    """The config key a command-line override sets: `+optim.lr=0.1` -> `optim.lr`."""
    return arg.split("=", 1)[0].lstrip("+~")


def config_with_overrides(stored: dict, composed: DictConfig, overrides: list[str],
                          allowed: Callable[[str], bool], refusal: str) -> DictConfig:
    """A checkpoint's config with the keys named on the command line taken from `composed` (the
    same command line applied to the defaults, so already parsed and type-checked by Hydra)."""
    cfg = OmegaConf.create(stored)
    for override in overrides:
        key = _override_key(override)
        if key.startswith("hydra.") or key == "resume":
            continue
        if not allowed(key):
            raise ConfigError(f"{override}: {refusal}")
        OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False)
    return cfg


def find_checkpoint(target: str, name: str = "last.pt") -> Path:
    """A checkpoint file from a path to it, to its run dir, or `latest` (newest run under outputs/)."""
    if target == "latest":
        found = sorted(Path("outputs").glob(f"**/checkpoints/{name}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"resume=latest: no run with checkpoints/{name} under {Path('outputs').resolve()}")
        return found[-1].resolve()
    path = Path(target).expanduser()
    for candidate in (path, path / "checkpoints" / name, path / name):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"no checkpoint at {path} (looked for {path}, {path / 'checkpoints' / name})")


def _quote(path: Path) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_arguments(args: list[str]) -> list[str]:
    """`resume=X` continues run X in its own run dir: point Hydra there, without letting it rewrite
    the run's .hydra/ record (the run's config is the one stored in its checkpoint)."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if not given or given[-1] in ("", "null"):
        return args
    if {"-m", "--multirun"} & set(args):
        _fail("resume= continues one run; it cannot be combined with -m")
    if any(a.startswith("hydra.run.dir=") for a in args):
        _fail("resume= continues in the checkpoint's own run dir; leave out hydra.run.dir")
    for arg in args:
        key = _override_key(arg)
        if not arg.startswith("-") and not key.startswith(("hydra.", "hydra/")) and key not in (*RESUMABLE, "resume"):
            _fail(f"{arg}: {RESUME_REFUSAL}")
    try:
        checkpoint = find_checkpoint(given[-1])
    except ConfigError as e:
        _fail(str(e))
    rest = [a for a in args if not a.startswith("resume=")]
    return [*rest, f"resume={_quote(checkpoint)}", f"hydra.run.dir={_quote(run_dir_of(checkpoint))}",
            "hydra.output_subdir=null"]


class GracefulStop:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM (preemption) asks training to stop at the
    next step boundary; a second one ends the process at once."""

    def __init__(self):
        self.signum: int | None = None

    def __enter__(self) -> GracefulStop:
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        log.warning(f"{signal.Signals(signum).name}: stopping after the current step and saving "
                    "(send it again to stop at once)")

    def requested(self) -> bool:
        return self.signum is not None


def train(cfg: DictConfig) -> dict:
    """Run one training job described by a composed config (or continue one: `resume=`); return
    its final metrics."""
    import torch

    from . import device as devices
    from . import distributed
    from .checkpoint import RunCheckpoints, load_checkpoint, restore_training
    from .data import Shard
    from .engine import TrainingInterrupted, TrainState, fit
    from .logging import ImageSettings, RunLogger, SilentLogger

    started_at = time.time()
    validate(cfg)
    world = distributed.from_environment()
    distributed.init_process_group(world)  # torchrun joined before Hydra; SLURM/submitit tasks join here
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one process tells the story
    if cfg.batch_size % world.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} (the global batch) does not split evenly over "
                          f"{world.world_size} processes; use a multiple of {world.world_size}")
    ckpt = None
    if cfg.resume:
        resume_from = cfg.resume
        ckpt = load_checkpoint(resume_from)
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        cfg = config_with_overrides(ckpt["config"], cfg, overrides, RESUMABLE.__contains__, RESUME_REFUSAL)
        cfg.resume = resume_from
        validate(cfg)
    resolve_stem(cfg)
    device, precision = pick_device_and_precision(cfg, world.local_rank)
    if cfg.model.sync_bn and world.enabled and device.type != "cuda":
        raise ConfigError("model.sync_bn=true needs CUDA GPUs (SyncBatchNorm runs on GPUs only)")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info(f"Run dir: {run_dir}")
    log.info(f"Device: {devices.describe(device)}, precision {precision.name}"
             f"{' (autocast)' if precision.dtype else ''}, channels_last={cfg.channels_last}"
             + (f"; {world.world_size} processes (DistributedDataParallel), global batch {cfg.batch_size}"
                if world.enabled else ""))
    seed_everything(cfg.seed)

    data = load_data(cfg, device, shard=Shard(world.rank, world.world_size))
    log.info(f"Data: {cfg.dataset.name}, {data.train.num_images:,} training images in {data.storage}, "
             f"{len(data.classes)} classes; validation on {data.val_source}")
    model = build_model(cfg, len(data.classes), device, pretrained=ckpt is None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"Model: {arch_of(cfg)} ({cfg.model.stem} stem), "
             f"{sum(p.numel() for p in model.parameters()):,} parameters"
             + (f", {trainable:,} trainable (model.freeze={cfg.model.freeze})" if cfg.model.freeze != "none" else "")
             + (f", backbone from {cfg.model.pretrained}" if cfg.model.pretrained else ""))
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model, len(data.train))
    scaler = precision.grad_scaler()
    state = TrainState()
    if ckpt is not None:
        state = restore_training(ckpt, model, optimizer, scheduler, scaler, cfg.resume)
        if state.epoch >= cfg.epochs and not state.epoch_progress:
            raise ConfigError(f"{run_dir} has finished all {state.epoch} epochs; resume with epochs=N "
                              f"(N > {state.epoch}) to train longer")
        log.info(f"Resuming from {cfg.resume}: epoch {state.epoch + 1}, "
                 f"step {state.global_step} (best val accuracy so far {_pct(state.best_val_accuracy)})")
    if world.enabled:
        if cfg.model.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    stored_cfg = OmegaConf.to_container(cfg, resolve=True)
    stored_cfg["dataset"].update(mean=data.mean, std=data.std)  # computed statistics are part of the run
    tb = cfg.tensorboard
    logger = RunLogger(run_dir, OmegaConf.to_yaml(stored_cfg), hparam_values(cfg, precision.name), cfg.epochs,
                       resume_step=state.global_step if ckpt is not None else None,
                       settings=ImageSettings(data.classes, data.mean, data.std, tb.images,
                                              tb.confusion_every_n_epochs, tb.histograms_every_n_epochs)
                       ) if world.is_main else SilentLogger()
    if ckpt is None and tb.images and world.is_main:
        data.train.set_epoch(0)  # epoch 0 is never trained: drawing its first batch changes nothing
        logger.augmented_samples(next(iter(data.train))[0])
    checkpoints = RunCheckpoints(run_dir / "checkpoints", model, optimizer, scheduler, scaler, {
        "config": stored_cfg, "classes": data.classes, "precision": precision.name,
        "normalization": {"mean": data.mean, "std": data.std, "image_size": data.image_size,
                          "stored_size": data.stored_size},
    }, writer=world.is_main)
    try:
        with GracefulStop() as stop:
            metrics = fit(model, data, optimizer, scheduler, precision, scaler, epochs=cfg.epochs, state=state,
                          logger=logger, checkpoints=checkpoints, label_smoothing=cfg.label_smoothing,
                          log_every=cfg.log_every_n_steps, checkpoint_every=cfg.checkpoint.every_n_steps,
                          should_stop=distributed.agreed_stop(stop.requested, cfg.log_every_n_steps),
                          progress=cfg.progress if world.is_main else False, started_at=started_at,
                          mistakes=tb.mistakes if tb.images else 0)
        logger.finish(metrics, state.history, state.global_step)
    except TrainingInterrupted:
        stop.signum = stop.signum or signal.SIGTERM  # another process received it
        log.warning(f"Stopped by {signal.Signals(stop.signum).name} at epoch {state.epoch + 1}, step "
                    f"{state.global_step}; saved {checkpoints.path('last')}. Resume with:\n  "
                    + (f"torchrun --nproc_per_node={world.world_size} -m resnet_train" if world.enabled
                       else "resnet-train") + f" resume={run_dir}")
        raise SystemExit(128 + stop.signum) from None
    finally:
        logger.close()
    log.info(f"Done in {metrics['wall_seconds']:.0f}s. best val accuracy {_pct(metrics['best_val_accuracy'])} "
             f"(epoch {metrics['best_epoch']}), test accuracy {_pct(metrics['test_accuracy'])}. "
             f"Results in {run_dir}")
    return metrics


def _pct(value: float | None) -> str:
    return "n/a" if value is None or value < 0 else f"{value:.2%}"


def _in_sweep() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _run_reporting_errors(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Known user errors become one `error:` line and exit status 2 instead of a traceback."""
    import torch

    from .checkpoint import CheckpointError
    from .data import DataError
    from .device import DeviceError
    from .engine import TrainingDiverged
    from .models import ModelError

    try:
        return fn(cfg)
    except (ConfigError, DeviceError, DataError, CheckpointError, TrainingDiverged, ModelError) as e:
        if _in_sweep():  # one job of a sweep: fail this job (the summary reports it), keep the others
            log.error(f"error: {e}")
            raise
        _fail(str(e))
    except torch.OutOfMemoryError:
        _fail(f"out of memory on the device with batch_size={cfg.batch_size}; try batch_size={max(cfg.batch_size // 2, 1)}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train_app(cfg: DictConfig) -> float | None:
    metrics = _run_reporting_errors(train, cfg)
    return metrics["best_val_accuracy"]  # what a Hydra sweeper (e.g. Optuna) maximizes


def train_main() -> None:
    """The `resnet-train` console script (also under torchrun: one process per GPU)."""
    args = resume_arguments(sys.argv[1:])
    from . import distributed

    world = distributed.from_environment()
    if world.enabled and os.environ.get("WORLD_SIZE"):  # torchrun: agree on one run dir before Hydra makes one
        distributed.init_process_group(world)
        args = distributed_arguments(args, world, distributed.broadcast_from_main(time.strftime("%Y-%m-%d/%H-%M-%S")))
    sys.argv[1:] = args
    _train_app()


def distributed_arguments(args: list[str], world: Any, stamp: str) -> list[str]:
    """Every process uses the first one's run dir (its time stamp, see train.yaml's hydra.run.dir);
    only the first writes the .hydra/ record and train.log, and checks the run dir."""
    os.environ["RESNET_TRAIN_RUN_STAMP"] = stamp
    if world.is_main:
        return args
    return [*args, "hydra.output_subdir=null", "hydra/job_logging=disabled",
            "hydra.callbacks.check_before_run.enabled=false"]


# --------------------------------------------------------------------------------------------
# resnet-eval
# --------------------------------------------------------------------------------------------

EVAL_KEYS = ("checkpoint", "split", "output")
# resnet-eval's own keys go to Hydra (eval.yaml); every other KEY=VALUE is an override of the
# checkpoint's training config, checked by composing it onto train.yaml.
_TRAINING_OVERRIDES: list[str] = []


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    from hydra import compose
    from hydra.errors import HydraException

    from . import device as devices
    from .checkpoint import CheckpointError, load_checkpoint, load_model_state
    from .data import DataError
    from .engine import evaluate
    from .logging import write_json

    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split={cfg.split!r} is invalid: expected test or val")
    try:
        composed = compose(config_name="train", overrides=_TRAINING_OVERRIDES)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(str(e).strip()) from None
    checkpoint = find_checkpoint(cfg.checkpoint, "best.pt")
    ckpt = load_checkpoint(checkpoint)
    # the precision the run trained in, unless precision= is given here
    stored = {**ckpt["config"], "precision": ckpt.get("precision", ckpt["config"].get("precision", "auto"))}
    run_cfg = config_with_overrides(stored, composed, _TRAINING_OVERRIDES, lambda key: key.split(".")[0] != "model",
                                    "the model is fixed by the checkpoint and cannot be changed here")
    validate(run_cfg)
    device, precision = pick_device_and_precision(run_cfg)
    norm = ckpt["normalization"]
    data = load_data(run_cfg, device, mean=norm["mean"], std=norm["std"])
    if data.classes != ckpt["classes"]:
        raise CheckpointError(f"the data has classes {data.classes[:5]}... but the checkpoint was trained on "
                              f"{ckpt['classes'][:5]}...")
    loader = data.test if cfg.split == "test" else data.val
    if loader is None:
        raise DataError(f"dataset {run_cfg.dataset.name} at {run_cfg.dataset.root} has no {cfg.split} split")
    model = build_model(run_cfg, len(data.classes), device, pretrained=False)
    load_model_state(model, ckpt["model"], str(checkpoint))
    result = evaluate(model, loader, precision, len(data.classes), desc=cfg.split, progress=run_cfg.progress)

    print(f"checkpoint {checkpoint} (epoch {ckpt.get('state', {}).get('epoch', '?')}), "
          f"{cfg.split} split: {result.images:,} images on {devices.describe(device)}, precision {precision.name}")
    print(f"loss {result.loss:.4f}  accuracy {result.accuracy:.2%}\n")
    print(format_per_class(data.classes, result.per_class_accuracy, result.confusion))
    report = {"checkpoint": str(checkpoint), "split": cfg.split, "images": result.images,
              "loss": result.loss, "accuracy": result.accuracy, "classes": data.classes,
              "per_class_accuracy": dict(zip(data.classes, result.per_class_accuracy)),
              "confusion_matrix": result.confusion.tolist()}
    output = Path(cfg.output) if cfg.output else run_dir_of(checkpoint) / "eval.json"
    write_json(output, report)
    print(f"\nwrote {output}")
    return report


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint file belongs to (<run dir>/checkpoints/<name>.pt)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def format_per_class(classes: list[str], accuracy: list[float], confusion: "torch.Tensor") -> str:
    """Per-class accuracy and the confusion matrix (rows: true class, columns: predicted) as text."""
    width = max(5, *(len(c) for c in classes)) + 4
    cell = max(4, len(str(int(confusion.max()))) + 1)
    lines = [f"{'class':<{width}}  accuracy"]
    lines += [f"{f'{i:>2} {c}':<{width}}  {a:8.2%}" for i, (c, a) in enumerate(zip(classes, accuracy))]
    lines += ["", "confusion matrix (rows: true class, columns: predicted class, numbered as above)"]
    lines += [" " * width + "".join(f"{j:>{cell}}" for j in range(len(classes)))]
    lines += [f"{f'{i:>2} {c}':<{width}}" + "".join(f"{int(n):>{cell}}" for n in row)
              for i, (c, row) in enumerate(zip(classes, confusion))]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _eval_app(cfg: DictConfig) -> None:
    _run_reporting_errors(evaluate_checkpoint, cfg)


def eval_main() -> None:
    """The `resnet-eval` console script."""
    own = [a for a in sys.argv[1:] if a.startswith("-") or a.split("=", 1)[0] in EVAL_KEYS
           or a.startswith(("hydra.", "hydra/"))]
    _TRAINING_OVERRIDES[:] = [a for a in sys.argv[1:] if a not in own]
    for override in _TRAINING_OVERRIDES:
        if _override_key(override).split(".")[0] == "model":
            _fail(f"{override}: the model is fixed by the checkpoint and cannot be changed here")
    sys.argv[1:] = own
    _eval_app()


# --------------------------------------------------------------------------------------------
# resnet-predict
# --------------------------------------------------------------------------------------------


def predict_checkpoint(cfg: DictConfig) -> int:
    """Top-k predictions for files and folders; returns the exit status (1 if any input was unreadable)."""
    from . import device as devices
    from .checkpoint import load_checkpoint, load_model_state
    from .data import BatchTransform
    from .predict import collect_files, predict_files, write_csv

    inputs = list(cfg.inputs) if OmegaConf.is_list(cfg.inputs) else [str(cfg.inputs)]
    if not _is_int(cfg.topk) or cfg.topk < 1:
        raise ConfigError(f"topk={cfg.topk!r} is invalid: expected a positive integer")
    if not _is_int(cfg.batch_size) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size!r} is invalid: expected a positive integer")
    checkpoint = find_checkpoint(cfg.checkpoint, "best.pt")
    ckpt = load_checkpoint(checkpoint)
    run_cfg = OmegaConf.create(ckpt["config"])
    run_cfg.channels_last = run_cfg.get("channels_last", True)
    device = devices.pick_device(cfg.device)
    precision = devices.Precision(devices.pick_precision(ckpt.get("precision", "auto"), device), device.type)
    classes, norm = ckpt["classes"], ckpt["normalization"]
    model = build_model(run_cfg, len(classes), device, pretrained=False)
    load_model_state(model, ckpt["model"], str(checkpoint))

    files, skipped = collect_files(inputs)
    stored = norm.get("stored_size", norm["image_size"])
    transform = BatchTransform(norm["mean"], norm["std"], output_size=norm["image_size"],
                               channels_last=run_cfg.channels_last)
    predictions, unreadable = predict_files(model, files, classes, transform, stored, precision, device,
                                            cfg.batch_size, cfg.topk)
    skipped += unreadable
    width = max((len(str(p.path)) for p in predictions), default=10)
    for p in predictions:
        print(f"{str(p.path):<{width}}  " + "  ".join(f"{c} {pr:.3f}" for c, pr in zip(p.classes, p.probabilities)))
    for item, reason in skipped:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    output = Path(cfg.output)
    write_csv(output, predictions, min(cfg.topk, len(classes)))
    print(f"\n{len(predictions)} image(s) predicted, {len(skipped)} skipped; wrote {output}")
    return 1 if skipped or not predictions else 0


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def _predict_app(cfg: DictConfig) -> None:
    status = _run_reporting_errors(predict_checkpoint, cfg)
    sys.exit(status)


def predict_main() -> None:
    """The `resnet-predict` console script."""
    _predict_app()


# --------------------------------------------------------------------------------------------
# resnet-summary
# --------------------------------------------------------------------------------------------

SUMMARY_HELP = """resnet-summary: a per-layer table of a model (output shape, parameters, trainable or frozen,
multiply-accumulates), for a config or a checkpoint.

Usage:
  resnet-summary [KEY=VALUE ...]          any resnet-train keys, e.g. model=resnet50 dataset.image_size=224
  resnet-summary checkpoint=PATH          the model of a trained run (a .pt file or a run dir)

Examples:
  resnet-summary model=resnet20
  resnet-summary model=resnet50 dataset.image_size=224 model.freeze=layer3
"""


def summary_table(args: list[str]) -> str:
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    given = [a.split("=", 1)[1] for a in args if a.startswith("checkpoint=")]
    if given:
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(find_checkpoint(given[-1], "best.pt"))
        cfg, num_classes = OmegaConf.create(ckpt["config"]), len(ckpt["classes"])
    else:
        try:
            with initialize_config_module(config_module="resnet_train.configs", version_base="1.3"):
                cfg = compose(config_name="train", overrides=args)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(str(e).split("\nConfig search path")[0].strip()) from None
        num_classes = {"cifar10": 10, "cifar100": 100}.get(cfg.dataset.name) or _folder_classes(cfg)
    cfg.model.pretrained = None  # the table needs the shapes, not the weights
    validate(cfg)
    resolve_stem(cfg)
    import torch

    from .summary import format_table, summarize

    model = build_model(cfg, num_classes, torch.device("cpu"), pretrained=False)
    image_size = cfg.dataset.image_size
    header = (f"{arch_of(cfg)} ({cfg.model.stem} stem, {num_classes} classes, "
              f"model.freeze={cfg.model.freeze}), {image_size}x{image_size} input\n")
    return header + format_table(summarize(model, image_size), model, image_size)


def _folder_classes(cfg: DictConfig) -> int:
    from .data import list_image_folder

    return len(list_image_folder(Path(cfg.dataset.root).expanduser() / "train")[1])


def summary_main() -> None:
    """The `resnet-summary` console script."""
    args = sys.argv[1:]
    if {"-h", "--help"} & set(args):
        print(SUMMARY_HELP)
        return
    try:
        print(summary_table(args))
    except ConfigError as e:
        _fail(str(e))
    except ValueError as e:  # CheckpointError, DataError, ModelError (their modules are loaded by now)
        from .checkpoint import CheckpointError
        from .data import DataError
        from .models import ModelError

        if not isinstance(e, (CheckpointError, DataError, ModelError)):
            raise
        _fail(str(e))
