"""The shipped instance settings: dagster.yaml (SQLite, the default) and dagster.postgres.yaml
differ only in storage, and both are valid instance configs for the installed Dagster."""

from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config

REPO = Path(__file__).resolve().parents[1]
PG_VARIABLES = {
    "DAGSTER_PG_HOST": "db.example",
    "DAGSTER_PG_PORT": "6543",
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "not-a-real-password",
    "DAGSTER_PG_DB": "dagster",
}


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_the_postgres_instance_is_the_default_one_with_postgres_storage():
    default, on_postgres = load("dagster.yaml"), load("dagster.postgres.yaml")
    assert "storage" not in default
    assert {k: v for k, v in on_postgres.items() if k != "storage"} == default
    assert list(on_postgres["storage"]) == ["postgres"]


@pytest.mark.parametrize("name", ["dagster.yaml", "dagster.postgres.yaml"])
def test_each_instance_config_is_valid(name, tmp_path, monkeypatch):
    for variable, value in PG_VARIABLES.items():
        monkeypatch.setenv(variable, value)
    (tmp_path / "dagster.yaml").write_text((REPO / name).read_text())
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_launcher"]["class"] == "LocalRunLauncher"


def test_postgres_credentials_come_from_the_environment_only():
    database = load("dagster.postgres.yaml")["storage"]["postgres"]["postgres_db"]
    assert {k: database[k] for k in ("hostname", "port", "username", "password", "db_name")} == {
        "hostname": {"env": "DAGSTER_PG_HOST"},
        "port": {"env": "DAGSTER_PG_PORT"},
        "username": {"env": "DAGSTER_PG_USERNAME"},
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "db_name": {"env": "DAGSTER_PG_DB"},
    }


def test_an_unset_postgres_variable_is_named_before_any_connection(tmp_path, monkeypatch):
    for variable, value in PG_VARIABLES.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.delenv("DAGSTER_PG_PASSWORD")
    (tmp_path / "dagster.yaml").write_text((REPO / "dagster.postgres.yaml").read_text())
    with pytest.raises(dg.DagsterInvalidConfigError, match="DAGSTER_PG_PASSWORD"):
        dg.DagsterInstance.from_config(str(tmp_path))
