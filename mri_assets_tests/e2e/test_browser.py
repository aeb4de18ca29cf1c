"""The Dagster UI of a real `dagster dev`, driven through Debian's chromium with Playwright.

Shares the server and the first deployment with test_dagster_dev.py (same worker, see conftest).
Screenshots go to test-artifacts/ at the repository root.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mri_assets_tests.e2e.conftest import ARTIFACTS, XDIST_GROUP

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group(XDIST_GROUP)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCATION = "mri_assets"
UI_TIMEOUT_MS = 60_000
RUN_TIMEOUT = 4 * 60


def pipeline_groups() -> dict[str, set[str]]:
    from mri_assets.definitions import defs

    groups: dict[str, set[str]] = {}
    for node in defs.resolve_asset_graph().asset_nodes:
        groups.setdefault(node.group_name, set()).add(node.key.to_user_string())
    return groups


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium; installed with apt-get when missing and we are root, else a skip."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            f"{CHROMIUM} is missing and apt-get cannot run here: apt-get install -y chromium"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "chromium"]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # stale package lists
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing and apt-get could not install it: {result.stderr[-500:]}"
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def page(chromium, dagster_dev):
    from playwright.sync_api import expect, sync_playwright

    # Node statuses arrive in a second GraphQL query after the graph; on a loaded CI machine
    # that takes longer than expect()'s 5 s default.
    expect.set_options(timeout=UI_TIMEOUT_MS)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)
            # A fresh instance greets the first visitor with a newsletter dialog over the page.
            page.add_locator_handler(
                page.get_by_text("Join the Dagster community"),
                lambda: page.get_by_role("button", name="Skip").click(),
            )
            yield page
        finally:
            browser.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"ui-{name}.png"
    page.screenshot(path=str(path))
    return path


def asset_links(page) -> set[str]:
    hrefs = page.locator('a[href^="/assets/"]').evaluate_all(
        "links => links.map(a => a.getAttribute('href'))"
    )
    return {
        href.removeprefix("/assets/") for href in hrefs if re.fullmatch(r"/assets/[^/?#]+", href)
    }


def test_assets_are_grouped_by_stage(page, dagster_dev, deployment):
    from playwright.sync_api import expect

    groups = pipeline_groups()
    assert set(groups) == {"ingest", "tables", "models", "deployment", "predictions"}

    page.goto(f"{dagster_dev.url}/asset-groups")
    for group in groups:
        expect(page.get_by_text(group, exact=True).first).to_be_visible()
    screenshot(page, "lineage")

    for group, assets in groups.items():
        page.goto(f"{dagster_dev.url}/locations/{LOCATION}/asset-groups/{group}/list")
        for asset in assets:
            expect(page.locator(f'a[href="/assets/{asset}"]').first).to_be_visible()
        assert asset_links(page) == assets, group

    # The models stage as a graph: every node materialized by the automation.
    page.goto(f"{dagster_dev.url}/locations/{LOCATION}/asset-groups/models")
    for asset in groups["models"]:
        expect(page.get_by_text(asset, exact=True).first).to_be_visible()
    expect(page.get_by_text("Materialized", exact=True)).to_have_count(len(groups["models"]))
    screenshot(page, "models-group")


def test_deployed_model_page_shows_the_promotion(page, dagster_dev, deployment):
    from playwright.sync_api import expect

    latest = dagster_dev.latest("deployed_model")
    page.goto(f"{dagster_dev.url}/assets/deployed_model")
    metadata = page.get_by_role("table").filter(has_text="deployed_version")
    expect(metadata).to_be_visible()
    for key in ("decision", "deployed_version", "candidate_roc_auc", "test_set_version"):
        expect(metadata.get_by_text(key, exact=True)).to_be_visible()
    expect(metadata.get_by_text(latest.metadata["decision"], exact=True).first).to_be_visible()
    expect(
        metadata.get_by_text(latest.metadata["deployed_version"], exact=True).first
    ).to_be_visible()
    screenshot(page, "deployed-model")


def test_materialize_from_the_ui_launches_a_run(page, dagster_dev, deployment):
    from playwright.sync_api import expect

    page.goto(f"{dagster_dev.url}/assets/images")
    button = page.get_by_role("button").filter(has_text=re.compile(r"^\s*Materialize\s*$"))
    expect(button).to_be_enabled()
    button.click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    expect(toast).to_be_visible()
    screenshot(page, "images-materialize")
    prefix = re.search(r"Launched run ([0-9a-f]{8})", toast.inner_text()).group(1)

    def finished():
        run = next((r for r in dagster_dev.runs(limit=20) if r["runId"].startswith(prefix)), None)
        return run if run and run["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None

    run = dagster_dev.wait_for(finished, RUN_TIMEOUT, f"run {prefix} launched from the UI")
    assert run["status"] == "SUCCESS", run
    assert ["images"] in [a["path"] for a in run["assetSelection"]]
    assert dagster_dev.latest("images").run_id == run["runId"]
