"""Device specs resolve as documented, fail clearly, and choose the precision per device."""

from __future__ import annotations

import pytest
import torch

from mri_assets.core import devices
from mri_assets.core.device_spec import parse_device_spec
from mri_assets.core.devices import DeviceUnavailable, model_on, placement, resolve_device


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pretend machine with two CUDA devices (nothing is ever run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_cpu_is_the_default(no_accelerator) -> None:
    assert resolve_device() == torch.device("cpu")
    assert resolve_device(None) == resolve_device("") == resolve_device(" CPU ")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch, no_accelerator):
    assert resolve_device("auto") == torch.device("cpu")

    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_cuda_index_must_exist(two_gpus) -> None:
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceUnavailable, match=r"cuda:2 but only 2 CUDA device"):
        resolve_device("cuda:2")


def test_unavailable_devices_say_what_to_do(no_accelerator) -> None:
    with pytest.raises(DeviceUnavailable, match="sees no CUDA GPU.*CUDA build"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailable, match="sees no CUDA GPU"):
        resolve_device("cuda:0")
    with pytest.raises(DeviceUnavailable, match="Metal"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda0", "tpu", "xla:0"])
def test_unknown_specs_are_refused_listing_the_valid_ones(spec: str) -> None:
    with pytest.raises(ValueError, match="auto, cpu, cuda, cuda:N, mps") as caught:
        resolve_device(spec)
    assert not isinstance(caught.value, DeviceUnavailable)


def test_cpu_autocasts_only_when_asked(no_accelerator) -> None:
    for mixed in (None, False):
        where = placement("cpu", mixed)
        assert where.amp_dtype is None and where.precision == "fp32"
        assert not where.needs_grad_scaler and where.is_cpu and where.reference

    asked = placement("cpu", mixed_precision=True)

    assert asked.precision == "bf16" and not asked.needs_grad_scaler and not asked.reference


@pytest.mark.parametrize(("major", "dtype", "scaler"), [(9, "bf16", False), (7, "fp16", True)])
def test_cuda_uses_bf16_where_native_else_fp16_with_a_grad_scaler(
    monkeypatch: pytest.MonkeyPatch, two_gpus, major: int, dtype: str, scaler: bool
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))

    where = placement("cuda:1")

    assert where.device == torch.device("cuda", 1) and where.is_cuda
    assert where.precision == dtype and where.needs_grad_scaler is scaler
    assert placement("cuda:1", mixed_precision=False).precision == "fp32"


def test_on_the_cpu_models_and_tensors_stay_put(no_accelerator) -> None:
    where = placement("cpu")
    model = torch.nn.Linear(3, 2)
    tensor = torch.ones(2, 3)

    with model_on(model, where) as inside:
        assert inside is model and model.weight.device.type == "cpu"
    assert where.to_device(tensor) is tensor
    assert where.pin(tensor) is tensor  # nothing to pin for: no copy made
    with where.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert not where.grad_scaler().is_enabled()


def test_spec_syntax_is_checked_without_touching_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("torch was asked"))

    assert parse_device_spec(" CUDA:1 ") == "cuda:1"
    assert parse_device_spec("auto") == "auto" and parse_device_spec(None) == "cpu"
    with pytest.raises(ValueError, match="MRI_DEVICE must be one of"):
        parse_device_spec("gpu0")
