from mri_assets.core.promotion import decide_promotion


def test_first_candidate_must_beat_the_baseline_by_the_margin():
    assert decide_promotion("v1", 0.97, 0.5, None, None, 0.01).action == "promote"
    refused = decide_promotion("v1", 0.505, 0.5, None, None, 0.01)
    assert refused.action == "refuse" and "baseline" in refused.reason and not refused.allowed


def test_candidate_must_beat_the_deployed_model_too():
    assert decide_promotion("v2", 0.96, 0.5, "v1", 0.97, 0.0).action == "refuse"
    assert decide_promotion("v2", 0.97, 0.5, "v1", 0.97, 0.001).action == "refuse"  # a tie is not a win
    decision = decide_promotion("v2", 0.99, 0.5, "v1", 0.97, 0.01)
    assert decision.action == "promote" and "deployed model (0.9700)" in decision.reason


def test_the_deployed_model_is_kept_not_compared_with_itself():
    decision = decide_promotion("v1", 0.9, 0.5, "v1", 0.9, 0.01)
    assert decision.action == "keep" and decision.allowed


def test_undefined_aucs_never_promote():
    assert decide_promotion("v1", None, 0.5, None, None, 0.0).action == "refuse"
    assert decide_promotion("v1", 0.9, None, None, None, 0.0).action == "refuse"
    assert decide_promotion("v2", 0.9, 0.5, "v1", None, 0.0).action == "refuse"
