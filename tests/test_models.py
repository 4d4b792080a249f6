import pytest
import torch
import torchvision

from resnet_train import models
from resnet_train.models import ARCHITECTURES

# Reference parameter counts for 10 classes with the cifar stem (torchvision-style ResNets with
# projection shortcuts; He et al.'s CIFAR ResNets with option-A shortcuts).
PARAMS = {"resnet18": 11_173_962, "resnet34": 21_282_122, "resnet50": 23_520_842, "resnet101": 42_512_970,
          "resnet152": 58_156_618, "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586,
          "resnet56": 853_018, "resnet110": 1_727_962}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_forward_backward_and_parameter_count(name):
    model = ARCHITECTURES[name](num_classes=10)
    assert n_params(model) == PARAMS[name]
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "resnet50"])
def test_imagenet_stem_and_options(name):
    model = ARCHITECTURES[name](num_classes=7, stem="imagenet", dropout=0.5, zero_init_residual=True)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert isinstance(model.dropout, torch.nn.Dropout) and model.conv1.kernel_size == (7, 7)
    last_bns = [m.bn3 if isinstance(m, models.Bottleneck) else m.bn2
                for m in model.modules() if isinstance(m, (models.BasicBlock, models.Bottleneck))]
    assert all((bn.weight == 0).all() for bn in last_bns)


def test_cifar_family_uses_option_a_shortcuts():
    model = models.resnet20()
    shortcuts = [b.downsample for b in model.modules() if isinstance(b, models.BasicBlock) and b.downsample is not None]
    assert len(shortcuts) == 2 and all(isinstance(s, models.ZeroPadShortcut) for s in shortcuts)
    x = torch.randn(1, 16, 8, 8)
    y = models.ZeroPadShortcut(2, 16)(x)
    assert y.shape == (1, 32, 4, 4) and torch.equal(y[:, :16], x[:, :, ::2, ::2]) and (y[:, 16:] == 0).all()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_weights_load_into_imagenet_stem(name):
    reference = getattr(torchvision.models, name)(num_classes=1000).eval()
    ours = ARCHITECTURES[name](num_classes=1000, stem="imagenet").eval()
    result = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
