"""Batched inference: class probabilities and backbone embeddings from cached pixels.

Every entry point takes ``device`` (see core/devices.py; None keeps the CPU) and
``mixed_precision`` (None: autocast on CUDA only). Pixels are resized and normalised on the CPU
one batch at a time; on a GPU each batch goes over from pinned memory asynchronously and results
stay on the device until the end, so preparing the next batch overlaps the current forward pass.

``evaluate`` scores a test set and computes its metrics (core/evaluation.py holds the result).
This module imports torch: it is itself imported only where torch work starts (train, serving,
and inside the asset and command bodies of the Dagster layer and the CLI), so loading the
Dagster definitions never pulls it in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from mri_assets.core.allocator import keep_freed_memory_for_reuse
from mri_assets.core.devices import Placement, fast_cuda_kernels, model_on, placement
from mri_assets.core.evaluation import Evaluation
from mri_assets.core.metrics import classification_metrics
from mri_assets.core.model import preprocess_pixels
from mri_assets.core.preprocessing import Preprocessing

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from mri_assets.core.catalog import SplitSnapshot
    from mri_assets.core.labels import ClassSpec
    from mri_assets.core.pixel_cache import PixelCache


def predict_probabilities(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    pixels: list[np.ndarray],
    batch_size: int = 64,
    *,
    device: str | torch.device | None = None,
    mixed_precision: bool | None = None,
    temperature: float = 1.0,
) -> np.ndarray:
    """Softmax probabilities (N, num_classes) as float32, columns in logit (ClassSpec) order.

    ``pixels`` are (H, W, 3) uint8 RGB arrays of any sizes; they are resized and normalised per
    batch so memory stays bounded by ``batch_size`` images. Runs in channels_last (see embed),
    on ``device``; the model is handed back on the device it came on. ``temperature`` divides
    the logits before the softmax (core/calibration.py fits it; 1 leaves them as they are).
    """
    if not pixels:
        return np.zeros((0, int(model.config.num_labels)), dtype=np.float32)
    where = placement(device, mixed_precision)
    if where.reference:  # the original path, unchanged: numpy per batch
        return np.concatenate(
            [
                torch.softmax(_tempered(model(pixel_values=batch).logits, temperature), -1).numpy()
                for batch in _inference_batches(model, preprocessing, pixels, batch_size, where)
            ]
        )
    outputs = []
    for batch in _inference_batches(model, preprocessing, pixels, batch_size, where):
        with where.autocast():
            logits = model(pixel_values=batch).logits
        outputs.append(torch.softmax(_tempered(logits.float(), temperature), dim=-1))
    return torch.cat(outputs).cpu().numpy()


def evaluate(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    snapshot: SplitSnapshot,
    cache: PixelCache,
    classes: ClassSpec,
    model_version: str,
    batch_size: int = 64,
    *,
    device: str | None = None,
    temperature: float = 1.0,
) -> Evaluation:
    """Probabilities and metrics of ``model`` on every image of ``snapshot`` (pixels from cache),
    computed on ``device`` (core/devices.py; None: the CPU), calibrated by ``temperature`` (the
    one stored with the version: core/serving.py)."""
    if not len(snapshot):
        raise ValueError(
            f"the {snapshot.split} set is empty: land files under <landing>/{snapshot.split}/ "
            f"and materialize {snapshot.split}_images first"
        )
    probabilities = predict_probabilities(
        model,
        preprocessing,
        cache.get_many(snapshot.sha256s),
        batch_size,
        device=device,
        temperature=temperature,
    )
    p_positive = probabilities[:, classes.positive_index]
    y_true = [classes.index(label) for label in snapshot.labels]
    metrics = classification_metrics(y_true, p_positive, classes.positive_index, classes.names)
    return Evaluation(
        model_version, snapshot.version, metrics, tuple(y_true), tuple(float(p) for p in p_positive)
    )


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def logits_and_features(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    pixels: list[np.ndarray],
    batch_size: int = 64,
    *,
    device: str | torch.device | None = None,
    mixed_precision: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits (N, num_classes) and pooled backbone features (N, D), float32, from ONE
    forward pass per batch: the backbone runs once and the head is applied to its pooled output
    (what ``model(...)`` does inside), so an out-of-distribution score from the features costs
    only the head-sized work on top of a prediction."""
    classes = int(model.config.num_labels)
    if not pixels:
        return np.zeros((0, classes), dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
    where = placement(device, mixed_precision)
    head = classifier_head(model)
    logits, features = [], []
    for batch in _inference_batches(model, preprocessing, pixels, batch_size, where):
        with where.autocast():
            pooled = pooled_features(model, batch)
            logits.append(head(pooled).float())
        features.append(pooled.float())
    return torch.cat(logits).cpu().numpy(), torch.cat(features).cpu().numpy()


def classifier_head(model: PreTrainedModel) -> torch.nn.Module:
    """The module that turns pooled features into logits (``classifier`` in HF vision models)."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no `classifier` head on its pooled features; "
            "out-of-distribution scores need a model shaped like ResNet or ConvNeXt"
        )
    return head


def embed(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    pixels: list[np.ndarray],
    batch_size: int = 32,
    *,
    device: str | torch.device | None = None,
    mixed_precision: bool | None = None,
) -> np.ndarray:
    """Pooled backbone features (N, D) as float32: what the classifier head sees.

    Runs in channels_last memory format, in batches of 32: on CPU both make a ResNet-50 pass at
    224 px faster per image than contiguous batches of 64, whose activations no longer fit the
    caches (benchmarks/training.py measures it).
    """
    if not pixels:
        return np.zeros((0, 0), dtype=np.float32)
    where = placement(device, mixed_precision)
    if where.reference:
        chunks = [
            pooled_features(model, batch).numpy()
            for batch in _inference_batches(model, preprocessing, pixels, batch_size, where)
        ]
        return np.concatenate(chunks).astype(np.float32, copy=False)
    outputs = []
    for batch in _inference_batches(model, preprocessing, pixels, batch_size, where):
        with where.autocast():
            outputs.append(pooled_features(model, batch).float())
    return torch.cat(outputs).cpu().numpy()


def _inference_batches(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    pixels: list[np.ndarray],
    batch_size: int,
    where: Placement,
) -> Iterator[torch.Tensor]:
    """Preprocessed channels_last batches of ``pixels`` on ``where.device``, yielded while the
    model is there, in eval mode, channels_last and inference mode (the fast path; see
    channels_last and allocator)."""
    keep_freed_memory_for_reuse()
    model.eval()
    with (
        model_on(model, where),
        channels_last(model),
        fast_cuda_kernels(where),
        torch.inference_mode(),
    ):
        for start in range(0, len(pixels), batch_size):
            part = pixels[start : start + batch_size]
            if not where.is_cuda:
                batch = preprocess_pixels(part, preprocessing)
                yield where.to_device(batch.contiguous(memory_format=torch.channels_last))
            else:  # written straight into pinned memory; the layout change runs on the GPU
                batch = preprocess_pixels(part, preprocessing, pin_memory=True)
                yield where.to_device(batch).contiguous(memory_format=torch.channels_last)


@contextmanager
def channels_last(model: PreTrainedModel) -> Iterator[None]:
    """The model's 4-D weights in channels_last for the block, then back to contiguous (so a
    later save or training step sees the usual layout). Converted outside inference mode, so
    the weights never become inference tensors."""
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
