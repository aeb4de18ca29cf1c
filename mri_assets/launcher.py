"""The run launcher for one machine: Dagster's own, plus a health check of the run worker.

Dagster's DefaultRunLauncher cannot tell when a run's process was killed from outside (out of
memory, ``kill -9``): the run stays "Started" for ever and keeps its pool slots. This launcher
answers run monitoring's health check from the process table, so the daemon marks such a run
failed, frees its slots, and run retries (``dagster.yaml``) start it again. On Kubernetes use
dagster-k8s's K8sRunLauncher instead, which has its own health check.

With ``scratch_home_per_run: true`` (off by default) each run worker gets its own new, empty
MRI_HOME, removed when the run ends, however it ends: the run keeps nothing on this machine, so
its durable state must be in MRI_STORE, MRI_CATALOG and MRI_LANDING. The launcher then starts the
worker itself (``dagster api execute_run``, the command the code server would run) under
``mri_assets.scratch_home``, which sets MRI_HOME and removes the folder when the worker exits.
On Kubernetes an emptyDir volume per run pod is the same thing.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import dagster as dg

# Internal names, stable across 1.x; pinned by pyproject's dagster==1.13.* and covered by tests.
from dagster._core.events import DagsterEventType, EngineEventData
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._grpc.types import ExecuteRunArgs

STARTED_MESSAGE = "Started process for run"
# Run tags naming a run's scratch MRI_HOME and the pid of the process that removes it.
SCRATCH_HOME_TAG = "mri/scratch_home"
SUPERVISOR_PID_TAG = "mri/scratch_supervisor_pid"
SCRATCH_PREFIX = "mri-run-"


class LocalRunLauncher(dg.DefaultRunLauncher):
    """DefaultRunLauncher whose run-worker health check reads the worker's pid from the run's
    "Started process for run (pid: N)" event and looks the process up in /proc; optionally
    gives each run its own scratch MRI_HOME (module docstring)."""

    def __init__(
        self, inst_data=None, scratch_home_per_run: bool = False, scratch_root: str | None = None
    ) -> None:
        super().__init__(inst_data=inst_data)
        self.scratch_home_per_run = scratch_home_per_run
        self.scratch_root = scratch_root
        self._supervisors: list[subprocess.Popen] = []

    @classmethod
    def config_type(cls) -> dict:
        return {
            "scratch_home_per_run": dg.Field(
                bool,
                is_required=False,
                default_value=False,
                description="Give each run a new, empty MRI_HOME, removed when the run ends.",
            ),
            "scratch_root": dg.Field(
                dg.StringSource,
                is_required=False,
                description="Where the scratch folders are made (default: the system temp dir).",
            ),
        }

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **config_value)

    def launch_run(self, context: LaunchRunContext) -> None:
        if not self.scratch_home_per_run:
            return super().launch_run(context)
        run = context.dagster_run
        command = ExecuteRunArgs(
            job_origin=run.job_code_origin,
            run_id=run.run_id,
            instance_ref=self._instance.get_ref(),
            set_exit_code_on_failure=True,
        ).get_command_args()
        if self.scratch_root:
            Path(self.scratch_root).mkdir(parents=True, exist_ok=True)
        home = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{run.run_id[:8]}-", dir=self.scratch_root)
        try:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "mri_assets.scratch_home", home, "--", *command],
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            shutil.rmtree(home, ignore_errors=True)
            raise
        # Reap the supervisors that have exited, so none lingers as a zombie.
        self._supervisors = [p for p in self._supervisors if p.poll() is None] + [supervisor]
        self._instance.add_run_tags(
            run.run_id, {SCRATCH_HOME_TAG: home, SUPERVISOR_PID_TAG: str(supervisor.pid)}
        )
        self._instance.report_engine_event(
            f"Run worker starting with its own MRI_HOME {home}, removed when the run ends "
            f"(supervisor pid {supervisor.pid})",
            run,
            EngineEventData(
                metadata={
                    "scratch_home": dg.MetadataValue.path(home),
                    "supervisor_pid": dg.MetadataValue.int(supervisor.pid),
                }
            ),
            cls=self.__class__,
        )

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or SUPERVISOR_PID_TAG not in run.tags:
            return super().terminate(run_id)
        if run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        try:
            # The supervisor passes it on to the worker, which ends the run as canceled.
            os.kill(int(run.tags[SUPERVISOR_PID_TAG]), signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        started = worker_started(self._instance, run.run_id)
        if started is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "the run worker has not started yet")
        pid, started_at = started
        problem = process_gone(pid, started_at)
        if problem:
            remove_scratch_home(run)
            return CheckRunHealthResult(
                WorkerStatus.FAILED,
                f"the run worker (pid {pid}) {problem}: it was killed from outside "
                "(out of memory, kill -9) or crashed",
            )
        return CheckRunHealthResult(WorkerStatus.RUNNING)


def remove_scratch_home(run: dg.DagsterRun) -> None:
    """Remove a dead run's scratch MRI_HOME: its supervisor does so, unless it was killed too."""
    home = run.tags.get(SCRATCH_HOME_TAG)
    if home and Path(home).name.startswith(SCRATCH_PREFIX):
        shutil.rmtree(home, ignore_errors=True)


def worker_started(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, time) of the latest run worker started for ``run_id``, if any."""
    found = None
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = entry.dagster_event
        if event is None or not (event.message or "").startswith(STARTED_MESSAGE):
            continue
        pid = event.engine_event_data.metadata.get("pid")
        if pid is not None:
            found = (int(pid.value), entry.timestamp)
    return found


def process_gone(pid: int, started_at: float) -> str | None:
    """Why process ``pid`` (started at about ``started_at``) is not running, or None if it is."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return "no longer exists"
    except OSError:
        return None  # no /proc (not Linux): assume alive rather than fail a healthy run
    if fields[0] in ("Z", "X"):
        return "has exited"
    # A new process reusing the pid started after our worker did.
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as handle:
        boot = next(float(line.split()[1]) for line in handle if line.startswith("btime"))
    if boot + int(fields[19]) / ticks > started_at + 5:
        return "no longer exists (its pid was reused)"
    return None
