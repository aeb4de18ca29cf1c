"""The catalogue in a real PostgreSQL (MRI_CATALOG=postgres:...), reached by DuckDB's postgres
extension loaded from the duckdb-ext-postgres package, with the landing zone on moto's S3."""

import json
import os
import subprocess
import sys
import time

import boto3
import dagster as dg
import pytest

from mri_assets.core import warehouse
from mri_assets.core.landing import S3Landing
from mri_assets.core.warehouse import CatalogLocation, CatalogueUnavailable, parse_catalog
from mri_assets.defs.ingest import raw_image_assets
from mri_assets.defs.tables import table_assets, table_checks
from mri_assets.settings import Settings
from mri_assets_tests.conftest import free_port
from mri_assets_tests.defs.helpers import materialize, resources_for
from mri_assets_tests.defs.test_ingest_and_tables import land_small_dataset
from mri_assets_tests.postgres import DATABASE, USERNAME, running_postgres

ASSETS = [*raw_image_assets, *table_assets, *table_checks]

READER = """
import json
from mri_assets.resources import MriSettingsResource, WarehouseResource
warehouse = WarehouseResource(settings=MriSettingsResource())
with warehouse.connection() as conn:
    rows = conn.execute("SELECT source_key, split FROM images ORDER BY source_key").fetchall()
    train = conn.execute("SELECT count(*) FROM train_images").fetchall()[0][0]
print(json.dumps({"images": rows, "train_images": train}))
"""

WRITER = """
from mri_assets.resources import MriSettingsResource, WarehouseResource
warehouse = WarehouseResource(settings=MriSettingsResource())
with warehouse.connection() as conn:
    conn.execute("CREATE TABLE IF NOT EXISTS waits (x INTEGER)")
    conn.execute("INSERT INTO waits VALUES (1)")
"""


@pytest.fixture(scope="module")
def postgres():
    with running_postgres() as server:
        yield server


def catalogue_env(server) -> dict[str, str]:
    return {
        "MRI_CATALOG": f"postgres:host=127.0.0.1 port={server.port} user={USERNAME} "
        f"dbname={DATABASE} connect_timeout=5",
        "PGPASSWORD": server.password,
    }


def test_tables_materialize_into_postgres_and_another_process_reads_them(
    mri_env, s3_bucket, postgres, monkeypatch, tmp_path
):
    for name, value in catalogue_env(postgres).items():
        monkeypatch.setenv(name, value)
    location = f"s3://{s3_bucket}/landing"
    land_small_dataset(S3Landing(boto3.client("s3"), location))
    with dg.instance_for_test() as instance:
        result = materialize(ASSETS, resources_for(landing=location), instance)
    assert result.success
    assert not (mri_env / "mri.duckdb").exists(), "nothing is written to the local file"
    tables = {row[0] for row in postgres.query("SELECT tablename FROM pg_tables")}
    assert {"landed_images", "images", "rejected_images", "train_images", "test_images"} <= tables

    # Another machine: its own, empty MRI_HOME; only Postgres is shared.
    empty_home = tmp_path / "other_machine"
    empty_home.mkdir()
    reader = subprocess.run(
        [sys.executable, "-c", READER],
        env={**os.environ, "MRI_HOME": str(empty_home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reader.returncode == 0, reader.stderr
    seen = json.loads(reader.stdout)
    expected = postgres.query("SELECT source_key, split FROM images ORDER BY source_key")
    assert [tuple(row) for row in seen["images"]] == expected
    assert len(expected) == 12 and seen["train_images"] == 6
    assert list(empty_home.iterdir()) == [], "the reader left nothing in its MRI_HOME"


def test_a_second_writer_waits_on_the_advisory_lock(postgres, monkeypatch, tmp_path):
    env = {**os.environ, **catalogue_env(postgres), "MRI_HOME": str(tmp_path)}
    location = parse_catalog(env["MRI_CATALOG"])
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    with warehouse.connect(location, tmp_path / "unused.duckdb") as holder:
        holder.execute("CREATE TABLE IF NOT EXISTS waits (x INTEGER)")
        writer = subprocess.Popen([sys.executable, "-c", WRITER], env=env)
        time.sleep(3)
        assert writer.poll() is None, "the second writer should be queued on the advisory lock"
        holder.execute("INSERT INTO waits VALUES (0)")
    assert writer.wait(timeout=60) == 0
    assert sorted(postgres.query("SELECT x FROM waits")) == [(0,), (1,)]


def test_an_unreachable_catalogue_names_the_setting_and_the_place(monkeypatch, tmp_path):
    monkeypatch.setenv("PGPASSWORD", "not-shown-anywhere")
    dsn = f"host=127.0.0.1 port={free_port()} dbname=mri user=mri connect_timeout=2"
    location = parse_catalog("postgres:" + dsn)
    with (
        pytest.raises(CatalogueUnavailable) as caught,
        warehouse.connect(location, tmp_path / "unused.duckdb"),
    ):
        pass
    message = str(caught.value)
    assert message.startswith("MRI_CATALOG: cannot connect to PostgreSQL host=127.0.0.1")
    assert "dbname=mri" in message and "not-shown-anywhere" not in message


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("postgres:", "needs a connection string"),
        ("postgres:host=db password=secret", "PGPASSWORD"),
        ("postgres:postgresql://mri:secret@db/mri", "PGPASSWORD"),
        ("sqlite:mri.db", "must be `duckdb` or `postgres:"),
    ],
)
def test_a_bad_catalogue_setting_is_refused_by_name(raw, reason):
    with pytest.raises(ValueError, match="MRI_CATALOG") as caught:
        Settings.from_env({"MRI_CATALOG": raw})
    assert reason in str(caught.value)
    assert "secret" not in str(caught.value)


def test_the_default_catalogue_is_the_duckdb_file():
    assert Settings.from_env({}).catalog == CatalogLocation()
    assert not Settings.from_env({}).catalog.shared


def test_a_missing_extension_says_what_to_install(postgres, monkeypatch, tmp_path):
    """No download is tried: an extension folder without the file fails with the install hint."""
    monkeypatch.setattr(warehouse, "extension_directory", lambda: tmp_path)
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    location = parse_catalog(catalogue_env(postgres)["MRI_CATALOG"])
    with (
        pytest.raises(CatalogueUnavailable, match=r"pip install 'mri-assets\[catalogue\]'"),
        warehouse.connect(location, tmp_path / "unused.duckdb"),
    ):
        pass


def test_standings_and_deployments_round_trip_through_postgres(postgres, monkeypatch, tmp_path):
    """The model stage's upserts (INSERT OR REPLACE, executemany) on the attached database."""
    from mri_assets.core.catalog import sync_deployments
    from mri_assets.core.evaluation_records import find_standing, record_standing
    from mri_assets_tests.core.test_promotion import standing

    monkeypatch.setenv("PGPASSWORD", postgres.password)
    location = parse_catalog(catalogue_env(postgres)["MRI_CATALOG"])
    history = [
        {
            "version": "v1",
            "action": "promote",
            "auc": 0.97,
            "test_set_version": "t1",
            "deployed_at": "2026-01-01T00:00:00Z",
            "reason": "first",
        }
    ]
    with warehouse.connect(location, tmp_path / "unused.duckdb") as conn:
        promoted = standing()
        record_standing(conn, promoted, run_id="run-1")
        record_standing(conn, standing(deployed=("v3", 0.995)))  # decided again: replaces
        assert sync_deployments(conn, history) == 1
    with warehouse.connect(location, tmp_path / "unused.duckdb") as conn:
        assert find_standing(conn, "v2", "t1").decision.action == "refuse"
        assert sync_deployments(conn, history) == 0
    assert postgres.query("SELECT count(*) FROM standings") == [(1,)]
    assert postgres.query("SELECT version FROM deployments") == [("v1",)]
