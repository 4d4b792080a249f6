"""Runs and checkpoints that travel: no float64 on the device (Apple MPS has none), precision resolved
on the device that runs, checkpoints from a GPU evaluated on a laptop, resume on other hardware.
GPUs are mocked only at the device-query seam (resnet_train.device)."""

import os
import weakref
from pathlib import Path

import pytest
import torch
from conftest import Runner, assert_ok, make_images, metrics_of
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_train import device as devices
from resnet_train import engine, evaluation
from resnet_train.checkpoint import restore_rng_states, restore_training, rng_states
from resnet_train.device import configure_backends, pick_device_and_precision, use_channels_last
from resnet_train.data import Augment, BatchTransform, MemoryLoader
from resnet_train.device import Precision
from resnet_train.models import resnet20
from resnet_train.optim import Scheduler, cosine

ROOT = Path(__file__).resolve().parents[1]


class RecordDtypes(TorchDispatchMode):
    """Every dtype any tensor operation produces while active."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


def test_the_loop_never_makes_a_float64_tensor():
    """Apple's MPS has no float64: the training step, the meters and evaluation stay in float32."""
    images, labels = (torch.from_numpy(a) for a in make_images(96, seed=3))
    train = MemoryLoader(images[:64], labels[:64], 16, BatchTransform((0.5,) * 3, (0.25,) * 3, Augment()), True)
    val = MemoryLoader(images[64:], labels[64:], 16, BatchTransform((0.5,) * 3, (0.25,) * 3), False)
    model = resnet20()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    precision = Precision("fp32", "cpu")
    train.set_epoch(1)
    with RecordDtypes() as recorded:
        step = engine.OptimizerStep(model, opt, Scheduler(opt, cosine(1), len(train)), precision)
        engine.train_one_epoch(step, train, hooks=engine.EpochHooks(log_every=2), progress=False)
        evaluation.evaluate(model, val, precision, 10, mistakes=4, progress=False)
    assert torch.float64 not in recorded.dtypes and torch.float32 in recorded.dtypes


@pytest.fixture
def apple(monkeypatch):
    """A Mac: no CUDA, an MPS device (mocked at the device-query seam)."""
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: True)


def test_apple_gpu_gets_fp32_and_no_channels_last(apple):
    device, precision = pick_device_and_precision("auto", "auto")
    assert device.type == "mps" and precision.name == "fp32"
    assert not use_channels_last("auto", device) and use_channels_last("auto", torch.device("cpu"))
    assert use_channels_last(True, device)  # an explicit choice is kept


def test_precision_auto_is_resolved_where_the_model_runs(monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_supported", lambda: False)
    assert pick_device_and_precision("cpu", "auto")[1].name == "fp32"  # no emulated bf16 on an old CPU
    monkeypatch.setattr(devices, "cpu_bf16_supported", lambda: True)
    assert pick_device_and_precision("cpu", "auto")[1].name == "bf16"


@pytest.fixture(scope="module")
def gpu_checkpoint(small_cifar_root, module_tmp):
    """A real run's checkpoint, edited to say what a T4 run on cuda:3 stores: fp16, device cuda:3."""
    user = Runner(module_tmp / "user")
    (user.cwd / "data").symlink_to(small_cifar_root)
    assert_ok(user("resnet-train", "model=resnet20", "epochs=1", "batch_size=64", "dataset.val_size=40",
                   "num_workers=0", "tensorboard.images=false", "hydra.run.dir=t4"))
    for name in ("best", "last"):
        path = user.cwd / "t4" / "checkpoints" / f"{name}.pt"
        ckpt = torch.load(path, weights_only=True)
        ckpt["precision"] = "fp16"
        ckpt["config"].update(device="cuda:3", precision="fp16", channels_last=True)
        ckpt["scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                          "_growth_tracker": 0}
        ckpt["rng"][0]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # a GPU's generator state
        torch.save(ckpt, path)
    return user


def test_a_gpu_checkpoint_evaluates_and_predicts_on_a_cpu(gpu_checkpoint):
    user = gpu_checkpoint
    evaluated = user("resnet-eval", "checkpoint=t4")
    assert_ok(evaluated)
    assert "on cpu, precision bf16" in evaluated.stdout or "on cpu, precision fp32" in evaluated.stdout
    predicted = user("resnet-predict", "checkpoint=t4", f"inputs=[{user.cwd / 't4' / 'train.log'}]")
    assert predicted.returncode == 2 and "Traceback" not in predicted.stderr  # (a log file is not an image)
    assert "none of the 1 file(s) could be read as an image" in predicted.stderr


def test_a_gpu_run_resumes_on_a_cpu(gpu_checkpoint):
    """device=cuda:3 and fp16 with a grad scaler in the checkpoint; resumed here with device=cpu."""
    user = gpu_checkpoint
    result = user("resnet-train", "resume=t4", "epochs=2", "device=cpu", "precision=auto")
    assert_ok(result)
    assert metrics_of(user.cwd / "t4")["epochs"] == 2


def test_resume_accepts_a_grad_scaler_change_and_fewer_gpus():
    model = resnet20()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = Scheduler(opt, cosine(1), 10)
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": {}, "state": {"epoch": 1}, "rng": [rng_states(torch.device("cpu"))]}
    fp16 = torch.amp.GradScaler("cpu", enabled=True)  # bf16/fp32 before (no scaler state), fp16 now
    cpu = torch.device("cpu")
    restore_training(ckpt, engine.OptimizerStep(model, opt, sched, Precision("fp32", "cpu"), fp16), "ckpt", cpu)
    assert fp16.get_scale() == 65536.0
    ckpt["scaler"] = fp16.state_dict()  # fp16 before, bf16 now: the scaler state is not needed
    no_scaler = torch.amp.GradScaler("cpu", enabled=False)
    restore_training(ckpt, engine.OptimizerStep(model, opt, sched, Precision("bf16", "cpu"), no_scaler), "ckpt", cpu)
    old_format = {**rng_states(torch.device("cpu")), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 4}
    restore_rng_states(old_format, torch.device("cpu"))  # every GPU's state, restored where there is none
    restore_rng_states([rng_states(torch.device("cpu"))] * 3, torch.device("cpu"))  # more ranks than now


def test_deterministic_switches_off_autotuning(monkeypatch):
    """deterministic=true: deterministic kernels, cuDNN autotuning off, cuBLAS's workspace fixed;
    false: autotuning on, and a later run in the same process does not inherit the earlier one's
    setting. (Setting the cuDNN flags for a CUDA device needs no GPU.)"""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    try:
        configure_backends(torch.device("cuda"), deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        configure_backends(torch.device("cuda"), deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
        assert torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:]


def test_checkpoints_are_written_from_cpu_copies():
    """on_cpu is what every checkpoint goes through (scripts/gpu_smoke.sh loads a GPU run's checkpoint
    with a plain torch.load to check it on a GPU): structure and non-tensors kept, tensors copied."""
    from resnet_train.checkpoint import on_cpu
    weights = torch.ones(2, requires_grad=True)
    state = {"model": {"w": weights}, "rng": [{"torch": torch.zeros(3, dtype=torch.uint8), "python": (3, [1, 2])}],
             "config": {"lr": 0.1}, "scaler": {}}
    copied = on_cpu(state)
    assert copied["rng"][0]["python"] == (3, [1, 2]) and copied["config"] == {"lr": 0.1} and copied["scaler"] == {}
    assert torch.equal(copied["model"]["w"], weights) and not copied["model"]["w"].requires_grad
    assert isinstance(copied["rng"], list) and isinstance(copied["rng"][0]["python"], tuple)


def first_version_config(config: dict) -> dict:
    """What the first version stored: augmentation under dataset.augment, none of the keys added since."""
    config = dict(config, dataset={**config["dataset"], "augment": {"crop_padding": 4, "hflip": True}})
    for key in ("augment", "mix", "ema", "tta", "grad_clip_norm", "accumulate_grad_batches", "early_stopping",
                "time_budget", "deterministic"):
        del config[key]
    return config


def test_a_first_version_run_evaluates_predicts_and_resumes(small_cifar_root, tmp_path):
    user = Runner(tmp_path)
    (user.cwd / "data").symlink_to(small_cifar_root)
    args = ["model=resnet20", "batch_size=64", "dataset.val_size=40", "num_workers=0", "tensorboard.images=false"]
    assert_ok(user("resnet-train", *args, "epochs=1", "hydra.run.dir=v1"))
    for name in ("best", "last"):
        path = user.cwd / "v1" / "checkpoints" / f"{name}.pt"
        ckpt = torch.load(path, weights_only=True)
        ckpt["config"] = first_version_config(ckpt["config"])
        torch.save(ckpt, path)
    assert_ok(user("resnet-eval", "checkpoint=v1"))
    assert_ok(user("resnet-summary", "checkpoint=v1"))
    resumed = user("resnet-train", *args, "epochs=2", "resume=v1")  # the original command line + resume=
    assert_ok(resumed)
    stored = torch.load(user.cwd / "v1" / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert stored["augment"]["crop_padding"] == 4 and "augment" not in stored["dataset"]
    assert stored["ema"]["decay"] == 0.0 and metrics_of(user.cwd / "v1")["epochs"] == 2


def test_gradient_histograms_show_unscaled_gradients(tmp_path):
    """Under fp16 the last step's gradients are multiplied by the loss scale; the histogram divides it out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from resnet_train.reporting import ImageSettings, RunReporter
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 65536.0 * 0.5)
    logger = RunReporter(tmp_path, "{}", {"lr": 0.1}, epochs=1,
                       settings=ImageSettings(["a", "b"], None, None, images=False, histograms_every=1))
    logger.validation(7, 1, None, model, grad_scale=65536.0)
    logger.flush()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    histogram = events.Histograms("gradients/weight")[0].histogram_value
    assert histogram.min == histogram.max == 0.5


class TwoDevices(TorchDispatchMode):
    """A GPU beside the host, simulated on one CPU: the tensors given as `on_host` (and what is
    computed from them alone) are the host's, every other tensor the GPU's, and an operation that
    combines the two raises as it would on a GPU. As in torch, a 0-dim host tensor may join an
    elementwise operation (a "CPU scalar"), but not a stack or a cat."""

    JOINS = (torch.ops.aten.stack.default, torch.ops.aten.cat.default)

    def __init__(self, on_host):
        super().__init__()
        self.host = {id(t): weakref.ref(t) for t in on_host}

    def _on_host(self, t: torch.Tensor) -> bool:
        ref = self.host.get(id(t))
        return ref is not None and ref() is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in pytree.tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if self._on_host(t)]
        if host and len(host) < len(tensors) and (func in self.JOINS or any(t.dim() for t in host)):
            raise RuntimeError(f"Expected all tensors to be on the same device ({func}: host and GPU tensors)")
        out = func(*args, **(kwargs or {}))
        if host and len(host) == len(tensors):
            self.host.update({id(t): weakref.ref(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)})
        return out


def host_kept_steps(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The state torch keeps on the host beside GPU weights: `step` of groups neither fused nor capturable."""
    return [optimizer.state[p]["step"] for g in optimizer.param_groups if not (g.get("fused") or g.get("capturable"))
            for p in g["params"] if isinstance(optimizer.state.get(p, {}).get("step"), torch.Tensor)]


@pytest.mark.parametrize("gpu", ["cuda", "mps"])
@pytest.mark.parametrize("optim", sorted(p.stem for p in (ROOT / "configs" / "optim").glob("*.yaml")))
def test_every_optimizer_checkpoints_with_its_state_where_torch_keeps_it(optim, gpu, compose_cfg):
    """Every optimizer as built for a CUDA GPU (fused where torch has it) and an Apple GPU (not
    fused): checking the state for NaN/inf and copying it for a checkpoint never combines the `step`
    counters torch keeps on the host with the weights on the GPU (it crashed the first checkpoint)."""
    from resnet_train.build import build_optimizer_and_scheduler
    from resnet_train.checkpoint import first_nonfinite, on_cpu
    cfg = compose_cfg(f"optim={optim}", "epochs=1")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer, _ = build_optimizer_and_scheduler(cfg, model, 1, torch.device(gpu))
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    host = host_kept_steps(optimizer)
    assert bool(host) == (optim != "sgd" and not (gpu == "cuda" and optim != "rmsprop"))  # (the layout simulated)
    with TwoDevices(host):
        assert first_nonfinite(model, optimizer) is None
        on_cpu(optimizer.state_dict())
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with TwoDevices(host):
        assert first_nonfinite(model, optimizer) == "model.0.weight"


def test_the_device_seam_catches_host_state_joined_to_gpu_weights():
    """The simulation itself: the stack the first checkpoint used to make raises."""
    weight, step = torch.ones(3), torch.tensor(1.0)
    with TwoDevices([step]), pytest.raises(RuntimeError, match="same device"):
        torch.stack([weight.isfinite().all(), step.isfinite().all()])
    with TwoDevices([step]):
        assert torch.equal(weight * step, weight)  # (a CPU scalar in an elementwise operation is fine)


def test_optimizer_kernels_asked_for_are_kept_and_checked_before_the_data(compose_cfg):
    """On CUDA the optimizer gets fused kernels unless the command line chose its kernels
    (`+optim.foreach=true` used to meet a forced fused=True after the data had loaded); a choice
    torch refuses is said at once, with the arguments a GPU run would build it with."""
    from resnet_train.build import build_optimizer_and_scheduler, check_buildable
    from resnet_train.errors import ConfigError
    model, cuda = torch.nn.Linear(2, 2), torch.device("cuda")
    assert build_optimizer_and_scheduler(compose_cfg("epochs=1"), model, 1, cuda)[0].defaults["fused"]
    check_buildable(compose_cfg("epochs=1", "+optim.foreach=true"), cuda)
    assert not build_optimizer_and_scheduler(compose_cfg("epochs=1", "+optim.foreach=true"), model, 1, cuda)[0] \
        .defaults.get("fused")
    with pytest.raises(ConfigError, match="foreach"):
        check_buildable(compose_cfg("epochs=1", "+optim.foreach=true", "+optim.fused=true"), cuda)


def test_one_gpu_named_for_several_processes_of_a_machine_is_refused(compose_cfg):
    """device=cuda:N under torchrun used to put every process on GPU N (the process group gave each its own)."""
    from resnet_train.errors import ConfigError
    from resnet_train.preflight import plan_run
    from resnet_train.world import World
    with pytest.raises(ConfigError, match=r"device=cuda:1 would put all 2 processes of this machine on one GPU.*"
                                          r"CUDA_VISIBLE_DEVICES"):
        plan_run(compose_cfg("device=cuda:1", "epochs=1"), [], World(1, 4, 1, "torchrun", 2))


def test_the_gpu_smoke_test_fails_where_it_cannot_run_and_its_rows_hold_on_a_cpu(tmp_path):
    """scripts/gpu_smoke.py without a GPU fails (a smoke test that ran nothing has not passed); its
    harness, run on the CPU (--device cpu: the rows that need CUDA skipped), passes every other row."""
    import json
    import subprocess
    import sys

    from conftest import subprocess_env
    env = {**subprocess_env(), "OMP_NUM_THREADS": "2"}
    smoke = [sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--json", str(tmp_path / "smoke.json")]
    result = subprocess.run(smoke, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: no CUDA GPU visible")
    result = subprocess.run([*smoke, "--device", "cpu"], env=env, capture_output=True, text=True, cwd=tmp_path,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]
    rows = {r["row"]: r["result"] for r in json.loads((tmp_path / "smoke.json").read_text())["rows"]}
    assert list(rows.values()).count("PASS") == 9 and "FAIL" not in rows.values(), rows
