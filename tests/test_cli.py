"""resnet-train, resnet-eval and resnet-predict as a user runs them: console scripts started in their
own working directory, relative paths, default output folders, generated data, offline, CPU."""

import json
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, Runner, assert_ok, assert_one_error, events, metrics_of, scalars, write_cifar

# Image summaries (matplotlib) are tested in test_sweep.py; elsewhere they only cost time.
FAST = ["model=resnet20", "epochs=2", "batch_size=32", "log_every_n_steps=5", "num_workers=0",
        "tensorboard.images=false"]
METRIC_KEYS = {"epochs", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
               "best_epoch", "best_val_accuracy", "images_per_second", "wall_seconds", "history"}


def only_run_dir(cwd: Path) -> Path:
    """The one run under <cwd>/outputs/<date>/<time>/ (the default run dir)."""
    found = [p.parent for p in (cwd / "outputs").glob("*/*/.hydra")]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def cifar_run(cifar_root, module_tmp):
    """One 2-epoch resnet20 run on generated CIFAR-10 batches in ./data (the default dataset.root),
    into the default run dir; shared by the tests that inspect it. The installed console script in
    a process of its own, as a user types it."""
    runner = Runner(module_tmp / "user")
    (runner.cwd / "data").symlink_to(cifar_root)
    result = runner.installed("resnet-train", *FAST, "dataset.val_size=100")
    assert_ok(result)
    return only_run_dir(runner.cwd), result, runner


def test_train_writes_a_complete_run_dir(cifar_run):
    run_dir, result, _ = cifar_run
    assert "Device: cpu" in result.stdout and "100 images held out" in result.stdout
    metrics = metrics_of(run_dir)
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["epochs"] == 2 and len(metrics["history"]) == 2 and metrics["best_epoch"] in (1, 2)
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "best_val_accuracy"):
        assert 0 <= metrics[key] <= 1
    assert metrics["best_val_accuracy"] > 0.5 and metrics["test_accuracy"] > 0.5  # chance is 0.1
    assert metrics["images_per_second"] > 0 and metrics["wall_seconds"] > 0
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        assert (run_dir / ".hydra" / name).is_file()
    assert (run_dir / "train.log").read_text().count("epoch") >= 2
    assert f"Results in outputs/{run_dir.parent.name}/{run_dir.name}" in result.stdout  # as the user would type it


def test_checkpoints_are_safe_to_load_and_self_describing(cifar_run):
    run_dir, _, _ = cifar_run
    for name in ("last", "best"):
        ckpt = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)
        assert ckpt["classes"] == CLASSES and ckpt["precision"] in ("bf16", "fp32")
        assert ckpt["config"]["model"]["_target_"].endswith("resnet20") and ckpt["config"]["epochs"] == 2
        assert ckpt["config"]["model"]["stem"] == "cifar"  # auto, resolved
        assert "layer3.2.conv2.weight" in ckpt["model"] and ckpt["optimizer"]["state"]
        assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == 2 and last["state"]["global_step"] == 2 * (900 // 32)


def test_tensorboard_has_the_expected_tags_and_steps(cifar_run):
    run_dir, _, _ = cifar_run
    acc = events(run_dir)
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr", "train/loss", "train/lr",
            "throughput/images_per_second", "metrics/test_accuracy", "metrics/best_val_accuracy"} <= tags
    per_epoch = 900 // 32  # 28 steps: epoch metrics sit at each epoch's last step
    assert [s for s, _ in scalars(run_dir, "accuracy/val")] == [per_epoch, 2 * per_epoch]
    assert scalars(run_dir, "epoch") == [(per_epoch, 1), (2 * per_epoch, 2)]
    steps = [s for s, _ in scalars(run_dir, "train/loss")]
    assert steps == sorted(set(steps)) and steps[0] == 5 and steps[-1] == 2 * per_epoch
    metrics = metrics_of(run_dir)
    assert acc.Scalars("metrics/test_accuracy")[-1].value == pytest.approx(metrics["test_accuracy"])
    assert acc.Scalars("accuracy/val")[-1].value == pytest.approx(metrics["val_accuracy"])
    plugins = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= plugins.keys()
    assert "custom_scalars__config__" in acc.Tags()["tensors"] and "config/text_summary" in acc.Tags()["tensors"]


def test_eval_reproduces_the_test_accuracy(cifar_run):
    run_dir, _, runner = cifar_run
    relative = run_dir.relative_to(runner.cwd)
    result = runner.installed("resnet-eval", f"checkpoint={relative}/checkpoints/best.pt")  # (as typed, a process)
    assert_ok(result)
    report = json.loads((run_dir / "eval.json").read_text())
    metrics = metrics_of(run_dir)
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert report["loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)
    assert report["images"] == 500 and set(report["per_class_accuracy"]) == set(CLASSES)
    assert sum(map(sum, report["confusion_matrix"])) == 500
    assert f"accuracy {metrics['test_accuracy']:.2%}" in result.stdout and "confusion matrix" in result.stdout


def test_eval_overrides_and_output(cifar_run, cifar_root, tmp_path):
    run_dir, _, runner = cifar_run
    out = tmp_path / "val.json"
    result = runner("resnet-eval", f"checkpoint={run_dir}", "split=val", f"output={out}",
                    f"dataset.root={cifar_root}", "device=cpu", "eval_batch_size=7")
    assert_ok(result)
    report = json.loads(out.read_text())
    assert report["split"] == "val" and report["images"] == 100
    fp32 = runner("resnet-eval", f"checkpoint={run_dir}", "split=val", f"output={out}", "precision=fp32")
    assert_ok(fp32)
    assert "precision fp32" in fp32.stdout
    same = runner("resnet-eval", f"checkpoint={run_dir}", f"output={out}", "model=resnet20", "model.dropout=0.0")
    assert_ok(same)  # naming the model the run has is fine
    assert_one_error(runner("resnet-eval", f"checkpoint={run_dir}", "model.dropout=0.5"),
                     "model.dropout: the run has 0.0, the command line gives 0.5", "fixed by the checkpoint")


def test_image_folder_end_to_end(image_folder_root, run_cli):
    (run_cli.cwd / "pets").symlink_to(image_folder_root)
    result = run_cli("resnet-train", *FAST, "dataset=image_folder", "dataset.root=pets", "dataset.val_size=0.25",
                     "optim.lr=0.05", "hydra.run.dir=runs/pets")
    assert_ok(result)
    assert "Normalization computed from the training images" in result.stdout
    run_dir = run_cli.cwd / "runs" / "pets"
    metrics = metrics_of(run_dir)
    assert metrics["best_val_accuracy"] > 0.4 and metrics["test_accuracy"] > 0.4  # 4 classes: chance 0.25
    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["classes"] == CLASSES[:4] and len(ckpt["normalization"]["mean"]) == 3
    assert_ok(run_cli("resnet-eval", "checkpoint=runs/pets"))
    assert json.loads((run_dir / "eval.json").read_text())["accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_same_seed_gives_the_same_loss_curve(cifar_run, cifar_root, run_cli):
    reference, _, _ = cifar_run  # seed 0 (the default)

    def curve(seed: int) -> list[float]:
        run = f"runs/seed{seed}"
        assert_ok(run_cli("resnet-train", *FAST, f"seed={seed}", "dataset.val_size=100", f"dataset.root={cifar_root}",
                          f"hydra.run.dir={run}"))
        return [v for _, v in scalars(run_cli.cwd / run, "train/loss")]
    again, other = curve(0), curve(3)
    assert len(again) == 12 and again == [v for _, v in scalars(reference, "train/loss")] and again != other


def test_val_size_zero_validates_on_the_test_split(small_cifar_root, run_cli):
    result = run_cli("resnet-train", *FAST, "epochs=1", "dataset.val_size=0", f"dataset.root={small_cifar_root}",
                     "hydra.run.dir=run")
    assert_ok(result)
    assert "validation on the test split" in result.stdout and "240 training images" in result.stdout
    metrics = metrics_of(run_cli.cwd / "run")
    assert metrics["val_accuracy"] == pytest.approx(metrics["test_accuracy"])
    evaluated = run_cli("resnet-eval", "checkpoint=run", "split=val", f"dataset.root={small_cifar_root}")
    assert_ok(evaluated)
    assert "val split = the test split (dataset.val_size=0): 40 images" in evaluated.stdout


def test_cifar100_and_two_decoding_workers(tmp_path, image_folder_root, run_cli):
    write_cifar(run_cli.cwd / "data", "cifar100", n_train=600, n_test=200)
    result = run_cli("resnet-train", *FAST, "epochs=1", "dataset=cifar100", "dataset.val_size=100",
                     "hydra.run.dir=c100")
    assert_ok(result)
    ckpt = torch.load(run_cli.cwd / "c100" / "checkpoints" / "last.pt", weights_only=True)
    assert len(ckpt["classes"]) == 100 and ckpt["model"]["fc.weight"].shape == (100, 64)
    assert metrics_of(run_cli.cwd / "c100")["test_images"] == 200
    # num_workers=2 (the default) decoding an image folder, streamed: the same data as decoding in-process
    streamed = run_cli("resnet-train", *[a for a in FAST if a != "num_workers=0"], "epochs=1", "dataset=image_folder",
                       f"dataset.root={image_folder_root}", "dataset.loader=stream", "hydra.run.dir=stream")
    assert_ok(streamed)
    assert "training images in stream" in streamed.stdout and metrics_of(run_cli.cwd / "stream")["test_images"] == 200


def test_help_lists_groups_and_examples(run_cli):
    result = run_cli("resnet-train", "--help")
    assert_ok(result)
    for text in ("model: resnet101, resnet110", "optim: adagrad, adam, adamw, rmsprop, sgd", "Examples:",
                 "scheduler: cosine, multistep, none, onecycle, plateau, step", "dataset: cifar10, cifar100"):
        assert text in result.stdout
    assert "checkpoint=PATH" in run_cli("resnet-eval", "--help").stdout
    assert "precision=auto" in run_cli("resnet-predict", "--help").stdout


BAD_INPUTS = [
    (["model=resnet19"], ["model=resnet19: no such option", "resnet110, resnet152, resnet18, resnet20"]),
    (["optm.lr=0.1"], ["optm.lr=0.1: resnet-train has no key optm.lr; did you mean optim.lr?"]),
    (["optim.lrr=0.1"], ["optim.lrr=0.1: the chosen optim has no argument lrr", "+optim.lrr=0.1"]),
    (["+unknown_key=1"], ["unknown_key=1: resnet-train has no key unknown_key"]),
    (["epochs=-1"], ["epochs=-1 is invalid"]),
    (["batch_size=0"], ["batch_size=0 is invalid"]),
    (["optim.lr=abc"], ["optim.lr='abc' is invalid"]),
    (["optim.lr=inf"], ["optim.lr=inf is invalid: expected a positive number"]),
    (["optim=adam", "optim.betas=[0.9]"], ["optim: Adam(", "betas=[0.9]"]),
    (["+optim.foo=1"], ["optim: SGD(", "unexpected keyword argument 'foo'"]),
    (["dataset.val_size=-5"], ["dataset.val_size=-5 is invalid"]),
    (["device=cuda"], ["no CUDA GPU"]),
    (["dataset=image_folder"], ["dataset.root is required"]),
    (["model.pretrained=imagenet", "model.stem=cifar"],
     ["model.pretrained=imagenet was trained with the imagenet stem"]),
    (["model=resnet20", "model.pretrained=imagenet"], ["ImageNet weights for resnet18..152"]),
    (["model.pretrained=no/such/file.pth"], ["model.pretrained=no/such/file.pth: no such file"]),
    (["optim.lr=["], ["optim.lr=["]),
    (["augment.crop_padding=100000"], ["augment.crop_padding=100000 is larger than the 32px images"]),
    (["augment.cutout=33"], ["augment.cutout=33 is larger than the 32px images"]),
    (["tta=null"], ["tta=null is invalid"]),
    (["mix.cutmix_alpha=-1"], ["mix.cutmix_alpha=-1 is invalid"]),
]


@pytest.mark.parametrize("args,fragments", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_fails_fast_with_one_error_line(run_cli, args, fragments):
    result = run_cli("resnet-train", *args, timeout=60)
    assert_one_error(result, *fragments)
    assert not (run_cli.cwd / "outputs").exists()  # refused before Hydra made a run dir, before any data was read


OTHER_BAD_INPUTS = [  # resnet-eval's, resnet-predict's and resnet-export's own keys: the same schema, the same words
    ("resnet-eval", ["checkpoint=run", "split=train"], ["split='train' is invalid: expected test or val"]),
    ("resnet-eval", ["checkpoint=run", "output=[a]"], ["output=['a'] is invalid: expected null or a file path"]),
    ("resnet-predict", ["checkpoint=run", "inputs=[a.png]", "topk=0"], ["topk=0 is invalid: expected a positive integer"]),
    ("resnet-predict", ["checkpoint=run", "inputs=[a.png]", "precision=fp8"],
     ["precision='fp8' is invalid: expected auto, fp32, bf16 or fp16"]),
    ("resnet-predict", ["checkpoint=run", "inputs=[a.png]", "topk_=3"],
     ["topk_=3: resnet-predict has no key topk_; did you mean topk?"]),
    ("resnet-predict", ["checkpoint=run"], ["inputs is required"]),
    ("resnet-export", ["checkpoint=run", "opset=12"], ["opset=12 is invalid: expected null or an integer >= 18"]),
    ("resnet-export", ["checkpoint=run", "atol=-1"], ["atol=-1 is invalid: expected a number >= 0"]),
    ("resnet-export", ["checkpoint=run", "formats=onnx"], ["formats=onnx: resnet-export has no key formats; "
                                                           "did you mean format?"]),
]


@pytest.mark.parametrize("program,args,fragments", OTHER_BAD_INPUTS, ids=[" ".join(a) for _, a, _ in OTHER_BAD_INPUTS])
def test_the_other_commands_check_their_keys_alike(run_cli, program, args, fragments):
    assert_one_error(run_cli(program, *args), *fragments)  # (before any checkpoint is looked for)


def test_missing_dataset_says_where_it_looked_and_leaves_no_run_dir(run_cli):
    result = run_cli("resnet-train", "dataset.download=false", timeout=60)
    assert_one_error(result, f"{run_cli.cwd}/data/cifar-10-batches-py does not exist", "cifar-10-python.tar.gz")
    assert not list((run_cli.cwd / "outputs").glob("*/*"))  # the run dir it made is gone again


def test_a_refusal_that_needs_the_data_leaves_the_run_dir_free(small_cifar_root, run_cli):
    """accumulate_grad_batches larger than an epoch's batches is known once the data is read: the
    corrected command then runs in the same dir."""
    (run_cli.cwd / "data").symlink_to(small_cifar_root)
    run = ["model=resnet20", "epochs=1", "batch_size=64", "dataset.val_size=40", "tensorboard.images=false",
           "hydra.run.dir=run"]
    assert_one_error(run_cli("resnet-train", *run, "accumulate_grad_batches=1000"), "needs that many batches")
    assert not (run_cli.cwd / "run").exists()
    assert_ok(run_cli("resnet-train", *run, "accumulate_grad_batches=2"))


def test_cifar_integrity_check_runs_for_real(cifar_root, run_cli):
    data = run_cli.cwd / "data"
    data.mkdir()
    for name in ("cifar-10-batches-py",):
        (data / name).mkdir()
        for f in (cifar_root / name).iterdir():
            (data / name / f.name).write_bytes(f.read_bytes())
    batch = data / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-10] + b"corrupted!")
    result = run_cli("resnet-train", *FAST, "dataset.download=false", timeout=60)
    assert_one_error(result, "cifar-10-batches-py has files that failed the integrity check")


@pytest.mark.parametrize("layout,message", [({"train": []}, "no class folders"),
                                            ({"train/cat": ["notes.txt"]}, "no images")])
def test_image_folder_without_classes_or_images(run_cli, layout, message):
    for folder, names in layout.items():
        (run_cli.cwd / "imgs" / folder).mkdir(parents=True)
        for name in names:
            (run_cli.cwd / "imgs" / folder / name).write_text("x")
    assert_one_error(run_cli("resnet-train", "dataset=image_folder", "dataset.root=imgs", timeout=60), message)


def test_an_existing_run_is_never_overwritten(cifar_run):
    run_dir, _, runner = cifar_run
    before = {p: p.read_bytes() for p in [run_dir / "checkpoints" / "last.pt", run_dir / ".hydra" / "config.yaml"]}
    result = runner("resnet-train", *FAST, f"hydra.run.dir={run_dir}", timeout=60)
    assert_one_error(result, "already holds a run", f"resume={run_dir}")
    assert all(p.read_bytes() == data for p, data in before.items())


@pytest.mark.parametrize("content,message", [
    (None, "no checkpoint at"), (b"garbage", "is not a torch file (it begins with 'garbage')"),
    (b"", "is not a torch file (it is empty)"), (b"PK\x03\x04garbage", "not a readable checkpoint (truncated"),
    ("tensor", "not a resnet-train checkpoint"),
])
def test_eval_rejects_bad_checkpoints(run_cli, content, message):
    path = run_cli.cwd / "model.pt"
    if content == "tensor":
        torch.save({"weights": torch.zeros(3)}, path)
    elif content is not None:
        path.write_bytes(content)
    assert_one_error(run_cli("resnet-eval", "checkpoint=model.pt", timeout=60), message)


@pytest.mark.parametrize("program, args, fragment", [
    ("resnet-train", ["--foo"], "unknown option --foo: resnet-train takes KEY=VALUE overrides"),
    ("resnet-eval", ["--foo", "checkpoint=run"], "unknown option --foo: resnet-eval takes KEY=VALUE overrides"),
    ("resnet-train", ["model=[resnet20,resnet18]"], "model=[resnet20,resnet18]: one run takes one model; to run "
                                                   "each, sweep them with -m: resnet-train -m model=resnet20,resnet18"),
    ("resnet-train", ["optim=adam", "+optim.amsgrad=maybe"], "optim.amsgrad='maybe' is invalid: expected true or "
                                                             "false (Adam's amsgrad is a flag)"),
])
def test_command_line_mistakes_hydra_would_not_name(run_cli, program, args, fragment):
    """argparse's 9 lines of usage for an unknown option, a number asked of a flag, a list of models
    trained as its last one: each is one line now."""
    assert_one_error(run_cli(program, *args), fragment)
