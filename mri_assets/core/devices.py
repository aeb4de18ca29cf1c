"""Where torch work runs (MRI_DEVICE) and how: precision, memory format, host-to-device copies.

The spec's syntax (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) is core/device_spec.py's.
Everything here is a no-op on the CPU, so the CPU path of training and inference stays exactly
what it was before devices existed (bit-identical for a given seed and thread count).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from mri_assets.core.device_spec import cuda_index, parse_device_spec


class DeviceUnavailable(ValueError):
    """The device named by MRI_DEVICE (or a ``device`` argument) does not exist here."""


def resolve_device(spec: str | torch.device | None = "cpu") -> torch.device:
    """The torch.device for ``spec``; None means ``cpu`` (the behaviour before devices existed).

    Raises DeviceUnavailable for a well-formed spec this machine cannot serve (no CUDA build,
    no such GPU index, no MPS), and ValueError for a spec that is not one of DEVICE_SPECS.
    """
    if isinstance(spec, torch.device):  # "mps:0" and the like name the one device there is
        spec = str(spec) if spec.type == "cuda" else spec.type
    text = parse_device_spec(spec)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise DeviceUnavailable(
                "MRI_DEVICE=mps but Apple's Metal backend is not available here (it needs macOS "
                "on Apple silicon and a torch build with MPS); use auto or cpu"
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"MRI_DEVICE={text} but torch {torch.__version__} sees no CUDA GPU (a CPU-only "
            "build, or no driver); install the CUDA build of the same torch release, or use "
            "auto or cpu"
        )
    index = cuda_index(text)
    if index is None:
        index = torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailable(
            f"MRI_DEVICE={text} but only {count} CUDA device(s) exist (cuda:0 to cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@dataclass(frozen=True)
class Placement:
    """A resolved device and the numeric precision torch work uses on it.

    ``amp_dtype`` is the autocast dtype (None: plain float32). On CUDA it is bfloat16 where the
    GPU supports it, else float16, which then needs a gradient scaler during training (float16's
    narrow exponent underflows small gradients; bfloat16 has float32's range).
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def reference(self) -> bool:
        """The CPU in float32: the deterministic reference path, kept bit-identical."""
        return self.is_cpu and self.amp_dtype is None

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``: what a record or a cache key should say."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def autocast(self) -> Any:
        """Context manager: autocast to ``amp_dtype`` on this device, or nothing at all."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> Any:
        """A GradScaler for float16 training; a disabled one (a pass-through) otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.needs_grad_scaler)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on this device; from pinned host memory the copy is asynchronous."""
        if tensor.device == self.device:
            return tensor
        return tensor.to(self.device, non_blocking=tensor.is_pinned())

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """Page-locked copy for fast asynchronous copies to a GPU; the tensor itself on CPU."""
        if self.is_cuda and tensor.device.type == "cpu" and not tensor.is_pinned():
            return tensor.pin_memory()
        return tensor


def placement(
    device: str | torch.device | None = None, mixed_precision: bool | None = None
) -> Placement:
    """Resolve ``device`` (see resolve_device) and choose its precision.

    ``mixed_precision`` None means on for CUDA and off elsewhere. On the CPU it is off unless
    asked for (True: bfloat16 autocast, fast only on CPUs with native bfloat16 such as AMX, and
    no longer the bit-identical reference path); MPS always runs in float32 (its autocast
    support varies by macOS and torch release).
    """
    resolved = resolve_device(device)
    use_amp = resolved.type == "cuda" if mixed_precision is None else mixed_precision
    if use_amp and resolved.type == "cpu":
        return Placement(resolved, torch.bfloat16)
    if not use_amp or resolved.type != "cuda":
        return Placement(resolved)
    # Native bfloat16 arrived with compute capability 8 (Ampere); is_bf16_supported() would
    # also say yes to the slow emulation on older GPUs, where float16 is the faster choice.
    major, _ = torch.cuda.get_device_capability(resolved)
    return Placement(resolved, torch.bfloat16 if major >= 8 else torch.float16)


@contextmanager
def fast_cuda_kernels(where: Placement) -> Iterator[None]:
    """On CUDA, let cuDNN pick the fastest convolution algorithms and use TF32 matmuls for the
    block (fixed input sizes make the benchmark search pay off); restore the settings after.
    Nothing changes on other devices."""
    if not where.is_cuda:
        yield
        return
    previous = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = previous


@contextmanager
def model_on(model: torch.nn.Module, where: Placement) -> Iterator[torch.nn.Module]:
    """``model`` moved to ``where.device`` for the block, then back to where it was.

    Callers hand models around on the CPU (save_pretrained, fingerprints, the model store), so a
    step that runs on a GPU gives the model back where it found it. A no-op on the CPU.
    """
    home = _device_of(model)
    if home == where.device:
        yield model
        return
    model.to(where.device)
    try:
        yield model
    finally:
        model.to(home)


def _device_of(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def synchronize(where: Placement) -> None:
    """Wait for queued GPU work (for honest timings); nothing to wait for on the CPU."""
    if where.is_cuda:
        torch.cuda.synchronize(where.device)
