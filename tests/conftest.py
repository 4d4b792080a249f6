"""Shared fixtures: small learnable data sets in the real on-disk formats, one runner for the console
scripts (the real entry point in this process, or a true subprocess where only a process shows the
behaviour; in its own working directory, offline, CPU), one TensorBoard reader, and an in-process
`train` for tests of the training function itself."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
import traceback
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the console scripts run in this process too: CPU only, as in a subprocess

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# One clearly different color per class: learnable in a couple of epochs, robust to crop and flip.
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [250, 190, 190], [0, 0, 128]], dtype=np.int16)


def make_images(n: int, num_classes: int = 10, size: int | tuple[int, int] = 32, seed: int = 0,
                label_noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images: a noisy class-colored square at a random place on a noisy gray background.
    `label_noise` of the images are drawn with a random class's color, so accuracy stays below 100%
    and matching numbers (e.g. eval vs training) say something. `size` may be (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(60, 196, size=(n, height, width, 3), dtype=np.int16)
    side = min(width, height) // 2
    for i, label in enumerate(labels):
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        color = rng.integers(num_classes) if rng.random() < label_noise else label
        patch = PALETTE[color % len(PALETTE)] + rng.integers(-20, 21, size=(side, side, 3))
        images[i, top:top + side, left:left + side] = patch
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


# --------------------------------------------------------------------------------------------
# CIFAR in torchvision's format, with its real integrity check
# --------------------------------------------------------------------------------------------

def register_md5s(folder: Path) -> None:
    """Record the md5 of every file in `folder` where the CIFAR integrity check looks them up."""
    registry = Path(os.environ["RESNET_TRAIN_TEST_CIFAR_MD5"])
    known = json.loads(registry.read_text()) if registry.is_file() else {}
    for path in folder.iterdir():
        known[str(path.resolve())] = hashlib.md5(path.read_bytes()).hexdigest()
    tmp = registry.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known))
    tmp.replace(registry)


def write_cifar(root: Path, name: str = "cifar10", n_train: int = 1000, n_test: int = 500, seed: int = 0) -> Path:
    """CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta) or CIFAR-100's (train,
    test, meta) as torchvision reads them; their md5s go to the test registry."""
    num_classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    train_images, train_labels = make_images(n_train, num_classes, seed=seed)  # balanced classes in each split
    test_images, test_labels = make_images(n_test, num_classes, seed=seed + 1)
    images, labels = np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR stores planar RGB rows
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def dump(filename: str, idx: np.ndarray) -> None:
        with open(folder / filename, "wb") as f:
            pickle.dump({"batch_label": filename, label_key: labels[idx].tolist(), "data": rows[idx],
                         "filenames": [f"{i}.png" for i in idx]}, f, protocol=2)

    if name == "cifar10":
        for k, idx in enumerate(np.array_split(np.arange(n_train), 5), 1):
            dump(f"data_batch_{k}", idx)
        dump("test_batch", np.arange(n_train, n_train + n_test))
        meta = ("batches.meta", {"label_names": CLASSES, "num_cases_per_batch": n_train // 5, "num_vis": 3072})
    else:
        dump("train", np.arange(n_train))
        dump("test", np.arange(n_train, n_train + n_test))
        meta = ("meta", {"fine_label_names": [f"class{i:02d}" for i in range(100)], "coarse_label_names": []})
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f, protocol=2)
    register_md5s(folder)
    return root


# A sitecustomize for the console scripts under test: torchvision's CIFAR integrity check runs for
# real, expecting our generated files' md5s (looked up by path in the registry) instead of the
# official ones. Installed when torchvision.datasets.cifar is first imported, so processes that
# never read CIFAR start as fast as usual.
SITECUSTOMIZE = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, os, sys

    def expected_md5s(check_integrity):
        def check(fpath, md5=None):
            registry = os.environ.get("RESNET_TRAIN_TEST_CIFAR_MD5", "")
            known = json.load(open(registry)) if os.path.isfile(registry) else {}
            return check_integrity(fpath, known.get(os.path.realpath(fpath), md5))
        return check

    class PatchCifarChecksums(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "torchvision.datasets.cifar":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                module.check_integrity = expected_md5s(module.check_integrity)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, PatchCifarChecksums())

    if os.environ.get("RESNET_TRAIN_TEST_HOOK"):  # a test's fault injection (e.g. running out of memory)
        exec(open(os.environ["RESNET_TRAIN_TEST_HOOK"]).read())
""")


# The test files, longest first (measured on the 2-core machine): pytest-xdist hands whole files to
# its two workers in this order (--no-loadscope-reorder), so they finish together.
LONGEST_FIRST = ["test_readme", "test_accuracy", "test_export", "test_distributed", "test_faults", "test_trackers",
                 "test_cli", "test_sweep", "test_transfer", "test_config", "test_resume", "test_engine", "test_packaging",
                 "test_models", "test_portability", "test_augment", "test_data", "test_layout"]


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Path:
    """A folder for one test module's shared runs, removed when the module's tests pass: the README's
    runs alone write ~5 GB (resnet50 checkpoints and exports), and a test suite should not fill the
    disk it runs on. (Each test's own `tmp_path` is removed when it passes: pyproject.toml.)"""
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp("module")
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def test_environment(tmp_path_factory) -> Path:
    """Session-wide: the md5 registry and the sitecustomize directory, named in os.environ so every
    subprocess finds them; the same expected-md5 lookup for CIFAR read in this process; one torch
    thread (pytest-xdist runs a test per core, and the console scripts run in its process too)."""
    import torch
    import torchvision.datasets.cifar as cifar

    root = tmp_path_factory.mktemp("env")
    (root / "sitecustomize.py").write_text(SITECUSTOMIZE)
    os.environ["RESNET_TRAIN_TEST_CIFAR_MD5"] = str(root / "cifar-md5.json")
    os.environ["RESNET_TRAIN_TEST_SITE"] = str(root)
    namespace: dict = {}
    exec(SITECUSTOMIZE.split("class PatchCifarChecksums")[0], namespace)
    real_check = cifar.check_integrity
    cifar.check_integrity = namespace["expected_md5s"](real_check)
    torch.set_num_threads(1)
    yield root
    cifar.check_integrity = real_check


@pytest.fixture
def cifar_checksums():
    """CIFAR read in this process checks the generated files' md5s (set up for the whole session)."""


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def small_cifar_root(tmp_path_factory) -> Path:
    """240 training and 40 test images: with dataset.val_size=40 and batch_size=32, 6 steps an epoch."""
    return write_cifar(tmp_path_factory.mktemp("small-cifar"), n_train=240, n_test=40)


def write_image_folder(root: Path, splits: dict[str, int], num_classes: int = 4, size: int | tuple[int, int] = 32,
                       seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png|jpg with `splits` = {"train": n, "test": n, ...}."""
    for k, (split, n) in enumerate(splits.items()):
        images, labels = make_images(n, num_classes, size, seed=seed + k)
        for i, (img, label) in enumerate(zip(images, labels)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:05d}.{'png' if i % 2 else 'jpg'}", quality=95)
    return root


@pytest.fixture(scope="session")
def image_folder_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), {"train": 400, "test": 200})


# --------------------------------------------------------------------------------------------
# Running the console scripts as a user does
# --------------------------------------------------------------------------------------------


def subprocess_env() -> dict:
    """CPU only, one thread each (pytest-xdist runs two tests at a time on the 2 cores), the CIFAR
    checksums of the generated data."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TORCH_HOME": os.environ.get(
        "TORCH_HOME", str(Path(os.environ["RESNET_TRAIN_TEST_SITE"]) / "torch-home"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ["RESNET_TRAIN_TEST_SITE"], env.get("PYTHONPATH")) if p)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def script(name: str) -> str:
    """The installed console script next to this interpreter."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed; run: pip install -e '.[test]'"
    return str(path)


# Environment variables only a fresh interpreter honours (a hidden package on PYTHONPATH): a runner
# with one of them runs its commands with the installed console scripts.
INTERPRETER_ONLY_ENV = ("PYTHONPATH",)


class Runner:
    """Runs console scripts in one working directory (relative paths and default output folders
    resolve there, as for a user in a terminal), three ways:

    runner(name, *args)            the script's real entry point in this process -- argv set, stdout
                                   and stderr captured, SystemExit caught, Hydra's global state, the
                                   environment and the working directory restored -- which spares a
                                   process per call (the default: the error contracts, most runs)
    runner.process / .popen(...)   a true process of its own (its pid, its signals, killed for
                                   real), forked from a server that has imported torch and resnet_train
                                   once: kills and signals, runs started at once, sweeps, a fault hook
    runner.installed(name, ...)    the installed console script in a fresh interpreter, as a user
                                   types it (one run per script); torchrun, and a hidden package
    """

    def __init__(self, cwd: Path, **env: str):
        self.cwd = Path(cwd)
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.extra_env = env
        self.env = {**subprocess_env(), **env}

    def __call__(self, name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """In this process, except what only a process runs: a sweep (Hydra's launchers) or a fault
        hook (RESNET_TRAIN_TEST_HOOK) in a forked process; torchrun or a hidden package in a fresh one."""
        args = [str(a) for a in args]
        if name not in console_scripts() or any(key in self.extra_env for key in INTERPRETER_ONLY_ENV):
            return self.installed(name, *args, timeout=timeout)
        sweep = {"-m", "--multirun"} & set(args) or any(a.startswith("hparams_search=") for a in args)
        if sweep or "RESNET_TRAIN_TEST_HOOK" in self.extra_env:
            return self.process(name, *args, timeout=timeout)
        return run_in_process(name, args, self.cwd, self.extra_env)

    def installed(self, name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([script(name), *map(str, args)], cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def process(self, name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        proc = ForkedProcess(name, [str(a) for a in args], self.cwd, self.env, merge_output=False)
        stdout, stderr = proc.communicate(timeout)
        return subprocess.CompletedProcess([name, *args], proc.returncode, stdout, stderr)

    def popen(self, name: str, *args: str, env: dict[str, str] | None = None) -> ForkedProcess | subprocess.Popen:
        """A process whose output (stdout and stderr together) is read line by line as it runs."""
        env = {**self.env, **(env or {})}
        if name not in console_scripts():
            return subprocess.Popen([script(name), *map(str, args)], cwd=self.cwd, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return ForkedProcess(name, [str(a) for a in args], self.cwd, env, merge_output=True)


# --------------------------------------------------------------------------------------------
# True processes without an interpreter start each: forked from a server that imported everything
# --------------------------------------------------------------------------------------------

PRELOAD = ["conftest", "resnet_train.cli", "resnet_train.commands.train", "resnet_train.commands.eval",
           "resnet_train.commands.predict", "resnet_train.commands.summary", "resnet_train.reporting"]
_forkserver = None


def _fork_context():
    """multiprocessing's forkserver: a clean process (no test threads, no state of earlier runs) that
    imports PRELOAD once; every process is forked from it, ready in milliseconds."""
    import multiprocessing

    global _forkserver
    if _forkserver is None:
        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(PRELOAD)
    return _forkserver


def _forked_command(name: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The child: what the installed console script does, with its output going to files (the
    sitecustomize's CIFAR checksums and fault hook applied, as in a fresh interpreter)."""
    import multiprocessing

    import torch
    import torchvision.datasets.cifar as cifar

    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(cwd)
    # A forkserver's child inherits its start method; a user's Linux interpreter (before 3.14) forks
    # DataLoader workers instead of starting a server that imports torch again.
    multiprocessing.set_start_method("fork", force=True)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(1)
    namespace: dict = {}
    exec(SITECUSTOMIZE.split("class PatchCifarChecksums")[0], namespace)
    cifar.check_integrity = namespace["expected_md5s"](cifar.check_integrity)
    if env.get("RESNET_TRAIN_TEST_HOOK"):  # a test's fault injection (e.g. running out of memory)
        exec(open(env["RESNET_TRAIN_TEST_HOOK"]).read(), {})
    sys.argv = [name, *args]
    console_scripts()[name].load()()  # (SystemExit and exceptions become the exit status, as in an interpreter)


class ForkedProcess:
    """A console script in a process of its own (see Runner), with subprocess.Popen's interface:
    pid, kill, send_signal, wait, communicate, returncode (negative: killed by that signal), and
    stdout as lines while it runs (with merge_output, stderr's among them)."""

    def __init__(self, name: str, args: list[str], cwd: Path, env: dict[str, str], merge_output: bool):
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="forked-"))
        self.out, self.err = folder / "stdout", folder / ("stdout" if merge_output else "stderr")
        self.out.touch()
        self.err.touch()
        self.process = _fork_context().Process(target=_forked_command,
                                               args=(name, args, str(cwd), env, str(self.out), str(self.err)))
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.process.kill()

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return self.process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        self.wait(timeout)
        return self.out.read_text(), None if self.err == self.out else self.err.read_text()

    @property
    def stdout(self):
        """The output's lines as they are written, until the process has ended."""
        with open(self.out) as f:
            pending = ""
            while True:
                chunk = f.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith("\n"):
                        yield pending
                        pending = ""
                    continue
                if self.process.exitcode is not None:
                    rest = pending + f.read()
                    if rest:
                        yield rest
                    return
                time.sleep(0.02)


def console_scripts() -> dict:
    """resnet-train & co.: the entry points `pip install` made console scripts of."""
    return {ep.name: ep for ep in entry_points(group="console_scripts") if ep.value.startswith("resnet_train.")}


def run_in_process(name: str, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The console script `name` run as a process would run it, in this one: what it printed and
    its exit status (an uncaught exception: its traceback on stderr and 1, as the interpreter does)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from resnet_train import cli

    main = console_scripts()[name].load()
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv[:], os.getcwd()
    root, saved_handlers, saved_level = logging.getLogger(), logging.getLogger().handlers[:], logging.getLogger().level
    code = 0
    try:
        os.environ.update(env)
        os.environ.pop("HYDRA_FULL_ERROR", None)
        os.chdir(cwd)
        sys.argv = [name, *args]
        cli.STARTED = time.time()  # (time_budget counts from the command's start)
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 (a bug: what the interpreter does with an uncaught exception)
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv[:] = saved_argv
        os.chdir(saved_cwd)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        for handler in root.handlers[:]:  # (Hydra's console handler and the run's train.log)
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        logging.raiseExceptions = True
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def run_cli(tmp_path) -> Runner:
    """A runner whose working directory is this test's own scratch folder."""
    return Runner(tmp_path / "work")


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def assert_one_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> None:
    """Failed with `code` and exactly one line on stderr, `error: ...`, containing every fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


# --------------------------------------------------------------------------------------------
# Reading results
# --------------------------------------------------------------------------------------------


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events(run_dir).Scalars(tag)]


def metrics_of(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


# --------------------------------------------------------------------------------------------
# Configs and in-process training
# --------------------------------------------------------------------------------------------


@pytest.fixture
def compose_cfg():
    """Compose the training config with overrides through Hydra's compose API."""
    def _compose(*overrides: str, config_name: str = "train"):
        with initialize_config_module(config_module="resnet_train.configs", version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    return _compose


@pytest.fixture
def train_in_process(compose_cfg, cifar_checksums, monkeypatch):
    """`train(cfg)` in this process (lightning-hydra-template style): no interpreter start-up, the
    same code path after Hydra. Returns (metrics, run_dir)."""
    import torch

    from resnet_train.commands.train import train

    torch.set_num_threads(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    def run(run_dir: Path, *overrides: str) -> dict:
        cfg = compose_cfg(*overrides, "progress=false")
        return train(cfg, Path(run_dir), list(overrides))
    return run
