"""Evaluation of one model on one test-set version: its figures and plots, torch-free.

Computing one is core/inference.py's ``evaluate``; recording and reading evaluations back is
core/evaluation_records.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mri_assets.core.labels import ClassSpec
from mri_assets.core.metrics import (
    confusion_matrix_png,
    png_markdown,
    reliability_diagram_png,
    roc_curve_png,
)
from mri_assets.core.promotion import Score


@dataclass(frozen=True)
class Evaluation:
    model_version: str
    test_set_version: str
    metrics: dict[str, Any]
    y_true: tuple[int, ...]
    p_positive: tuple[float, ...]
    reused: bool = False  # read back from the catalogue rather than computed now

    @property
    def roc_auc(self) -> float | None:
        return self.metrics.get("roc_auc")

    @property
    def score(self) -> Score:
        """The figures the promotion standing compares."""
        m = self.metrics
        return Score(self.model_version, m.get("roc_auc"), m.get("accuracy"), m.get("log_loss"))


def evaluation_plots_markdown(evaluation: Evaluation, classes: ClassSpec, title: str) -> str:
    """ROC curve, reliability diagram and confusion matrix side by side, as markdown with
    inline PNGs."""
    roc = roc_curve_png(
        np.array(evaluation.y_true),
        np.array(evaluation.p_positive),
        classes.positive_index,
        classes.names,
        title=f"{title}: ROC",
    )
    reliability = reliability_diagram_png(
        np.array(evaluation.y_true),
        np.array(evaluation.p_positive),
        classes.positive_index,
        classes.names,
        title=f"{title}: reliability",
    )
    matrix = confusion_matrix_png(
        evaluation.metrics["confusion_matrix"], classes.names, title=f"{title}: confusion matrix"
    )
    return (
        f"{png_markdown(roc, f'{title} ROC curve')} "
        f"{png_markdown(reliability, f'{title} reliability diagram')} "
        f"{png_markdown(matrix, f'{title} confusion matrix')}"
    )


def metrics_metadata(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics a person scans for, rounded, with None kept as None."""
    keys = (
        "roc_auc",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "log_loss",
        "expected_calibration_error",
        "base_rate_accuracy",
    )
    return {k: (None if metrics.get(k) is None else round(float(metrics[k]), 4)) for k in keys}
