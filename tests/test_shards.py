"""WebDataset shards: written by webdataset's own ShardWriter (and by resnet-shards), trained on
above chance, a streamed run killed mid-epoch resumed bitwise, every bad input one error line."""

from __future__ import annotations

import io
import json
import shlex
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from resnet_train.errors import DataError
from conftest import Runner, assert_ok, assert_one_error, make_images, metrics_of, write_image_folder
from PIL import Image
from test_resume import _until_paused, assert_same_final_state, last_state

NUM_CLASSES = 4
SIZE = 16  # pixels: enough for the colored squares, quick on two shared cores
RUN = ["model=resnet20", "epochs=2", f"dataset.image_size={SIZE}", "batch_size=32", "seed=1",
       "tensorboard.images=false", "log_every_n_steps=2"]


def write_with_webdataset(folder: Path, split: str, n: int, per_shard: int, seed: int) -> str:
    """`n` generated images as PNG + `cls` samples, `per_shard` a shard, by wds.ShardWriter (its own
    encoders: numpy image -> .png, int -> .cls). Returns the brace pattern of the shards."""
    images, labels = make_images(n, NUM_CLASSES, SIZE, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as writer:
        for i, (image, label) in enumerate(zip(images, labels)):
            writer.write({"__key__": f"{split}{i:06d}", "png": image, "cls": int(label)})
    last = (n - 1) // per_shard
    return f"{folder}/{split}-{{000000..{last:06d}}}.tar"


@pytest.fixture(scope="module")
def user(module_tmp) -> Runner:
    runner = Runner(module_tmp / "user")
    runner.train = write_with_webdataset(runner.cwd / "shards", "train", 256, 64, seed=0)  # 4 shards, 8 batches
    runner.test = write_with_webdataset(runner.cwd / "shards", "test", 64, 64, seed=1)
    return runner


def data_args(user: Runner) -> list[str]:
    return ["dataset=webdataset", f"dataset.train={user.train}", f"dataset.test={user.test}",
            f"dataset.num_classes={NUM_CLASSES}"]


@pytest.fixture(scope="module")
def reference_run(user) -> Path:
    """Two decoding workers, a last.pt every 3 steps: the uninterrupted run a resumed one must equal."""
    result = user("resnet-train", *RUN, *data_args(user), "num_workers=2", "checkpoint.every_n_steps=3",
                  "hydra.run.dir=runs/reference")
    assert_ok(result)
    return user.cwd / "runs" / "reference"


def test_trains_above_chance_on_shards_webdataset_wrote_and_eval_repeats_the_test(user, reference_run):
    metrics = metrics_of(reference_run)
    assert metrics["test_accuracy"] > 0.6, metrics  # chance: 0.25
    ckpt = torch.load(reference_run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["stream_layout"] == {"processes": 1, "num_workers": 2}
    result = user("resnet-eval", f"checkpoint={reference_run}")
    assert_ok(result)
    report = json.loads((reference_run / "eval.json").read_text())
    assert report["images"] == 64 and report["accuracy"] == pytest.approx(metrics["test_accuracy"])
    exported = user("resnet-export", f"checkpoint={reference_run}", "format=torchscript", "parity_images=8")
    assert_ok(exported)
    assert "8 test images of the run" in exported.stdout  # (the first test shard's, decoded)


def test_a_run_killed_mid_epoch_resumes_bitwise(user, reference_run):
    """Killed after step 10 (epoch 2, its last.pt at step 9: one batch into the epoch, so the
    resumed epoch starts at the second worker's batch): the resumed run equals the reference."""
    command = [*RUN, *data_args(user), "num_workers=2", "checkpoint.every_n_steps=3", "hydra.run.dir=runs/killed"]
    proc = user.popen("resnet-train", *command, env={"RESNET_TRAIN_PAUSE_AT": "train_step@10"})
    _until_paused(proc)
    proc.kill()
    proc.wait()
    state = last_state(user.cwd / "runs" / "killed")
    assert state["global_step"] == 9 and state["epoch_progress"]["step"] == 1
    changed = user("resnet-train", "resume=runs/killed", "num_workers=1")
    assert_one_error(changed, "mid-epoch", "num_workers=2")
    assert_ok(user("resnet-train", "resume=runs/killed"))
    assert_same_final_state(reference_run, user.cwd / "runs" / "killed")


def test_the_order_depends_on_seed_and_epoch_only(user):
    """Two loaders built alike give the same batches; the next epoch another order; all the images
    of an epoch's batches are distinct samples when the shards divide evenly among the workers."""
    from resnet_train.data import BatchTransform, Shard, ShardLoader
    from resnet_train.data.shards import SampleFormat, ShardSet, count_samples, expand_pattern

    fmt = SampleFormat(("png",), "cls", tuple(map(str, range(NUM_CLASSES))))
    urls = expand_pattern(user.train, "dataset.train")
    shards = ShardSet(tuple(urls), tuple(count_samples(urls, fmt, 0)[0]))

    def epoch(e: int, workers: int, shard: Shard = Shard(), batch_size: int = 32) -> list[torch.Tensor]:
        loader = ShardLoader(shards, fmt, SIZE, True, batch_size, BatchTransform(None, None), True,
                             torch.device("cpu"), seed=3, num_workers=workers, shard=shard)
        loader.set_epoch(e)
        batches = [images for images, _ in loader]
        assert len(batches) == len(loader)
        return batches

    first, again, second = epoch(1, 2), epoch(1, 2), epoch(2, 2)
    assert len(first) == 8 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], second[0])
    assert len(torch.unique(torch.cat(first).flatten(1), dim=0)) == 256  # each image once
    # Two processes (16 images each of a global batch of 32), each reading two shards of its own:
    # the same number of batches, and together every image once.
    ranks = [epoch(1, 1, Shard(rank, 2), batch_size=16) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 8
    assert len(torch.unique(torch.cat(ranks[0] + ranks[1]).flatten(1), dim=0)) == 256


def test_samples_decode_as_files_do_exif_and_16_bit(tmp_path):
    """One decoder for files and shard samples: a sideways phone photo turned upright, a 16-bit
    gradient scaled to 8 bits -- the same tensors from a shard as from the files."""
    import numpy as np
    from test_photos import sideways_photo

    from resnet_train.data import decode_resized
    from resnet_train.data.shards import SampleFormat, decode_sample, shard_samples

    sideways_photo(tmp_path / "p.jpg")
    Image.fromarray(np.tile(np.arange(0, 65536, 1024, dtype=np.uint16), (64, 1))).save(tmp_path / "g.png")
    _tar(tmp_path / "s.tar", {"p.jpg": (tmp_path / "p.jpg").read_bytes(), "p.cls": b"0",
                              "g.png": (tmp_path / "g.png").read_bytes(), "g.cls": b"1"})
    fmt = SampleFormat(("jpg", "png"), "cls", ("a", "b"))
    decoded = [decode_sample(s, "s.tar", fmt, 20, True) for s in shard_samples(str(tmp_path / "s.tar"))]
    assert [label for _, label in decoded] == [0, 1]
    for (image, _), name in zip(decoded, ("p.jpg", "g.png")):
        assert torch.equal(image, decode_resized(str(tmp_path / name), 20).permute(1, 2, 0))
    assert decoded[1][0].min() < 20 and decoded[1][0].max() > 200  # scaled, not clipped to white
    assert decoded[0][0][:5, :, 0].float().mean() > 200  # red on top: turned upright


def test_resnet_shards_writes_an_image_folder_that_trains(tmp_path):
    """resnet-shards: the files' own bytes under their extension, sizes.json (no counting pass) and
    classes.txt, no temporary names left; the command it prints runs as printed."""
    runner = Runner(tmp_path / "work")
    write_image_folder(runner.cwd / "pets", {"train": 96, "test": 32}, num_classes=3, size=SIZE)
    result = runner("resnet-shards", "pets", "out", "--max-count", "40")
    assert_ok(result)
    out = runner.cwd / "out"
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "sizes.json", "test-000000.tar",
                                                     "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 40, "train-000001.tar": 40,
                                                            "train-000002.tar": 16, "test-000000.tar": 32}
    assert (out / "classes.txt").read_text().split() == ["airplane", "automobile", "bird"]
    with tarfile.open(out / "train-000000.tar") as tar:
        names = tar.getnames()
        sample = names[0].split(".")[0]
        image = next(n for n in names if n.startswith(sample + ".") and not n.endswith(".cls"))
        original = [p for p in (runner.cwd / "pets" / "train").rglob("*") if p.is_file()
                    and p.read_bytes() == tar.extractfile(image).read()]
        assert len(original) == 1 and original[0].suffix == Path(image).suffix  # the file's bytes, unchanged
    printed = result.stdout.strip().splitlines()[-1].split()
    assert printed[:2] == ["resnet-train", "dataset=webdataset"]
    args = shlex.split(result.stdout.strip().splitlines()[-1])[1:]
    train = runner("resnet-train", *args, *RUN, "epochs=1", "num_workers=0")
    assert_ok(train)
    assert_one_error(runner("resnet-train", *args[1:]), "only dataset=manifest or dataset=webdataset have dataset.train")
    assert "counted from sizes.json" in train.stdout + train.stderr
    assert_one_error(runner("resnet-shards", "pets", "out"), "already has shards")
    assert_one_error(runner("resnet-shards", "nowhere", "out2"), "nowhere/train does not exist")
    assert_one_error(runner("resnet-shards", "pets"), "resnet-shards --help")


def test_a_writer_stopped_midway_leaves_only_whole_shards(tmp_path):
    """The shard being written when the writer fails keeps its hidden temporary name only until
    the failure is handled (removed), so no shard looks whole that is not; no sizes.json."""
    from resnet_train.data.shards import _rng, write_dataset

    folder = write_image_folder(tmp_path / "pets", {"train": 10}, num_classes=2, size=SIZE)
    samples = [(str(p), i % 2) for i, p in enumerate(sorted((folder / "train").rglob("*.*")))]
    samples[7] = (str(tmp_path / "gone.png"), 1)
    out = tmp_path / "out"
    def reached_after(seed: int) -> int:  # samples written before gone.png (the order is shuffled)
        order = list(range(10))
        _rng(seed).shuffle(order)
        return order.index(7)
    seed = next(s for s in range(100) if reached_after(s) >= 6)  # two whole shards, then a failing third
    with pytest.raises(DataError, match="gone.png"):
        write_dataset({"train": samples}, ["a", "b"], out, max_count=3, seed=seed)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"train-{i:06d}.tar" for i in range(reached_after(seed) // 3)]
    for name in names:
        with tarfile.open(out / name) as tar:
            assert len(tar.getnames()) == 6  # 3 samples: image + cls


def test_shards_at_an_fsspec_url_are_read_with_their_sizes_file(user, tmp_path):
    """Any URL fsspec opens (here its in-memory filesystem: s3://, gs:// and https:// go the same
    way): the shards and the sizes.json beside them."""
    import fsspec

    fs = fsspec.filesystem("memory")
    local = sorted((user.cwd / "shards").glob("train-*.tar"))
    for path in local:
        fs.pipe(f"/remote/{path.name}", path.read_bytes())
    fs.pipe("/remote/sizes.json", json.dumps({p.name: 64 for p in local}).encode())
    runner = Runner(tmp_path / "work")
    result = runner("resnet-train", *RUN, "epochs=1", "num_workers=0", "dataset=webdataset",
                    "dataset.train=memory://remote/train-{000000..000003}.tar", f"dataset.num_classes={NUM_CLASSES}")
    assert_ok(result)
    assert "4 shard(s), 256 images (counted from sizes.json)" in result.stdout + result.stderr
    fs.rm("/remote", recursive=True)


def test_a_file_url_pattern_reads_the_same_shards(user, tmp_path):
    runner = Runner(tmp_path / "work")
    result = runner("resnet-train", *RUN, "epochs=1", "num_workers=0", "dataset=webdataset",
                    f"dataset.train=file://{user.train}", f"dataset.num_classes={NUM_CLASSES}", "dataset.val=null",
                    "dataset.mean=[0.5,0.5,0.5]", "dataset.std=[0.25,0.25,0.25]")
    assert_ok(result)
    assert "4 shard(s), 256 images" in result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# Bad inputs: one line each, before training
# --------------------------------------------------------------------------------------------


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_images(1, size=SIZE)[0][0]).save(buffer, format="png")
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["no_match", "truncated", "no_image", "no_label", "label_range", "unknown_name",
                                  "too_few_shards", "no_classes", "val_size"])
def test_each_bad_input_is_one_line_naming_it(user, tmp_path, case):
    runner = Runner(tmp_path / "work")
    bad = runner.cwd / "bad"
    bad.mkdir()
    good = _png()
    pattern, extra, expected = str(bad / "b-{0..1}.tar"), [f"dataset.num_classes={NUM_CLASSES}"], []
    for i in range(2):
        _tar(bad / f"b-{i}.tar", {"a.png": good, "a.cls": b"0", "b.png": good, "b.cls": b"1"})
    if case == "no_match":
        pattern, expected = str(bad / "missing-{0..3}.tar"), ["matches no shard", "missing-0.tar"]
    elif case == "truncated":
        data = (bad / "b-1.tar").read_bytes()
        (bad / "b-1.tar").write_bytes(data[:700])
        expected = ["b-1.tar", "truncated or corrupt"]
    elif case == "no_image":
        _tar(bad / "b-1.tar", {"a.png": good, "a.cls": b"1", "c.txt": b"x", "c.cls": b"0"})
        expected = ["b-1.tar", "sample c has no image", "dataset.image_key"]
    elif case == "no_label":
        _tar(bad / "b-1.tar", {"a.png": good, "a.cls": b"1", "c.png": good})
        expected = ["b-1.tar", "sample c has no label 'cls'"]
    elif case == "label_range":
        _tar(bad / "b-1.tar", {"a.png": good, "a.cls": b"7"})
        expected = ["b-1.tar", "sample a has label 7, outside 0..3"]
    elif case == "unknown_name":
        _tar(bad / "b-1.tar", {"a.png": good, "a.cls": b"cat"})
        extra, expected = ["dataset.classes=[dog,bird]"], ["b-1.tar", "label 'cat', not one of dataset.classes"]
    elif case == "too_few_shards":
        extra, expected = [*extra, "num_workers=3"], ["2 shard(s)", "need at least 3"]
    elif case == "no_classes":
        extra, expected = [], ["dataset.classes=[cat,dog,...]", "dataset.num_classes=N"]
    elif case == "val_size":
        extra, expected = [*extra, "dataset.val_size=0.1"], ["dataset.val_size=0.1", "dataset.val="]
    result = runner("resnet-train", *RUN, "epochs=1", "num_workers=0", "batch_size=2", "dataset=webdataset",
                    f"dataset.train={pattern}", *extra)
    assert_one_error(result, *expected)
    assert "Epoch" not in result.stdout and not list(runner.cwd.glob("outputs/*/*/checkpoints/*.pt"))


def test_without_the_extra_one_line_names_it(user, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # (import webdataset raises ImportError)
    runner = Runner(tmp_path / "work")
    result = runner("resnet-train", *RUN, *data_args(user))
    assert_one_error(result, "pip install 'resnet-train[webdataset]'")


def test_files_of_every_format_become_members_that_training_reads(tmp_path):
    """A folder may hold any format Pillow opens; shards are read by their image keys (jpg, png, ...):
    .jfif goes in as jpg (its own bytes), a .tga (no such key) as a lossless PNG of it."""
    from resnet_train.data.shards import IMAGE_KEYS, _member

    image = Image.fromarray(make_images(1, size=16)[0][0])
    image.save(tmp_path / "a.jfif", "JPEG")
    image.save(tmp_path / "b.tga")
    image.save(tmp_path / "c.png")
    assert _member(str(tmp_path / "a.jfif")) == ("jpg", (tmp_path / "a.jfif").read_bytes())
    assert _member(str(tmp_path / "c.png")) == ("png", (tmp_path / "c.png").read_bytes())
    key, data = _member(str(tmp_path / "b.tga"))
    assert key == "png" and key in IMAGE_KEYS
    assert Image.open(io.BytesIO(data)).convert("RGB").tobytes() == image.tobytes()


def test_resnet_shards_writes_a_manifest_by_its_split_column(tmp_path):
    """The seam the image folder uses, fed by a manifest: its split column decides the shards' splits
    and its training labels the classes."""
    runner = Runner(tmp_path / "work")
    pets = write_image_folder(runner.cwd / "pets", {"train": 30, "test": 10}, num_classes=3, size=SIZE)
    rows = [f"{p.relative_to(runner.cwd)},{p.parent.name},{split}" for split in ("train", "test")
            for p in sorted((pets / split).rglob("*.*"))]
    (runner.cwd / "all.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    result = runner("resnet-shards", "all.csv", "out", "--max-count", "20")
    assert_ok(result)
    assert json.loads((runner.cwd / "out" / "sizes.json").read_text()) == {
        "train-000000.tar": 20, "train-000001.tar": 10, "test-000000.tar": 10}
    assert (runner.cwd / "out" / "classes.txt").read_text().split() == ["airplane", "automobile", "bird"]
    assert_one_error(runner("resnet-shards", "gone.csv", "out2"), "gone.csv", "no such manifest file")
