"""Healing after real faults, at the Dagster layer: the landing sensor asks again until the
catalogue has recorded the listing; a failed base_model is tried again when scans land; the run
launcher notices a run worker killed with SIGKILL; a hanging S3 endpoint ends a sensor tick."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import dagster_duckdb.resource
import duckdb
import pytest

from mri_assets.core.landing import S3_CLIENT_SETTINGS, LocalLanding
from mri_assets.defs import ingest
from mri_assets.launcher import LocalRunLauncher
from mri_assets_tests.conftest import png_bytes
from mri_assets_tests.defs.test_automation import Pipeline
from mri_assets_tests.defs.test_landing_sensors import run_ingest, tick

HOLD_DUCKDB = """
import sys, time, duckdb
conn = duckdb.connect(sys.argv[1])
print("holding", flush=True)
sys.stdin.readline()
"""


def hold_duckdb(path: Path) -> subprocess.Popen:
    """Another program with the DuckDB file open for writing until its stdin is closed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DUCKDB, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_an_ingest_run_that_failed_while_duckdb_was_held_is_asked_for_again(mri_env, monkeypatch):
    monkeypatch.setattr(ingest, "RETRY_BASE_SECONDS", 0.2)
    # dagster-duckdb retries a locked file 10 times over ~100 s before it gives up; two tries keep
    # this test to seconds (the lock, and the failure, are still DuckDB's own).
    backoff = dagster_duckdb.resource.backoff
    monkeypatch.setattr(
        dagster_duckdb.resource, "backoff", lambda **kw: backoff(**{**kw, "max_retries": 2})
    )
    location = str(mri_env / "landing")
    landing = LocalLanding(location)
    for i in range(6):
        landing.write(f"train/glioma/{i}.png", png_bytes(i))
    with dg.instance_for_test() as instance:
        _, cursor = tick(None, location, instance)
        requests, cursor = tick(cursor, location, instance)
        assert len(requests) == 1
        database = mri_env / "mri.duckdb"
        duckdb.connect(str(database)).close()
        holder = hold_duckdb(database)
        try:
            failed = run_ingest(instance, location, requests[0])  # the step retries, then fails
        finally:
            holder.stdin.close()
            holder.wait()
        assert not failed.success
        assert "lock" in str(failed.get_step_failure_events()[0].event_specific_data.error)
        time.sleep(0.3)
        again, cursor = tick(cursor, location, instance)  # nothing new landed, no click
        assert len(again) == 1 and again[0].tags[ingest.ATTEMPT_TAG] == "2/5"
        assert run_ingest(instance, location, again[0]).success
        assert tick(cursor, location, instance)[0] == []
    with duckdb.connect(str(database), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM landing_ledger").fetchall()[0][0] == 6


@pytest.fixture
def full_disk(mri_env):
    """A real 8 MiB tmpfs as the pixel cache, filled to the last byte."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    pixels = mri_env / "pixels"
    pixels.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(pixels)], check=True)
    filler = pixels / "filler"
    try:
        with open(filler, "wb") as handle:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    except OSError:
        pass  # ENOSPC: the disk is full
    yield filler
    subprocess.run(["umount", "-l", str(pixels)], check=True)


def test_a_full_disk_fails_the_run_records_nothing_and_heals_once_space_is_freed(
    mri_env, full_disk, monkeypatch
):
    monkeypatch.setattr(ingest, "RETRY_BASE_SECONDS", 0.2)
    location = str(mri_env / "landing")
    landing = LocalLanding(location)
    for i in range(5):
        landing.write(f"train/glioma/{i}.png", png_bytes(i, size=64))
    with dg.instance_for_test() as instance:
        _, cursor = tick(None, location, instance)
        requests, cursor = tick(cursor, location, instance)
        failed = run_ingest(instance, location, requests[0])
        assert not failed.success
        error = str(failed.get_step_failure_events()[0].event_specific_data.error)
        assert "No space left on device" in error
        with duckdb.connect(str(mri_env / "mri.duckdb"), read_only=True) as conn:
            assert conn.execute("SELECT count(*) FROM landing_ledger").fetchall()[0][0] == 0
        full_disk.unlink()  # the fault clears
        time.sleep(0.3)
        again, cursor = tick(cursor, location, instance)
        assert len(again) == 1
        assert run_ingest(instance, location, again[0]).success
    with duckdb.connect(str(mri_env / "mri.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM landed_images").fetchall()[0][0] == 5


def test_a_failed_base_model_is_tried_again_when_training_scans_land():
    with dg.instance_for_test() as instance:
        pipeline = Pipeline(instance)
        assert pipeline.tick() == {"base_model"}
        pipeline.failing = {"base_model"}
        assert not pipeline.run({"base_model"}).success
        assert pipeline.tick() == set()  # a permanent fault is not retried in a loop
        pipeline.failing = set()
        pipeline.land("train")
        assert pipeline.tick() == {"base_model"}


def test_the_launcher_reports_a_run_worker_killed_with_sigkill():
    with dg.instance_for_test(
        overrides={"run_launcher": {"module": "mri_assets.launcher", "class": "LocalRunLauncher"}}
    ) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, LocalRunLauncher) and launcher.supports_check_run_worker_health
        run = instance.create_run_for_job(dg.GraphDefinition("empty").to_job())
        assert launcher.check_run_worker_health(run).status.value == "RUNNING"  # not started yet
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        from dagster._core.events import EngineEventData

        instance.report_engine_event(
            f"Started process for run (pid: {worker.pid}).",
            run,
            EngineEventData.in_process(worker.pid),
        )
        assert launcher.check_run_worker_health(run).status.value == "RUNNING"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        health = launcher.check_run_worker_health(run)
        assert health.status.value == "FAILED" and f"pid {worker.pid}" in health.msg


def test_a_hanging_s3_endpoint_fails_a_sensor_tick_well_inside_the_sensor_timeout(monkeypatch):
    """An endpoint that accepts connections and never answers. A tick waits at most the attempts
    times the connect and read timeouts of S3_CLIENT_SETTINGS: that bound must end well inside
    Dagster's 60 s sensor timeout. The hang itself runs with a 2 s read timeout (the same code
    path, a fifth of the wait): the tick must take at least both attempts' read timeouts, which
    shows that the settings are the ones that ended it."""
    attempts = S3_CLIENT_SETTINGS["retries"]["total_max_attempts"]
    worst = attempts * (S3_CLIENT_SETTINGS["connect_timeout"] + S3_CLIENT_SETTINGS["read_timeout"])
    assert worst <= 30, S3_CLIENT_SETTINGS
    monkeypatch.setitem(S3_CLIENT_SETTINGS, "read_timeout", 2)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []
    threading.Thread(
        target=lambda: [accepted.append(listener.accept()) for _ in range(8)], daemon=True
    ).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    started = time.monotonic()
    with dg.instance_for_test() as instance, pytest.raises(Exception, match="timeout|timed out"):
        tick(None, "s3://hanging/landing", instance)
    elapsed = time.monotonic() - started
    listener.close()
    assert accepted and attempts * 2 <= elapsed < 30  # Dagster's sensor timeout is 60 s
    print(f"hanging endpoint: tick failed after {elapsed:.1f}s")
