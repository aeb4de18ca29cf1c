"""The project's promises about itself: the README stays true, definitions load and validate."""

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


def test_readme_names_every_launchpad_field():
    from mri_assets.defs.models import FineTuneConfig

    readme = (ROOT / "README.md").read_text()
    launchpad = readme[readme.index("Training is configured per run in the Launchpad") :]
    launchpad = launchpad[: launchpad.index("\n\n")]
    assert [f for f in FineTuneConfig.model_fields if f"`{f}`" not in launchpad] == []
