"""resnet-train and resnet-eval as a user runs them: subprocesses on generated data, offline, CPU."""

import json
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, subprocess_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Image summaries (matplotlib) are tested in test_sweep.py; elsewhere they only cost time.
FAST = ["model=resnet20", "epochs=2", "batch_size=32", "log_every_n_steps=5", "num_workers=0", "tensorboard.images=false"]
METRIC_KEYS = {"epochs", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
               "best_epoch", "best_val_accuracy", "images_per_second", "wall_seconds", "history"}


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def cifar_run(cifar_root, fake_md5_dir, tmp_path_factory):
    """One 2-epoch resnet20 run on generated CIFAR-10 batches, shared by the tests that inspect it."""
    import subprocess
    import sys
    run_dir = tmp_path_factory.mktemp("runs") / "cifar"
    env = subprocess_env(fake_md5_dir)
    result = subprocess.run([str(Path(sys.executable).parent / "resnet-train"), *FAST, "dataset.val_size=100",
                             f"dataset.root={cifar_root}", f"hydra.run.dir={run_dir}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert_ok(result)
    return run_dir, result


def test_train_writes_a_complete_run_dir(cifar_run):
    run_dir, result = cifar_run
    assert "Device: cpu" in result.stdout and "100 images held out" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["epochs"] == 2 and len(metrics["history"]) == 2 and metrics["best_epoch"] in (1, 2)
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "best_val_accuracy"):
        assert 0 <= metrics[key] <= 1
    assert metrics["best_val_accuracy"] > 0.5 and metrics["test_accuracy"] > 0.5  # chance is 0.1
    assert metrics["images_per_second"] > 0 and metrics["wall_seconds"] > 0
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        assert (run_dir / ".hydra" / name).is_file()
    assert (run_dir / "train.log").read_text().count("epoch") >= 2


def test_checkpoints_are_safe_to_load_and_self_describing(cifar_run):
    run_dir, _ = cifar_run
    for name in ("last", "best"):
        ckpt = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)
        assert ckpt["classes"] == CLASSES and ckpt["precision"] in ("bf16", "fp32")
        assert ckpt["config"]["model"]["_target_"].endswith("resnet20") and ckpt["config"]["epochs"] == 2
        assert "layer3.2.conv2.weight" in ckpt["model"] and ckpt["optimizer"]["state"]
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == 2 and last["state"]["global_step"] == 2 * (900 // 32)


def test_tensorboard_has_the_expected_tags_and_steps(cifar_run):
    run_dir, _ = cifar_run
    acc = events(run_dir)
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr", "train/loss", "train/lr",
            "throughput/images_per_second", "metrics/test_accuracy", "metrics/best_val_accuracy"} <= scalars
    per_epoch = 900 // 32  # 28 steps: epoch metrics sit at each epoch's last step
    assert [e.step for e in acc.Scalars("accuracy/val")] == [per_epoch, 2 * per_epoch]
    assert [(e.step, e.value) for e in acc.Scalars("epoch")] == [(per_epoch, 1), (2 * per_epoch, 2)]
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[0] == 5 and steps[-1] == 2 * (900 // 32)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert acc.Scalars("metrics/test_accuracy")[-1].value == pytest.approx(metrics["test_accuracy"])
    assert acc.Scalars("accuracy/val")[-1].value == pytest.approx(metrics["val_accuracy"])
    plugins = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= plugins.keys()
    assert "custom_scalars__config__" in acc.Tags()["tensors"] and "config/text_summary" in acc.Tags()["tensors"]


def test_eval_reproduces_the_test_accuracy(cifar_run, run_cli):
    run_dir, _ = cifar_run
    result = run_cli("resnet-eval", f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}")
    assert_ok(result)
    report = json.loads((run_dir / "eval.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert report["loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)
    assert report["images"] == 500 and set(report["per_class_accuracy"]) == set(CLASSES)
    assert sum(map(sum, report["confusion_matrix"])) == 500
    assert f"accuracy {metrics['test_accuracy']:.2%}" in result.stdout and "confusion matrix" in result.stdout


def test_eval_overrides_and_output(cifar_run, cifar_root, run_cli, tmp_path):
    run_dir, _ = cifar_run
    out = tmp_path / "val.json"
    result = run_cli("resnet-eval", f"checkpoint={run_dir}", "split=val", f"output={out}",
                     f"dataset.root={cifar_root}", "device=cpu", "eval_batch_size=7")
    assert_ok(result)
    report = json.loads(out.read_text())
    assert report["split"] == "val" and report["images"] == 100
    assert "precision bf16" in result.stdout or "precision fp32" in result.stdout  # the training run's
    fp32 = run_cli("resnet-eval", f"checkpoint={run_dir}", "split=val", f"output={out}", "precision=fp32")
    assert_ok(fp32)
    assert "precision fp32" in fp32.stdout  # an explicit precision= wins over the checkpoint's
    bad = run_cli("resnet-eval", f"checkpoint={run_dir}", "model.dropout=0.5")
    assert bad.returncode == 2 and "fixed by the checkpoint" in bad.stderr


def test_image_folder_end_to_end(image_folder_root, run_cli, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("resnet-train", *FAST, "dataset=image_folder", f"dataset.root={image_folder_root}",
                     "dataset.val_size=0.25", "optim.lr=0.05", f"hydra.run.dir={run_dir}")
    assert_ok(result)
    assert "Normalization computed from the training images" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_val_accuracy"] > 0.4 and metrics["test_accuracy"] > 0.4  # 4 classes: chance 0.25
    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["classes"] == CLASSES[:4] and len(ckpt["normalization"]["mean"]) == 3
    evaluated = run_cli("resnet-eval", f"checkpoint={run_dir}")
    assert_ok(evaluated)
    assert json.loads((run_dir / "eval.json").read_text())["accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_same_seed_gives_the_same_loss_curve(cifar_run, cifar_root, run_cli, tmp_path):
    reference, _ = cifar_run  # seed 0 (the default)

    def curve(run_dir: Path) -> list[float]:
        return [e.value for e in events(run_dir).Scalars("train/loss")]

    def run(name: str, seed: int) -> Path:
        result = run_cli("resnet-train", *FAST, f"seed={seed}", "dataset.val_size=100", f"dataset.root={cifar_root}",
                         f"hydra.run.dir={tmp_path / name}")
        assert_ok(result)
        return tmp_path / name
    again, other = curve(run("again", 0)), curve(run("other", 3))
    assert len(again) == 12 and again == curve(reference) and again != other  # 2 x 28 steps, logged every 5 + ends


def test_val_size_zero_validates_on_the_test_split(cifar_root, run_cli, tmp_path):
    result = run_cli("resnet-train", *FAST, "epochs=1", "dataset.val_size=0", f"dataset.root={cifar_root}",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert_ok(result)
    assert "validation on the test split" in result.stdout and "1,000 training images" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val_accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_help_lists_groups_and_examples(run_cli):
    result = run_cli("resnet-train", "--help")
    assert_ok(result)
    for text in ("model: resnet101, resnet110", "optim: adagrad, adam, adamw, rmsprop, sgd", "Examples:",
                 "scheduler: cosine, multistep, none, onecycle, plateau, step", "dataset: cifar10, cifar100"):
        assert text in result.stdout
    assert "checkpoint=PATH" in run_cli("resnet-eval", "--help").stdout


BAD_INPUTS = [
    (["model=resnet19"], "Available options in 'model'"),
    (["optm.lr=0.1"], "optm.lr"),
    (["optim.lrr=0.1"], "optim.lrr"),
    (["epochs=-1"], "epochs=-1 is invalid"),
    (["batch_size=0"], "batch_size=0 is invalid"),
    (["optim.lr=abc"], "optim.lr='abc' is invalid"),
    (["dataset.val_size=-5"], "dataset.val_size=-5 is invalid"),
    (["device=cuda"], "no CUDA GPU"),
    (["dataset=image_folder"], "dataset.root is required"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[a[0] for a, _ in BAD_INPUTS])
def test_bad_input_fails_fast_with_one_message(run_cli, tmp_path, args, message):
    run_dir = tmp_path / "run"
    result = run_cli("resnet-train", *args, f"hydra.run.dir={run_dir}", timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and message in output and "Traceback" not in output
    assert not run_dir.exists()  # rejected before Hydra made a run dir, before any data was read


def test_missing_dataset_says_where_it_looked(run_cli, tmp_path):
    root = tmp_path / "no-cifar-here"
    result = run_cli("resnet-train", f"dataset.root={root}", "dataset.download=false",
                     f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{root}/cifar-10-batches-py does not exist" in result.stderr and "cifar-10-python.tar.gz" in result.stderr


@pytest.mark.parametrize("layout,message", [({"train": []}, "no class folders"),
                                            ({"train/cat": ["notes.txt"]}, "no images")])
def test_image_folder_without_classes_or_images(run_cli, tmp_path, layout, message):
    for folder, names in layout.items():
        (tmp_path / "imgs" / folder).mkdir(parents=True)
        for name in names:
            (tmp_path / "imgs" / folder / name).write_text("x")
    result = run_cli("resnet-train", "dataset=image_folder", f"dataset.root={tmp_path / 'imgs'}",
                     f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_an_existing_run_is_never_overwritten(cifar_run, cifar_root, run_cli):
    run_dir, _ = cifar_run
    before = {p: p.read_bytes() for p in [run_dir / "checkpoints" / "last.pt", run_dir / ".hydra" / "config.yaml"]}
    result = run_cli("resnet-train", *FAST, f"dataset.root={cifar_root}", f"hydra.run.dir={run_dir}", timeout=60)
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert all(p.read_bytes() == data for p, data in before.items())


@pytest.mark.parametrize("content,message", [
    (None, "no checkpoint at"), (b"garbage", "not a readable checkpoint"), ("tensor", "not a resnet-train checkpoint"),
])
def test_eval_rejects_bad_checkpoints(run_cli, tmp_path, content, message):
    path = tmp_path / "model.pt"
    if content == "tensor":
        torch.save({"weights": torch.zeros(3)}, path)
    elif content is not None:
        path.write_bytes(content)
    result = run_cli("resnet-eval", f"checkpoint={path}", timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_out_of_memory_names_the_batch_size(compose_cfg, capsys):
    from resnet_train.cli import _run_reporting_errors

    def out_of_memory(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(SystemExit) as exit_:
        _run_reporting_errors(out_of_memory, compose_cfg("batch_size=512"))
    assert exit_.value.code == 2
    assert "out of memory on the device with batch_size=512; try batch_size=256" in capsys.readouterr().err
