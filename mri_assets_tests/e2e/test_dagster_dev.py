"""The real `dagster dev`: scans landing in the folder become a deployed model with no click
(through the faults of the `deployment` fixture), and a second test batch is evaluated without
retraining."""

import pytest

from mri_assets_tests.e2e.conftest import ARTIFACTS, XDIST_GROUP, format_runs, make_dataset

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group(XDIST_GROUP)]

EVALUATION_TIMEOUT = 5 * 60


def test_landing_is_deployed_and_new_test_data_is_evaluated(dagster_dev, deployment, tmp_path):
    deployed = deployment.deployed.metadata
    assert deployed["decision"] == "promote", deployed
    first_test_set = deployed["test_set_version"]
    candidate = dagster_dev.latest("candidate_evaluation")
    assert candidate.metadata["test_set_version"] == first_test_set
    assert candidate.metadata["model_version"] == deployed["deployed_version"]
    # base_model was built once (requested while missing, never again), and nothing failed but
    # the training run whose worker the fixture killed (test_healing follows its retry).
    assert len(dagster_dev.materializations("base_model")) == 1
    failed = [r["runId"] for r in dagster_dev.runs() if r["status"] == "FAILURE"]
    assert failed == [deployment.killed_run["runId"]]
    trained = dagster_dev.materializations("fine_tuned_model")

    # A second test batch, under its own folder so no key clashes with the first landing.
    batch = make_dataset(tmp_path / "second", 8, 8, 128, seed=1) / "test"
    landed_at = dagster_dev.land(batch, under="test/batch-2")

    def evaluated_on_new_test_set():
        latest = {
            asset: dagster_dev.latest(asset) for asset in ("baseline", "candidate_evaluation")
        }
        if all(m and m.timestamp > landed_at for m in latest.values()):
            return latest
        return None

    latest = dagster_dev.wait_for(
        evaluated_on_new_test_set,
        EVALUATION_TIMEOUT,
        "baseline and candidate_evaluation on the second test batch",
    )
    new_test_set = latest["candidate_evaluation"].metadata["test_set_version"]
    assert new_test_set != first_test_set
    assert latest["baseline"].metadata["test_set_version"] == new_test_set
    assert (
        latest["candidate_evaluation"].metadata["test_images"] > candidate.metadata["test_images"]
    )
    # The same candidate, evaluated on more images: no retraining for new test data.
    assert latest["candidate_evaluation"].metadata["model_version"] == deployed["deployed_version"]
    assert dagster_dev.materializations("fine_tuned_model") == trained
    report = (
        f"second test batch -> candidate_evaluation: "
        f"{latest['candidate_evaluation'].timestamp - landed_at:.1f}s\n"
        + format_runs(dagster_dev.runs(), landed_at)
    )
    print(report)
    with (ARTIFACTS / "e2e-timings.txt").open("a") as timings:
        timings.write(report + "\n")


def test_inbox_scans_are_scored_by_the_deployed_model(dagster_dev, deployment, tmp_path):
    deployed_version = deployment.deployed.metadata["deployed_version"]
    # Four unlabelled scans (the generator's folders are only names here) and one bad file.
    scans = make_dataset(tmp_path / "inbox", 2, 2, 128, seed=2) / "train"
    (scans / "notes.png").write_text("not an image")
    landed_at = dagster_dev.land(scans, under="inbox/ward-3")

    def scored():
        latest = dagster_dev.latest("predictions")
        if latest and latest.timestamp > landed_at and latest.metadata.get("scored_now"):
            return latest
        return None

    predictions = dagster_dev.wait_for(scored, EVALUATION_TIMEOUT, "predictions of the inbox")
    assert predictions.metadata["model_version"] == deployed_version
    assert predictions.metadata["scored_now"] == 4
    rejected = dagster_dev.wait_for(
        lambda: (
            (latest := dagster_dev.latest("rejected_images"))
            and latest.timestamp > landed_at
            and latest
        ),
        EVALUATION_TIMEOUT,
        "rejected_images after the inbox landing",
    )
    assert "inbox/ward-3/notes.png" in rejected.metadata["preview"]
