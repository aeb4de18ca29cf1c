"""Metrics from probabilities against hand-computed values, and the PNG plots."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sklearn_log_loss
from sklearn.metrics import roc_auc_score

from mri_assets.core.metrics import (
    classification_metrics,
    confusion_matrix_png,
    expected_calibration_error,
    png_markdown,
    reliability_diagram_png,
    roc_curve_png,
    training_curve_png,
)

CLASSES = ("glioma", "meningioma")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ranked perfectly by probability, but one positive (0.45) falls below the 0.5 threshold.
Y_TRUE = [0, 0, 1, 1]
P_POSITIVE = [0.2, 0.3, 0.45, 0.9]


def test_metrics_match_hand_computed_values() -> None:
    metrics = classification_metrics(Y_TRUE, P_POSITIVE, positive_index=1, class_names=CLASSES)

    assert metrics["roc_auc"] == 1.0
    assert metrics["accuracy"] == 0.75
    assert metrics["precision"] == 1.0  # the one predicted positive is right
    assert metrics["recall"] == 0.5
    assert metrics["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert metrics["confusion_matrix"] == [[2, 0], [1, 1]]
    assert metrics["base_rate_accuracy"] == 0.5
    assert metrics["n"] == 4
    assert metrics["n_per_class"] == {"glioma": 2, "meningioma": 2}
    assert metrics["warning"] is None
    expected_loss = -(math.log(0.8) + math.log(0.7) + math.log(0.45) + math.log(0.9)) / 4
    assert metrics["log_loss"] == pytest.approx(expected_loss)


def test_auc_comes_from_probabilities_not_hard_labels() -> None:
    metrics = classification_metrics(Y_TRUE, P_POSITIVE, positive_index=1, class_names=CLASSES)
    hard_label_auc = roc_auc_score(Y_TRUE, (np.asarray(P_POSITIVE) >= 0.5).astype(int))

    assert hard_label_auc == 0.75
    assert metrics["roc_auc"] == 1.0


def test_log_loss_is_nonzero_and_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 2, 50)
    probs = rng.uniform(0.01, 0.99, 50)

    metrics = classification_metrics(y_true, probs, positive_index=1, class_names=CLASSES)

    assert metrics["log_loss"] > 0.1
    assert metrics["log_loss"] == pytest.approx(sklearn_log_loss(y_true, probs, labels=[0, 1]))


def test_confident_mistake_is_clipped_not_infinite() -> None:
    metrics = classification_metrics([1, 0], [0.0, 0.0], positive_index=1, class_names=CLASSES)

    assert math.isfinite(metrics["log_loss"])
    assert metrics["log_loss"] > 10


def test_positive_class_first_keeps_class_name_order() -> None:
    # glioma (index 0) positive: p is P(glioma); rows and columns stay glioma, meningioma.
    y_true = [0, 0, 0, 1]
    p_glioma = [0.9, 0.8, 0.3, 0.6]

    metrics = classification_metrics(y_true, p_glioma, positive_index=0, class_names=CLASSES)

    assert metrics["confusion_matrix"] == [[2, 1], [1, 0]]
    assert metrics["positive_class"] == "glioma"
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score([1, 1, 1, 0], p_glioma))
    assert metrics["base_rate_accuracy"] == 0.75


def test_single_class_test_set_reports_no_auc_with_a_warning() -> None:
    metrics = classification_metrics(
        [1, 1, 1], [0.7, 0.4, 0.9], positive_index=1, class_names=CLASSES
    )

    assert metrics["roc_auc"] is None
    assert "meningioma" in metrics["warning"] and "undefined" in metrics["warning"]
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["log_loss"] == pytest.approx(
        -(math.log(0.7) + math.log(0.4) + math.log(0.9)) / 3
    )
    assert metrics["n_per_class"] == {"glioma": 0, "meningioma": 3}
    assert metrics["base_rate_accuracy"] == 1.0


@pytest.mark.parametrize(
    ("y_true", "probs"),
    [
        ([], []),
        ([0, 1], [0.5]),
        ([0, 2], [0.5, 0.5]),
        ([0, 1], [0.5, 1.5]),
        ([0, 1], [0.5, float("nan")]),
    ],
)
def test_invalid_inputs_raise(y_true: list[int], probs: list[float]) -> None:
    with pytest.raises(ValueError):
        classification_metrics(y_true, probs, positive_index=1, class_names=CLASSES)


def test_roc_curve_png_is_a_small_png() -> None:
    png = roc_curve_png(Y_TRUE, P_POSITIVE, positive_index=1, class_names=CLASSES)

    assert png.startswith(PNG_SIGNATURE)
    assert len(png) < 60_000


def test_roc_curve_png_of_single_class_set_still_renders() -> None:
    assert roc_curve_png([0, 0], [0.1, 0.6], 1, CLASSES).startswith(PNG_SIGNATURE)


def test_confusion_matrix_png_is_a_small_png() -> None:
    png = confusion_matrix_png([[40, 3], [5, 38]], CLASSES)

    assert png.startswith(PNG_SIGNATURE)
    assert len(png) < 60_000


def test_training_curve_png_draws_loss_and_auc_per_epoch() -> None:
    png = training_curve_png([1, 2, 3], [0.7, 0.5, 0.4], [0.68, 0.55, 0.5], [0.6, 0.8, 0.85])
    assert png.startswith(PNG_SIGNATURE) and len(png) < 60_000
    # Without a validation slice only the train loss is drawn: a different, still valid picture.
    train_only = training_curve_png([1, 2, 3], [0.7, 0.5, 0.4], [None] * 3, [None] * 3)
    assert train_only.startswith(PNG_SIGNATURE) and train_only != png


def test_png_markdown_inlines_the_bytes() -> None:
    png = confusion_matrix_png([[1, 0], [0, 1]], CLASSES)

    markdown = png_markdown(png, "confusion [test]")

    prefix = "![confusion (test)](data:image/png;base64,"
    assert markdown.startswith(prefix) and markdown.endswith(")")
    assert base64.b64decode(markdown[len(prefix) : -1]) == png


def test_expected_calibration_error_by_hand() -> None:
    # Two bins: 0.9-confident answers right 3 times of 4; 0.6-confident ones right 1 of 2.
    truth = np.array([1, 1, 1, 0, 1, 0])
    p_positive = np.array([0.9, 0.9, 0.9, 0.9, 0.6, 0.6])

    ece = expected_calibration_error(truth, p_positive, positive_index=1)

    assert ece == pytest.approx((4 * abs(0.75 - 0.9) + 2 * abs(0.5 - 0.6)) / 6)
    metrics = classification_metrics(truth, p_positive, 1, ("glioma", "meningioma"))
    assert metrics["expected_calibration_error"] == pytest.approx(ece)


def test_calibrated_probabilities_have_a_small_ece_and_overconfident_ones_a_large_one() -> None:
    rng = np.random.default_rng(0)
    p_positive = rng.uniform(0, 1, 20000)
    truth = (rng.uniform(0, 1, p_positive.size) < p_positive).astype(int)
    overconfident = np.where(p_positive >= 0.5, 0.99, 0.01)

    assert expected_calibration_error(truth, p_positive, 1) < 0.02
    assert expected_calibration_error(truth, overconfident, 1) > 0.2


def test_reliability_diagram_is_a_png() -> None:
    png = reliability_diagram_png([0, 1, 1, 0], [0.2, 0.7, 0.9, 0.6], 1, ("glioma", "meningioma"))
    assert png.startswith(b"\x89PNG")
