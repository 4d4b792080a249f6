#!/usr/bin/env python
"""The whole flow on a CUDA GPU, each row asserting an outcome, not an exit status: accuracy above
chance on learnable generated CIFAR-format data, finite weights, the fp16 loss scale in use, eval
agreeing with the run's own test, a SIGTERM landing mid-epoch (RESNET_TRAIN_PAUSE_AT) and the
resume ending bitwise equal to an uninterrupted run, every optimizer through 20 steps and a
checkpoint on the GPU, a 2-process DDP run on the one GPU, no recompilation after the first epoch
with compile=true, deterministic runs equal, and scripts/sync_check.py on the step training builds.
Prints a table and writes gpu_smoke.json (--json). Exit status 1 if a row failed.

    pip install -e ".[test]" && bash scripts/gpu_smoke.sh        (about 4 minutes on one GPU)
    python scripts/gpu_smoke.py --device cpu                     (the harness itself, on a CPU:
                                                                  rows that need CUDA are skipped)
Without a CUDA GPU and without --device cpu it fails: a smoke test that ran nothing has not passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
CHANCE = 0.1  # 10 classes
ABOVE_CHANCE = 0.25  # what 2 epochs on the generated data must beat (they reach far more on a GPU)


class Skip(Exception):
    """A row that does not apply on this device."""


class Smoke:
    def __init__(self, device: str, small: bool):
        self.device, self.rows = device, []
        model, batch = ("resnet20", 128) if small else ("resnet18", 256)
        self.common = [f"model={model}", f"batch_size={batch}", "dataset.val_size=500", "num_workers=2",
                       "progress=false", "tensorboard.images=false", f"device={device}"]
        self.small = small

    def run(self, *command: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """`command`'s stdout and stderr as one stream, in the order written (stderr: empty)."""
        result = subprocess.run(command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=timeout)
        Path("last.log").write_text(f"$ {' '.join(command)}\n{result.stdout}")
        return result

    def train(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        result = self.run("resnet-train", *self.common, *args, env=env)
        ok(result)
        return result

    def row(self, name: str, check: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            outcome, detail = "PASS", check()
        except Skip as e:
            outcome, detail = "SKIP", str(e)
        except Exception as e:  # (an assertion, a timeout, a missing file: the row failed)
            outcome, detail = "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:300]
        self.rows.append({"row": name, "result": outcome, "seconds": round(time.perf_counter() - start, 1),
                          "detail": detail})
        print(f"[{outcome}] {name}: {detail}", flush=True)

    def needs_cuda(self) -> None:
        if self.device != "cuda":
            raise Skip("needs CUDA")


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}: {(result.stdout.strip().splitlines() or [''])[-1]}"


def metrics(run: str) -> dict:
    return json.loads(Path(run, "metrics.json").read_text())


def last(run: str, name: str = "last") -> dict:
    return torch.load(Path(run, "checkpoints", f"{name}.pt"), weights_only=True, map_location="cpu")


def finite_weights(run: str) -> None:
    bad = [k for k, t in last(run)["model"].items() if t.is_floating_point() and not t.isfinite().all()]
    assert not bad, f"non-finite weights: {bad[:3]}"


def above_chance(run: str) -> float:
    accuracy = metrics(run)["test_accuracy"]
    assert accuracy > ABOVE_CHANCE, f"test accuracy {accuracy:.2%} is not above {ABOVE_CHANCE:.0%} (chance {CHANCE:.0%})"
    return accuracy


def same_weights(a: str, b: str) -> None:
    wa, wb = last(a)["model"], last(b)["model"]
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}"


# The rows ------------------------------------------------------------------------------------


def bf16(s: Smoke) -> str:
    s.train("epochs=2", "precision=bf16" if s.device == "cuda" else "precision=auto", "hydra.run.dir=runs/bf16")
    finite_weights("runs/bf16")
    return f"test accuracy {above_chance('runs/bf16'):.2%}, weights finite, {metrics('runs/bf16')['images_per_second']:,.0f} img/s"


def fp16(s: Smoke) -> str:
    s.needs_cuda()
    s.train("epochs=2", "precision=fp16", "hydra.run.dir=runs/fp16")
    finite_weights("runs/fp16")
    scaler = last("runs/fp16")["scaler"]
    assert scaler and (scaler["scale"] != 65536.0 or scaler["_growth_tracker"] > 0), f"loss scale unused: {scaler}"
    return f"test accuracy {above_chance('runs/fp16'):.2%}, loss scale {scaler['scale']:g} after {scaler['_growth_tracker']} clean steps"


def evaluation(s: Smoke) -> str:
    ok(s.run("resnet-eval", "checkpoint=runs/bf16", "output=eval.json", f"device={s.device}"))
    ours, run = json.loads(Path("eval.json").read_text())["accuracy"], metrics("runs/bf16")["test_accuracy"]
    assert abs(ours - run) <= 0.005, f"resnet-eval {ours:.2%} vs the run's own test {run:.2%}"
    return f"{ours:.2%} = the run's test accuracy {run:.2%}"


def evaluation_on_cpu(s: Smoke) -> str:
    s.needs_cuda()
    ok(s.run("resnet-eval", "checkpoint=runs/fp16", "output=eval_cpu.json", "device=cpu"))
    ours, run = json.loads(Path("eval_cpu.json").read_text())["accuracy"], metrics("runs/fp16")["test_accuracy"]
    assert abs(ours - run) <= 0.02, f"on the CPU {ours:.2%} vs on the GPU {run:.2%}"
    return f"fp16 GPU run evaluated on the CPU: {ours:.2%} (GPU: {run:.2%})"


def prediction(s: Smoke) -> str:
    ok(s.run("resnet-predict", "checkpoint=runs/bf16", "inputs=[photos/test]", "output=predictions.csv"))
    rows = Path("predictions.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 24, f"{len(rows)} predictions for 24 files"
    return "24 files predicted"


def checkpoint_on_cpu(s: Smoke) -> str:
    def devices(obj):
        if isinstance(obj, torch.Tensor):
            yield obj.device.type
        elif isinstance(obj, (dict, list, tuple)):
            for v in (obj.values() if isinstance(obj, dict) else obj):
                yield from devices(v)
    found = set(devices(torch.load("runs/bf16/checkpoints/last.pt", weights_only=True)))  # (no map_location)
    assert found == {"cpu"}, found
    return "every tensor of last.pt on the CPU"


def sigterm_and_resume(s: Smoke) -> str:
    run = ["model=resnet20", "epochs=2", "seed=5", "deterministic=true", "checkpoint.every_n_steps=4"]
    s.train(*run, "hydra.run.dir=runs/uninterrupted")
    env = {**os.environ, "RESNET_TRAIN_PAUSE_AT": "train_step@6", "RESNET_TRAIN_PAUSE_SECONDS": "120"}
    proc = subprocess.Popen(["resnet-train", *s.common, *run, "hydra.run.dir=runs/stopped"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("paused at"):
            break
    else:
        raise AssertionError(f"exit {proc.wait()} before reaching step 6")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, f"exit {proc.returncode} after SIGTERM (expected 143)"
    state = last("runs/stopped")["state"]
    assert state["epoch"] == 0 and state["epoch_progress"]["step"] == 6, f"stopped at {state}"
    ok(s.run("resnet-train", "resume=runs/stopped"))
    same_weights("runs/uninterrupted", "runs/stopped")
    return "stopped at epoch 1 step 6 (exit 143); resumed: weights bitwise equal to the uninterrupted run"


def every_optimizer(s: Smoke) -> str:
    """20 steps of each optimizer as training builds it on this device, then what a checkpoint does
    with its state: the finiteness check, a CPU copy, a restore (Adam & co. keep `step` on the CPU)."""
    from resnet_train.build import training_step
    from resnet_train.checkpoint import first_nonfinite, on_cpu
    from resnet_train.composing import compose_train
    from resnet_train.device import Precision, pick_precision
    from resnet_train.models import resnet20

    device = torch.device(s.device)
    precision = Precision(pick_precision("auto", device), device.type)
    done = []
    for optim in sorted(p.stem for p in (HERE.parent / "configs" / "optim").glob("*.yaml")):
        model = resnet20().to(device)
        step = training_step(compose_train([f"optim={optim}", "epochs=1"]), model, precision, 20, device)
        images, labels = torch.randn(20 * 32, 3, 32, 32, device=device), torch.randint(0, 10, (20 * 32,), device=device)
        for i in range(20):
            step(iter([(images[i * 32:(i + 1) * 32], labels[i * 32:(i + 1) * 32])]))
        assert first_nonfinite(step.model, step.optimizer) is None, f"{optim}: non-finite state"
        saved = on_cpu(step.optimizer.state_dict())
        step.optimizer.load_state_dict(saved)
        step(iter([(images[:32], labels[:32])]))
        kernel = "fused" if step.optimizer.param_groups[0].get("fused") else "not fused"
        done.append(f"{optim} ({kernel})")
    return f"20 steps, checked, saved, restored, stepped again: {', '.join(done)}"


def adam_cpu_to_gpu(s: Smoke) -> str:
    s.needs_cuda()
    s.train("model=resnet20", "optim=adam", "epochs=1", "device=cpu", "hydra.run.dir=runs/adam")
    ok(s.run("resnet-train", "resume=runs/adam", "epochs=2", "device=cuda"))
    assert metrics("runs/adam")["epochs"] == 2
    finite_weights("runs/adam")
    return "1 epoch on the CPU, the second on the GPU (fused Adam): finite, finished"


def two_processes(s: Smoke) -> str:
    env = {"RESNET_TRAIN_DIST_BACKEND": "gloo"} if s.device == "cuda" else {}  # (NCCL refuses 2 ranks on 1 GPU)
    result = s.run("torchrun", "--standalone", "--nproc_per_node=2", "-m", "resnet_train", *s.common, "epochs=2",
                   "hydra.run.dir=runs/ddp", env=env)
    ok(result)
    assert "2 processes (DistributedDataParallel)" in result.stdout
    m = metrics("runs/ddp")
    assert m["test_images"] == 1000, f"test_images {m['test_images']} (each of the 1000 once)"
    return f"2 processes on one {s.device} device (gloo): test accuracy {above_chance('runs/ddp'):.2%} on 1000 images"


def compiled(s: Smoke) -> str:
    result = s.train("epochs=3", "compile=true", "hydra.run.dir=runs/compiled", env={"TORCH_LOGS": "recompiles"})
    lines = result.stdout.splitlines()
    epochs = [i for i, line in enumerate(lines) if re.search(r"epoch \d+/3 ", line)]
    assert len(epochs) == 3, "the run's epoch lines are missing"
    first = [line for line in lines[:epochs[0]] if "Recompiling" in line]
    later = [line for line in lines[epochs[0]:epochs[-1]] if "Recompiling" in line]
    # (the first validation recompiles once, for eval mode: seeing it shows the log is captured)
    assert first, "no recompilation logged at the first validation: is TORCH_LOGS=recompiles captured?"
    assert not later, f"{len(later)} recompilations after the first epoch: {later[0][:150]}"
    return (f"{len(first)} recompilation in epoch 1 (validation), none in epochs 2-3; "
            f"test accuracy {above_chance('runs/compiled'):.2%}")


def deterministic(s: Smoke) -> str:
    for name in ("det1", "det2"):
        s.train("epochs=1", "deterministic=true", "seed=3", f"hydra.run.dir=runs/{name}")
    same_weights("runs/det1", "runs/det2")
    return "two deterministic runs: weights bitwise equal"


def no_host_sync(s: Smoke) -> str:
    s.needs_cuda()
    result = s.run(sys.executable, str(HERE / "sync_check.py"))
    ok(result)
    clean = result.stdout.count("| no sync |")
    assert clean == 12, f"{clean} of 12 option x precision rows without a sync"
    return "12 of 12 augment option x precision steps without a host sync"


ROWS = [("train 2 epochs, bf16", bf16), ("train 2 epochs, fp16 + GradScaler", fp16),
        ("resnet-eval = the run's test", evaluation), ("resnet-eval of the fp16 run on the CPU", evaluation_on_cpu),
        ("resnet-predict", prediction), ("checkpoint tensors on the CPU", checkpoint_on_cpu),
        ("SIGTERM mid-epoch + resume, bitwise", sigterm_and_resume), ("every optimizer, 20 steps", every_optimizer),
        ("Adam: CPU, then resumed on the GPU", adam_cpu_to_gpu), ("2-process DDP on one device", two_processes),
        ("compile=true: no recompilation after epoch 1", compiled), ("deterministic=true twice", deterministic),
        ("no host sync in a training step (sync_check.py)", no_host_sync)]


def make_data(n_train: int) -> None:
    """CIFAR-10 python batches of learnable generated images, and the tests' sitecustomize that makes
    torchvision's integrity check expect their md5 sums."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import conftest

    Path("sitecustomize.py").write_text(conftest.SITECUSTOMIZE)
    conftest.write_cifar(Path("data"), n_train=n_train, n_test=1000)
    conftest.write_image_folder(Path("photos"), {"test": 24}, num_classes=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--json", type=Path, default=Path("gpu_smoke.json").resolve())
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: no CUDA GPU visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
              "the smoke test ran nothing; --device cpu checks the harness itself", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"device: {device}, torch {torch.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke."))
    os.chdir(work)
    os.environ.update(RESNET_TRAIN_TEST_CIFAR_MD5=str(work / "cifar-md5.json"),
                      PYTHONPATH=os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")])))
    make_data(5600 if args.device == "cuda" else 1600)
    smoke, start = Smoke(args.device, small=args.device != "cuda"), time.perf_counter()
    for name, check in ROWS:
        smoke.row(name, lambda: check(smoke))
    print("\n| row | result | seconds | detail |\n|---|---|---:|---|")
    for r in smoke.rows:
        print(f"| {r['row']} | {r['result']} | {r['seconds']} | {r['detail']} |")
    failed = [r for r in smoke.rows if r["result"] == "FAIL"]
    args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": smoke.rows,
                                     "seconds": round(time.perf_counter() - start), "work": str(work)}, indent=2))
    print(f"\n{len(smoke.rows) - len(failed)} of {len(smoke.rows)} rows passed or skipped in "
          f"{time.perf_counter() - start:.0f}s; wrote {args.json}" + (f"; work dir kept: {work}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
