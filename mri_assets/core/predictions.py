"""DuckDB table `predictions`: one row per (inbox scan, model version), and the decisions about
it (which scans to score, the drift verdict, which predictions to explain).

Rows are only ever added: a newly deployed model scores the whole inbox again under its own
version, and earlier rows stay for audit. Every function takes an open connection where it needs
one; the caller decides locking.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mri_assets.core.catalog import Column, ensure_schema

if TYPE_CHECKING:
    from mri_assets.core.serving import ServedModel  # torch: the caller has loaded it

# A prediction whose top probability is below this is "low confidence" (explained with Grad-CAM).
LOW_CONFIDENCE = 0.6
# Grad-CAM overlays written per run (flagged first, then least confident): a backward pass each.
MAX_EXPLAINED = 16
# Scans scored per call: bounds the decoded pixels held at once.
SCORING_CHUNK = 256


def probability_column(class_name: str) -> str:
    """``p_<class>`` with anything but letters, digits and ``_`` replaced: ``p_glioma``."""
    return "p_" + re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_")


def predictions_columns(class_names: Sequence[str]) -> tuple[Column, ...]:
    """The table's columns for these classes, in order (also the asset's column schema)."""
    return (
        Column("source_key", "VARCHAR", "Path of the scan below the landing zone (inbox/...)"),
        Column("sha256", "VARCHAR", "sha256 of the scan's bytes"),
        Column("model_version", "VARCHAR", "Model version that scored it"),
        Column("label", "VARCHAR", "Predicted class"),
        *(
            Column(probability_column(name), "DOUBLE", f"Calibrated probability of {name}")
            for name in class_names
        ),
        Column("ood_score", "DOUBLE", "Out-of-distribution score (NULL: the version has none)"),
        Column("ood_flag", "BOOLEAN", "Score above the version's threshold (NULL: no score)"),
        Column("predicted_at", "TIMESTAMP", "When it was scored (UTC)"),
    )


def ensure_predictions_table(conn, class_names: Sequence[str]) -> None:
    """Create ``predictions`` for these classes; a class added later gains its column."""
    ensure_schema(conn)  # inbox_images, which the queries join
    columns = predictions_columns(class_names)
    body = ",\n    ".join(f'"{c.name}" {c.type}' for c in columns)
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS predictions (\n    {body},\n"
        "    PRIMARY KEY (source_key, sha256, model_version)\n)"
    )
    for column in columns:
        conn.execute(
            f'ALTER TABLE predictions ADD COLUMN IF NOT EXISTS "{column.name}" {column.type}'
        )


def scans_to_score(conn, model_version: str) -> list[tuple[str, str]]:
    """(source_key, sha256) of the inbox scans ``model_version`` has not scored yet."""
    return conn.execute(
        """
        SELECT i.source_key, i.sha256 FROM inbox_images i
        WHERE NOT EXISTS (
            SELECT 1 FROM predictions p
            WHERE p.source_key = i.source_key AND p.sha256 = i.sha256 AND p.model_version = ?
        )
        ORDER BY i.source_key
        """,
        [model_version],
    ).fetchall()


def scored_contents(conn) -> set[str]:
    """sha256s any model version has scored: a scan whose content is not in it is new."""
    return {row[0] for row in conn.execute("SELECT DISTINCT sha256 FROM predictions").fetchall()}


def record_predictions(conn, frame: pd.DataFrame) -> None:
    """Append ``frame`` (score_scans' rows); a row already there is kept as it was."""
    if not len(frame):
        return
    conn.register("batch_predictions", frame)
    conn.execute(
        "INSERT INTO predictions BY NAME SELECT * FROM batch_predictions ON CONFLICT DO NOTHING"
    )
    conn.unregister("batch_predictions")


def prediction_counts(conn, model_version: str) -> dict[str, int]:
    """Rows of ``model_version`` and all rows, and how many of the former are flagged."""
    rows, flagged, total = conn.execute(
        """
        SELECT count(*) FILTER (WHERE model_version = ?),
               count(*) FILTER (WHERE model_version = ? AND ood_flag),
               count(*)
        FROM predictions
        """,
        [model_version, model_version],
    ).fetchall()[0]
    return {"version_rows": rows, "version_flagged": flagged, "all_rows": total}


def score_scans(
    served: ServedModel,
    scans: Sequence[tuple[str, str]],
    pixels_lookup: Callable[[list[str]], list[np.ndarray]],
    *,
    device: str | None = None,
    chunk: int = SCORING_CHUNK,
) -> pd.DataFrame:
    """One row per scan (source_key, sha256): the served model's label, calibrated
    probabilities and OOD score and flag. Each content is scored once, however many keys hold
    it, ``chunk`` contents at a time."""
    contents = list(dict.fromkeys(sha for _, sha in scans))
    probabilities, ood_scores, ood_flags = [], [], []
    for start in range(0, len(contents), chunk):
        scores = served.score(pixels_lookup(contents[start : start + chunk]), device=device)
        probabilities.append(scores.probabilities)
        ood_scores.append(scores.ood_scores)
        ood_flags.append(scores.ood_flags)
    names = served.class_names
    row_of = {sha: row for row, sha in enumerate(contents)}
    rows = [row_of[sha] for _, sha in scans]
    stacked = np.concatenate(probabilities) if probabilities else np.zeros((0, len(names)))
    frame = pd.DataFrame(
        {
            "source_key": [key for key, _ in scans],
            "sha256": [sha for _, sha in scans],
            "model_version": served.version,
            "label": [names[i] for i in stacked[rows].argmax(axis=1)] if rows else [],
        }
    )
    for index, name in enumerate(names):
        frame[probability_column(name)] = stacked[rows, index].astype(np.float64)
    has_ood = served.statistics.ood is not None and rows
    frame["ood_score"] = np.concatenate(ood_scores)[rows] if has_ood else None
    frame["ood_flag"] = np.concatenate(ood_flags)[rows] if has_ood else None
    frame["predicted_at"] = datetime.now(timezone.utc).replace(tzinfo=None)
    return frame


def to_explain(frame: pd.DataFrame, limit: int = MAX_EXPLAINED) -> pd.DataFrame:
    """The predictions worth a saliency map: flagged ones (highest score first), then those
    whose top probability is below LOW_CONFIDENCE (least confident first), one per content."""
    if not len(frame):
        return frame
    probability_columns = [c for c in frame.columns if c.startswith("p_")]
    confidence = frame[probability_columns].max(axis=1)
    flagged = frame["ood_flag"].fillna(False).astype(bool)
    chosen = pd.concat(
        [
            frame[flagged].sort_values("ood_score", ascending=False),
            # Assigned before filtering: a Series assigned to an empty frame would bring its index
            # (every row) along, as rows of NaN.
            frame.assign(_c=confidence)[~flagged & (confidence < LOW_CONFIDENCE)].sort_values("_c"),
        ]
    )
    return chosen.drop(columns="_c", errors="ignore").drop_duplicates("sha256").head(limit)


@dataclass(frozen=True)
class DriftVerdict:
    """Whether the share of new scans flagged out-of-distribution stays within the setting."""

    passed: bool
    new_scans: int
    flagged: int
    limit: float
    description: str

    @property
    def share(self) -> float | None:
        return self.flagged / self.new_scans if self.new_scans else None


def drift_verdict(new_flags: Sequence[bool | None], limit: float) -> DriftVerdict:
    """The verdict on the scans scored for the first time (``new_flags``: their OOD flags,
    None where the model has no OOD score)."""
    known = [bool(f) for f in new_flags if f is not None]
    flagged = sum(known)
    if not new_flags:
        return DriftVerdict(True, 0, 0, limit, "no new scans in this run")
    if not known:
        return DriftVerdict(
            True, len(new_flags), 0, limit, "the deployed version has no OOD score to judge by"
        )
    share = flagged / len(known)
    passed = share <= limit
    return DriftVerdict(
        passed,
        len(known),
        flagged,
        limit,
        f"{flagged} of {len(known)} new scans ({share:.0%}) flagged out-of-distribution; "
        f"the limit is {limit:.0%} (MRI_OOD_DRIFT_SHARE)"
        + ("" if passed else ": the scans arriving no longer look like the training data"),
    )
