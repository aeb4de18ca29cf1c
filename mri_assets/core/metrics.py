"""Evaluation of a binary classifier from its probabilities, plus small PNG plots of it.

Everything returned is plain Python (floats, ints, lists, str, None) so it can go straight into
JSON or Dagster metadata. A test set holding only one class is not an error: ROC AUC is then
undefined, so ``roc_auc`` is None and ``warning`` says why, while accuracy and log loss are
still reported.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

THRESHOLD = 0.5
# Equal-width confidence bins of the expected calibration error and the reliability diagram.
CALIBRATION_BINS = 10
# Probabilities are clipped before the log so a confident mistake costs a lot, not infinity.
LOG_LOSS_EPS = 1e-15


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    p_positive: Sequence[float] | np.ndarray,
    positive_index: int,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Metrics of a two-class prediction.

    ``y_true`` holds class indices (positions in ``class_names``); ``p_positive`` the predicted
    probability of ``class_names[positive_index]``. Predicts positive when p >= 0.5.

    Returns roc_auc (from the probabilities; None for a single-class set, with ``warning``),
    accuracy, precision, recall and f1 of the positive class, log_loss, confusion_matrix
    (rows = true, columns = predicted, both in ``class_names`` order), base_rate_accuracy
    (always predicting the majority class), n and n_per_class.
    """
    truth, probs = _validated(y_true, p_positive, positive_index, class_names)
    is_positive = truth == positive_index
    predicted_positive = probs >= THRESHOLD
    negative_index = 1 - positive_index
    predicted = np.where(predicted_positive, positive_index, negative_index)

    counts = [int(np.sum(truth == index)) for index in range(len(class_names))]
    single_class = min(counts) == 0
    true_pos = int(np.sum(is_positive & predicted_positive))
    precision = _ratio(true_pos, int(np.sum(predicted_positive)))
    recall = _ratio(true_pos, int(np.sum(is_positive)))
    metrics: dict[str, Any] = {
        "n": int(truth.size),
        "n_per_class": dict(zip(class_names, counts, strict=True)),
        "positive_class": class_names[positive_index],
        "threshold": THRESHOLD,
        "roc_auc": None if single_class else roc_auc(is_positive, probs),
        "accuracy": float(np.mean(predicted == truth)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "log_loss": log_loss(is_positive, probs),
        "confusion_matrix": confusion_matrix(truth, predicted, len(class_names)),
        "base_rate_accuracy": max(counts) / truth.size,
        "expected_calibration_error": expected_calibration_error(truth, probs, positive_index),
        "warning": None,
    }
    if single_class:
        present = class_names[int(np.argmax(counts))]
        metrics["warning"] = (
            f"the test set holds only class {present!r} ({truth.size} images): ROC AUC is "
            "undefined without both classes, so roc_auc is None"
        )
    return metrics


def calibration_bins(
    truth: np.ndarray, probs: np.ndarray, positive_index: int, bins: int = CALIBRATION_BINS
) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, images) per non-empty confidence bin, where the confidence of
    a prediction is the probability of the class it predicts (in [0.5, 1] for two classes)."""
    predicted_positive = probs >= THRESHOLD
    confidence = np.where(predicted_positive, probs, 1.0 - probs)
    correct = predicted_positive == (truth == positive_index)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return [
        (float(confidence[which == b].mean()), float(correct[which == b].mean()), int(n))
        for b in range(bins)
        if (n := int(np.sum(which == b)))
    ]


def expected_calibration_error(
    truth: np.ndarray, probs: np.ndarray, positive_index: int, bins: int = CALIBRATION_BINS
) -> float:
    """Mean |accuracy - confidence| over the confidence bins, weighted by their images (Naeini
    et al. 2015; Guo et al. 2017): 0 when a 0.8-confident answer is right 80 % of the time."""
    per_bin = calibration_bins(np.asarray(truth), np.asarray(probs), positive_index, bins)
    total = sum(n for _, _, n in per_bin)
    return float(sum(n * abs(acc - conf) for conf, acc, n in per_bin) / total)


def roc_auc(is_positive: np.ndarray, probs: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive outranks a random negative."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(is_positive.astype(int), probs))


def log_loss(is_positive: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy (natural log) of the positive-class probabilities."""
    clipped = np.clip(probs.astype(np.float64), LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    return float(-np.mean(np.where(is_positive, np.log(clipped), np.log1p(-clipped))))


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> list[list[int]]:
    """Counts ``[true][predicted]`` as nested lists."""
    matrix = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix.tolist()


def _validated(
    y_true: Sequence[int] | np.ndarray,
    p_positive: Sequence[float] | np.ndarray,
    positive_index: int,
    class_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(y_true, dtype=int).ravel()
    probs = np.asarray(p_positive, dtype=np.float64).ravel()
    if len(class_names) != 2 or positive_index not in (0, 1):
        raise ValueError(
            f"need two classes and positive_index 0 or 1, got {class_names!r}, {positive_index}"
        )
    if truth.size == 0:
        raise ValueError("cannot evaluate an empty test set")
    if truth.shape != probs.shape:
        raise ValueError(f"{truth.size} labels but {probs.size} probabilities")
    if not np.isin(truth, (0, 1)).all():
        raise ValueError(f"labels must be class indices 0 or 1, got {sorted(set(truth.tolist()))}")
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError("probabilities must be finite and within [0, 1]")
    return truth, probs


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


# --- plots -------------------------------------------------------------------------------------

FIGSIZE = (4.0, 4.0)
DPI = 80


def roc_curve_png(
    y_true: Sequence[int] | np.ndarray,
    p_positive: Sequence[float] | np.ndarray,
    positive_index: int,
    class_names: Sequence[str],
    title: str = "ROC curve",
) -> bytes:
    """The ROC curve of the positive class as PNG bytes (chance diagonal included)."""
    truth, probs = _validated(y_true, p_positive, positive_index, class_names)
    is_positive = truth == positive_index
    figure, axes = _figure()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    if is_positive.all() or not is_positive.any():
        axes.text(0.5, 0.5, "single-class test set:\nROC undefined", ha="center", va="center")
    else:
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(is_positive.astype(int), probs)
        auc = roc_auc(is_positive, probs)
        axes.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"AUC = {auc:.3f}")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    axes.set_title(f"{title} ({class_names[positive_index]} positive)", fontsize=9)
    axes.legend(loc="lower right", fontsize=8)
    return _png(figure)


def reliability_diagram_png(
    y_true: Sequence[int] | np.ndarray,
    p_positive: Sequence[float] | np.ndarray,
    positive_index: int,
    class_names: Sequence[str],
    title: str = "Reliability",
) -> bytes:
    """Accuracy against confidence per bin (bars), the diagonal of perfect calibration, and the
    expected calibration error in the legend, PNG bytes."""
    truth, probs = _validated(y_true, p_positive, positive_index, class_names)
    per_bin = calibration_bins(truth, probs, positive_index)
    ece = expected_calibration_error(truth, probs, positive_index)
    width = 0.5 / CALIBRATION_BINS
    figure, axes = _figure()
    axes.plot([0.5, 1], [0.5, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    axes.bar(
        [conf for conf, _, _ in per_bin],
        [acc for _, acc, _ in per_bin],
        width=width * 0.9,
        color="tab:blue",
        alpha=0.7,
        label=f"accuracy (ECE = {ece:.3f})",
    )
    axes.set(xlim=(0.5, 1), ylim=(0, 1.01), xlabel="confidence", ylabel="accuracy")
    axes.set_title(title, fontsize=9)
    axes.legend(loc="upper left", fontsize=8)
    return _png(figure)


def confusion_matrix_png(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str = "Confusion matrix"
) -> bytes:
    """A confusion matrix (rows true, columns predicted) as an annotated heat map, PNG bytes."""
    counts = np.asarray(matrix, dtype=int)
    figure, axes = _figure()
    axes.imshow(counts, cmap="Blues", vmin=0)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names))
    axes.set_yticks(ticks, labels=list(class_names))
    axes.set(xlabel="predicted", ylabel="true")
    axes.set_title(title, fontsize=9)
    dark_above = counts.max() / 2 if counts.size else 0
    for (row, col), value in np.ndenumerate(counts):
        colour = "white" if value > dark_above else "black"
        axes.text(col, row, str(value), ha="center", va="center", color=colour, fontsize=12)
    return _png(figure)


def training_curve_png(
    epochs: Sequence[int],
    train_loss: Sequence[float],
    val_loss: Sequence[float | None],
    val_auc: Sequence[float | None],
    title: str = "training curve",
) -> bytes:
    """Loss (train and validation, left axis) and validation ROC AUC (right axis) per epoch, PNG.

    ``None`` entries (no validation slice, or an undefined AUC) are left out of their line.
    """

    def present(values: Sequence[float | None]) -> tuple[list[int], list[float]]:
        pairs = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None]
        return [e for e, _ in pairs], [float(v) for _, v in pairs]

    figure, axes = _figure()
    axes.plot(list(epochs), list(train_loss), marker="o", color="tab:blue", label="train loss")
    if any(v is not None for v in val_loss):
        axes.plot(*present(val_loss), marker="o", color="tab:orange", label="validation loss")
    axes.set(xlabel="epoch", ylabel="loss")
    axes.legend(loc="upper left", fontsize=8)
    if any(v is not None for v in val_auc):
        auc_axes = axes.twinx()
        auc_axes.plot(*present(val_auc), marker="s", color="tab:green", label="validation AUC")
        auc_axes.set(ylabel="ROC AUC", ylim=(0, 1.01))
        auc_axes.legend(loc="upper right", fontsize=8)
    axes.set_title(title, fontsize=9)
    return _png(figure)


def png_markdown(png_bytes: bytes, alt: str) -> str:
    """A markdown image with the PNG inlined as a base64 data URI (for Dagster markdown metadata)."""
    safe_alt = alt.replace("[", "(").replace("]", ")")
    return f"![{safe_alt}](data:image/png;base64,{base64.b64encode(png_bytes).decode('ascii')})"


def _figure() -> tuple[Any, Any]:
    # Figure + Agg canvas directly: no pyplot global state, no GUI backend, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
