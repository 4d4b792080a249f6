"""Device and precision choice with the capability queries mocked (the only seam we mock)."""
import pytest
import torch

from resnet_train import device as d


@pytest.fixture
def machine(monkeypatch):
    def set_machine(cuda=0, capability=(8, 0), mps=False, cpu_bf16=True):
        monkeypatch.setattr(d, "cuda_available", lambda: cuda > 0)
        monkeypatch.setattr(d, "cuda_device_count", lambda: cuda)
        monkeypatch.setattr(d, "cuda_name", lambda i: "Fake GPU")
        monkeypatch.setattr(d, "cuda_bf16_supported", lambda i: capability >= (8, 0))
        monkeypatch.setattr(d, "mps_available", lambda: mps)
        monkeypatch.setattr(d, "cpu_bf16_supported", lambda: cpu_bf16)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return set_machine


def test_auto_prefers_cuda_then_mps_then_cpu(machine):
    machine(cuda=2)
    assert d.pick_device("auto") == torch.device("cuda", 0)
    assert d.describe(torch.device("cuda", 1)) == "cuda:1 (Fake GPU)"
    machine(mps=True)
    assert d.pick_device("auto") == torch.device("mps")
    machine()
    assert d.pick_device("auto") == torch.device("cpu")


def test_explicit_devices_are_checked(machine):
    machine(cuda=2)
    assert d.pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(d.DeviceError, match="has 2 CUDA GPU"):
        d.pick_device("cuda:2")
    machine(cuda=0)
    with pytest.raises(d.DeviceError, match="no CUDA GPU"):
        d.pick_device("cuda")
    with pytest.raises(d.DeviceError, match="MPS"):
        d.pick_device("mps")
    with pytest.raises(d.DeviceError, match="not one of"):
        d.pick_device("tpu")


@pytest.mark.parametrize("kind,capability,cpu_bf16,expected", [
    ("cuda", (9, 0), True, "bf16"),   # Hopper
    ("cuda", (8, 0), True, "bf16"),   # Ampere
    ("cuda", (7, 0), True, "fp16"),   # Volta: fp16 + GradScaler
    ("cpu", None, True, "bf16"),      # AVX512-BF16 / AMX
    ("cpu", None, False, "fp32"),
])
def test_auto_precision(machine, kind, capability, cpu_bf16, expected):
    machine(cuda=1 if kind == "cuda" else 0, capability=capability or (0, 0), cpu_bf16=cpu_bf16)
    dev = torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")
    assert d.pick_precision("auto", dev) == expected


def test_precision_settings(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GradScaler asks before enabling itself
    assert d.Precision("fp16", "cuda").grad_scaler().is_enabled()
    assert not d.Precision("bf16", "cpu").grad_scaler().is_enabled()
    assert d.Precision("bf16", "cpu").dtype == torch.bfloat16 and d.Precision("fp32", "cpu").dtype is None
    with pytest.raises(d.DeviceError, match="fp16 is for GPUs"):
        d.pick_precision("fp16", torch.device("cpu"))
