"""DuckDB tables `evaluations` and `standings`: their schema and every query on them.

``evaluations`` holds one row per (model version, test-set version): a model is evaluated on a
test set once, and read back after. ``standings`` holds one row per (candidate version, test-set
version): the comparison candidate_evaluation decided on, which the promotion gate and
deployed_model read. Every function takes an open connection; the caller decides locking.
"""

from __future__ import annotations

import json

from mri_assets.core.catalog import Column, SplitSnapshot
from mri_assets.core.evaluation import Evaluation
from mri_assets.core.labels import ClassSpec
from mri_assets.core.promotion import Decision, Score, Standing

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS standings (
    candidate_version VARCHAR NOT NULL,
    test_set_version VARCHAR NOT NULL,
    action VARCHAR NOT NULL,            -- promote | keep | refuse
    reason VARCHAR NOT NULL,
    margin DOUBLE NOT NULL,
    n_test INTEGER NOT NULL,
    base_rate_accuracy DOUBLE,
    candidate_roc_auc DOUBLE,
    candidate_accuracy DOUBLE,
    candidate_log_loss DOUBLE,
    baseline_version VARCHAR NOT NULL,
    baseline_roc_auc DOUBLE,
    baseline_accuracy DOUBLE,
    baseline_log_loss DOUBLE,
    deployed_version VARCHAR,           -- NULL: nothing was deployed when it was decided
    deployed_roc_auc DOUBLE,
    deployed_accuracy DOUBLE,
    deployed_log_loss DOUBLE,
    dagster_run_id VARCHAR,
    decided_at TIMESTAMP NOT NULL,
    PRIMARY KEY (candidate_version, test_set_version)
);
"""

# The standings table, as candidate_evaluation's column schema shows it.
STANDINGS_COLUMNS = (
    Column("candidate_version", "VARCHAR", "Model version of the candidate"),
    Column("test_set_version", "VARCHAR", "Test-set version all three were evaluated on"),
    Column("action", "VARCHAR", "promote, keep or refuse"),
    Column("reason", "VARCHAR", "Why, in words"),
    Column("margin", "DOUBLE", "AUC the candidate had to gain (MRI_PROMOTION_MARGIN)"),
    Column("n_test", "INTEGER", "Test images"),
    Column("base_rate_accuracy", "DOUBLE", "Accuracy of always answering the larger class"),
    Column("candidate_roc_auc", "DOUBLE", "Candidate's ROC AUC"),
    Column("candidate_accuracy", "DOUBLE", "Candidate's accuracy"),
    Column("candidate_log_loss", "DOUBLE", "Candidate's log loss"),
    Column("baseline_version", "VARCHAR", "Version of the base model evaluated as baseline"),
    Column("baseline_roc_auc", "DOUBLE", "Baseline's ROC AUC"),
    Column("baseline_accuracy", "DOUBLE", "Baseline's accuracy"),
    Column("baseline_log_loss", "DOUBLE", "Baseline's log loss"),
    Column("deployed_version", "VARCHAR", "Model deployed when it was decided (NULL: none)"),
    Column("deployed_roc_auc", "DOUBLE", "Deployed model's ROC AUC"),
    Column("deployed_accuracy", "DOUBLE", "Deployed model's accuracy"),
    Column("deployed_log_loss", "DOUBLE", "Deployed model's log loss"),
    Column("dagster_run_id", "VARCHAR", "Run of candidate_evaluation that decided it"),
    Column("decided_at", "TIMESTAMP", "When it was decided"),
)

_STANDING_COLUMNS = (
    "candidate_version, test_set_version, action, reason, margin, n_test, base_rate_accuracy, "
    "candidate_roc_auc, candidate_accuracy, candidate_log_loss, "
    "baseline_version, baseline_roc_auc, baseline_accuracy, baseline_log_loss, "
    "deployed_version, deployed_roc_auc, deployed_accuracy, deployed_log_loss"
)


def find_evaluation(
    conn, model_version: str, snapshot: SplitSnapshot, classes: ClassSpec
) -> Evaluation | None:
    """The recorded evaluation of this model on this test-set version, if there is one."""
    conn.execute(SCHEMA)
    rows = conn.execute(
        "SELECT metrics_json, p_positive_json FROM evaluations "
        "WHERE model_version = ? AND test_set_version = ?",
        [model_version, snapshot.version],
    ).fetchall()
    if not rows:
        return None
    y_true = tuple(classes.index(label) for label in snapshot.labels)
    return Evaluation(
        model_version,
        snapshot.version,
        json.loads(rows[0][0]),
        y_true,
        tuple(json.loads(rows[0][1])),
        reused=True,
    )


def record_evaluation(conn, evaluation: Evaluation, role: str) -> None:
    """Append one evaluation; an existing (model, test set) row is kept, never overwritten."""
    conn.execute(SCHEMA)
    m = evaluation.metrics
    conn.execute(
        "INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now()) "
        "ON CONFLICT DO NOTHING",
        [
            evaluation.model_version,
            evaluation.test_set_version,
            role,
            m["roc_auc"],
            m["accuracy"],
            m["precision"],
            m["recall"],
            m["f1"],
            m["log_loss"],
            m["base_rate_accuracy"],
            m["n"],
            json.dumps(m["confusion_matrix"]),
            json.dumps(m),
            json.dumps(list(evaluation.p_positive)),
        ],
    )


def record_standing(conn, standing: Standing, run_id: str | None = None) -> None:
    """Record the standing of its candidate on its test set, replacing an earlier decision on the
    same pair (candidate_evaluation materialized again, e.g. after the deployed model changed)."""
    conn.execute(SCHEMA)

    def figures(score: Score | None) -> list:
        if score is None:
            return [None, None, None, None]
        return [score.version, score.roc_auc, score.accuracy, score.log_loss]

    values = [
        standing.candidate.version,
        standing.test_set_version,
        standing.decision.action,
        standing.decision.reason,
        standing.margin,
        standing.n_test,
        standing.base_rate_accuracy,
        *figures(standing.candidate)[1:],
        *figures(standing.baseline),
        *figures(standing.deployed),
    ]
    conn.execute(
        f"INSERT OR REPLACE INTO standings ({_STANDING_COLUMNS}, dagster_run_id, decided_at) "
        f"VALUES ({', '.join('?' * len(values))}, ?, now())",
        [*values, run_id],
    )


def find_standing(conn, candidate_version: str, test_set_version: str) -> Standing | None:
    """The recorded standing of this candidate on this test-set version, if it was decided."""
    conn.execute(SCHEMA)
    rows = conn.execute(
        f"SELECT {_STANDING_COLUMNS} FROM standings "
        "WHERE candidate_version = ? AND test_set_version = ?",
        [candidate_version, test_set_version],
    ).fetchall()
    if not rows:
        return None
    (candidate, test_set, action, reason, margin, n_test, base_rate, *scores) = rows[0]
    deployed = Score(*scores[7:11]) if scores[7] is not None else None
    return Standing(
        test_set_version=test_set,
        n_test=n_test,
        base_rate_accuracy=base_rate,
        candidate=Score(candidate, *scores[0:3]),
        baseline=Score(*scores[3:7]),
        deployed=deployed,
        margin=margin,
        decision=Decision(action, reason),
    )
