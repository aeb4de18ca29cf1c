"""A run's scratch MRI_HOME (LocalRunLauncher's scratch_home_per_run) is removed however the run
worker ends: normally, killed with SIGKILL, or with its supervisor killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
from dagster._core.events import EngineEventData

from mri_assets.launcher import (
    SCRATCH_HOME_TAG,
    SCRATCH_PREFIX,
    SUPERVISOR_PID_TAG,
    LocalRunLauncher,
)

# A stand-in run worker: writes into its MRI_HOME, says where it is, then waits to be ended.
WORKER = """
import os, pathlib, sys, time
home = pathlib.Path(os.environ["MRI_HOME"])
(home / "cache.bin").write_bytes(b"x" * 1000)
(home / "pid").write_text(str(os.getpid()))
if sys.argv[1] == "exit":
    sys.exit(3)
time.sleep(60)
"""


def scratch_home(tmp_path: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=tmp_path))


def supervise(home: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mri_assets.scratch_home",
            str(home),
            "--",
            sys.executable,
            "-c",
            WORKER,
            mode,
        ]
    )


def worker_pid(home: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while not (home / "pid").exists() or not (home / "pid").read_text():
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.05)
    return int((home / "pid").read_text())


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and "Z" not in stat_state(pid):
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.05)


def stat_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "X"


def test_the_folder_goes_when_the_worker_exits_and_its_exit_code_is_kept(tmp_path):
    home = scratch_home(tmp_path)
    supervisor = supervise(home, "exit")
    assert supervisor.wait(timeout=30) == 3
    assert not home.exists()


def test_the_folder_goes_when_the_worker_is_killed_with_sigkill(tmp_path):
    home = scratch_home(tmp_path)
    supervisor = supervise(home, "wait")
    os.kill(worker_pid(home), signal.SIGKILL)
    assert supervisor.wait(timeout=30) == -signal.SIGKILL & 0xFF
    assert not home.exists()


def test_a_termination_request_reaches_the_worker_and_the_folder_goes(tmp_path):
    home = scratch_home(tmp_path)
    supervisor = supervise(home, "wait")
    pid = worker_pid(home)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == -signal.SIGTERM & 0xFF
    wait_gone(pid)
    assert not home.exists()


def test_a_killed_supervisor_takes_the_worker_with_it_and_the_health_check_removes_the_folder(
    tmp_path,
):
    home = scratch_home(tmp_path)
    supervisor = supervise(home, "wait")
    pid = worker_pid(home)
    supervisor.kill()
    supervisor.wait()
    wait_gone(pid)
    assert home.exists()  # nobody left to remove it but the launcher
    config = {"module": "mri_assets.launcher", "class": "LocalRunLauncher"}
    config["config"] = {"scratch_home_per_run": True, "scratch_root": str(tmp_path)}
    with dg.instance_for_test(overrides={"run_launcher": config}) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, LocalRunLauncher) and launcher.scratch_home_per_run
        run = instance.create_run_for_job(
            dg.GraphDefinition("empty").to_job(), tags={SCRATCH_HOME_TAG: str(home)}
        )
        instance.report_engine_event(
            f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
        )
        health = launcher.check_run_worker_health(instance.get_run_by_id(run.run_id))
    assert health.status.value == "FAILED" and f"pid {pid}" in health.msg
    assert not home.exists()


def test_terminating_a_run_ends_its_worker_and_removes_the_folder(tmp_path):
    home = scratch_home(tmp_path)
    supervisor = supervise(home, "wait")
    pid = worker_pid(home)
    config = {"module": "mri_assets.launcher", "class": "LocalRunLauncher"}
    config["config"] = {"scratch_home_per_run": True}
    with dg.instance_for_test(overrides={"run_launcher": config}) as instance:
        run = instance.create_run_for_job(
            dg.GraphDefinition("empty").to_job(),
            tags={SCRATCH_HOME_TAG: str(home), SUPERVISOR_PID_TAG: str(supervisor.pid)},
        )
        assert instance.run_launcher.terminate(run.run_id)
        assert supervisor.wait(timeout=30) == -signal.SIGTERM & 0xFF
        wait_gone(pid)
        assert not home.exists()
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELING
