"""Proof, on one machine, that no run needs anything on the machine it runs on: `dagster dev` on
the shipped Postgres instance (dagster.postgres.yaml) and a real PostgreSQL server, with
MRI_LANDING and MRI_STORE in S3 (moto's server over HTTP) and MRI_CATALOG in PostgreSQL, and the
launcher's `scratch_home_per_run`, so every run starts in its own new, empty MRI_HOME that is
deleted when it ends. PostgreSQL is stopped as by a crash (`pg_ctl stop -m immediate`) while a
model is being trained, and started again. Scans landed in S3 reach deployed_model all the same;
the runs and their events are rows in Postgres; then `mri-assets predict` serves the model from a
third, empty MRI_HOME with only MRI_STORE set.

One `dagster dev` pass for all of it: each costs a minute or more of this machine's two cores.
"""

import json
import os
import subprocess
import threading
import time
import urllib.error
from pathlib import Path

import boto3
import pytest
import yaml

from mri_assets.launcher import SCRATCH_HOME_TAG, SCRATCH_PREFIX
from mri_assets_tests.conftest import png_bytes
from mri_assets_tests.e2e.conftest import REPO, DagsterDev, executable, format_runs, make_dataset
from mri_assets_tests.postgres import DATABASE, USERNAME, PostgresServer, running_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("postgres")]

TIMEOUT = 8 * 60
CLASSES = ("glioma", "meningioma")
# Longer than dagster-postgres's own reconnect attempts (a few, a fraction of a second apart),
# so the outage is one that its retries cannot hide.
OUTAGE_SECONDS = 10
# Run, event-log and schedule storage: one pooled webserver connection each.
POOLED_CONNECTIONS = 3


def aws_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }


def s3_client(endpoint: str):
    env = aws_environment(endpoint)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


class PostgresDagsterDev(DagsterDev):
    """`dagster dev` with DAGSTER_HOME holding dagster.postgres.yaml and DAGSTER_PG_* set.

    After Postgres restarts, the webserver's storages each hold one pooled connection to the old
    server (dagster-webserver keeps one open per storage, without a liveness check), and the first
    request through each fails once with a server error; the pool then reconnects. Each such
    error is kept in ``server_errors`` (what a user would see) and the call is made again."""

    instance_config = REPO / "dagster.postgres.yaml"

    def __init__(self, root, postgres: PostgresServer) -> None:
        super().__init__(root)
        self.postgres = postgres
        self.server_errors: list[str] = []

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.update(self.postgres.environment())
        return env

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        while True:
            try:
                return super().graphql(query, variables, timeout)
            except urllib.error.HTTPError as error:
                body = error.read().decode(errors="replace")
                self.server_errors.append(f"{error.code}: {body[:200]}")
                if error.code != 500 or len(self.server_errors) > POOLED_CONNECTIONS:
                    raise


class ScratchRunsDagsterDev(PostgresDagsterDev):
    """Every durable thing in Postgres or S3; every run in its own scratch MRI_HOME."""

    def __init__(self, root, postgres, endpoint: str, bucket: str) -> None:
        super().__init__(root, postgres)
        self.endpoint = endpoint
        self.bucket = bucket
        self.scratch_root = root / "run-scratch"
        self.instance_config = root / "dagster.scratch.yaml"
        config = yaml.safe_load((REPO / "dagster.postgres.yaml").read_text())
        config["run_launcher"]["config"] = {
            "scratch_home_per_run": True,
            "scratch_root": str(self.scratch_root),
        }
        root.mkdir(parents=True, exist_ok=True)
        self.instance_config.write_text(yaml.safe_dump(config))

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.update(self.durable_environment())
        env.update(
            MRI_LANDING=f"s3://{self.bucket}/landing",
            MRI_CATALOG=f"postgres:host=127.0.0.1 port={self.postgres.port} user={USERNAME} "
            f"dbname={DATABASE} connect_timeout=5",
            PGPASSWORD=self.postgres.password,
        )
        return env

    def durable_environment(self) -> dict[str, str]:
        """What a machine needs to serve the model: the store and the S3 endpoint, no more."""
        return {"MRI_STORE": f"s3://{self.bucket}/state", **aws_environment(self.endpoint)}

    def land(self, source, under: str = "") -> float:
        subprocess.run(
            [executable("mri-assets"), "upload", str(source), "--quiet"],
            check=True,
            env=self.environment(),
            capture_output=True,
        )
        return time.time()


def captured_log(relative: Path) -> bool:
    """A step's or a sensor tick's captured stdout/stderr, as Dagster's local compute log
    manager keeps them under DAGSTER_HOME/storage/."""
    return relative.parts[0] == "storage" and relative.suffix in (".out", ".err", ".complete")


class FolderWatcher:
    """Lists a folder every few tenths of a second, keeping every entry name ever seen."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.folder.exists():
                self.seen.update(p.name for p in self.folder.iterdir())
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def bucket(moto_server, request):
    name = f"scratch-{os.getpid()}-{abs(hash(request.node.nodeid)) % 10**6}"
    s3_client(moto_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def server(tmp_path, moto_server, bucket):
    with running_postgres() as postgres:
        dev = ScratchRunsDagsterDev(tmp_path / "scratch-runs", postgres, moto_server, bucket)
        dev.start()
        try:
            dev.wait_ready()
            yield dev
        finally:
            dev.stop()


def crash_postgres_during_training(server: ScratchRunsDagsterDev) -> dict:
    """Stop PostgreSQL as by a crash once a training run has started, start it again
    OUTAGE_SECONDS later; returns the training run."""
    training = server.wait_for(
        lambda: server.run_with("fine_tuned_model", "STARTED"), TIMEOUT, "a training run to start"
    )
    server.postgres.stop("immediate")
    time.sleep(OUTAGE_SECONDS)
    server.postgres.start()
    return training


def test_every_run_in_its_own_scratch_home_reaches_a_served_model(server, tmp_path):
    started = time.time()
    data = make_dataset(tmp_path / "scans", 24, 24, 128, seed=0)
    with FolderWatcher(server.scratch_root) as watcher:
        landed_at = server.land(data)
        training = crash_postgres_during_training(server)
        print(f"postgres down from +{time.time() - OUTAGE_SECONDS - landed_at:.0f}s")

        def deployed():
            latest = server.latest("deployed_model")
            return latest if latest and latest.timestamp > landed_at else None

        deployment = server.wait_for(deployed, TIMEOUT, "deployed_model from scans landed in S3")

        def all_runs_ended():
            runs = server.runs()
            return (
                runs
                if all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs)
                else None
            )

        runs = server.wait_for(all_runs_ended, 120, "every run to end")
    print(f"landing -> deployed_model: {deployment.timestamp - landed_at:.1f}s")
    print(format_runs(runs, landed_at))
    assert deployment.metadata["decision"] == "promote"
    print("UI errors after the restart:\n" + "\n".join(server.server_errors))
    assert all("server closed the connection unexpectedly" in e for e in server.server_errors)

    # The training run either missed the outage or failed in it and was retried to success.
    by_id = {run["runId"]: run for run in runs}
    trained = by_id[training["runId"]]["status"]
    retries = [  # newest first, as runs() lists them
        run
        for run in runs
        if {"key": "dagster/root_run_id", "value": training["runId"]} in run["tags"]
    ]
    print(f"training run: {trained}; its retries: {[r['status'] for r in retries]}")
    assert trained == "SUCCESS" or (trained == "FAILURE" and retries[0]["status"] == "SUCCESS")

    # What the UI showed is what Postgres holds: every run, with its status, and the events.
    stored = dict(server.postgres.query("SELECT run_id, status FROM runs"))
    assert stored == {run_id: run["status"] for run_id, run in by_id.items()}
    materialized = server.postgres.query(
        "SELECT count(*) FROM event_logs "
        "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' AND asset_key = %s",
        ('["deployed_model"]',),
    )[0][0]
    assert materialized >= 1

    # Every run had its own scratch MRI_HOME, seen while it ran, gone once it ended.
    homes = {}
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert SCRATCH_HOME_TAG in tags, f"run {run['runId']} ran without a scratch MRI_HOME"
        homes[run["runId"]] = tags[SCRATCH_HOME_TAG]
    assert len(set(homes.values())) == len(homes) >= 4, homes
    for run_id, home in homes.items():
        name = os.path.basename(home)
        assert name.startswith(f"{SCRATCH_PREFIX}{run_id[:8]}-")
        assert name in watcher.seen, f"the scratch home of run {run_id} was never seen"
    # A run is marked ended before its worker process has exited; the folder goes right after.
    server.wait_for(
        lambda: not any(os.path.exists(home) for home in homes.values()),
        30,
        "every run's scratch home to be removed once its worker exited",
        interval=0.5,
    )
    assert list(server.scratch_root.iterdir()) == []
    # Nothing was left in the MRI_HOME of the code server, the daemon and the sensors.
    left = sorted(str(p.relative_to(server.mri_home)) for p in server.mri_home.rglob("*"))
    assert left == [], left
    # DAGSTER_HOME holds its config and the captured logs of steps and sensor ticks (Dagster's
    # local compute logs: storage/<run>/compute_logs/*, storage/__repository__/<sensor>/<tick>.*;
    # README), nothing else: no SQLite storage, no pickled outputs of an fs_io_manager.
    kept = [
        str(relative)
        for p in server.dagster_home.rglob("*")
        if p.is_file()
        and (relative := p.relative_to(server.dagster_home)) != Path("dagster.yaml")
        and not captured_log(relative)
    ]
    assert kept == [], kept

    # What the runs made durable is in the bucket.
    s3 = s3_client(server.endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix="state/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    version = deployment.metadata["deployed_version"]
    assert f"state/models/manifests/{version}.json" in keys
    assert any(k.startswith("state/pixels/packs/") for k in keys)

    # A third machine: an empty MRI_HOME, only the store and the S3 endpoint.
    third = tmp_path / "third-machine"
    third.mkdir()
    scan = tmp_path / "scan.png"
    scan.write_bytes(png_bytes(3, size=64))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MRI_", "AWS_", "DAGSTER_"))}
    env.update(server.durable_environment(), MRI_HOME=str(third))
    served = subprocess.run(
        [executable("mri-assets"), "predict", "--json", str(scan)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert served.returncode == 0, served.stderr
    answer = json.loads(served.stdout.splitlines()[-1])
    assert answer["path"] == str(scan) and answer["label"] in CLASSES
    print(f"test duration: {time.time() - started:.1f}s")
