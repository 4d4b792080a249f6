"""Data that does not sit in class folders -- manifests (CSV, TSV, JSON Lines) and Hugging Face
datasets -- written in their real formats, trained on and evaluated as a user does; their bad rows
as one line each; and imbalanced classes: class weights, the balanced sampler, per-class F1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, assert_ok, assert_one_error, make_images, metrics_of, write_image_folder
from PIL import Image

FAST = ["model=resnet20", "epochs=2", "batch_size=32", "log_every_n_steps=5", "num_workers=0",
        "tensorboard.images=false", "optim.lr=0.05"]


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("pics"), {"train": 240, "test": 80})


def write_csv(path: Path, rows: list[tuple], header: str = "path,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


def test_a_manifest_of_relative_paths_trains_evaluates_and_streams(pics, run_cli):
    """Paths relative to the manifest's own folder (not the working directory), JSON Lines for the
    test split; the run learns, resnet-eval reproduces its test accuracy, and streaming agrees."""
    (run_cli.cwd / "photos").symlink_to(pics)
    lists = run_cli.cwd / "lists"
    write_csv(lists / "train.csv", [(f"../photos/{p.relative_to(pics)}", p.parent.name)
                                    for p in sorted((pics / "train").rglob("*.*"))])
    lists.joinpath("test.jsonl").write_text("".join(
        json.dumps({"path": f"../photos/{p.relative_to(pics)}", "label": p.parent.name}) + "\n"
        for p in sorted((pics / "test").rglob("*.*"))))
    result = run_cli("resnet-train", *FAST, "dataset=manifest", "dataset.train=lists/train.csv",
                     "dataset.test=lists/test.jsonl", "dataset.val_size=0.25", "hydra.run.dir=runs/m")
    assert_ok(result)
    metrics = metrics_of(run_cli.cwd / "runs" / "m")
    assert metrics["best_val_accuracy"] > 0.4 and metrics["test_accuracy"] > 0.4  # 4 classes: chance 0.25
    ckpt = torch.load(run_cli.cwd / "runs" / "m" / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["classes"] == sorted(CLASSES[:4])
    assert_ok(run_cli("resnet-eval", "checkpoint=runs/m"))
    report = json.loads((run_cli.cwd / "runs" / "m" / "eval.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"])
    streamed = run_cli("resnet-train", *FAST, "epochs=1", "dataset=manifest", "dataset.train=lists/train.csv",
                       "dataset.test=lists/test.jsonl", "dataset.loader=stream", "hydra.run.dir=runs/s")
    assert_ok(streamed)
    assert "streamed from the files" in streamed.stdout


def test_one_manifest_with_a_split_column_and_file_urls(pics, run_cli):
    rows = [(p.as_uri(), p.parent.name, split) for split in ("train", "test")
            for p in sorted((pics / split).rglob("*.*"))]
    rows = [(path, label, "validation" if split == "train" and i % 5 == 0 else split)
            for i, (path, label, split) in enumerate(rows)]
    write_csv(run_cli.cwd / "all.csv", rows, "path,label,split")
    result = run_cli("resnet-train", *FAST, "epochs=1", "dataset=manifest", "dataset.train=all.csv",
                     "hydra.run.dir=run")
    assert_ok(result)
    assert "validation on the val rows of" in result.stdout and "(48 images)" in result.stdout
    assert metrics_of(run_cli.cwd / "run")["test_images"] == 80


@pytest.mark.parametrize("case", ["missing file", "empty label", "unknown split", "unknown test label",
                                  "not a manifest", "bad json", "other column names", "row of another split"])
def test_a_bad_row_is_one_line_naming_the_manifest_and_its_line(pics, run_cli, case):
    good = [(str(p), p.parent.name) for p in sorted((pics / "train").rglob("*.*"))[:40]]
    train = write_csv(run_cli.cwd / "train.csv", good)
    args = ["dataset.train=train.csv"]
    if case == "missing file":
        write_csv(train, [*good[:6], ("gone/x.jpg", "cat"), *good[6:]])
        expected = ("train.csv:8", "gone/x.jpg does not exist")
    elif case == "empty label":
        write_csv(train, [*good[:2], (good[2][0], ""), *good[3:]])
        expected = ("train.csv:4", "'label' column is empty")
    elif case == "unknown split":
        write_csv(train, [(*row, "train" if i != 3 else "holdout") for i, row in enumerate(good)], "path,label,split")
        expected = ("train.csv:5", "split 'holdout'")
    elif case == "unknown test label":
        write_csv(run_cli.cwd / "test.csv", [(good[0][0], "zebra")])
        args.append("dataset.test=test.csv")
        expected = ("test.csv:2", "label 'zebra'")
    elif case == "row of another split":
        write_csv(run_cli.cwd / "test.csv", [(good[0][0], good[0][1], "test"), (good[1][0], good[1][1], "train")],
                  "path,label,split")
        args.append("dataset.test=test.csv")
        expected = ("test.csv:3", "a train row in the manifest given as dataset.test")
    elif case == "other column names":
        write_csv(train, good, "filepath,class")
        expected = ("train.csv:2", "no 'path' column (the columns: filepath, class)", "dataset.path_column")
    elif case == "not a manifest":
        (run_cli.cwd / "train.xlsx").write_bytes(b"PK")
        args = ["dataset.train=train.xlsx"]
        expected = ("dataset.train=train.xlsx", ".csv, .tsv or .jsonl")
    else:
        (run_cli.cwd / "train.jsonl").write_text(json.dumps({"path": good[0][0], "label": "a"}) + "\n{oops\n")
        args = ["dataset.train=train.jsonl"]
        expected = ("train.jsonl:2", "not a JSON object")
    result = run_cli("resnet-train", *FAST, "dataset=manifest", *args)
    assert_one_error(result, *expected)
    assert not list(run_cli.cwd.glob("outputs/*/*/checkpoints"))


def test_integer_labels_sort_as_numbers_and_given_classes_keep_their_order(tmp_path):
    from resnet_train.data.manifest import Columns, read_manifests

    images, labels = make_images(24, 12, 16)
    rows = []
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", int(label)))
    train = write_csv(tmp_path / "train.csv", rows)
    found = read_manifests({"train": str(train)}, Columns(), None, {"train"})
    assert found.classes == [str(i) for i in range(12)]  # 2 before 10
    assert [label for _, label in found.samples["train"]] == [int(label) for label in labels]
    given = read_manifests({"train": str(train)}, Columns(), [str(i) for i in reversed(range(12))], {"train"})
    assert [label for _, label in given.samples["train"]] == [11 - int(label) for label in labels]


# --------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------


def hf_split(n: int, seed: int, names: list[str] | None = CLASSES[:4], image: str = "image", label: str = "label"):
    import datasets

    images, labels = make_images(n, 4, 32, seed=seed)
    label_feature = datasets.ClassLabel(names=names) if names else datasets.Value("string")
    values = labels.tolist() if names else [CLASSES[i] for i in labels]
    return datasets.Dataset.from_dict({image: [Image.fromarray(i) for i in images], label: values},
                                      features=datasets.Features({image: datasets.Image(), label: label_feature}))


def test_a_saved_hugging_face_dataset_trains_and_evaluates(run_cli):
    import datasets

    datasets.DatasetDict({"train": hf_split(200, 0), "validation": hf_split(40, 1), "test": hf_split(80, 2)}
                         ).save_to_disk(str(run_cli.cwd / "beans"))
    result = run_cli("resnet-train", *FAST, "dataset=hf", "dataset.path=beans", "hydra.run.dir=run")
    assert_ok(result)
    assert "validation on the validation split of beans (40 images)" in result.stdout
    metrics = metrics_of(run_cli.cwd / "run")
    assert metrics["best_val_accuracy"] > 0.4 and metrics["test_accuracy"] > 0.4
    ckpt = torch.load(run_cli.cwd / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["classes"] == CLASSES[:4]  # the ClassLabel's order, not sorted
    assert_ok(run_cli("resnet-eval", "checkpoint=run"))
    assert json.loads((run_cli.cwd / "run" / "eval.json").read_text())["accuracy"] == pytest.approx(
        metrics["test_accuracy"])


def test_a_parquet_folder_with_string_labels_streams(run_cli):
    folder = run_cli.cwd / "flowers"
    folder.mkdir()
    hf_split(160, 0, None, "img", "species").to_parquet(str(folder / "train-00000-of-00001.parquet"))
    hf_split(40, 1, None, "img", "species").to_parquet(str(folder / "test-00000-of-00001.parquet"))
    result = run_cli("resnet-train", *FAST, "epochs=1", "dataset=hf", "dataset.path=flowers", "dataset.image_column=img",
                     "dataset.label_column=species", "dataset.loader=stream", "num_workers=1", "hydra.run.dir=run")
    assert_ok(result)
    assert torch.load(run_cli.cwd / "run" / "checkpoints" / "last.pt", weights_only=True)["classes"] == sorted(CLASSES[:4])


def test_an_unlabelled_test_split_is_left_out_not_an_error(run_cli):
    """Hub datasets often hide their test labels (-1): such a split is left out, in a line."""
    import datasets

    hidden = hf_split(20, 1).cast_column("label", datasets.Value("int64")).map(lambda row: {"label": -1})
    hidden = hidden.cast_column("label", datasets.ClassLabel(names=CLASSES[:4]))
    datasets.DatasetDict({"train": hf_split(120, 0), "test": hidden}).save_to_disk(str(run_cli.cwd / "ds"))
    result = run_cli("resnet-train", *FAST, "epochs=1", "dataset=hf", "dataset.path=ds", "hydra.run.dir=run")
    assert_ok(result)
    assert "the test split of ds has no labels" in result.stdout
    assert metrics_of(run_cli.cwd / "run")["test_accuracy"] is None


def test_hugging_face_mistakes_are_one_line(run_cli):
    import datasets

    datasets.DatasetDict({"train": hf_split(40, 0)}).save_to_disk(str(run_cli.cwd / "ds"))
    assert_one_error(run_cli("resnet-train", *FAST, "dataset=hf", "dataset.path=ds", "dataset.image_column=picture"),
                     "dataset.image_column=picture", "its columns: image, label")
    assert_one_error(run_cli("resnet-train", *FAST, "dataset=hf", "dataset.path=./nowhere"),
                     "dataset.path=./nowhere", "no such folder")


# --------------------------------------------------------------------------------------------
# Imbalanced classes
# --------------------------------------------------------------------------------------------


def test_the_balanced_sampler_draws_every_class_about_equally_and_repeats_on_resume():
    from resnet_train.data import BatchTransform, MemoryLoader
    from resnet_train.data.loaders import balanced_weights

    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    images = torch.zeros(len(labels), 4, 4, 3, dtype=torch.uint8)
    loader = MemoryLoader(images, labels, 100, BatchTransform(None, None), True, seed=5,
                          weights=balanced_weights(labels))
    drawn = torch.cat([y for _, y in loader]).bincount(minlength=3)
    assert drawn.sum() == 1000 and all(250 < n < 420 for n in drawn.tolist()), drawn
    loader.set_epoch(0, skip=4)
    assert torch.equal(torch.cat([y for _, y in loader]),
                       torch.cat([y for _, y in MemoryLoader(images, labels, 100, BatchTransform(None, None), True,
                                                             seed=5, weights=balanced_weights(labels))][4:]))


def test_class_weights_and_per_class_scores(small_cifar_root, run_cli, compose_cfg):
    from resnet_train.build import class_weights
    from resnet_train.evaluation import EvalResult

    cfg = compose_cfg("loss.class_weights=balanced")
    weights = class_weights(cfg, [300, 100, 100], torch.device("cpu"))
    assert weights.tolist() == pytest.approx([500 / 900, 500 / 300, 500 / 300])
    confusion = torch.tensor([[8, 2, 0], [1, 3, 0], [0, 0, 0]])  # class 2: no images, never predicted
    scores = EvalResult(0.0, 0.0, 14, 0.0, confusion).per_class(["a", "b", "c"])
    assert scores["a"] == pytest.approx({"accuracy": 0.8, "precision": 8 / 9, "recall": 0.8,
                                         "f1": 2 * (8 / 9) * 0.8 / (8 / 9 + 0.8), "support": 10})
    assert scores["c"] == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    macro = EvalResult(0.0, 0.0, 14, 0.0, confusion).macro_f1  # (over a and b: c neither occurs nor is predicted)
    assert macro == pytest.approx((scores["a"]["f1"] + scores["b"]["f1"]) / 2)
    result = run_cli("resnet-train", *FAST, "epochs=1", f"dataset.root={small_cifar_root}", "dataset.val_size=40",
                     "loss.class_weights=balanced", "sampler=balanced", "hydra.run.dir=run")
    assert_ok(result)
    metrics = metrics_of(run_cli.cwd / "run")
    assert set(metrics["test_per_class"]) == set(CLASSES) and metrics["test_macro_f1"] is not None
    assert_ok(eval_run := run_cli("resnet-eval", "checkpoint=run"))
    assert "precision" in eval_run.stdout and "F1" in eval_run.stdout
    wrong = run_cli("resnet-train", *FAST, f"dataset.root={small_cifar_root}", "dataset.val_size=40",
                    "loss.class_weights=[1,2,3]")
    assert_one_error(wrong, "loss.class_weights has 3 weights for 10 classes")
    assert not list(run_cli.cwd.glob("outputs/*/*"))  # (refused before training: no run dir left)
    shards = ["dataset=webdataset", "dataset.train=x-{0..1}.tar", "dataset.classes=[a,b]", "dataset.val_size=0"]
    assert_one_error(run_cli("resnet-train", *shards, "sampler=balanced"), "sampler=balanced: shards are read in order")
    assert_one_error(run_cli("resnet-train", *shards, "loss.class_weights=balanced"),
                     "loss.class_weights=balanced needs each class's count")


def test_a_streamed_hugging_face_run_killed_mid_epoch_resumes_exactly(run_cli):
    """Rows decoded by the workers, the balanced sampler and class weights: kill -9 at a step in the
    middle of epoch 2, resume, and every weight equals the uninterrupted run's."""
    import datasets

    datasets.DatasetDict({"train": hf_split(160, 0), "test": hf_split(40, 1)}).save_to_disk(str(run_cli.cwd / "ds"))
    run = [*FAST, "dataset=hf", "dataset.path=ds", "dataset.loader=stream", "num_workers=1", "batch_size=16",
           "dataset.val_size=32", "sampler=balanced", "loss.class_weights=balanced", "checkpoint.every_n_steps=3"]
    assert_ok(run_cli("resnet-train", *run, "hydra.run.dir=reference"))
    proc = run_cli.popen("resnet-train", *run, "hydra.run.dir=killed", env={"RESNET_TRAIN_PAUSE_AT": "train_step@12"})
    for line in proc.stdout:
        if line.startswith("paused at"):
            break
    proc.kill()
    proc.wait()
    assert torch.load(run_cli.cwd / "killed" / "checkpoints" / "last.pt", weights_only=True)["state"]["global_step"] == 9
    assert_ok(run_cli("resnet-train", "resume=killed"))
    a, b = (torch.load(run_cli.cwd / d / "checkpoints" / "last.pt", weights_only=True) for d in ("reference", "killed"))
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert metrics_of(run_cli.cwd / "reference")["test_per_class"] == metrics_of(run_cli.cwd / "killed")["test_per_class"]
