"""Safetensors only: the pickle-based weight formats that are never loaded, and the check that
refuses a model folder offering nothing else. torch-free, for the model store at load time."""

from __future__ import annotations

from pathlib import Path

# Weight formats that torch.load would unpickle, i.e. that can run arbitrary code when loaded.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


class UnsafeWeightsError(ValueError):
    """A model folder offers only pickle-based weights, which are never loaded."""


def refuse_pickle_only(folder: Path) -> None:
    """Raise UnsafeWeightsError if ``folder`` has pickle weights and no safetensors file."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        raise UnsafeWeightsError(
            f"{folder} holds only pickle-based weights ({', '.join(pickles)}); only safetensors "
            "are accepted, because unpickling can run arbitrary code. Re-save the model with "
            "save_pretrained(..., safe_serialization=True) to get model.safetensors."
        )
