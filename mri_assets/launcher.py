"""The run launcher for one machine: Dagster's own, plus a health check of the run worker.

Dagster's DefaultRunLauncher cannot tell when a run's process was killed from outside (out of
memory, ``kill -9``): the run stays "Started" for ever and keeps its pool slots. This launcher
answers run monitoring's health check from the process table, so the daemon marks such a run
failed, frees its slots, and run retries (``dagster.yaml``) start it again. On Kubernetes use
dagster-k8s's K8sRunLauncher instead, which has its own health check.
"""

import os

import dagster as dg

# Internal names, stable across 1.x; pinned by pyproject's dagster==1.13.* and covered by tests.
from dagster._core.events import DagsterEventType
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

STARTED_MESSAGE = "Started process for run"


class LocalRunLauncher(dg.DefaultRunLauncher):
    """DefaultRunLauncher whose run-worker health check reads the worker's pid from the run's
    "Started process for run (pid: N)" event and looks the process up in /proc."""

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
            return CheckRunHealthResult(
                WorkerStatus.FAILED,
                f"the run worker (pid {pid}) {problem}: it was killed from outside "
                "(out of memory, kill -9) or crashed",
            )
        return CheckRunHealthResult(WorkerStatus.RUNNING)


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
