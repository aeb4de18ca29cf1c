"""Decoded pixels stored once per content hash, so no image is decoded twice."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def save_npy_atomically(target: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy through a temp file and os.replace: never half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PixelCache:
    """``root/ab/abcdef....npy`` holds the (H, W, 3) uint8 RGB pixels of one sha256."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.npy"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def put(self, sha256: str, pixels: np.ndarray) -> None:
        """Write atomically: a reader never sees a half-written array."""
        target = self.path(sha256)
        if not target.exists():
            save_npy_atomically(target, np.ascontiguousarray(pixels, dtype=np.uint8))

    def get(self, sha256: str) -> np.ndarray:
        path = self.path(sha256)
        if not path.exists():
            raise KeyError(
                f"no cached pixels for sha256 {sha256} under {self.root}; "
                "re-materialize the raw image assets to re-ingest it"
            )
        return np.load(path, allow_pickle=False)

    def get_many(self, sha256s: Iterable[str]) -> list[np.ndarray]:
        return [self.get(sha) for sha in sha256s]
