"""A planned config turned into the objects of a run: data, model, the optimizer step (optimizer,
schedule, EMA, ...) -- and `model_from_checkpoint`, the one way every command gets a trained model
onto a device.

Plain functions of a (checked) config; the commands call them in order. The device and precision
come from the plan (preflight.py, resolved by device.py).
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import device as devices
from . import distributed, world
from .checkpoint import check_model_state, load_checkpoint, load_model_state, selected_weights
from .config import CIFAR_DATASETS, IMAGE_SOURCES, arch_of, stem_of
from .data import Augment, Batching, Data, DatasetSpec, Shard, build_data
from .device import Precision
from .ema import WeightEMA
from .engine import OptimizerStep, StepSettings
from .errors import ConfigError, DataError, UserError, is_out_of_memory
from .mixing import Mixer
from .optim import Scheduler, build_optimizer
from .runs import find_checkpoint

log = logging.getLogger("resnet_train")


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def load_data(cfg: DictConfig, device: torch.device, shard: Shard = Shard(), **overrides: Any) -> Data:
    """The run's data on `device` (this process's `shard` of it); `overrides` replace keys of the
    dataset group (resnet-eval gives the checkpoint's normalization and classes, resnet-export a stream)."""
    dataset = dataset_spec(cfg, **overrides)
    augment = OmegaConf.to_container(cfg.augment, resolve=True)
    batching = Batching(cfg.batch_size, cfg.eval_batch_size or 2 * cfg.batch_size,
                        Augment(**{**augment, "crop_scale": tuple(augment["crop_scale"])}), cfg.seed, cfg.num_workers,
                        devices.use_channels_last(cfg.channels_last, device), progress=cfg.progress,
                        processes_here=world.from_environment().local_world_size, sampler=cfg.sampler)
    # One process per machine downloads CIFAR, the others read its files; image folders are read
    # by every process at once.
    downloading = dataset.name in CIFAR_DATASETS and dataset.download
    with distributed.local_main_first() if downloading else contextlib.nullcontext(), _memory_for(dataset):
        return build_data(dataset, batching, device, shard, log=log.info)


def dataset_spec(cfg: DictConfig, **overrides: Any) -> DatasetSpec:
    """The dataset group of `cfg` (with `overrides`), as build_data takes it."""
    return DatasetSpec(**{**OmegaConf.to_container(cfg.dataset, resolve=True), **overrides})


@contextlib.contextmanager
def _memory_for(dataset: DatasetSpec):
    """Running out of memory while the images are read is the data's size, not the batch size's
    (which is what an out-of-memory error is blamed on later, in a step)."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        killed = "killed by signal: Killed" in str(e)  # a decoding worker, as the kernel's OOM killer does
        if not (killed or is_out_of_memory(e)):
            raise
        advice = ("stream it from disk with dataset.loader=stream, or lower dataset.image_size"
                  if dataset.name in IMAGE_SOURCES and dataset.loader != "stream" else
                  "lower num_workers or dataset.image_size, or free memory on this machine")
        raise DataError(f"out of memory while reading {dataset.root or dataset.name} at {dataset.image_size}px"
                        f"{' (a decoding worker was killed)' if killed else ''}; {advice}") from None


def build_model(cfg: DictConfig, num_classes: int, device: torch.device,
                load_pretrained: bool = True) -> torch.nn.Module:
    """The configured model on `device`; `load_pretrained=False` skips model.pretrained (when the
    weights come from a checkpoint anyway). Sets cfg.model.stem to the stem it resolved to."""
    stem = stem_of(cfg)
    pretrained = cfg.model.pretrained if load_pretrained else None
    if pretrained and stem == "imagenet" and cfg.dataset.image_size <= 64:
        log.warning(f"model.pretrained: the weights' imagenet stem (7x7/2 conv + max-pool) shrinks "
                    f"{cfg.dataset.image_size}px images 4x before the first block; fine-tuning recipes resize "
                    "to dataset.image_size=224 (see experiment=finetune_resnet18)")
    with distributed.local_main_first():  # ImageNet weights: fetched once per machine
        model = _instantiate({**_model_args(cfg), "stem": stem, "pretrained": pretrained}, num_classes=num_classes)
    cfg.model.stem = model.stem
    return model.to(device, memory_format=devices.memory_format(cfg.channels_last, device))


def _model_args(cfg: DictConfig) -> dict:
    """The model factory's arguments (sync_bn is applied when wrapping the model for training)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "sync_bn"}


def _instantiate(config: dict, **kwargs: Any) -> Any:
    """hydra's instantiate, with our own errors raised as themselves (Hydra wraps what the target raises)."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(config, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def _optimizer_args(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items()
            if k not in ("decay_norm_and_bias", "backbone_lr_scale")}


def build_optimizer_and_scheduler(cfg: DictConfig, model: torch.nn.Module, steps_per_epoch: int,
                                  device: torch.device) -> tuple[torch.optim.Optimizer, Scheduler]:
    args = _optimizer_args(cfg)
    if device.type == "cuda" and not {"fused", "foreach"} & args.keys() and _takes(args["_target_"], "fused"):
        args["fused"] = True  # one kernel for the whole update instead of one per tensor (unless asked otherwise)
    try:
        optimizer = build_optimizer(model, instantiate(args), cfg.optim.get("weight_decay", 0.0),
                                    cfg.optim.get("decay_norm_and_bias", True), cfg.optim.get("backbone_lr_scale", 1.0),
                                    cfg.optim.lr)
        schedule = instantiate({k: v for k, v in cfg.scheduler.items() if k != "warmup_epochs"})(epochs=cfg.epochs)
    except (TypeError, ValueError, IndexError, RuntimeError) as e:  # an argument they do not take or accept
        raise _rejected(cfg, e) from None
    return optimizer, Scheduler(optimizer, schedule, steps_per_epoch, cfg.scheduler.warmup_epochs)


def _rejected(cfg: DictConfig, e: Exception) -> ConfigError:
    """Name the optimizer or schedule and the arguments it was given, and its complaint."""
    group = "scheduler" if "schedul" in str(e) or "epochs" in str(e) else "optim"
    args = ", ".join(f"{k}={v}" for k, v in OmegaConf.to_container(cfg[group]).items() if not k.startswith("_"))
    return ConfigError(f"{group}: {cfg[group]._target_.rsplit('.', 1)[-1]}({args}) does not work: "
                       f"{str(e).strip().splitlines()[0]}")


def _takes(target: str, argument: str) -> bool:
    import inspect

    from hydra.utils import get_class

    try:
        return argument in inspect.signature(get_class(target)).parameters
    except Exception:
        return False


def check_buildable(cfg: DictConfig, device: torch.device) -> None:
    """Build the optimizer and schedule for one dummy parameter, with the arguments they get on
    `device` (fused kernels on CUDA, which the CPU has too): an argument the optimizer does not take
    (`+optim.foo=1`) or rejects (`optim.betas=[0.9]`) fails now, before any data is read."""
    dummy = torch.nn.Linear(1, 1)
    if cfg.epochs == "auto":  # (time_budget chooses it later)
        cfg = OmegaConf.merge(cfg, {"epochs": 1})
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, dummy, 1, device)
    try:
        dummy(torch.zeros(1, 1)).sum().backward()
        optimizer.step()
        scheduler.step()
    except (TypeError, ValueError, IndexError, RuntimeError) as e:
        raise _rejected(cfg, e) from None


def check_weights_fit(ckpt: dict, source: str) -> None:
    """The checkpoint's weights fit the model its own config describes (built on the meta device:
    no memory, no time), so a damaged or edited file is refused before any data is read."""
    cfg = OmegaConf.create(ckpt["config"])
    with torch.device("meta"):
        model = _instantiate({**_model_args(cfg), "pretrained": None}, num_classes=len(ckpt["classes"]))
    check_model_state(model, ckpt["model"], source)


def training_step(cfg: DictConfig, model: torch.nn.Module, precision: Precision, steps_per_epoch: int,
                  device: torch.device, class_counts: list[int] | None = None) -> OptimizerStep:
    """The run's optimizer step for `model` (on `device`, before any DDP or compile wrapper: wrap it
    into `step.model` after restoring a checkpoint): optimizer and schedule, grad scaler, label
    smoothing, class weights (`balanced` from the training split's `class_counts`), accumulation,
    clipping, MixUp/CutMix, EMA."""
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model, steps_per_epoch, device)
    mix = cfg.mix
    mixer = Mixer(mix.mixup_alpha, mix.cutmix_alpha, mix.prob, mix.switch_prob, cfg.seed)
    ema = WeightEMA(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay > 0 else None
    settings = StepSettings(cfg.label_smoothing, cfg.accumulate_grad_batches, cfg.grad_clip_norm,
                            mixer if mixer.active else None, ema, class_weights(cfg, class_counts, device))
    return OptimizerStep(model, optimizer, scheduler, precision, precision.grad_scaler(), settings)


def class_weights(cfg: DictConfig, class_counts: list[int] | None, device: torch.device) -> torch.Tensor | None:
    """loss.class_weights as the loss's per-class weights on `device`: given, or `balanced` --
    n / (classes x count), so a class's images weigh in inverse proportion to how many there are."""
    given = cfg.loss.class_weights
    if given is None:
        return None
    if given == "balanced":  # (config.check_class_balance: the source gives the counts)
        counts = torch.tensor(class_counts, dtype=torch.float32).clamp(min=1)
        return (counts.sum() / (len(counts) * counts)).to(device)
    return torch.tensor(list(given), dtype=torch.float32, device=device)


def wrap_for_training(model: torch.nn.Module, cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when several processes train, then torch.compile if asked."""
    if distributed.active():
        if cfg.model.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


# --------------------------------------------------------------------------------------------
# A trained model, from its checkpoint, on this machine's device
# --------------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    model: torch.nn.Module  # in eval mode, on `device`
    checkpoint: dict  # the file's contents (config, classes, normalization, ...)
    path: Path
    config: DictConfig  # the run's config
    device: torch.device
    precision: Precision  # resolved on `device`

    @property
    def classes(self) -> list[str]:
        return self.checkpoint["classes"]

    @property
    def uses_ema(self) -> bool:
        return selected_weights(self.checkpoint) is not self.checkpoint["model"]

    @property
    def exif_transpose(self) -> bool:
        """Whether training turned its image files upright by their EXIF orientation (so must anything fed to it)."""
        return bool(self.config.dataset.get("exif_transpose", True))


def model_from_checkpoint(path: str | Path, device: str = "auto", precision: str = "auto",
                          channels_last: bool | str = "auto", loaded: dict | None = None) -> TrainedModel:
    """The model of a checkpoint (a .pt file, or a run dir: its best.pt) on `device`, with
    precision and memory format resolved on that device, not taken from the training machine: a
    checkpoint written on cuda:3 in fp16 loads and runs on a CPU-only laptop. `loaded`: the
    file's contents when the caller has read it already."""
    path = find_checkpoint(str(path), "best")
    ckpt = loaded if loaded is not None else load_checkpoint(path)
    cfg = OmegaConf.create(ckpt["config"])
    torch_device, resolved = devices.pick_device_and_precision(device, precision)
    cfg.channels_last = channels_last
    model = build_model(cfg, len(ckpt["classes"]), torch_device, load_pretrained=False)
    load_model_state(model, selected_weights(ckpt), str(path))
    return TrainedModel(model.eval(), ckpt, path, cfg, torch_device, resolved)


def describe_model(cfg: DictConfig, model: torch.nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"{arch_of(cfg)} ({cfg.model.stem} stem), {total:,} parameters"
            + (f", {trainable:,} trainable (model.freeze={cfg.model.freeze})" if cfg.model.freeze != "none" else "")
            + (f", backbone from {cfg.model.pretrained}" if cfg.model.pretrained else ""))
