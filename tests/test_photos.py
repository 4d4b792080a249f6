"""Folders of photos as people keep them: links (loops, duplicates), hidden and stray files, every
format Pillow opens, Unicode class names, EXIF orientation, memory bounded by chunks, and commands
that read only the split they need."""

import errno
import os
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import torch
from conftest import CLASSES, Runner, assert_ok, assert_one_error, subprocess_env, write_image_folder
from PIL import Image
from test_data import data_of

from resnet_train.data import DataError, decode_resized, scan_image_folder


def scan(folder, **kw):
    said = []
    result = scan_image_folder(folder, log=said.append, **kw)
    return result, said


def test_a_link_loop_neither_multiplies_nor_mislabels_images(tmp_path):
    root = write_image_folder(tmp_path, {"train": 30, "test": 12}, num_classes=3)
    cat = root / "train" / CLASSES[0]
    (cat / "loop").symlink_to("..")  # back to train/: every class again, labelled as this one
    (cat / "up").symlink_to("../..")  # above train/: test/ too
    (cat / "self").symlink_to(".")
    result, said = scan(root / "train")
    assert len(result.samples) == 30 and len({p for p, _ in result.samples}) == 30
    assert all(CLASSES[label] == os.path.basename(os.path.dirname(p)) for p, label in result.samples)
    assert len(said) == 1 and "3 folder links into folders already scanned" in said[0]
    for loader in ("memory", "stream"):  # both loaders see the 30 files once (24 train + 6 val)
        data = data_of("image_folder", root, loader=loader, batch_size=4, val_size=6)
        assert data.train.num_images + data.val.num_images == 30 and data.test.num_images == 12


def test_links_to_files_and_folders_outside_are_followed_each_file_once(tmp_path):
    root = write_image_folder(tmp_path / "a", {"train": 20}, num_classes=2)
    extra = write_image_folder(tmp_path / "b", {"train": 6}, num_classes=2) / "train" / CLASSES[0]
    first, second = (root / "train" / c for c in CLASSES[:2])
    (first / "elsewhere").symlink_to(extra)  # a folder elsewhere: followed
    (first / "elsewhere2").symlink_to(extra)  # the same folder a second time: skipped
    (second / "twice.png").symlink_to(sorted(second.iterdir())[0])  # a file of its own class again
    (second / "other.png").symlink_to(sorted(first.iterdir())[0])  # a file of the other class
    result, said = scan(root / "train")
    files = [p for p, _ in result.samples]
    assert len(files) == 20 + 3 and sum("/elsewhere/" in p for p in files) == 3
    assert not any(p.endswith(("twice.png", "other.png")) for p in files)
    for fragment in ("1 folder links into folders already scanned", "1 files reached twice through links",
                     f"1 files in two classes through links (kept in the first class in name order) (e.g. "
                     f"{CLASSES[1]}/other.png is {CLASSES[0]}/"):
        assert fragment in said[0], said[0]


def test_links_that_cannot_be_followed_and_stray_files_are_said_not_a_traceback(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path, {"train": 10}, num_classes=2)
    cat = root / "train" / CLASSES[0]
    (cat / "itself").symlink_to("itself")  # ELOOP on every look
    (cat / "a").symlink_to("b")
    (cat / "b").symlink_to("a")
    (cat / "root").symlink_to("/")  # above everything: a plain prefix test ("//") would follow it
    (root / "train" / "stray.png").write_bytes((cat / sorted(os.listdir(cat))[0]).read_bytes())
    locked = cat / "locked"
    locked.mkdir()
    Image.new("RGB", (8, 8)).save(locked / "x.png")
    scandir = os.scandir

    def no_permission(path):  # a folder of another user (chmod 0 does not stop root, who runs CI)
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", no_permission)
    result, said = scan(root / "train")
    assert len(result.samples) == 10 and len(said) == 1
    for fragment in ("3 links that cannot be followed (too many levels of symbolic links)",
                     "1 folder links into folders already scanned", "1 files outside class folders (e.g. stray.png)",
                     "1 folders that cannot be listed (permission denied)"):
        assert fragment in said[0], said[0]


def test_runs_of_earlier_versions_keep_decoding_files_as_stored():
    """Before dataset.exif_transpose a folder's files were not turned: a resumed or evaluated old
    run keeps its preprocessing; a new run has the key from its config."""
    from resnet_train.stored_config import in_current_schema

    old = {"dataset": {"name": "image_folder", "root": "pets", "image_size": 64}}
    assert in_current_schema(old)["dataset"]["exif_transpose"] is False
    new = {"dataset": {**old["dataset"], "exif_transpose": True}}
    assert in_current_schema(new)["dataset"]["exif_transpose"] is True


def test_hidden_stray_and_tool_files_are_skipped_in_one_line(tmp_path):
    root = write_image_folder(tmp_path, {"train": 10}, num_classes=2)
    cat = root / "train" / CLASSES[0]
    Image.new("RGB", (8, 8)).save(cat / ".hidden.png")
    (cat / "._IMG_1.jpg").write_bytes(b"AppleDouble")  # macOS's resource forks
    (cat / "notes.txt").write_text("not an image")
    (cat / "README").write_text("no suffix")
    for tool in ("__MACOSX", ".ipynb_checkpoints"):
        (root / "train" / tool).mkdir()  # (not classes)
        Image.new("RGB", (8, 8)).save(root / "train" / tool / "x.png")
    result, said = scan(root / "train")
    assert result.classes == CLASSES[:2] and len(result.samples) == 10
    assert len(said) == 1
    for fragment in ("hidden files or folders", ".txt files (not a format Pillow opens)", "suffix-less files",
                     "__MACOSX folders", "1 .ipynb_checkpoints folders"):
        assert fragment in said[0], said[0]


def test_every_format_pillow_opens_is_read_animated_ones_by_their_first_frame(tmp_path):
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    for cls in ("a", "b"):
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True)
        red.save(folder / "x.gif", save_all=True, append_images=[blue], duration=100, loop=0)
        red.save(folder / "x.jfif", format="JPEG")
        red.save(folder / "x.jpe", format="JPEG")
        red.save(folder / "x.webp")
        red.save(folder / "x.tiff")
        red.save(folder / "x.BMP")
    result, said = scan(tmp_path / "train")
    assert len(result.samples) == 12 and not said
    first = decode_resized(str(tmp_path / "train" / "a" / "x.gif"), 8)
    assert first[0].float().mean() > 200 and first[2].float().mean() < 50  # red: the first frame


def test_class_names_compare_as_text_nfc_and_nfd(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    for split, name in (("train", nfc), ("test", nfd)):
        for cls in (name, "tea"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    data = data_of("image_folder", tmp_path, batch_size=2, val_size=2)
    assert data.classes == [nfc, "tea"] and data.test.num_images == 8
    (tmp_path / "train" / nfd).mkdir()  # both spellings side by side: one line, not two classes
    with pytest.raises(DataError, match="two class folders named 'café'"):
        data_of("image_folder", tmp_path, batch_size=2, val_size=2)


def sideways_photo(path, orientation: int = 6):
    """A 40x20 photo stored as a phone stores a portrait shot: pixels sideways, EXIF says turn them.
    Left half red, right half blue as stored."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def test_exif_orientation_turns_photos_upright(tmp_path):
    sideways_photo(tmp_path / "p.jpg")  # orientation 6: turn 90 degrees clockwise -> 20 wide, 40 tall
    upright = decode_resized(str(tmp_path / "p.jpg"), 20)
    assert upright.shape == (3, 20, 20)  # the center of the tall image: rows from both colours
    top, bottom = upright[:, :5].float().mean((1, 2)), upright[:, -5:].float().mean((1, 2))
    assert top[0] > 200 and bottom[2] > 200  # red on top, blue below
    ignored = decode_resized(str(tmp_path / "p.jpg"), 20, exif_transpose=False)  # the center of the wide one
    assert ignored[0, :, :5].float().mean() > 200 and ignored[2, :, -5:].float().mean() > 200


def test_predict_and_export_turn_photos_upright_and_say_the_precision(tmp_path, image_folder_root):
    user = Runner(tmp_path)
    assert_ok(user("resnet-train", "model=resnet20", "dataset=image_folder", f"dataset.root={image_folder_root}",
                   "epochs=1", "batch_size=64", "hydra.run.dir=run", "tensorboard.images=false"))
    sideways_photo(tmp_path / "side.jpg")
    Image.open(tmp_path / "side.jpg").transpose(Image.Transpose.ROTATE_270).save(tmp_path / "turned.png")
    result = user("resnet-predict", "checkpoint=run", "inputs=[side.jpg,turned.png]", "precision=fp32", "topk=4")
    assert_ok(result)
    assert "precision fp32" in result.stdout
    rows = (tmp_path / "predictions.csv").read_text().splitlines()[1:]
    assert rows[0].split(",")[1:] == rows[1].split(",")[1:]  # the same picture, the same answer


def peak_rss_growth(script: str) -> int:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_statistics_take_a_few_mb_beyond_the_decoded_images(tmp_path):
    """200 photos at 160px (15 MB decoded): computing their mean and std must not copy them to int64
    (8x) and square them (8x again) all at once."""
    write_image_folder(tmp_path, {"train": 200}, num_classes=2, size=(200, 160))
    growth = peak_rss_growth(f"""
import resource, torch
from resnet_train.data import Batching, DatasetSpec, build_data
torch.set_num_threads(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = build_data(DatasetSpec("image_folder", {str(tmp_path)!r}, image_size=160, val_size=0),
                  Batching(32, 64), torch.device("cpu"), log=lambda m: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
""")
    decoded_kb = 200 * 160 * 160 * 3 // 1024
    assert growth < 3 * decoded_kb + 200 * 1024, (growth, decoded_kb)  # (the old way: ~17x)


def test_a_streamed_run_finds_a_broken_test_image_before_training(tmp_path, image_folder_root):
    broken = tmp_path / "broken"
    (broken / "test" / CLASSES[0]).mkdir(parents=True)
    (broken / "train").symlink_to(image_folder_root / "train", target_is_directory=True)
    for path in sorted((image_folder_root / "test" / CLASSES[0]).iterdir())[:5]:
        (broken / "test" / CLASSES[0] / path.name).symlink_to(path)
    (broken / "test" / CLASSES[0] / "zz-broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    result = Runner(tmp_path)("resnet-train", "model=resnet20", "dataset=image_folder", "dataset.root=broken",
                              "dataset.loader=stream", "epochs=1", "num_workers=1")
    assert_one_error(result, "could not read image", "zz-broken.jpg")
    assert "epoch" not in result.stdout.lower() and not list(tmp_path.glob("outputs/*/*/checkpoints"))


def test_running_out_of_memory_while_reading_blames_the_data_not_the_batch(tmp_path, image_folder_root):
    hook = tmp_path / "oom_hook.py"
    hook.write_text("import resnet_train.data as data\n"
                    "def decode_all(*args, **kwargs):\n"
                    "    raise RuntimeError('[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can\\'t "
                    "allocate memory: you tried to allocate 4816896000 bytes.')\n"
                    "data.decode_all = decode_all\n")
    result = Runner(tmp_path, RESNET_TRAIN_TEST_HOOK=str(hook))(
        "resnet-train", "model=resnet20", "dataset=image_folder", f"dataset.root={image_folder_root}",
        "dataset.loader=memory", "epochs=1")
    assert_one_error(result, "out of memory while reading", str(image_folder_root), "dataset.loader=stream")
    assert "batch_size" not in result.stderr


def test_only_the_images_a_command_reads_are_decoded(tmp_path, monkeypatch):
    import resnet_train.data as data

    decoded = []
    real = data.decode_all
    monkeypatch.setattr(data, "decode_all", lambda samples, *a, **k: decoded.append(len(samples)) or real(samples, *a, **k))
    root = write_image_folder(tmp_path, {"train": 30, "test": 12}, num_classes=3)
    val = data_of("image_folder", root, splits=("val",), val_size=6, mean=[0.5] * 3, std=[0.2] * 3).val
    assert val.num_images == 6 and decoded == [6]  # train/ is scanned to hold them out, not decoded
    decoded.clear()
    (root / "val").symlink_to(root / "test", target_is_directory=True)
    data_of("image_folder", root, splits=("val",), val_size=0, mean=[0.5] * 3, std=[0.2] * 3)
    assert decoded == [12]  # val/ only: test/ stands in for validation only where there is no val/


def test_eval_reads_only_the_split_it_evaluates(tmp_path, image_folder_root):
    """A folder holding only test/: the classes are the checkpoint's."""
    user = Runner(tmp_path)
    assert_ok(user("resnet-train", "model=resnet20", "dataset=image_folder", f"dataset.root={image_folder_root}",
                   "epochs=1", "batch_size=64", "hydra.run.dir=run", "tensorboard.images=false"))
    (tmp_path / "only-test").mkdir()
    (tmp_path / "only-test" / "test").symlink_to(image_folder_root / "test", target_is_directory=True)
    result = user("resnet-eval", "checkpoint=run", "dataset.root=only-test", "output=eval.json")
    assert_ok(result)
    assert "200 images" in result.stdout
    assert_one_error(user("resnet-eval", "checkpoint=run", "dataset.root=only-test", "split=val"), "train")
    (tmp_path / "no-test").mkdir()
    (tmp_path / "no-test" / "train").symlink_to(image_folder_root / "train", target_is_directory=True)
    result = user("resnet-eval", "checkpoint=run", "dataset.root=no-test")
    assert_one_error(result, "no-test/test does not exist", "split=val evaluates the validation images")
    assert "decoded" not in result.stdout + result.stderr  # (said before the memory plan)


def test_image_folders_are_read_by_every_process_at_once(monkeypatch, image_folder_root, compose_cfg):
    """Only a CIFAR download waits for the machine's first process; an image folder is read by all."""
    from resnet_train import build, distributed

    def refuse():
        raise AssertionError("local_main_first used for an image folder")
    monkeypatch.setattr(distributed, "local_main_first", refuse)
    cfg = compose_cfg("model=resnet20", "dataset=image_folder", f"dataset.root={image_folder_root}")
    assert build.load_data(cfg, torch.device("cpu")).classes == CLASSES[:4]


def test_a_resume_keeps_where_loader_auto_put_the_images(tmp_path, monkeypatch, train_in_process, caplog):
    """loader=auto decides by the memory free at the start; memory and stream shuffle differently,
    so a resume that finds less memory free keeps the run's decision instead of switching mid-run."""
    from resnet_train.data import storage

    root = write_image_folder(tmp_path / "imgs", {"train": 40}, num_classes=2)
    args = ["model=resnet20", "dataset=image_folder", f"dataset.root={root}", "batch_size=8", "num_workers=0",
            "tensorboard.images=false"]
    train_in_process(tmp_path / "run", *args, "epochs=1")
    decoded = 40 * 32 * 32 * 3
    monkeypatch.setattr(storage, "host_available_bytes", lambda: 3 * decoded // 2)  # auto would stream now
    caplog.set_level("INFO", logger="resnet_train")
    train_in_process(tmp_path / "run", *args, "epochs=2", f"resume={tmp_path / 'run' / 'checkpoints' / 'last.pt'}")
    assert "training images in memory" in caplog.text
    assert data_of("image_folder", root, loader="auto", batch_size=8).storage == "stream"  # (a new run would)
