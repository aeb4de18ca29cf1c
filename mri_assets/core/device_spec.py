"""What MRI_DEVICE may say: the syntax of a device spec, checked without torch.

A spec is ``auto`` (CUDA, then Apple MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
Settings validate it at load time here; whether the device exists is core/devices.py's question.
"""

from __future__ import annotations

import re

DEVICE_SPECS = ("auto", "cpu", "cuda", "cuda:N", "mps")
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def parse_device_spec(raw: str | None) -> str:
    """``raw`` normalised (trimmed, lower case; empty or None: ``cpu``) when it is one of
    DEVICE_SPECS, else ValueError."""
    text = (raw or "cpu").strip().lower()
    if text in ("auto", "cpu", "cuda", "mps") or _CUDA_INDEX.fullmatch(text):
        return text
    raise ValueError(f"MRI_DEVICE must be one of {', '.join(DEVICE_SPECS)}; got {raw!r}")


def cuda_index(spec: str) -> int | None:
    """N of a parsed ``cuda:N`` spec; None for any other spec (bare ``cuda`` included)."""
    match = _CUDA_INDEX.fullmatch(spec)
    return int(match.group(1)) if match else None
