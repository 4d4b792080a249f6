"""Transfer learning and using a trained model: pretrained weights, freezing, predict, summary."""

import csv
import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import Runner, assert_ok, assert_one_error, write_image_folder

from resnet_train import models
from resnet_train.commands.summary import layer_rows
from resnet_train.errors import ModelError
from resnet_train.models import ARCHITECTURES
from resnet_train.optim import param_groups


@pytest.fixture(scope="module")
def torchvision_weights(module_tmp) -> tuple[Path, dict]:
    torch.manual_seed(1)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = module_tmp / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_pretrained_path_loads_every_backbone_tensor(torchvision_weights):
    path, state = torchvision_weights
    model = models.resnet18(num_classes=10, stem="imagenet", pretrained=str(path))
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key
    assert model.fc.weight.shape == (10, 512)  # a new classifier for this data set


def test_stem_auto_follows_the_weights(torchvision_weights, tmp_path):
    path, _ = torchvision_weights
    assert models.resnet18(stem="auto", pretrained=str(path)).stem == "imagenet"  # 7x7 first convolution
    torch.save(models.resnet18(stem="cifar").state_dict(), tmp_path / "cifar_style.pt")
    assert models.resnet18(stem="auto", pretrained=str(tmp_path / "cifar_style.pt")).stem == "cifar"  # 3x3


def test_pretrained_mismatches_and_offline_imagenet_are_clear(torchvision_weights, tmp_path, monkeypatch):
    path, _ = torchvision_weights
    with pytest.raises(ModelError, match="do not fit this model.*imagenet stem"):
        models.resnet18(stem="cifar", pretrained=str(path))  # conv1 is 3x3 there
    with pytest.raises(ModelError, match="do not fit this model"):
        models.resnet34(stem="imagenet", pretrained=str(path))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ModelError, match="model.pretrained: .*junk.pth is not a torch file"):
        models.resnet18(stem="imagenet", pretrained=str(tmp_path / "junk.pth"))
    with pytest.raises(ModelError, match="no ImageNet weights for resnet20"):
        models.resnet20(pretrained="imagenet")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(ModelError, match=r"(?s)Name or service not known.*resnet18-f37072fd.pth.*"
                                         r"torch-home/hub/checkpoints/resnet18-f37072fd.pth"):
        models.resnet18(stem="imagenet", pretrained="imagenet")


@pytest.mark.parametrize("upto,frozen,trainable", [
    ("backbone", ["conv1", "bn1", "layer1", "layer4"], ["fc"]),
    ("layer2", ["conv1", "layer1", "layer2"], ["layer3", "layer4", "fc"]),
    ("stem", ["conv1", "bn1"], ["layer1", "fc"]),
])
def test_freeze_points(upto, frozen, trainable):
    model = models.resnet18(freeze=upto).train()
    for name in frozen:
        module = getattr(model, name)
        assert not any(p.requires_grad for p in module.parameters()), name
        assert all(not m.training for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)), name
    for name in trainable:
        assert all(p.requires_grad for p in getattr(model, name).parameters()), name
    assert model.fc.training
    with pytest.raises(ModelError, match="model.freeze=layer4"):
        models.resnet20(freeze="layer4")


def test_optimizer_gets_only_trainable_params_and_a_scaled_backbone_lr():
    model = models.resnet18(freeze="layer2")
    groups = param_groups(model, 5e-4, decay_norm_and_bias=False, backbone_lr_scale=0.1, lr=0.2)
    given = {id(p) for g in groups for p in g["params"]}
    assert given == {id(p) for p in model.parameters() if p.requires_grad}
    for group in groups:
        is_head = all(p is model.fc.weight or p is model.fc.bias for p in group["params"])
        assert group.get("lr") == (None if is_head else pytest.approx(0.02))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_summary_totals_equal_the_parameter_count(name):
    model = ARCHITECTURES[name](freeze="layer1")
    rows = layer_rows(model, 32)
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())
    frozen = sum(r.params for r in rows if not r.trainable)
    assert frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad) > 0
    assert rows[-1].name == "fc" and rows[-1].output_shape == (10,)


def test_summary_macs_match_the_known_resnet18_figure():
    rows = layer_rows(models.resnet18(num_classes=1000, stem="imagenet"), 224)
    assert sum(r.macs for r in rows) == pytest.approx(1.814e9, rel=1e-3)  # torchvision: 1.81 GFLOPS (MACs)


def test_summary_cli(run_cli):
    result = run_cli.installed("resnet-summary", "model=resnet50", "dataset.image_size=224", "model.freeze=layer3")
    assert_ok(result)
    assert "imagenet stem" in result.stdout and "GMACs" in result.stdout and "frozen" in result.stdout
    assert "parameters: 23,528,522" in result.stdout
    assert_one_error(run_cli("resnet-summary", "model=resnet19"), "model=resnet19: no such option")


def test_freeze_backbone_trains_only_the_classifier(torchvision_weights, small_cifar_root, run_cli):
    shared, state = torchvision_weights
    path = run_cli.cwd / "backbone.pt"
    path.write_bytes(shared.read_bytes())
    initial = models.resnet18(num_classes=10, stem="imagenet", pretrained=str(path)).fc.weight.detach().clone()
    result = run_cli("resnet-train", "model=resnet18", "model.pretrained=backbone.pt", "model.freeze=backbone",
                     "dataset.image_size=72", "epochs=1", "batch_size=64", "dataset.val_size=40",
                     "tensorboard.images=false", f"dataset.root={small_cifar_root}", "hydra.run.dir=probe")
    assert_ok(result)  # model.stem=auto followed the weights (7x7 first convolution: imagenet stem)
    assert "5,130 trainable (model.freeze=backbone)" in result.stdout and "resnet18 (imagenet stem)" in result.stdout
    ckpt = torch.load(run_cli.cwd / "probe" / "checkpoints" / "last.pt", weights_only=True)
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(ckpt["model"][key], value), key  # weights and BN running statistics untouched
    torch.manual_seed(0)
    assert not torch.equal(ckpt["model"]["fc.weight"], initial)  # the classifier (same seed, same init) trained
    assert len(ckpt["optimizer"]["state"]) == 2  # fc.weight and fc.bias only
    path.unlink()  # the weights live in the checkpoint now: evaluating or resuming needs no backbone file
    assert_ok(run_cli("resnet-eval", "checkpoint=probe"))
    again = run_cli("resnet-train", "resume=probe")
    assert again.returncode == 2 and "has finished all 1 epochs" in again.stderr


def test_imagenet_weights_offline_from_the_torch_home_cache(small_cifar_root, tmp_path):
    """model.pretrained=imagenet with stem=auto on 32px images: torchvision's file from $TORCH_HOME
    (no network here), the imagenet stem it was trained with, and a one-time warning about 32px."""
    torch.manual_seed(2)
    weights = torchvision.models.resnet18(num_classes=1000).state_dict()
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(weights, cache / "resnet18-f37072fd.pth")
    user = Runner(tmp_path / "work", TORCH_HOME=str(tmp_path / "torch-home"))
    result = user("resnet-train", "model.pretrained=imagenet", "epochs=1", "batch_size=64", "dataset.val_size=40",
                  "tensorboard.images=false", "num_workers=0", f"dataset.root={small_cifar_root}", "hydra.run.dir=ft")
    assert_ok(result)
    assert "resnet18 (imagenet stem)" in result.stdout and result.stdout.count("dataset.image_size=224") == 1
    ckpt = torch.load(user.cwd / "ft" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["model"]["stem"] == "imagenet" and ckpt["model"]["conv1.weight"].shape[-1] == 7
    missing = Runner(tmp_path / "offline", TORCH_HOME=str(tmp_path / "empty-home"))
    assert_one_error(missing("resnet-train", "model.pretrained=imagenet", f"dataset.root={small_cifar_root}",
                             "dataset.val_size=40", "epochs=1"),
                     "resnet18-f37072fd.pth", "empty-home/hub/checkpoints")


@pytest.fixture(scope="module")
def folder_run(module_tmp):
    root = write_image_folder(module_tmp / "pets", {"train": 300, "test": 120}, num_classes=4)
    user = Runner(root.parent / "user")
    assert_ok(user("resnet-train", "model=resnet20", "epochs=2", "batch_size=32", "optim.lr=0.05",
                   "dataset=image_folder", f"dataset.root={root}", "dataset.val_size=0.2", "num_workers=0",
                   "tensorboard.images=false", "hydra.run.dir=run"))
    return root, user.cwd / "run"


def test_predictions_agree_with_eval(folder_run, run_cli):
    root, run_dir = folder_run
    assert_ok(run_cli("resnet-eval", f"checkpoint={run_dir}", "output=eval.json"))
    accuracy = json.loads((run_cli.cwd / "eval.json").read_text())["accuracy"]

    result = run_cli.installed("resnet-predict", f"checkpoint={run_dir}", f"inputs=[{root / 'test'}]", "topk=3")
    assert_ok(result)
    rows = list(csv.DictReader((run_cli.cwd / "predictions.csv").open()))  # the default output, here
    assert len(rows) == 120 and list(rows[0]) == ["file", "class_1", "probability_1", "class_2", "probability_2",
                                                  "class_3", "probability_3"]
    correct = sum(Path(r["file"]).parent.name == r["class_1"] for r in rows)
    assert correct / len(rows) == pytest.approx(accuracy)
    assert all(float(r["probability_1"]) >= float(r["probability_2"]) >= float(r["probability_3"]) for r in rows)
    assert "120 image(s) predicted, 0 skipped" in result.stdout
    fp32 = run_cli("resnet-predict", f"checkpoint={run_dir}", f"inputs=[{root / 'test'}]", "precision=fp32",
                   "output=fp32.csv")
    assert_ok(fp32)
    same = [r["class_1"] for r in csv.DictReader((run_cli.cwd / "fp32.csv").open())]
    assert sum(a == r["class_1"] for a, r in zip(same, rows)) >= 0.95 * len(rows)


def test_predict_reports_and_skips_unreadable_files(folder_run, run_cli):
    root, run_dir = folder_run
    (run_cli.cwd / "notes.txt").write_text("not an image")
    (run_cli.cwd / "broken.png").write_bytes(b"\x89PNG broken")
    image = next((root / "test").rglob("*.png"))
    result = run_cli("resnet-predict", f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}",
                     f"inputs=[{image},notes.txt,broken.png,missing.jpg]", "output=p.csv")
    assert result.returncode == 1
    assert "1 image(s) predicted, 3 skipped" in result.stdout
    for name in ("notes.txt", "broken.png", "missing.jpg"):
        assert name in result.stderr
    assert "Traceback" not in result.stderr
    assert len(list(csv.DictReader((run_cli.cwd / "p.csv").open()))) == 1
    assert_one_error(run_cli("resnet-predict", "checkpoint=.", f"inputs=[{image}]"), "no checkpoint at")
    before = (run_cli.cwd / "p.csv").read_text()
    assert_one_error(run_cli("resnet-predict", f"checkpoint={run_dir}", "inputs=[missing.jpg]", "output=p.csv"),
                     "no files found", "missing.jpg: no such file")  # (before the model is loaded)
    nothing = run_cli("resnet-predict", f"checkpoint={run_dir}", "inputs=[notes.txt,broken.png]", "output=p.csv")
    assert nothing.returncode == 2 and "error: none of the 2 file(s) could be read" in nothing.stderr
    assert (run_cli.cwd / "p.csv").read_text() == before  # the earlier predictions are kept
