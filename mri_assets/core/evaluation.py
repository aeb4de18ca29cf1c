"""Evaluation of one model on one test-set version, recorded once and reused after."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from mri_assets.core.catalog import SplitSnapshot
from mri_assets.core.labels import ClassSpec
from mri_assets.core.pixel_cache import PixelCache

EVALUATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    model_version VARCHAR NOT NULL,
    test_set_version VARCHAR NOT NULL,
    role VARCHAR NOT NULL,              -- the role it was first evaluated in
    roc_auc DOUBLE,
    accuracy DOUBLE,
    precision DOUBLE,
    recall DOUBLE,
    f1 DOUBLE,
    log_loss DOUBLE,
    base_rate_accuracy DOUBLE,
    n INTEGER,
    confusion_matrix VARCHAR,
    metrics_json VARCHAR NOT NULL,
    p_positive_json VARCHAR NOT NULL,   -- per-image probabilities, in sha256 order
    evaluated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (model_version, test_set_version)
);
"""


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


def evaluate(model, preprocessing, snapshot: SplitSnapshot, cache: PixelCache, classes: ClassSpec,
             model_version: str, batch_size: int = 64) -> Evaluation:
    """Probabilities and metrics of ``model`` on every image of ``snapshot`` (pixels from cache)."""
    from mri_assets.core.inference import predict_probabilities
    from mri_assets.core.metrics import classification_metrics

    if not len(snapshot):
        raise ValueError(
            f"the {snapshot.split} set is empty: land files under <landing>/{snapshot.split}/ "
            f"and materialize {snapshot.split}_images first"
        )
    probabilities = predict_probabilities(model, preprocessing, cache.get_many(snapshot.sha256s), batch_size)
    p_positive = probabilities[:, classes.positive_index]
    y_true = [classes.index(label) for label in snapshot.labels]
    metrics = classification_metrics(y_true, p_positive, classes.positive_index, classes.names)
    return Evaluation(model_version, snapshot.version, metrics, tuple(y_true),
                      tuple(float(p) for p in p_positive))


def find_evaluation(conn, model_version: str, snapshot: SplitSnapshot, classes: ClassSpec) -> Evaluation | None:
    """The recorded evaluation of this model on this test-set version, if there is one."""
    conn.execute(EVALUATIONS_SCHEMA)
    rows = conn.execute(
        "SELECT metrics_json, p_positive_json FROM evaluations "
        "WHERE model_version = ? AND test_set_version = ?",
        [model_version, snapshot.version],
    ).fetchall()
    if not rows:
        return None
    y_true = tuple(classes.index(label) for label in snapshot.labels)
    return Evaluation(model_version, snapshot.version, json.loads(rows[0][0]), y_true,
                      tuple(json.loads(rows[0][1])), reused=True)


def record_evaluation(conn, evaluation: Evaluation, role: str) -> None:
    """Append one evaluation; an existing (model, test set) row is kept, never overwritten."""
    conn.execute(EVALUATIONS_SCHEMA)
    m = evaluation.metrics
    conn.execute(
        "INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now()) "
        "ON CONFLICT DO NOTHING",
        [
            evaluation.model_version, evaluation.test_set_version, role, m["roc_auc"],
            m["accuracy"], m["precision"], m["recall"], m["f1"], m["log_loss"],
            m["base_rate_accuracy"], m["n"], json.dumps(m["confusion_matrix"]),
            json.dumps(m), json.dumps(list(evaluation.p_positive)),
        ],
    )


def evaluation_plots_markdown(evaluation: Evaluation, classes: ClassSpec, title: str) -> str:
    """ROC curve and confusion matrix side by side, as markdown with inline PNGs."""
    from mri_assets.core.metrics import confusion_matrix_png, png_markdown, roc_curve_png

    roc = roc_curve_png(np.array(evaluation.y_true), np.array(evaluation.p_positive),
                        classes.positive_index, classes.names, title=f"{title}: ROC")
    matrix = confusion_matrix_png(evaluation.metrics["confusion_matrix"], classes.names,
                                  title=f"{title}: confusion matrix")
    return f"{png_markdown(roc, f'{title} ROC curve')} {png_markdown(matrix, f'{title} confusion matrix')}"


def metrics_metadata(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics a person scans for, rounded, with None kept as None."""
    keys = ("roc_auc", "accuracy", "precision", "recall", "f1", "log_loss", "base_rate_accuracy")
    return {k: (None if metrics.get(k) is None else round(float(metrics[k]), 4)) for k in keys}
