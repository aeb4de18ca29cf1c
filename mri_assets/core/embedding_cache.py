"""Pooled backbone embeddings on disk, one .npy per image, keyed by backbone and preprocessing.

``linear_probe`` training computes each image's embedding once and reads it back on every later
run with the same backbone weights and preprocessing (core/train.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mri_assets.core.files import replaced_atomically
from mri_assets.core.object_store import S3Objects
from mri_assets.core.preprocessing import PREPROCESSING_VERSION, Preprocessing


def save_npy_atomically(target: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy through a temp file and a rename: never half-written. Not fsynced:
    what it stores (embeddings) is recomputed when missing."""
    with replaced_atomically(target, durable=False) as handle:
        np.save(handle, array)


class EmbeddingCache:
    """``root/<backbone+preprocessing key>/ab/<sha256>.npy``: one float32 embedding per image.

    The key folds in a fingerprint of the backbone weights and the preprocessing, so a changed
    base model or image size never reuses stale embeddings. Plain .npy, read without pickle.
    """

    def __init__(self, root: str | Path, remote: S3Objects | None = None) -> None:
        self.root = Path(root)
        # With MRI_STORE=s3://...: the bucket's embeddings/ folder, same layout, each object
        # written once; ``root`` is then its cache. One listing per key tells what it holds.
        self.remote = remote
        self._remote_names: dict[str, set[str]] = {}

    @staticmethod
    def key(
        backbone_fingerprint: str, preprocessing: Preprocessing, precision: str = "fp32"
    ) -> str:
        """Folder name for one backbone, preprocessing and precision. Mixed-precision embeddings
        differ from float32 ones in the last bits, so they never share a folder (float32 keeps
        the key it always had)."""
        norm = hashlib.sha256(
            repr((preprocessing.mean, preprocessing.std, PREPROCESSING_VERSION)).encode()
        ).hexdigest()
        key = f"{backbone_fingerprint[:16]}-{preprocessing.image_size}px-{norm[:8]}"
        return key if precision == "fp32" else f"{key}-{precision}"

    def path(self, key: str, sha256: str) -> Path:
        return self.root / key / sha256[:2] / f"{sha256}.npy"

    def has(self, key: str, sha256: str) -> bool:
        if self.path(key, sha256).exists():
            return True
        return self.remote is not None and self._remote_key(key, sha256) in self._listed(key)

    def get(self, key: str, sha256: str) -> np.ndarray:
        path = self.path(key, sha256)
        if not path.exists() and self.remote is not None:
            self.remote.download(self._remote_key(key, sha256), path)
        return np.load(path, allow_pickle=False)

    def put(self, key: str, sha256: str, embedding: np.ndarray) -> None:
        """Atomic write (temp file + os.replace): a reader never sees half an embedding."""
        path = self.path(key, sha256)
        save_npy_atomically(path, np.asarray(embedding, dtype=np.float32))
        if self.remote is not None:
            self.remote.put_file(self._remote_key(key, sha256), path)
            self._listed(key).add(self._remote_key(key, sha256))

    def _remote_key(self, key: str, sha256: str) -> str:
        return self.path(key, sha256).relative_to(self.root).as_posix()

    def _listed(self, key: str) -> set[str]:
        if key not in self._remote_names:
            self._remote_names[key] = set(self.remote.list_keys(f"{key}/"))
        return self._remote_names[key]
