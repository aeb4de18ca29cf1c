"""Calibration and out-of-distribution scores of a served model: fitted once after training,
stored with the version, applied by every scoring path; versions stored before them still serve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mri_assets.core.calibration import fit_temperature, negative_log_likelihood, softmax
from mri_assets.core.inference import logits_and_features, predict_probabilities
from mri_assets.core.labels import ClassSpec
from mri_assets.core.model import load_base_model
from mri_assets.core.phantoms import generate_slice
from mri_assets.core.recipe import TrainConfig
from mri_assets.core.serving import ModelStatistics, ServedModel, fit_statistics
from mri_assets.core.store import ARRAYS_FILE, ModelStore
from mri_assets.core.train import fine_tune

SIZE = 64
CLASSES = ClassSpec()


def phantom_slices(n: int, seed: int) -> tuple[list[int], list[np.ndarray]]:
    """Generated T2-like slices, as RGB, alternating glioma and meningioma."""
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n)]
    slices = [generate_slice(rng, CLASSES.names[label], SIZE) for label in labels]
    return labels, [np.repeat(s[..., None], 3, axis=2) for s in slices]


def natural_texture(rng: np.random.Generator) -> np.ndarray:
    """A colour 1/f noise field: the spectrum of a natural photograph, nothing like an MRI."""
    freq = np.fft.fftfreq(SIZE)[:, None] ** 2 + np.fft.fftfreq(SIZE)[None, :] ** 2
    freq[0, 0] = 1.0
    planes = []
    for _ in range(3):
        field = np.fft.ifft2(np.fft.fft2(rng.normal(size=(SIZE, SIZE))) / freq**0.75).real
        planes.append((field - field.min()) / np.ptp(field) * 255)
    return np.stack(planes, axis=-1).astype(np.uint8)


def chest_slice(rng: np.random.Generator) -> np.ndarray:
    """Another body part from another generator: a wide body outline with two dark lungs."""
    y, x = np.mgrid[:SIZE, :SIZE] / SIZE * 2 - 1
    body = np.where((x / 0.9) ** 2 + (y / 0.6) ** 2 < 1, 150.0, 0.0)
    lungs = (((x - 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1) | (
        ((x + 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1
    )
    image = np.where(lungs, 20.0, body) + rng.normal(0, 10, (SIZE, SIZE))
    return np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def other_scanner(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same anatomy through another scanner: a different intensity curve and much more noise."""
    curved = 255 * (image / 255.0) ** 0.5 + rng.normal(0, 25, image.shape)
    return np.clip(curved, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The embedded ResNet trained briefly on 100 generated slices, and its fitted statistics."""
    labels, pixels = phantom_slices(100, seed=0)
    base = load_base_model("embedded", CLASSES, tmp_path_factory.mktemp("store") / "base")
    sha256s = [f"{i:064x}" for i in range(len(pixels))]
    lookup = dict(zip(sha256s, pixels, strict=True))
    result = fine_tune(
        base.model,
        base.preprocessing,
        sha256s,
        labels,
        lambda shas: [lookup[s] for s in shas],
        TrainConfig(epochs=3, image_size=SIZE, num_threads=1, validation_fraction=0.25),
        log=lambda line: None,
    )
    statistics = fit_statistics(
        result.model,
        result.preprocessing,
        pixels,
        labels,
        result.train_indices,
        result.validation_indices,
    )
    return result, statistics


def test_temperature_undoes_a_known_overconfidence() -> None:
    rng = np.random.default_rng(0)
    honest = rng.normal(0, 2, (4000, 2))
    labels = (rng.random(4000) < softmax(honest)[:, 1]).astype(int)

    fitted = fit_temperature(honest * 3.0, labels)  # a model three times too sure of itself

    assert fitted.value == pytest.approx(3.0, rel=0.1)
    assert fitted.nll_after < fitted.nll_before
    assert fitted.nll_after == pytest.approx(negative_log_likelihood(honest, labels), abs=0.01)


@pytest.mark.parametrize("labels", [[0, 1] * 4, [1] * 20], ids=["too_few", "one_class"])
def test_temperature_is_not_fitted_on_a_validation_slice_that_says_too_little(labels) -> None:
    labels = np.array(labels)
    fitted = fit_temperature(np.zeros((labels.size, 2)), labels)

    assert fitted.value == 1.0
    assert "temperature scaling needs at least" in fitted.reason


def test_one_forward_pass_gives_the_models_own_logits(trained) -> None:
    result, _ = trained
    _, pixels = phantom_slices(6, seed=3)

    logits, features = logits_and_features(result.model, result.preprocessing, pixels)

    plain = predict_probabilities(result.model, result.preprocessing, pixels)
    np.testing.assert_allclose(softmax(logits), plain, atol=1e-5)
    assert features.shape == (6, result.model.config.hidden_sizes[-1])


def test_served_probabilities_use_the_fitted_temperature(trained) -> None:
    result, statistics = trained
    served = ServedModel("v", result.model, result.preprocessing, statistics)
    _, pixels = phantom_slices(6, seed=4)

    scores = served.score(pixels)

    assert statistics.temperature.reason is None
    assert statistics.temperature.value != pytest.approx(1.0, abs=1e-3)
    expected = predict_probabilities(
        result.model, result.preprocessing, pixels, temperature=statistics.temperature.value
    )
    np.testing.assert_allclose(scores.probabilities, expected, atol=1e-5)


def test_other_scanners_contrasts_and_body_parts_are_flagged_and_phantoms_are_not(trained):
    result, statistics = trained
    served = ServedModel("v", result.model, result.preprocessing, statistics)
    rng = np.random.default_rng(7)
    _, held_out = phantom_slices(60, seed=11)  # unseen slices from the training generator
    unusual = {
        "inverted contrast (T1-like)": [255 - image for image in held_out[:20]],
        "other scanner": [other_scanner(image, rng) for image in held_out[20:40]],
        "natural image": [natural_texture(rng) for _ in range(20)],
        "chest, not head": [chest_slice(rng) for _ in range(20)],
    }

    in_distribution = served.score(held_out).ood_flags
    assert in_distribution.mean() <= 0.05, statistics.ood.threshold
    for kind, images in unusual.items():
        scores = served.score(images)
        assert scores.ood_flags.mean() >= 0.95, (kind, scores.ood_scores, statistics.ood.threshold)


def test_statistics_travel_with_the_version_and_old_versions_still_serve(trained, tmp_path):
    result, statistics = trained
    store = ModelStore(tmp_path / "models")
    version = store.save_version(
        result.model, result.preprocessing, statistics.to_record(), arrays=statistics.to_arrays()
    )
    legacy = store.save_version(result.model, result.preprocessing, {"train_set_version": "t"})
    _, pixels = phantom_slices(4, seed=5)

    served = ServedModel.load(store, version)
    old = ServedModel.load(store, legacy)

    assert (store.version_path(version) / ARRAYS_FILE).is_file()
    assert served.temperature == pytest.approx(statistics.temperature.value)
    np.testing.assert_allclose(
        served.score(pixels).ood_scores,
        ServedModel("v", result.model, result.preprocessing, statistics).score(pixels).ood_scores,
        rtol=1e-6,
    )
    assert (
        old.temperature == 1.0 and "stored before calibration" in old.statistics.temperature.reason
    )
    assert old.statistics.ood is None and legacy in old.statistics.ood_unavailable
    old_scores = old.score(pixels)
    assert old_scores.ood_scores is None and old_scores.ood_flags is None
    np.testing.assert_allclose(
        old_scores.probabilities, predict_probabilities(result.model, result.preprocessing, pixels)
    )
    assert store.load_arrays(legacy) == {}


def test_too_few_images_per_class_leave_ood_unavailable_with_a_reason(trained) -> None:
    result, _ = trained
    labels, pixels = phantom_slices(6, seed=6)

    statistics = fit_statistics(result.model, result.preprocessing, pixels, labels, range(6), [])

    assert statistics.ood is None
    assert "needs at least 5 of each" in statistics.ood_unavailable
    assert statistics.to_record()["ood"] == {
        "available": False,
        "reason": statistics.ood_unavailable,
    }
    again = ModelStatistics.from_stored("v", statistics.to_record(), {})
    assert again.ood is None and again.ood_unavailable == statistics.ood_unavailable
    assert torch.is_grad_enabled()


def test_a_model_without_pooled_features_is_calibrated_but_has_no_ood_score(trained, monkeypatch):
    import mri_assets.core.inference as inference

    result, with_features = trained
    labels, pixels = phantom_slices(100, seed=0)  # the training images, as fine_tuned_model does

    def no_pooler(model, batch):
        raise ValueError("ViTLike has no pooled backbone output")

    monkeypatch.setattr(inference, "pooled_features", no_pooler)
    statistics = fit_statistics(
        result.model,
        result.preprocessing,
        pixels,
        labels,
        result.train_indices,
        result.validation_indices,
    )

    assert statistics.ood is None and "no pooled backbone output" in statistics.ood_unavailable
    assert statistics.temperature.value == pytest.approx(with_features.temperature.value, rel=1e-3)


@pytest.mark.parametrize("n, d", [(40, 300), (300, 40)])
def test_shrunk_precision_is_ledoit_wolfs_inverse_on_both_sides_of_n_equals_d(n, d):
    """The Woodbury path (N < D) and the direct one (N >= D) give sklearn's precision_."""
    from sklearn.covariance import LedoitWolf

    from mri_assets.core.ood import shrunk_precision

    rng = np.random.default_rng(n)
    centred = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d)
    expected = LedoitWolf(assume_centered=True).fit(centred).precision_
    np.testing.assert_allclose(shrunk_precision(centred), expected, rtol=1e-9, atol=1e-12)
