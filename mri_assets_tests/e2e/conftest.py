"""One real `dagster dev` on the default instance, shared by the e2e, healing and browser tests.

`dagster_dev` starts the server (own process group, temporary MRI_HOME and DAGSTER_HOME) and stops
it by signalling that group. `deployment` lands a small generated data set, with a scan whose name
is not UTF-8 and a link out of the landing zone among it, kills the training run's worker with
SIGKILL mid-training, and waits, bounded, until the automation has carried the landing to
`deployed_model` all the same. The three test files use it, so the pipeline runs once per worker
(each `dagster dev` pass costs a minute or more of this machine's two cores); they carry the same
xdist_group mark so `--dist loadgroup` puts them on one worker.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from mri_assets.core.catalog import exclusive_lock
from mri_assets.launcher import worker_started
from mri_assets_tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
BIN = Path(sys.executable).parent
XDIST_GROUP = "dagster_dev"

SERVER_START_TIMEOUT = 120
DEPLOY_TIMEOUT = 8 * 60
POLL_SECONDS = 2.0


def executable(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed next to {sys.executable} nor on PATH")
    return found


MATERIALIZATIONS = """
query Materializations($path: [String!]!, $limit: Int!) {
  assetOrError(assetKey: {path: $path}) {
    __typename
    ... on Asset {
      assetMaterializations(limit: $limit) {
        runId
        timestamp
        metadataEntries {
          label
          ... on TextMetadataEntry { text }
          ... on FloatMetadataEntry { floatValue }
          ... on IntMetadataEntry { intValue }
          ... on BoolMetadataEntry { boolValue }
          ... on MarkdownMetadataEntry { mdStr }
        }
      }
    }
  }
}
"""

RUNS = """
query Runs($limit: Int!) {
  runsOrError(limit: $limit) {
    __typename
    ... on Runs {
      results {
        runId
        status
        creationTime
        startTime
        endTime
        tags { key value }
        assetSelection { path }
        stepStats { stepKey status startTime endTime }
      }
    }
  }
}
"""


@dataclass(frozen=True)
class Materialization:
    run_id: str
    timestamp: float  # seconds since the epoch
    metadata: dict

    @classmethod
    def parse(cls, raw: dict) -> "Materialization":
        metadata = {}
        for entry in raw["metadataEntries"]:
            values = [v for k, v in entry.items() if k != "label"]
            metadata[entry["label"]] = values[0] if values else None
        return cls(raw["runId"], float(raw["timestamp"]) / 1000, metadata)


class DagsterDev:
    """`dagster dev -w workspace.yaml` on a free loopback port, in its own process group."""

    # The instance settings copied into DAGSTER_HOME (a subclass may start on another instance).
    instance_config = REPO / "dagster.yaml"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mri_home = root / "mri_home"
        self.landing = self.mri_home / "landing"
        self.dagster_home = root / "dagster_home"
        self.log_path = root / "dagster-dev.log"
        self.process: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MRI_", "DAGSTER_", "AWS_", "SLACK_", "PYTEST_"))
        }
        env.update(
            MRI_HOME=str(self.mri_home),
            DAGSTER_HOME=str(self.dagster_home),
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self) -> None:
        self.dagster_home.mkdir(parents=True)
        self.mri_home.mkdir(parents=True)
        shutil.copy(self.instance_config, self.dagster_home / "dagster.yaml")
        log = self.log_path.open("wb")
        # setsid makes the server the leader of a new process group (it is not one already, so
        # setsid does not fork): the run and code-server processes it starts join that group, and
        # stop() signals all of them. env restores default SIGINT/SIGTERM handling, which a test
        # runner's worker may have set to ignore, so dagster can shut down gracefully.
        self.process = subprocess.Popen(
            [
                "setsid",
                "env",
                "--default-signal=INT,TERM",
                executable("dagster"),
                "dev",
                "-w",
                "workspace.yaml",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            cwd=REPO,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.started_at = time.time()

    def stop(self, grace: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pgid = self.process.pid
        try:
            os.killpg(pgid, signal.SIGINT)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        # Whatever is left of the group (a run still stopping, the code server) goes now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT) -> float:
        """Seconds until the GraphQL endpoint answers and the code location has loaded."""
        query = (
            "{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name } } } }"
        )

        def ready():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                data = self.graphql(query, timeout=5)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                return False
            repos = data["repositoriesOrError"]
            return repos["__typename"] == "RepositoryConnection" and bool(repos["nodes"])

        self.wait_for(ready, timeout, "the GraphQL endpoint and the code location", interval=1)
        return time.time() - self.started_at

    def wait_for(
        self,
        condition: Callable[[], object],
        timeout: float,
        what: str,
        interval: float = POLL_SECONDS,
    ):
        """Poll `condition` (sleeping between calls) until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what}\n"
                    f"--- runs ---\n{self.runs_summary()}\n"
                    f"--- tail of the dagster dev log ---\n{self.log_tail()}"
                )
            time.sleep(interval)

    def materializations(self, asset: str, limit: int = 20) -> list[Materialization]:
        """Newest first."""
        data = self.graphql(MATERIALIZATIONS, {"path": [asset], "limit": limit})
        node = data["assetOrError"]
        if node["__typename"] != "Asset":
            return []
        return [Materialization.parse(m) for m in node["assetMaterializations"]]

    def latest(self, asset: str) -> Materialization | None:
        found = self.materializations(asset, limit=1)
        return found[0] if found else None

    def runs(self, limit: int = 100) -> list[dict]:
        """Newest first."""
        data = self.graphql(RUNS, {"limit": limit})
        return data["runsOrError"].get("results", [])

    def run_with(self, asset: str, status: str) -> dict | None:
        """The newest run that selected ``asset`` and has ``status``."""
        for run in self.runs():
            selected = {"/".join(a["path"]) for a in run["assetSelection"] or []}
            if asset in selected and run["status"] == status:
                return run
        return None

    def kill_training_worker(self) -> tuple[dict, float]:
        """SIGKILL the worker of the first training run once its training step is in progress:
        (that run, when it was killed)."""
        training = self.wait_for(
            lambda: self.run_with("fine_tuned_model", "STARTED"),
            DEPLOY_TIMEOUT,
            "a training run to start",
        )
        with dg.DagsterInstance.from_config(str(self.dagster_home)) as instance:

            def worker_pid():
                run = self.run_with("fine_tuned_model", "STARTED") or {}
                steps = {s["stepKey"]: s["status"] for s in run.get("stepStats", [])}
                started = worker_started(instance, training["runId"])
                return started and steps.get("fine_tuned_model") == "IN_PROGRESS" and started[0]

            pid = self.wait_for(worker_pid, DEPLOY_TIMEOUT, "training to be in progress")
        os.kill(pid, signal.SIGKILL)
        return training, time.time()

    def runs_summary(self) -> str:
        try:
            runs = self.runs()
        except Exception as error:  # noqa: BLE001 - a summary for a failure message
            return f"(runs unavailable: {error})"
        lines = []
        for run in reversed(runs):
            assets = ",".join("/".join(a["path"]) for a in run["assetSelection"] or [])
            lines.append(f"{run['runId'][:8]} {run['status']:<9} {assets}")
        return "\n".join(lines) or "(no runs)"

    def land(self, source: Path, under: str = "") -> float:
        """Copy a generated tree into the landing zone with `mri-assets upload`; returns when done."""
        target = self.landing / under if under else self.landing
        subprocess.run(
            [executable("mri-assets"), "upload", str(source), "--landing", str(target), "--quiet"],
            check=True,
            env=self.environment(),
            capture_output=True,
        )
        return time.time()


def make_dataset(out: Path, glioma: int, meningioma: int, size: int, seed: int) -> Path:
    subprocess.run(
        [
            executable("mri-assets"),
            "make-dataset",
            str(out),
            "--glioma",
            str(glioma),
            "--meningioma",
            str(meningioma),
            "--size",
            str(size),
            "--seed",
            str(seed),
            "--quiet",
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def dagster_dev(tmp_path_factory):
    server = DagsterDev(tmp_path_factory.mktemp("dagster_dev"))
    server.start()
    try:
        server.startup_seconds = server.wait_ready()
        yield server
    finally:
        server.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        shutil.copy(server.log_path, ARTIFACTS / f"dagster-dev-{worker}.log")


@dataclass
class Deployment:
    """The first landing, carried to deployed_model by the running server through the faults."""

    landed_at: float
    deployed: Materialization
    killed_run: dict  # the training run whose worker was killed
    killed_at: float
    catalogue: dict  # what the DuckDB catalogue held right after the deployment
    landed_entries: int  # files and links in the landing zone at that moment
    timings: dict[str, float] = field(default_factory=dict)


def land_faults(train: Path, outside: Path) -> None:
    """A link out of the landing zone and a scan whose name is not UTF-8, put straight into the
    landing zone's ``train`` folder beside the scans."""
    outside.mkdir()
    os.symlink(outside, train / "glioma-outside-link")
    with open(os.fsencode(train) + b"/glioma \xff.png", "wb") as handle:
        handle.write(b"not even an image")


def read_catalogue(server: DagsterDev) -> dict:
    """The accepted count, the rejections and the count of contents in both splits, read under
    the catalogue's lock (a run may be writing)."""
    database = server.mri_home / "mri.duckdb"
    with exclusive_lock(database), duckdb.connect(str(database), read_only=True) as conn:
        accepted = conn.execute("SELECT count(*) FROM images").fetchall()[0][0]
        rejected = dict(conn.execute("SELECT source_key, reason FROM rejected_images").fetchall())
        shared = conn.execute(
            "SELECT count(*) FROM (SELECT content_id FROM images WHERE split IN ('train', 'test') "
            "GROUP BY content_id HAVING count(DISTINCT split) > 1)"
        ).fetchall()[0][0]
    return {"accepted": accepted, "rejected": rejected, "in_both_splits": shared}


def format_runs(runs: list[dict], since: float) -> str:
    lines = ["created  started  ended   run       assets (seconds after landing)"]
    for run in sorted(runs, key=lambda r: r["creationTime"]):
        if run["creationTime"] < since - 1:
            continue
        assets = ",".join("/".join(a["path"]) for a in run["assetSelection"] or [])
        sensor = next((t["value"] for t in run["tags"] if t["key"] == "dagster/sensor_name"), "")
        assets = f"{assets} [{sensor}]" if sensor else assets

        def rel(t):
            return f"{t - since:7.1f}" if t else "      -"

        lines.append(
            f"{rel(run['creationTime'])} {rel(run['startTime'])} {rel(run['endTime'])}  "
            f"{run['runId'][:8]}  {run['status']:<8} {assets}"
        )
    return "\n".join(lines)


@pytest.fixture(scope="session")
def deployment(dagster_dev, tmp_path_factory) -> Deployment:
    root = tmp_path_factory.mktemp("dataset")
    data = make_dataset(root / "first", 24, 24, 128, seed=0)
    landed_at = dagster_dev.land(data)
    land_faults(dagster_dev.landing / "train", root / "private")  # `upload` would not copy them
    killed_run, killed_at = dagster_dev.kill_training_worker()

    def deployed():
        latest = dagster_dev.latest("deployed_model")
        return latest if latest and latest.timestamp > killed_at else None

    materialization = dagster_dev.wait_for(
        deployed, DEPLOY_TIMEOUT, "deployed_model to be materialized after the kill"
    )
    catalogue = read_catalogue(dagster_dev)
    landed = sum(len(files) for _, _, files in os.walk(dagster_dev.landing))
    timings = {
        "server startup (to GraphQL + code location)": dagster_dev.startup_seconds,
        "landing -> training worker killed": killed_at - landed_at,
        "landing -> deployed_model materialized": materialization.timestamp - landed_at,
    }
    report = "\n".join(f"{k}: {v:.1f}s" for k, v in timings.items())
    report += "\n" + format_runs(dagster_dev.runs(), landed_at)
    print(report)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "e2e-timings.txt").write_text(report + "\n")
    return Deployment(
        landed_at=landed_at,
        deployed=materialization,
        killed_run=killed_run,
        killed_at=killed_at,
        catalogue=catalogue,
        landed_entries=landed + 1,  # os.walk lists the link to a folder as a folder
        timings=timings,
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used the server gets the tail of its log in the report."""
    outcome = yield
    report = outcome.get_result()
    server = item.funcargs.get("dagster_dev") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(server, DagsterDev):
        report.sections.append(("dagster dev log (tail)", server.log_tail(150)))
    page = item.funcargs.get("page") if hasattr(item, "funcargs") else None
    if report.failed and page is not None:  # what the browser showed when the test failed
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"failed-{item.name}.png"
        try:
            page.screenshot(path=str(path))
            report.sections.append(("screenshot", str(path)))
        except Exception as error:  # a dead browser must not hide the real failure
            report.sections.append(("screenshot", f"not taken: {error}"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make `--dist loadgroup` group again under pytest 9.2 (pytest-xdist issue #1386).

    xdist tells its scheduler an item's group by appending "@<group>" to the node id, which it sets
    through `item._nodeid`; pytest 9.2 derives `nodeid` from a structured `item._id`, so the suffix
    is lost and the tests of a group are spread over the workers (each of which would then start
    its own `dagster dev`). Where the suffix is missing, set it on the structured id. Nothing
    happens outside loadgroup workers, nor once xdist sets the suffix itself.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import NodeId

    for item in items:
        groups = sorted(
            {
                str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                for m in item.iter_markers("xdist_group")
            }
        )
        if groups and "@" not in item.nodeid and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")
