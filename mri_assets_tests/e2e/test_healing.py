"""The real `dagster dev`, with real faults (landed and done by the `deployment` fixture): a run
worker killed with SIGKILL in the middle of training, a scan whose name is not UTF-8 and a link
out of the landing zone. With no click and nothing new landed, the pipeline still reaches
deployed_model, and every landed entry is either in `images` or in `rejected_images`."""

import pytest

from mri_assets_tests.e2e.conftest import XDIST_GROUP

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group(XDIST_GROUP)]


def test_a_run_worker_killed_mid_training_is_retried_to_deployment(dagster_dev, deployment):
    assert deployment.deployed.metadata["decision"] == "promote"
    killed = deployment.killed_run["runId"]
    runs = {r["runId"]: r for r in dagster_dev.runs()}
    assert runs[killed]["status"] == "FAILURE"
    retries = [
        r for r in runs.values() if {"key": "dagster/parent_run_id", "value": killed} in r["tags"]
    ]
    assert retries and retries[0]["status"] == "SUCCESS"
    print(
        f"killed at +{deployment.killed_at - deployment.landed_at:.0f}s, deployed at "
        f"+{deployment.deployed.timestamp - deployment.landed_at:.0f}s"
    )


def test_every_landed_entry_is_accepted_or_rejected_with_its_reason(deployment):
    catalogue = deployment.catalogue
    rejected = catalogue["rejected"]
    assert rejected["train/glioma \\xff.png"] == "bad_file_name"
    assert rejected["train/glioma-outside-link"] == "outside_landing"
    assert catalogue["accepted"] + len(rejected) == deployment.landed_entries
    assert catalogue["in_both_splits"] == 0
