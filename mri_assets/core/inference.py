"""Batched inference: class probabilities and backbone embeddings from cached pixels."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from mri_assets.core.allocator import keep_freed_memory_for_reuse
from mri_assets.core.model import Preprocessing, preprocess_pixels

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def predict_probabilities(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    pixels: list[np.ndarray],
    batch_size: int = 64,
) -> np.ndarray:
    """Softmax probabilities (N, num_classes), columns in logit (ClassSpec) order.

    ``pixels`` are (H, W, 3) uint8 RGB arrays of any sizes; they are resized and normalised per
    batch so memory stays bounded by ``batch_size`` images. Runs in channels_last (see embed).
    """
    import torch

    if not pixels:
        return np.zeros((0, int(model.config.num_labels)), dtype=np.float32)
    return np.concatenate([
        torch.softmax(model(pixel_values=batch).logits, dim=-1).numpy()
        for batch in _inference_batches(model, preprocessing, pixels, batch_size)
    ])


def logits_of(model: PreTrainedModel, inputs: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits for an already preprocessed batch (N, 3, S, S), in eval mode and without grad."""
    import torch

    model.eval()
    with torch.inference_mode():
        return torch.cat([model(pixel_values=part).logits for part in _batches(inputs, batch_size)])


def embed(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    pixels: list[np.ndarray],
    batch_size: int = 32,
) -> np.ndarray:
    """Pooled backbone features (N, D) as float32: what the classifier head sees.

    Runs in channels_last memory format, in batches of 32: on CPU both make a ResNet-50 pass at
    224 px about twice as fast per image as contiguous batches of 64 (benchmarks/training.py).
    """
    if not pixels:
        return np.zeros((0, 0), dtype=np.float32)
    chunks = [
        pooled_features(model, batch).numpy()
        for batch in _inference_batches(model, preprocessing, pixels, batch_size)
    ]
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _inference_batches(
    model: PreTrainedModel, preprocessing: Preprocessing, pixels: list[np.ndarray], batch_size: int
) -> Iterator[torch.Tensor]:
    """Preprocessed channels_last batches of ``pixels``, yielded while the model is in eval mode,
    channels_last and inference mode (the fast CPU path; see channels_last and allocator)."""
    import torch

    keep_freed_memory_for_reuse()
    model.eval()
    with channels_last(model), torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            batch = preprocess_pixels(pixels[start : start + batch_size], preprocessing)
            yield batch.contiguous(memory_format=torch.channels_last)


@contextmanager
def channels_last(model: PreTrainedModel) -> Iterator[None]:
    """The model's 4-D weights in channels_last for the block, then back to contiguous (so a
    later save or training step sees the usual layout). Converted outside inference mode, so
    the weights never become inference tensors."""
    import torch

    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def pooled_features(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    """Backbone output pooled to one vector per image (N, D).

    Works for models whose base model returns ``pooler_output`` (ResNet, ConvNeXt, ...), the
    input their ``classifier`` head takes.
    """
    pooled = getattr(model.base_model(pixel_values=batch), "pooler_output", None)
    if pooled is None:
        raise ValueError(
            f"{type(model).__name__} has no pooled backbone output; linear_probe needs a model "
            "whose base model returns pooler_output (e.g. ResNet, ConvNeXt)"
        )
    return pooled.flatten(1)


def _batches(inputs: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, inputs.shape[0], batch_size):
        yield inputs[start : start + batch_size]
