"""Temperature scaling: one scalar T that divides the logits so that probabilities mean what
they say (Guo et al. 2017, "On Calibration of Modern Neural Networks",
https://arxiv.org/abs/1706.04599). T is fitted on the validation slice after training, by
minimising the negative log-likelihood over log T; it never changes which class wins, so ROC
AUC and accuracy are unchanged and only confidence moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Fewer validation images than this, or one class only, say too little about confidence: T = 1.
MIN_VALIDATION_IMAGES = 10
# log T is searched in [-LOG_T_BOUND, LOG_T_BOUND]: T from about 0.05 to 20.
LOG_T_BOUND = 3.0


def not_recorded(version: str) -> str:
    """Why ``version`` has neither temperature nor OOD detector (core/serving.py, `status`)."""
    return (
        f"model version {version} was stored before calibration and OOD statistics were "
        "recorded; retrain to get them"
    )


@dataclass(frozen=True)
class Temperature:
    """The fitted temperature (1.0 when not fitted, with ``reason`` saying why)."""

    value: float = 1.0
    fitted_on: int = 0  # validation images
    nll_before: float | None = None
    nll_after: float | None = None
    reason: str | None = None  # why it was not fitted

    def to_record(self) -> dict[str, Any]:
        return {
            "temperature": self.value,
            "fitted_on": self.fitted_on,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "reason": self.reason,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any] | None, missing_reason: str) -> Temperature:
        """The temperature stored in a training record's ``calibration``; T = 1 with
        ``missing_reason`` when the record has none (a version saved before calibration)."""
        if not record or "temperature" not in record:
            return cls(reason=missing_reason)
        return cls(
            value=float(record["temperature"]),
            fitted_on=int(record.get("fitted_on") or 0),
            nll_before=record.get("nll_before"),
            nll_after=record.get("nll_after"),
            reason=record.get("reason"),
        )


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> Temperature:
    """The T that minimises the mean NLL of ``softmax(logits / T)`` against ``labels``.

    ``logits`` is (N, C), ``labels`` (N,) class indices. A bounded 1-D search over log T (the
    NLL is convex in 1/T, so the search finds the one minimum).
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size < MIN_VALIDATION_IMAGES or np.unique(labels).size < 2:
        return Temperature(
            fitted_on=int(labels.size),
            reason=f"the validation slice holds {labels.size} images of "
            f"{np.unique(labels).size} class(es); temperature scaling needs at least "
            f"{MIN_VALIDATION_IMAGES} images of both classes, so T = 1",
        )
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits / np.exp(log_t), labels),
        bounds=(-LOG_T_BOUND, LOG_T_BOUND),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return Temperature(
        value=float(np.exp(result.x)),
        fitted_on=int(labels.size),
        nll_before=negative_log_likelihood(logits, labels),
        nll_after=float(result.fun),
    )


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of ``softmax(logits)`` against class indices ``labels``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(labels.size), labels]))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` as float32."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
