"""Every option of every config group composes and instantiates; bad values are rejected by name."""
import re
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from resnet_train import optim as optim_module
from resnet_train.build import build_model, build_optimizer_and_scheduler
from resnet_train.device import pick_device_and_precision
from resnet_train.config import CIFAR_ARCHS, DATASETS, IMAGENET_ARCHS, stem_of, validate
from resnet_train.errors import ConfigError, DeviceError


def options(group: str) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in (files("resnet_train.configs") / group).iterdir()
                  if p.name.endswith(".yaml"))


def readme_options(group: str) -> list[str]:
    """The options the README's config-groups table lists for `group` (its backticked names)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith(f"| `{group}` |"))
    return sorted(re.findall(r"`([a-z0-9_]+)`", row.split("|")[2]))


@pytest.mark.parametrize("group", ["model", "dataset", "augment", "optim", "scheduler"])
def test_groups_have_the_documented_options(compose_cfg, group):
    """The YAML options, the README's table and the schema's enumerations name the same things, and
    every option passes the schema."""
    documented = [o for o in readme_options(group) if o != "nesterov"]  # (an sgd argument, not an option)
    assert options(group) == documented
    if group in ("model", "dataset"):
        assert options(group) == sorted(IMAGENET_ARCHS + CIFAR_ARCHS if group == "model" else DATASETS)
    for name in options(group):
        validate(compose_cfg(f"{group}={name}", where_data_is(name if group == "dataset" else "cifar10")))


def where_data_is(dataset: str) -> str:
    """The key that says where a dataset option's images are, set to a placeholder."""
    return {"manifest": "dataset.train=train.csv", "hf": "dataset.path=/some/where"}.get(dataset,
                                                                                         "dataset.root=/some/where")


@pytest.mark.parametrize("name", options("model"))
def test_model_options_instantiate(compose_cfg, name):
    cfg = compose_cfg(f"model={name}")
    validate(cfg)
    assert stem_of(cfg) == "cifar"
    model = build_model(cfg, 10, torch.device("cpu"))
    assert model.fc.out_features == 10 and cfg.model.stem == "cifar"


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options_compose(compose_cfg, name):
    cfg = compose_cfg(f"dataset={name}", where_data_is(name))
    validate(cfg)
    assert cfg.dataset.name == name and cfg.dataset.image_size == 32


@pytest.mark.parametrize("optim", options("optim"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optim_and_scheduler_options_instantiate(compose_cfg, optim, scheduler):
    cfg = compose_cfg(f"optim={optim}", f"scheduler={scheduler}", "model=resnet20", "scheduler.warmup_epochs=1")
    validate(cfg)
    model = torch.nn.Linear(3, 2)
    opt, sched = build_optimizer_and_scheduler(cfg, model, steps_per_epoch=10, device=torch.device("cpu"))
    assert type(opt).__name__.lower() == optim
    start = 1 / cfg.scheduler.div_factor if scheduler == "onecycle" else 1.0  # 1cycle starts low by design
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr / 10 * start)  # first of 10 warmup steps
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] > 0


def test_documented_defaults(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert compose_cfg("optim=adam").optim.lr == 1e-3 and compose_cfg("optim=adagrad").optim.lr == 1e-2
    rms = compose_cfg("optim=rmsprop").optim
    assert (rms.lr, rms.alpha) == (1e-3, 0.99)
    assert list(cfg.dataset.mean) == [0.4914, 0.4822, 0.4465] and list(cfg.dataset.std) == [0.2023, 0.1994, 0.2010]
    assert cfg.augment.crop_padding == 4 and cfg.augment.hflip and cfg.augment.policy == "none"
    assert cfg.dataset.val_size == 5000
    assert compose_cfg("dataset.image_size=224").model.stem == "auto"
    assert stem_of(compose_cfg("dataset.image_size=224")) == "imagenet"


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_recipes_compose(compose_cfg, name):
    cfg = compose_cfg(f"experiment={name}")
    validate(cfg)
    text = (files("resnet_train.configs") / "experiment" / f"{name}.yaml").read_text()
    assert "Reference:" in text  # every recipe names the accuracy it aims at and where that comes from


def test_he2016_recipe_matches_the_paper(compose_cfg):
    cfg = compose_cfg("experiment=he2016_resnet20")
    steps_per_epoch = (50_000 - cfg.dataset.val_size) // cfg.batch_size
    assert cfg.model._target_.endswith("resnet20") and cfg.optim.weight_decay == 1e-4
    assert [round(m * steps_per_epoch, -3) for m in cfg.scheduler.milestones] == [32_000, 48_000]
    assert round(cfg.epochs * steps_per_epoch, -3) == 64_000


@pytest.mark.parametrize("override,key", [
    ("epochs=-1", "epochs"), ("epochs=2.5", "epochs"), ("batch_size=0", "batch_size"),
    ("optim.lr=abc", "optim.lr"), ("optim.lr=-0.1", "optim.lr"), ("optim.momentum=1.5", "optim.momentum"),
    ("dataset.val_size=-5", "dataset.val_size"), ("dataset.val_size=1.5", "dataset.val_size"),
    ("model.stem=big", "model.stem"), ("dataset.loader=disk", "dataset.loader"),
    ("optim.nesterov=maybe", "optim.nesterov"),
    ("dataset.std=[0.2,0,0.2]", "dataset.std"), ("num_workers=-1", "num_workers"),
])
def test_bad_values_are_rejected_by_name(compose_cfg, override, key):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError, match=rf"^{key}="):
        validate(cfg)


@pytest.mark.parametrize("override", ["scheduler=multistep", "scheduler=multistep scheduler.milestones=[1.5,3]", "optim.nesterov=true",
                                      "dataset.val_size=0", "dataset.val_size=0.5", "epochs=auto time_budget=10m",
                                      "channels_last=false", "precision=bf16", "model.stem=imagenet"])
def test_valid_values_pass(compose_cfg, override):
    validate(compose_cfg(*override.split()))


def test_precision_and_device_values_are_checked(compose_cfg):
    with pytest.raises(DeviceError, match="precision='fp8' is not one of auto, fp32, bf16, fp16"):
        pick_device_and_precision("auto", "fp8")
    with pytest.raises(DeviceError, match="device='gpu0' is not one of"):
        pick_device_and_precision("gpu0", "auto")


def test_image_folder_needs_a_root(compose_cfg):
    with pytest.raises(ConfigError, match="dataset.root is required"):
        validate(compose_cfg("dataset=image_folder"))


def test_schedules_are_functions_of_the_run_length(compose_cfg):
    cfg = compose_cfg("scheduler=multistep", "scheduler.milestones=[1,2]")
    fn = instantiate({k: v for k, v in OmegaConf.to_container(cfg.scheduler).items() if k != "warmup_epochs"})(epochs=3)
    assert [fn(e) for e in (0, 1, 2)] == pytest.approx([1, 0.1, 0.01])
    plateau = compose_cfg("scheduler=plateau").scheduler
    fn = instantiate({k: v for k, v in OmegaConf.to_container(plateau).items() if k != "warmup_epochs"})(epochs=3)
    assert isinstance(fn, optim_module.Plateau) and fn.patience == 5
