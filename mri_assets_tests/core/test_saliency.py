"""Grad-CAM looks where the evidence is, on the embedded ResNet shape and a ResNet-50 shape."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ResNetConfig, ResNetForImageClassification

from mri_assets.core.preprocessing import Preprocessing
from mri_assets.core.recipe import TrainConfig
from mri_assets.core.saliency import grad_cam, last_convolutional_stage, overlay_png
from mri_assets.core.train import fine_tune

SIZE = 64
SQUARE = 12


def squares(n: int, seed: int) -> tuple[list[int], list[np.ndarray], list[tuple[int, int]]]:
    """Dark noise; class 1 holds a bright square somewhere, class 0 none."""
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n)]
    images = rng.integers(0, 60, (n, SIZE, SIZE, 3)).astype(np.uint8)
    corners = []
    for image, label in zip(images, labels, strict=True):
        row, col = (int(v) for v in rng.integers(0, SIZE - SQUARE, 2))
        if label:
            image[row : row + SQUARE, col : col + SQUARE] = 230
        corners.append((row, col))
    return labels, list(images), corners


def tiny_resnet(layer_type: str = "basic") -> ResNetForImageClassification:
    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type=layer_type, num_labels=2
    )
    return ResNetForImageClassification(config)


def test_the_map_points_at_the_square_that_makes_the_class() -> None:
    labels, images, _ = squares(80, seed=0)
    sha256s = [f"{i:064x}" for i in range(len(images))]
    lookup = dict(zip(sha256s, images, strict=True))
    result = fine_tune(
        tiny_resnet(),
        Preprocessing(SIZE),
        sha256s,
        labels,
        lambda shas: [lookup[s] for s in shas],
        TrainConfig(epochs=10, validation_fraction=0.2, num_threads=1),
        log=lambda line: None,
    )
    _, test_images, corners = squares(20, seed=1)
    with_square = test_images[1::2]

    maps = grad_cam(result.model, result.preprocessing, with_square, [1] * len(with_square))

    for saliency, (row, col) in zip(maps, corners[1::2], strict=True):
        assert saliency.shape == (SIZE, SIZE) and 0 <= saliency.min() <= saliency.max() <= 1
        inside = saliency[row : row + SQUARE, col : col + SQUARE].mean()
        assert inside > 2 * saliency.mean()


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_last_stage_is_found_and_maps_match_each_images_size(layer_type) -> None:
    model = tiny_resnet(layer_type)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(40, 56, 3), (70, 33, 3)]]

    maps = grad_cam(model, Preprocessing(32), images)

    assert last_convolutional_stage(model) is model.resnet.encoder.stages[-1]
    assert [m.shape for m in maps] == [(40, 56), (70, 33)]
    assert all(m.dtype == np.float32 and np.isfinite(m).all() for m in maps)


def test_a_model_without_stages_uses_its_last_convolution() -> None:
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base_model = self
            self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
            self.head = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU())

    model = Plain()
    assert last_convolutional_stage(model) is model.head


def test_overlay_is_a_png_of_the_scan_and_can_be_shrunk() -> None:
    scan = np.full((80, 60, 3), 100, dtype=np.uint8)
    saliency = np.zeros((80, 60), dtype=np.float32)
    saliency[:10, :10] = 1.0

    full = Image.open(io.BytesIO(overlay_png(scan, saliency)))
    small = Image.open(io.BytesIO(overlay_png(scan, saliency, max_side=40)))

    assert full.size == (60, 80) and max(small.size) == 40
    pixels = np.asarray(full.convert("RGB")).astype(int)
    assert (pixels[50:, 30:] == 100).all()  # no saliency: the scan as it was
    assert np.abs(pixels[:10, :10] - 100).sum() > 0  # saliency: coloured
