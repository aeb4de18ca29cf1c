"""How pixels become model input (``Preprocessing``) and the ``preprocessor_config.json`` that
records it in a model folder, read without torch or transformers: the embedding cache and the
model store use it at load time. Writing that file and running the preprocessing (torch) are
core/model.py's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# Names how model.preprocess_pixels turns pixels into tensors; cached embeddings are keyed by it,
# so a change of method never mixes old and new embeddings.
PREPROCESSING_VERSION = "uint8-antialiased-resize"


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become model input: square resize to ``image_size``, then (x/255 - mean) / std."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def with_size(self, image_size: int | None) -> Preprocessing:
        """The same normalisation at another image size (None keeps this one)."""
        if image_size is None or image_size == self.image_size:
            return self
        return Preprocessing(int(image_size), self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


def read_preprocessing(folder: str | Path) -> Preprocessing:
    """Parse a folder's ``preprocessor_config.json`` without importing transformers."""
    return preprocessing_from_config(json.loads((Path(folder) / PREPROCESSOR_CONFIG).read_text()))


def preprocessing_from_config(config: dict[str, Any]) -> Preprocessing:
    """The Preprocessing an image processor's settings describe (``size``, ``crop_size``,
    ``image_mean``, ``image_std``); what is missing is ImageNet's, at 224 px."""
    return Preprocessing(
        _size_from(config.get("size") or {}, config.get("crop_size")),
        _triple(config.get("image_mean"), IMAGENET_MEAN),
        _triple(config.get("image_std"), IMAGENET_STD),
    )


def _size_from(size: dict[str, Any] | int, crop_size: dict[str, Any] | None = None) -> int:
    if isinstance(size, int):
        return size
    for key in ("shortest_edge", "height", "width"):
        if size.get(key):
            return int(size[key])
    if crop_size and crop_size.get("height"):
        return int(crop_size["height"])
    return 224


def _triple(values: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if values is None:
        return default
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    floats = tuple(float(v) for v in values)
    return floats if len(floats) == 3 else default
