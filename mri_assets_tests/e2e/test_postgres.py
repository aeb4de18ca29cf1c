"""The real `dagster dev` on the shipped Postgres instance (dagster.postgres.yaml) and a real
PostgreSQL server: landed scans reach deployed_model, and the runs and their events are rows in
Postgres, not in SQLite files under DAGSTER_HOME. Postgres is then stopped as by a crash
(`pg_ctl stop -m immediate`) while a model is being trained, and started again."""

import time
import urllib.error

import pytest

from mri_assets_tests.e2e.conftest import REPO, DagsterDev, make_dataset
from mri_assets_tests.e2e.test_healing import run_with
from mri_assets_tests.postgres import PostgresServer, running_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("postgres")]

TIMEOUT = 8 * 60
# Longer than dagster-postgres's own reconnect attempts (a few, a fraction of a second apart),
# so the outage is one that its retries cannot hide.
OUTAGE_SECONDS = 10
# Run, event-log and schedule storage: one pooled webserver connection each.
STORAGES_WITH_A_POOLED_CONNECTION = 3


class PostgresDagsterDev(DagsterDev):
    """`dagster dev` with DAGSTER_HOME holding dagster.postgres.yaml and DAGSTER_PG_* set."""

    instance_config = REPO / "dagster.postgres.yaml"

    def __init__(self, root, postgres: PostgresServer) -> None:
        super().__init__(root)
        self.postgres = postgres

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.update(self.postgres.environment())
        return env


@pytest.fixture
def postgres():
    with running_postgres() as server:
        yield server


@pytest.fixture
def server(tmp_path, postgres):
    dev = PostgresDagsterDev(tmp_path / "on-postgres", postgres)
    dev.start()
    try:
        dev.wait_ready()
        yield dev
    finally:
        dev.stop()


class StaleConnectionErrors:
    """Calls to the UI's GraphQL that fail with a server error: after Postgres restarts, the
    webserver's storages each hold one pooled connection to the old server (dagster-webserver
    keeps one open per storage, without a liveness check), and the first request through each
    fails once; the pool then reconnects. Each such error is kept (what a user would see) and
    the call is made again."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def call(self, function, *args):
        while True:
            try:
                return function(*args)
            except urllib.error.HTTPError as error:
                body = error.read().decode(errors="replace")
                self.seen.append(f"{error.code}: {body[:200]}")
                if error.code != 500 or len(self.seen) > STORAGES_WITH_A_POOLED_CONNECTION:
                    raise


def test_the_pipeline_runs_on_postgres_and_outlives_a_postgres_crash(server, postgres, tmp_path):
    data = make_dataset(tmp_path / "scans", 24, 24, 128, seed=0)
    landed_at = server.land(data)

    training = server.wait_for(
        lambda: run_with(server, "fine_tuned_model", "STARTED"), TIMEOUT, "a training run to start"
    )
    postgres.stop("immediate")
    stopped_at = time.time()
    time.sleep(OUTAGE_SECONDS)
    postgres.start()
    print(f"postgres down from +{stopped_at - landed_at:.0f}s for {OUTAGE_SECONDS}s")

    errors = StaleConnectionErrors()

    def deployed():
        latest = errors.call(server.latest, "deployed_model")
        return latest if latest and latest.timestamp > landed_at else None

    deployment = server.wait_for(deployed, TIMEOUT, "deployed_model after the Postgres outage")
    assert deployment.metadata["decision"] == "promote"
    runs = {r["runId"]: r for r in errors.call(server.runs)}
    print("UI errors after the restart:\n" + "\n".join(errors.seen))
    assert all("server closed the connection unexpectedly" in error for error in errors.seen)

    # The training run either missed the outage or failed in it and was retried to success.
    trained = runs[training["runId"]]["status"]
    retries = [  # newest first, as runs() lists them
        run
        for run in runs.values()
        if {"key": "dagster/root_run_id", "value": training["runId"]} in run["tags"]
    ]
    print(f"training run: {trained}; its retries: {[r['status'] for r in retries]}")
    assert trained == "SUCCESS" or (trained == "FAILURE" and retries[0]["status"] == "SUCCESS")

    # What the UI showed is what Postgres holds: every run, with its status, and the events.
    stored = dict(postgres.query("SELECT run_id, status FROM runs"))
    assert stored == {run_id: run["status"] for run_id, run in runs.items()}
    materialized = postgres.query(
        "SELECT count(*) FROM event_logs "
        "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' AND asset_key = %s",
        ('["deployed_model"]',),
    )[0][0]
    assert materialized >= 1
    # Nothing went to the SQLite default: no run, event-log or schedule database files.
    assert sorted(p.name for p in server.dagster_home.rglob("*.db")) == []
