"""Batched probabilities and embeddings agree with a plain forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from mri_assets.core.inference import embed, predict_probabilities
from mri_assets.core.model import preprocess_pixels
from mri_assets.core.preprocessing import Preprocessing

PREPROCESSING = Preprocessing(32)


@pytest.fixture(scope="module")
def model() -> ResNetForImageClassification:
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=2
    )
    torch.manual_seed(2)
    return ResNetForImageClassification(config)


@pytest.fixture(scope="module")
def pixels() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = [(40, 40), (64, 48), (40, 40), (33, 70), (64, 48)]
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]


def test_probabilities_match_a_plain_forward_pass(model, pixels) -> None:
    model.train()  # predict must switch to eval itself: batch norm statistics differ otherwise

    probs = predict_probabilities(model, PREPROCESSING, pixels)

    assert not model.training
    with torch.no_grad():
        expected = torch.softmax(
            model(pixel_values=preprocess_pixels(pixels, PREPROCESSING)).logits, -1
        )
    assert probs.shape == (5, 2)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_batch_size_does_not_change_the_answer(model, pixels) -> None:
    one_by_one = predict_probabilities(model, PREPROCESSING, pixels, batch_size=1)
    all_at_once = predict_probabilities(model, PREPROCESSING, pixels, batch_size=64)

    np.testing.assert_allclose(one_by_one, all_at_once, atol=1e-5)


def test_no_images_give_an_empty_array(model) -> None:
    assert predict_probabilities(model, PREPROCESSING, []).shape == (0, 2)


def test_embeddings_are_what_the_head_sees(model, pixels) -> None:
    features = embed(model, PREPROCESSING, pixels, batch_size=2)

    assert features.shape == (5, 16) and features.dtype == np.float32
    model.eval()
    with torch.no_grad():
        logits_from_head = model.classifier(torch.from_numpy(features))
        logits = model(pixel_values=preprocess_pixels(pixels, PREPROCESSING)).logits
    assert torch.allclose(logits_from_head, logits, atol=1e-5)
