"""A stored model version as it is served: its weights plus what was fitted with it.

Every scoring path (evaluation, `mri-assets predict`, the `predictions` asset) goes through
``ServedModel.score``, so each applies the same temperature and the same out-of-distribution
detector. What is fitted (``fit_statistics``, right after fine-tuning) is stored with the
version: scalars in the training record's ``calibration`` and ``ood`` entries, arrays in the
version's ``arrays.safetensors``. A version stored before these existed is served with T = 1
and no OOD score, and says why. This module imports torch (core/inference.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mri_assets.core.calibration import Temperature, fit_temperature, not_recorded, softmax
from mri_assets.core.inference import logits_and_features, predict_probabilities
from mri_assets.core.ood import CROSS_FIT_FOLDS, OodDetector, fit_ood

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from mri_assets.core.preprocessing import Preprocessing
    from mri_assets.core.store import ModelStore


@dataclass(frozen=True)
class ModelStatistics:
    """The temperature and the OOD detector of one model version (``ood`` None: not
    available, ``ood_unavailable`` says why)."""

    temperature: Temperature
    ood: OodDetector | None
    ood_unavailable: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The training-record entries (merged into the record as ``calibration`` and ``ood``)."""
        ood = (
            {"available": True, **self.ood.to_record()}
            if self.ood
            else {"available": False, "reason": self.ood_unavailable}
        )
        return {"calibration": self.temperature.to_record(), "ood": ood}

    def to_arrays(self) -> dict[str, np.ndarray]:
        return self.ood.to_arrays() if self.ood else {}

    @classmethod
    def from_stored(
        cls, version: str, record: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> ModelStatistics:
        missing = not_recorded(version)
        temperature = Temperature.from_record(record.get("calibration"), missing)
        ood_record = record.get("ood") or {}
        if not ood_record:
            return cls(temperature, None, missing)
        if not ood_record.get("available"):
            return cls(temperature, None, ood_record.get("reason") or missing)
        try:
            return cls(temperature, OodDetector.from_stored(ood_record, arrays))
        except KeyError as error:
            return cls(
                temperature,
                None,
                f"model version {version}'s arrays.safetensors lacks {error}; retrain it",
            )


def fit_statistics(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    pixels: Sequence[np.ndarray],
    labels: Sequence[int],
    train_indices: Sequence[int],
    validation_indices: Sequence[int],
    *,
    device: str | None = None,
) -> ModelStatistics:
    """Temperature on the validation images, OOD detector on the train and validation images,
    from one forward pass over all of them with the trained model."""
    targets = np.asarray(labels, dtype=np.int64)
    train = np.asarray(train_indices, dtype=np.int64)
    validation = np.asarray(validation_indices, dtype=np.int64)
    try:
        logits, features = logits_and_features(model, preprocessing, list(pixels), device=device)
    except ValueError as error:  # no pooled features or no `classifier` head: no OOD score
        # log p differs from the logits by one constant per row, which softmax ignores.
        probabilities = predict_probabilities(model, preprocessing, list(pixels), device=device)
        logits = np.log(np.clip(probabilities, 1e-30, None))
        return ModelStatistics(
            fit_temperature(logits[validation], targets[validation]), None, str(error)
        )
    temperature = fit_temperature(logits[validation], targets[validation])
    seen = np.concatenate([train, validation])
    counts = np.bincount(targets[seen], minlength=2)
    if counts.min() < CROSS_FIT_FOLDS:
        return ModelStatistics(
            temperature,
            None,
            f"the train set holds {counts.tolist()} images per class; the OOD threshold "
            f"needs at least {CROSS_FIT_FOLDS} of each",
        )
    return ModelStatistics(temperature, fit_ood(features[seen], targets[seen]))


@dataclass(frozen=True)
class Scores:
    """Calibrated probabilities (N, C) and, when the model has a detector, OOD scores and flags."""

    probabilities: np.ndarray
    ood_scores: np.ndarray | None
    ood_flags: np.ndarray | None


@dataclass
class ServedModel:
    """One stored version, loaded: model, preprocessing, class names and its statistics."""

    version: str
    model: PreTrainedModel
    preprocessing: Preprocessing
    statistics: ModelStatistics

    @classmethod
    def load(cls, store: ModelStore, version: str) -> ServedModel:
        model, preprocessing = store.load_version(version)
        statistics = ModelStatistics.from_stored(
            version, store.training_record(version), store.load_arrays(version)
        )
        return cls(version, model, preprocessing, statistics)

    @property
    def class_names(self) -> list[str]:
        return [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @property
    def temperature(self) -> float:
        return self.statistics.temperature.value

    def score(
        self, pixels: Sequence[np.ndarray], batch_size: int = 64, *, device: str | None = None
    ) -> Scores:
        """Scores of ``pixels`` ((H, W, 3) uint8 arrays) in one forward pass per batch."""
        detector = self.statistics.ood
        if detector is None:
            probabilities = predict_probabilities(
                self.model,
                self.preprocessing,
                list(pixels),
                batch_size,
                device=device,
                temperature=self.temperature,
            )
            return Scores(probabilities, None, None)
        logits, features = logits_and_features(
            self.model, self.preprocessing, list(pixels), batch_size, device=device
        )
        ood_scores = detector.scores(features)
        return Scores(softmax(logits, self.temperature), ood_scores, detector.flags(ood_scores))
