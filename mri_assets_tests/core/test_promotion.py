"""The promotion rule, the recorded standing and what deployed_model does with it: pure logic on
small hand-made figures, no model trained."""

import duckdb
import pytest

from mri_assets.core.evaluation_records import find_standing, record_standing
from mri_assets.core.notify import promotion_message, refusal_message
from mri_assets.core.promotion import (
    Score,
    Standing,
    decide_promotion,
    deployment_step,
    newest_version_trained_on,
)


def decide(candidate, baseline, deployed=None, margin=0.0):
    return decide_promotion(
        candidate=Score(*candidate),
        baseline=Score("base", baseline),
        deployed=None if deployed is None else Score(*deployed),
        margin=margin,
    )


def standing(candidate=("v2", 0.99), deployed=("v1", 0.97), margin=0.01) -> Standing:
    return Standing.decide(
        test_set_version="t1",
        n_test=60,
        base_rate_accuracy=0.55,
        candidate=Score(*candidate, accuracy=0.9, log_loss=0.3),
        baseline=Score("base", 0.5),
        deployed=None if deployed is None else Score(*deployed),
        margin=margin,
    )


def test_first_candidate_must_beat_the_baseline_by_the_margin():
    assert decide(("v1", 0.97), 0.5, margin=0.01).action == "promote"
    refused = decide(("v1", 0.505), 0.5, margin=0.01)
    assert refused.action == "refuse" and "baseline" in refused.reason and not refused.allowed


def test_candidate_must_beat_the_deployed_model_too():
    assert decide(("v2", 0.96), 0.5, ("v1", 0.97)).action == "refuse"
    assert decide(("v2", 0.97), 0.5, ("v1", 0.97), margin=0.001).action == "refuse"  # a tie
    decision = decide(("v2", 0.99), 0.5, ("v1", 0.97), margin=0.01)
    assert decision.action == "promote" and "deployed model (0.9700)" in decision.reason


def test_the_deployed_model_is_kept_not_compared_with_itself():
    decision = decide(("v1", 0.9), 0.5, ("v1", 0.9), margin=0.01)
    assert decision.action == "keep" and decision.allowed


def test_undefined_aucs_never_promote():
    assert decide(("v1", None), 0.5).action == "refuse"
    assert decide(("v1", 0.9), None).action == "refuse"
    assert decide(("v2", 0.9), 0.5, ("v1", None)).action == "refuse"


def test_a_standing_survives_its_record_unchanged():
    conn = duckdb.connect()
    promoted, first = standing(), standing(candidate=("v1", 0.9), deployed=None)
    record_standing(conn, promoted, run_id="run-1")
    record_standing(conn, first)
    assert find_standing(conn, "v2", "t1") == promoted
    assert find_standing(conn, "v1", "t1") == first and first.deployed is None
    assert find_standing(conn, "v2", "t2") is None
    # Decided again (say the deployed model changed): the newer decision replaces the older.
    refused = standing(deployed=("v3", 0.995))
    record_standing(conn, refused)
    assert find_standing(conn, "v2", "t1").decision.action == "refuse"
    assert conn.execute("SELECT count(*) FROM standings").fetchall() == [(2,)]


@pytest.mark.parametrize(
    ("decided", "deployed_now", "action"),
    [
        (standing(), "v1", "promote"),
        (standing(deployed=None, candidate=("v1", 0.9)), None, "promote"),
        (standing(deployed=("v1", 0.995)), "v1", "skip"),  # refused
        (standing(), "v2", "record"),  # the pointer flipped, the history was not recorded yet
        (standing(), "v0", "stale"),  # rolled back since the standing was decided
        (
            standing(candidate=("v1", 0.97), deployed=("v1", 0.97)),
            "v0",
            "stale",
        ),  # kept, then rolled back
    ],
)
def test_deployed_model_acts_on_the_recorded_standing(decided, deployed_now, action):
    step = deployment_step(decided, deployed_now)
    assert step.action == action
    if action == "stale":
        assert "materialize candidate_evaluation again" in step.reason


def test_the_candidate_is_the_newest_version_trained_on_the_train_set():
    trained_on = {
        "20260101T000000Z-a": "t1",
        "20260102T000000Z-b": "t2",
        "20260103T000000Z-c": "t1",
    }
    assert newest_version_trained_on(trained_on, trained_on.get, "t1") == "20260103T000000Z-c"
    assert newest_version_trained_on(trained_on, trained_on.get, "t2") == "20260102T000000Z-b"
    assert newest_version_trained_on(trained_on, trained_on.get, "t3") is None


def test_messages_show_the_comparison_and_link_to_the_run():
    promoted = promotion_message(standing(), "http://dagster.local:3000/", "abcdef12-3456")
    assert promoted.splitlines()[0] == ":white_check_mark: Promoted `v2` to deployed_model."
    assert "• deployed `v1`: AUC 0.970" in promoted and "accuracy 0.550" in promoted
    assert promoted.endswith("Run: <http://dagster.local:3000/runs/abcdef12-3456|abcdef12>")
    refused = refusal_message(standing(deployed=("v1", 0.995)), "http://d", "run-2")
    assert refused.startswith(":no_entry: Candidate `v2` was not promoted: AUC 0.9900 does not")
    first = refusal_message(standing(candidate=("v1", None), deployed=None), "http://d", "run-3")
    assert "• deployed (none)" in first and "undefined" in first
