"""The real `dagster dev`, with real faults: a run worker killed with SIGKILL in the middle of
training, a scan whose name is not UTF-8 and a link out of the landing zone. With no click and
nothing new landed, the pipeline still reaches deployed_model, and every landed entry is either
in `images` or in `rejected_images`."""

import os
import signal
import time

import dagster as dg
import duckdb
import pytest

from mri_assets.core.catalog import exclusive_lock
from mri_assets.launcher import worker_started
from mri_assets_tests.e2e.conftest import DagsterDev, make_dataset

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("healing")]

TIMEOUT = 8 * 60


@pytest.fixture
def server(tmp_path):
    dev = DagsterDev(tmp_path / "healing")
    dev.start()
    try:
        dev.wait_ready()
        yield dev
    finally:
        dev.stop()


def run_with(server: DagsterDev, asset: str, status: str) -> dict | None:
    for run in server.runs():
        selected = {"/".join(a["path"]) for a in run["assetSelection"] or []}
        if asset in selected and run["status"] == status:
            return run
    return None


def test_a_run_worker_killed_mid_training_is_retried_to_deployment(server, tmp_path):
    data = make_dataset(tmp_path / "scans", 24, 24, 128, seed=0)
    landed_at = server.land(data)
    train = server.landing / "train"
    private = tmp_path / "private"
    private.mkdir()
    os.symlink(private, train / "glioma-outside-link")
    with open(os.fsencode(train) + b"/glioma \xff.png", "wb") as handle:
        handle.write(b"not even an image")

    training = server.wait_for(
        lambda: run_with(server, "fine_tuned_model", "STARTED"), TIMEOUT, "a training run to start"
    )
    with dg.DagsterInstance.from_config(str(server.dagster_home)) as instance:

        def worker_pid():
            run = run_with(server, "fine_tuned_model", "STARTED") or {}
            steps = {s["stepKey"]: s["status"] for s in run.get("stepStats", [])}
            started = worker_started(instance, training["runId"])
            return started and steps.get("fine_tuned_model") == "IN_PROGRESS" and started[0]

        pid = server.wait_for(worker_pid, TIMEOUT, "training to be in progress")
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()

    def deployed_after_kill():
        latest = server.latest("deployed_model")
        return latest if latest and latest.timestamp > killed_at else None

    deployed = server.wait_for(deployed_after_kill, TIMEOUT, "deployed_model after the kill")
    assert deployed.metadata["decision"] == "promote"
    runs = {r["runId"]: r for r in server.runs()}
    assert runs[training["runId"]]["status"] == "FAILURE"
    retries = [
        r
        for r in runs.values()
        if {"key": "dagster/parent_run_id", "value": training["runId"]} in r["tags"]
    ]
    assert retries and retries[0]["status"] == "SUCCESS"
    print(
        f"killed at +{killed_at - landed_at:.0f}s, deployed at +{deployed.timestamp - landed_at:.0f}s"
    )

    landed = sum(len(files) for _, _, files in os.walk(server.landing)) + 1  # + the link itself
    database = server.mri_home / "mri.duckdb"
    with exclusive_lock(database), duckdb.connect(str(database), read_only=True) as conn:
        accepted = conn.execute("SELECT count(*) FROM images").fetchall()[0][0]
        rejected = dict(conn.execute("SELECT source_key, reason FROM rejected_images").fetchall())
        shared = conn.execute(
            "SELECT count(*) FROM (SELECT content_id FROM images WHERE split IN ('train', 'test') "
            "GROUP BY content_id HAVING count(DISTINCT split) > 1)"
        ).fetchall()[0][0]
    assert rejected["train/glioma \\xff.png"] == "bad_file_name"
    assert rejected["train/glioma-outside-link"] == "outside_landing"
    assert accepted + len(rejected) == landed
    assert shared == 0
