"""Shared fixtures: composed configs, small learnable data sets in the real on-disk formats, and a
runner for the console scripts as subprocesses (offline, CPU)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# One clearly different color per class: learnable in a couple of epochs, robust to crop and flip.
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [250, 190, 190], [0, 0, 128]], dtype=np.int16)


def make_images(n: int, num_classes: int = 10, size: int = 32, seed: int = 0,
                label_noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images: a noisy class-colored square at a random place on a noisy gray background.
    `label_noise` of the images are drawn with a random class's color, so accuracy stays below 100%
    and matching numbers (e.g. eval vs training) say something."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(60, 196, size=(n, size, size, 3), dtype=np.int16)
    side = size // 2
    for i, label in enumerate(labels):
        top, left = rng.integers(0, size - side + 1, size=2)
        color = rng.integers(num_classes) if rng.random() < label_noise else label
        patch = PALETTE[color % len(PALETTE)] + rng.integers(-20, 21, size=(side, side, 3))
        images[i, top:top + side, left:left + side] = patch
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_cifar10(root: Path, n_train: int = 1000, n_test: int = 500, seed: int = 0) -> Path:
    """CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta) as torchvision reads them."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images, train_labels = make_images(n_train, seed=seed)  # balanced classes in each split
    test_images, test_labels = make_images(n_test, seed=seed + 1)
    images, labels = np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR stores planar RGB rows

    def dump(name: str, idx: np.ndarray) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels[idx].tolist(), "data": rows[idx],
                         "filenames": [f"{i}.png" for i in idx]}, f, protocol=2)

    for k, idx in enumerate(np.array_split(np.arange(n_train), 5), 1):
        dump(f"data_batch_{k}", idx)
    dump("test_batch", np.arange(n_train, n_train + n_test))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": n_train // 5, "num_vis": 3072}, f, protocol=2)
    return root


def write_image_folder(root: Path, splits: dict[str, int], num_classes: int = 4, size: int = 32, seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png|jpg with `splits` = {"train": n, "test": n, ...}."""
    for k, (split, n) in enumerate(splits.items()):
        images, labels = make_images(n, num_classes, size, seed=seed + k)
        for i, (img, label) in enumerate(zip(images, labels)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:05d}.{'png' if i % 2 else 'jpg'}", quality=95)
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def image_folder_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), {"train": 400, "test": 200})


@pytest.fixture(scope="session")
def fake_md5_dir(tmp_path_factory) -> Path:
    """A sitecustomize for subprocesses: torchvision's CIFAR md5 checks accept any existing file
    (the only part of the real format our generated batches cannot match). It patches the module
    when it is first imported, so processes that never load CIFAR start as fast as usual."""
    d = tmp_path_factory.mktemp("sitecustomize")
    (d / "sitecustomize.py").write_text(textwrap.dedent("""
        import importlib.abc, importlib.machinery, os, sys

        class PatchCifarIntegrityCheck(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name != "torchvision.datasets.cifar":
                    return None
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                run_module = spec.loader.exec_module

                def exec_module(module):
                    run_module(module)
                    module.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
                spec.loader.exec_module = exec_module
                return spec

        sys.meta_path.insert(0, PatchCifarIntegrityCheck())
    """))
    return d


@pytest.fixture
def fake_md5(monkeypatch):
    """The same md5 bypass for in-process tests."""
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def subprocess_env(fake_md5_dir: Path | None = None) -> dict:
    """The environment for the console scripts under test: CPU only, one thread each (pytest-xdist
    runs two tests at a time on the 2 cores), and the CIFAR md5 bypass when given."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    if fake_md5_dir is not None:
        env["PYTHONPATH"] = str(fake_md5_dir)
    return env


def script(name: str) -> str:
    """The installed console script next to this interpreter."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed; run: pip install -e '.[test]'"
    return str(path)


@pytest.fixture
def run_cli(fake_md5_dir, tmp_path):
    """Run a console script in a subprocess, offline, from a scratch directory."""
    def run(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([script(name), *args], cwd=tmp_path, env=subprocess_env(fake_md5_dir),
                              capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture
def compose_cfg():
    """Compose the training config with overrides through Hydra's compose API."""
    def _compose(*overrides: str, config_name: str = "train"):
        with initialize_config_module(config_module="resnet_train.configs", version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    return _compose
