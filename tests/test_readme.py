"""The README's command lines, run as typed: parsed from its ```bash blocks and run in order from one
fresh working directory (relative paths, default output folders), so the README and the tool
cannot drift apart.

Only the data is swapped and the work shrunk: dataset.root points at small generated sets placed
where the README's paths say (./data for CIFAR, ./pets for an image folder), runs train for one
epoch (one step) on them, time budgets become 3s, 224px becomes 72px (still the imagenet stem), a
placeholder run directory (`outputs/2026-11-23/14-02-11`) becomes the newest run, batches have 32
images, and image summaries (tested in test_sweep.py) are off. Lines that cannot run here (installing,
the test suite itself, a SLURM cluster, several machines) are listed in SKIPPED with the reason:
any other line must run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import Runner, events, make_images, write_cifar, write_image_folder
from omegaconf import OmegaConf
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = ("resnet-train", "resnet-eval", "resnet-predict", "resnet-summary", "resnet-export", "resnet-shards",
            "torchrun", "tensorboard")
SKIPPED = {  # a README line starting with ... : why it is not run here
    "python3 -m venv": "creates the environment these tests run in",
    ". .venv/bin/activate": "activates the environment these tests run in",
    "pip install": "installs what these tests run with",
    "python -m pytest": "the test suite itself",
    "python scripts/benchmark.py": "benchmarks print tables; they are never timed in tests",
    "python scripts/make_photo_folder.py": "reads the shared CIFAR-10 copy, which the tests must not depend on (benchmark input)",
    "bash scripts/gpu_smoke.sh": "needs a CUDA GPU (run by hand where there is one)",
    "torchrun --nnodes": "needs several machines",
    "resnet-train -m hydra/launcher=slurm": "needs a SLURM cluster (the launcher config is tested in test_distributed)",
}
PLACEHOLDER_RUN = re.compile(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d")
PLACEHOLDER_SWEEP = re.compile(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d")


def readme_command_lines() -> list[str]:
    """Every command line of the README's ```bash blocks (continuations joined, comments dropped),
    split at `&&`."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            lines += [part.strip() for part in line.split("&&") if part.strip()]
    return lines


def skip_reason(line: str) -> str | None:
    return next((why for start, why in SKIPPED.items() if line.startswith(start)), None)


def adapt(line: str, cwd: Path) -> list[str]:
    """The README line with the data swapped and the work shrunk (see the module docstring)."""
    newest_run = max((p.parent for p in cwd.glob("outputs/*/*/checkpoints")), key=lambda p: p.stat().st_mtime,
                     default=None)
    newest_sweep = max(cwd.glob("multirun/*/*"), key=lambda p: p.stat().st_mtime, default=None)
    if newest_run is not None:
        line = PLACEHOLDER_RUN.sub(str(newest_run.relative_to(cwd)), line)
    if newest_sweep is not None:
        line = PLACEHOLDER_SWEEP.sub(str(newest_sweep.relative_to(cwd)), line)
    args = shlex.split(line)
    args = [_data_root(a, line, _run_dataset(args, cwd)) for a in args]
    if args[0] not in ("resnet-train", "torchrun") or "--help" in args:
        return args
    keys = {a.split("=", 1)[0].lstrip("+") for a in args if "=" in a and not a.startswith("-")}
    shrunk = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "epochs":
            arg = "epochs=auto" if value == "auto" else "epochs=1"
        elif key == "time_budget":
            arg = "time_budget=3s"
        elif key == "dataset.image_size" and int(value) > 72:
            arg = "dataset.image_size=72"
        elif key == "hydra.sweeper.n_trials":
            arg = "hydra.sweeper.n_trials=2"
        elif key == "batch_size":
            arg = "batch_size=32"
        shrunk.append(arg)
    extra = ["epochs=1", "batch_size=32", "progress=false", "num_workers=0", "tensorboard.images=false"]
    if any(a.startswith("experiment=") and "finetune" in a or "linear_probe" in a for a in args):
        extra.append("dataset.image_size=72")
    if "resume" not in keys and "dataset=webdataset" not in args:  # (shards hold nothing out)
        extra.append("dataset.val_size=16" if "dataset=image_folder" not in args else "dataset.val_size=0.25")
    if any(a.startswith("experiment=budget") for a in args):  # (its time_budget picks the epochs)
        extra.append("time_budget=3s")
    skip = {"epochs"} if "resume" in keys or "time_budget" in keys or "time_budget=3s" in extra else set()
    return shrunk + [e for e in extra if e.split("=")[0] not in keys | skip]


def _data_root(arg: str, line: str, run_dataset: str | None) -> str:
    if not arg.startswith("dataset.root="):
        return arg
    folder = "dataset=image_folder" in line or run_dataset == "image_folder"
    return "dataset.root=pets" if folder else "dataset.root=data"


def _run_dataset(args: list[str], cwd: Path) -> str | None:
    """The dataset of the run a `checkpoint=` argument names (resnet-eval swaps data for it)."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("checkpoint=")]
    if not given:
        return None
    path = cwd / given[0]
    run_dir = path.parent.parent if path.suffix == ".pt" else path
    return OmegaConf.load(run_dir / ".hydra" / "config.yaml").dataset.name


@pytest.fixture(scope="module")
def user(module_tmp) -> Runner:
    """A fresh working directory with the data where the README's commands look for it, and
    torchvision's ImageNet file names in $TORCH_HOME (random weights: no network here)."""
    cwd = module_tmp
    torch_home = cwd / ".torch"
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    for arch in ("resnet18", "resnet50"):
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        torch.save(getattr(torchvision.models, arch)().state_dict(), cache / Path(weights.url).name)
    runner = Runner(cwd / "work", TORCH_HOME=str(torch_home))
    write_cifar(runner.cwd / "data", "cifar10", n_train=48, n_test=16)  # 32 training images: 1 step an epoch
    write_cifar(runner.cwd / "data", "cifar100", n_train=48, n_test=16)
    write_image_folder(runner.cwd / "pets", {"train": 48, "test": 8}, num_classes=3)
    write_image_folder(runner.cwd / "more_photos", {"x": 6}, num_classes=3)
    Image.fromarray(make_images(1)[0][0]).save(runner.cwd / "cat.png")
    write_manifests(runner.cwd)
    write_hf_datasets(runner.cwd)
    return runner


def write_manifests(cwd: Path) -> None:
    """train.csv, val.csv, test.csv and all.csv (with a split column) of the pets folder, and a
    train.tsv with columns of other names."""
    rows = {split: [(str(p.relative_to(cwd)), p.parent.name) for p in sorted((cwd / "pets" / split).rglob("*.*"))]
            for split in ("train", "test")}
    (cwd / "train.tsv").write_text("species\tfile\n" + "".join(f"{c}\t{p}\n" for p, c in rows["train"]))
    rows["val"], rows["train"] = rows["train"][::6], [r for i, r in enumerate(rows["train"]) if i % 6]
    for split, listed in rows.items():
        (cwd / f"{split}.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in listed))
    (cwd / "all.csv").write_text("path,label,split\n" + "".join(
        f"{p},{c},{split}\n" for split, listed in rows.items() for p, c in listed))


def write_hf_datasets(cwd: Path) -> None:
    """A DatasetDict saved with save_to_disk (beans/) and a folder of parquet files (flowers-parquet/)."""
    import datasets

    def split(n: int, seed: int, image: str, label: str) -> datasets.Dataset:
        images, labels = make_images(n, 3, 32, seed=seed)
        features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=["a", "b", "c"])})
        return datasets.Dataset.from_dict({image: [Image.fromarray(i) for i in images], label: labels.tolist()},
                                          features=features)
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": split(48, 0, "image", "label"), "test": split(8, 1, "image", "label")}
                         ).save_to_disk(str(cwd / "beans"))
    (cwd / "flowers-parquet").mkdir()
    for name, n in (("train", 48), ("test", 8)):
        split(n, 2, "img", "species").to_parquet(str(cwd / "flowers-parquet" / f"{name}-00000-of-00001.parquet"))


LINES = readme_command_lines()


def test_the_readme_has_the_commands_we_promise():
    ran = [line for line in LINES if line.split()[0] in COMMANDS and not skip_reason(line)]
    assert len(ran) >= 20, ran
    unknown = [line for line in LINES if line.split()[0] not in COMMANDS and not skip_reason(line)]
    assert not unknown, f"README lines neither run nor skipped with a reason: {unknown}"


@pytest.mark.parametrize("line", [line for line in LINES if line.split()[0] in COMMANDS and not skip_reason(line)])
def test_readme_command_runs_as_typed(user, line):
    args = adapt(line, user.cwd)
    if args[0] == "tensorboard":  # the event files are there and readable: what --logdir will show
        runs = [p.parent for p in (user.cwd / args[-1].split("=")[-1]).rglob("events.out.tfevents.*")]
        assert runs and all("loss/train" in events(r).Tags()["scalars"] for r in runs)
        return
    if args[0] == "torchrun":
        args = [a.replace("--nproc_per_node=4", "--nproc_per_node=2") for a in args]
    result = user(args[0], *args[1:], timeout=600)
    assert result.returncode == 0, \
        f"{' '.join(args)}\nexit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
