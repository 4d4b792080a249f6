import time
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, _fork_context, write_image_folder
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from resnet_train.data import (
    Augment,
    BatchTransform,
    DataError,
    MemoryLoader,
    Batching,
    DatasetSpec,
    build_data,
    crop_flip,
    draw_augmentation,
    epoch_generator,
    load_cifar,
    stratified_split,
)

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def random_batch(n=16, size=32, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_crop_flip_matches_per_image_torchvision():
    images = random_batch()
    g = torch.Generator().manual_seed(7)
    offsets, flips = draw_augmentation(len(images), 4, True, g)
    assert flips.any() and not flips.all() and offsets.min() >= 0 and offsets.max() <= 8
    ours = crop_flip(images, 4, offsets, flips)
    for img, out, (top, left), flip in zip(images, ours, offsets.tolist(), flips.tolist()):
        ref = TF.crop(TF.pad(img.permute(2, 0, 1), [4, 4, 4, 4], fill=0), top, left, 32, 32)
        if flip:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out.permute(2, 0, 1), ref)


def test_transform_is_seeded_and_draws_the_same_params_as_reference():
    images = random_batch()
    t = BatchTransform(None, None, Augment(crop_padding=4, hflip=True))
    a = t(images, torch.Generator().manual_seed(3))
    b = t(images, torch.Generator().manual_seed(3))
    c = t(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    offsets, flips = draw_augmentation(len(images), 4, True, torch.Generator().manual_seed(3))
    assert torch.equal(a * 255, crop_flip(images, 4, offsets, flips).permute(0, 3, 1, 2).float())


def test_hflip_only_and_no_augmentation_at_eval():
    images = random_batch()
    t = BatchTransform(None, None, Augment(crop="none", hflip=True))
    out = (t(images, torch.Generator().manual_seed(0)) * 255).round().byte().permute(0, 2, 3, 1)
    for img, o in zip(images, out):
        assert torch.equal(o, img) or torch.equal(o, img.flip(1))
    plain = BatchTransform(None, None, Augment(crop_padding=4, hflip=True))(images, None)
    assert torch.equal((plain * 255).round().byte().permute(0, 2, 3, 1), images)


@pytest.mark.parametrize("channels_last", [True, False])
def test_normalization_matches_torchvision(channels_last):
    images = random_batch()
    ours = BatchTransform(MEAN, STD, channels_last=channels_last)(images)
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])(images.permute(0, 3, 1, 2))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_resize_on_the_fly():
    out = BatchTransform(MEAN, STD, output_size=64)(random_batch(4))
    assert out.shape == (4, 3, 64, 64)


def test_stratified_split_is_seeded_and_proportional():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    train, val = stratified_split(labels, 100, seed=0)
    assert len(val) == 100 and len(train) == 900 and not set(train.tolist()) & set(val.tolist())
    assert torch.bincount(labels[val]).tolist() == [60, 30, 10]
    assert torch.equal(val, stratified_split(labels, 100, seed=0)[1])
    assert not torch.equal(val, stratified_split(labels, 100, seed=1)[1])


def test_memory_loader_order_depends_on_seed_and_epoch():
    images, labels = random_batch(40), torch.arange(40)
    loader = MemoryLoader(images, labels, 8, BatchTransform(None, None, Augment()), train=True, seed=1)
    assert len(loader) == 5
    epoch1 = torch.cat([y for _, y in loader])
    assert sorted(epoch1.tolist()) == list(range(40))
    assert torch.equal(epoch1, torch.cat([y for _, y in loader]))
    loader.set_epoch(2)
    assert not torch.equal(epoch1, torch.cat([y for _, y in loader]))
    g = epoch_generator(1, 2, torch.device("cpu"))
    assert g.initial_seed() == epoch_generator(1, 2, torch.device("cpu")).initial_seed()


def data_of(name: str, root, log=lambda m: None, **kw):
    """build_data with the dataset's and the batching's settings given as keywords (the tests' defaults)."""
    spec = dict(image_size=32, mean=None, std=None, normalize=True, val_size=0.2, split_seed=0, loader="memory",
                exif_transpose=True, classes=None, splits=("train", "val", "test"))
    batching = dict(batch_size=32, eval_batch_size=64, augment=Augment(), seed=0, num_workers=0, channels_last=True)
    for key, value in kw.items():
        (spec if key in spec else batching)[key] = value
    return build_data(DatasetSpec(name, str(root), **spec), Batching(**batching), torch.device("cpu"),
                      log=log)


def test_cifar10_reads_the_python_batches(cifar_root, cifar_checksums):
    train, test, classes = load_cifar("cifar10", cifar_root, download=False)
    assert classes == CLASSES and len(train) == 1000 and len(test) == 500
    assert train.images.shape == (1000, 32, 32, 3) and train.images.dtype == torch.uint8
    data = data_of("cifar10", cifar_root, val_size=100, mean=MEAN, std=STD)
    assert data.train.num_images == 900 and data.val.num_images == 100 and data.test.num_images == 500
    assert torch.bincount(data.val.labels).tolist() == [10] * 10
    x, y = next(iter(data.train))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_val_size_zero_validates_on_test(cifar_root, cifar_checksums):
    data = data_of("cifar10", cifar_root, val_size=0, mean=MEAN, std=STD)
    assert data.val is data.test and data.train.num_images == 1000 and "test split" in data.val_source


def test_missing_cifar_without_download_says_how_to_provide_it(tmp_path):
    with pytest.raises(DataError, match="(?s)cifar-10-batches-py.*dataset.download=false.*cifar-10-python.tar.gz"):
        load_cifar("cifar10", tmp_path / "empty", download=False)


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_image_folder_both_loaders_agree(tmp_path, loader):
    root = write_image_folder(tmp_path, {"train": 60, "val": 20, "test": 20}, num_classes=3)
    data = data_of("image_folder", root, loader=loader, batch_size=8)
    assert data.classes == CLASSES[:3] and data.storage == loader
    assert data.train.num_images == 60 and data.val.num_images == 20 and data.test.num_images == 20
    test_x = torch.cat([x for x, _ in data.test])
    ref = data_of("image_folder", root, loader="memory", batch_size=8)
    torch.testing.assert_close(test_x, torch.cat([x for x, _ in ref.test]))
    assert len(data.mean) == 3 and all(0 < s < 1 for s in data.std)


def test_image_folder_resizes_to_image_size(tmp_path):
    root = write_image_folder(tmp_path, {"train": 12}, num_classes=2, size=48)
    data = data_of("image_folder", root, image_size=24, val_size=0, batch_size=4)
    assert next(iter(data.train))[0].shape == (4, 3, 24, 24)


def test_image_folder_errors(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        data_of("image_folder", tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images"):
        data_of("image_folder", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        data_of("image_folder", tmp_path / "nowhere")


def test_corrupt_image_is_named(tmp_path):
    root = write_image_folder(tmp_path, {"train": 10}, num_classes=2)
    bad = root / "train" / CLASSES[0] / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        data_of("image_folder", root, val_size=0, batch_size=4)


def test_auto_loader_streams_what_does_not_fit(tmp_path, monkeypatch):
    """auto: memory while the decoded images take at most half the host's available memory, counting
    a copy per process on the machine; said in one line before anything is decoded."""
    from resnet_train.data import storage
    root = write_image_folder(tmp_path, {"train": 40}, num_classes=2)
    decoded = 40 * 32 * 32 * 3
    monkeypatch.setattr(storage, "host_available_bytes", lambda: 2 * decoded)
    said = []
    assert data_of("image_folder", root, loader="auto", batch_size=8, log=said.append).storage == "memory"
    assert f"40 images at 32px: {decoded // 1024 ** 2:.0f} MB decoded" in said[0] and "into memory" in said[0]
    assert data_of("image_folder", root, loader="auto", batch_size=8, processes_here=2).storage == "stream"
    monkeypatch.setattr(storage, "host_available_bytes", lambda: 2 * decoded - 1)
    assert data_of("image_folder", root, loader="auto", batch_size=8).storage == "stream"
    monkeypatch.setattr(storage, "host_available_bytes", lambda: decoded - 1)
    with pytest.raises(DataError, match="dataset.loader=memory: 40 images at 32px.*more than the host's available"):
        data_of("image_folder", root, loader="memory", batch_size=8)


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_skipping_batches_resumes_the_same_epoch(tmp_path, loader):
    """set_epoch(e, skip=k) yields exactly the batches k.. of the uninterrupted epoch e."""
    root = write_image_folder(tmp_path, {"train": 48}, num_classes=3)
    train = data_of("image_folder", root, loader=loader, val_size=0, batch_size=8).train
    train.set_epoch(3)
    full = list(train)
    train.set_epoch(3, skip=2)
    resumed = list(train)
    assert len(full) == len(train) == 6 and len(resumed) == 4
    for (x, y), (rx, ry) in zip(full[2:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    train.set_epoch(4)
    assert not torch.equal(torch.cat([y for _, y in train]), torch.cat([y for _, y in full]))


def test_non_square_images_are_decoded_like_torchvision_resize_and_center_crop(tmp_path):
    """A 48x32 (landscape) and a 30x50 (portrait) image: shorter side to image_size, center crop."""
    from PIL import Image
    from torchvision.transforms import v2 as T

    from resnet_train.data import decode_resized
    for size in ((48, 32), (30, 50)):
        g = torch.Generator().manual_seed(1)
        array = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g)
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.fromarray(array.numpy()).save(path)
        ours = decode_resized(str(path), 24)
        reference = T.Compose([T.Resize(24, antialias=True), T.CenterCrop(24)])(array.permute(2, 0, 1))
        assert ours.shape == (3, 24, 24) and torch.equal(ours, reference)


def test_folder_without_test_split_and_without_normalization(tmp_path, train_in_process):
    """No test/ folder: no final test, said once; normalize=false: the model sees pixels in 0..1."""
    root = write_image_folder(tmp_path / "imgs", {"train": 120}, num_classes=3, size=(40, 30))
    metrics = train_in_process(tmp_path / "run", "model=resnet20", "epochs=1", "batch_size=16", "num_workers=0",
                               "dataset=image_folder", f"dataset.root={root}", "dataset.normalize=false",
                               "tensorboard.images=false")
    assert metrics["test_accuracy"] is None and metrics["best_val_accuracy"] is not None
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["normalization"]["mean"] is None and ckpt["config"]["dataset"]["mean"] is None
    data = data_of("image_folder", root, normalize=False, val_size=0, batch_size=8)
    x, _ = next(iter(data.train))
    assert 0 <= x.min() and x.max() <= 1


def test_channel_stats_are_exact_over_chunks():
    """Integer sums chunk by chunk (no float64 copy of the set) give the float64 statistics."""
    from resnet_train.data import channel_stats
    images = torch.randint(0, 256, (1000, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(images, chunk_bytes=300 * 8 * images[0].numel())
    reference = images.reshape(-1, 3).double() / 255
    assert mean == pytest.approx(reference.mean(0).tolist(), abs=1e-12)
    assert std == pytest.approx(reference.std(0).tolist(), abs=1e-12)


def _hold_a_streamed_iterator(root: str, pid_file: str) -> None:
    train = data_of("image_folder", root, loader="stream", val_size=0, batch_size=4, num_workers=1).train
    batches = iter(train)
    next(batches)
    Path(pid_file).write_text(str(train.loader._iterator._workers[0].pid))  # (persistent workers: kept by the loader)
    time.sleep(600)


def test_loader_workers_end_with_a_killed_run_under_forkserver(tmp_path):
    """A worker's parent is the forkserver, not the run, so torch's own watchdog never fires; ours does."""
    root = write_image_folder(tmp_path, {"train": 16}, num_classes=2)
    pid_file = tmp_path / "worker.pid"
    run = _fork_context().Process(target=_hold_a_streamed_iterator, args=(str(root), str(pid_file)))
    run.start()
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and run.is_alive()
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    run.kill()
    run.join()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists():
        assert time.monotonic() < deadline, "the DataLoader worker outlived its run"
        time.sleep(0.1)
