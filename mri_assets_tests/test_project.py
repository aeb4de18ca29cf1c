"""The project's promises about itself: the README stays true, definitions load and validate."""

import json
import os
import subprocess
import sys
from pathlib import Path

from mri_assets.settings import settings_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_settings_table_is_the_one_in_settings_py():
    readme = (ROOT / "README.md").read_text()
    assert settings_table() in readme, "README's settings table differs from settings_table()"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_definitions_load_without_importing_torch():
    code = (
        "import sys, mri_assets.definitions as d; "
        "d.defs.resolve_all_asset_keys(); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_dagster_definitions_validate(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dg_checks_and_lists_the_same_definitions(tmp_path):
    """`dg` (dagster-dg-cli, the dev extra) works in the project: pyproject's [tool.dg] points it
    at mri_assets.definitions, the module workspace.yaml loads."""
    dg_cli = Path(sys.executable).with_name("dg")
    assert dg_cli.exists(), f"{dg_cli} missing: install the dev extra (pip install -e '.[dev]')"
    # As if the venv were activated: dg warns when the active venv is not the project's.
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "VIRTUAL_ENV": sys.prefix}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    def dg(*args: str) -> str:
        result = subprocess.run(
            [str(dg_cli), *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    assert "All definitions loaded successfully" in dg("check", "defs")
    listed = json.loads(dg("list", "defs", "--json"))
    from mri_assets.definitions import defs

    assert {a["asset_key"] for a in listed["assets"]} == {
        key.to_user_string() for key in defs.resolve_all_asset_keys()
    }
    assert {s["name"] for s in listed["sensors"]} >= {"train_landing_sensor", "automation_sensor"}


def test_readme_names_every_launchpad_field():
    from mri_assets.defs.models import FineTuneConfig

    readme = (ROOT / "README.md").read_text()
    launchpad = readme[readme.index("Training is configured per run in the Launchpad") :]
    launchpad = launchpad[: launchpad.index("\n\n")]
    assert [f for f in FineTuneConfig.model_fields if f"`{f}`" not in launchpad] == []


def test_every_asset_has_owners_tags_and_a_code_version():
    from mri_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.owners == ["team:mri-ml"], key
        assert node.tags.get("domain") == "mri", key
        assert node.code_version, key
