import os

import boto3
import dagster as dg
import pytest

from mri_assets.core.landing import LocalLanding, S3Landing
from mri_assets.defs import ingest
from mri_assets.defs.ingest import LandingCursor, evaluate_landing, landing_sensors
from mri_assets_tests.conftest import png_bytes
from mri_assets_tests.defs.helpers import resources_for

TRAIN_SENSOR = next(s for s in landing_sensors if s.name == "train_landing_sensor")


def tick(cursor, landing_location):
    """One sensor evaluation, as the daemon would run it; returns (run requests, next cursor)."""
    resources = {"landing": resources_for(landing=landing_location)["landing"]}
    with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
        result = TRAIN_SENSOR.evaluate_tick(context)
    return result.run_requests, result.cursor


def settle(cursor, location):
    """Ticks until the sensor requests or stops changing its mind (at most three)."""
    requests = []
    for _ in range(3):
        requests, cursor = tick(cursor, location)
        if requests:
            break
    return requests, cursor


@pytest.fixture(params=["local", "s3"])
def landing_zone(request, tmp_path):
    if request.param == "local":
        return LocalLanding(tmp_path / "landing"), str(tmp_path / "landing")
    bucket = request.getfixturevalue("s3_bucket")
    location = f"s3://{bucket}/in"
    return S3Landing(boto3.client("s3"), location, page_size=10), location


def test_sensor_requests_once_per_change_and_nothing_when_idle(landing_zone):
    landing, location = landing_zone
    requests, cursor = tick(None, location)
    assert requests == []  # empty folder
    for i in range(25):  # many objects in the same second, over several listing pages
        landing.write(f"train/glioma/{i}.png", png_bytes(i, size=8))
    first, cursor = tick(cursor, location)
    assert first == []  # waits one tick for the upload to settle
    requests, cursor = tick(cursor, location)
    assert len(requests) == 1 and requests[0].tags["mri/landing_objects"] == "25"
    assert tick(cursor, location)[0] == []  # nothing new: nothing requested

    # A restart re-reads the stored cursor: still nothing to do.
    assert tick(LandingCursor.parse(cursor).dump(), location)[0] == []

    landing.write("train/glioma/25.png", png_bytes(25, size=8))
    landing.write("train/glioma/3.png", png_bytes(300, size=8))  # rewritten in place
    requests, cursor = settle(cursor, location)
    assert len(requests) == 1 and requests[0].run_key != first
    assert requests[0].tags["mri/landing_objects"] == "26"


def test_in_progress_files_do_not_trigger(tmp_path):
    landing = LocalLanding(tmp_path)
    landing.write("train/glioma/1.png", png_bytes(1))
    _, cursor = settle(None, str(tmp_path))
    (tmp_path / "train" / "glioma" / ".2.png.abc.part").write_bytes(b"half")
    assert settle(cursor, str(tmp_path))[0] == []


def test_local_copy_preserving_old_mtime_is_still_seen(tmp_path):
    landing = LocalLanding(tmp_path)
    landing.write("train/glioma/1.png", png_bytes(1))
    _, cursor = settle(None, str(tmp_path))
    old = tmp_path / "train" / "glioma" / "old.png"
    old.write_bytes(png_bytes(2))
    os.utime(old, ns=(0, 0))
    assert len(settle(cursor, str(tmp_path))[0]) == 1


def test_a_landing_that_never_settles_is_ingested_after_the_limit():
    cursor = LandingCursor("old", "a", 1000.0)
    cursor, request = evaluate_landing(cursor, "b", 1010.0)
    assert not request and cursor.seen_since == 1000.0
    cursor, request = evaluate_landing(cursor, "c", 1000.0 + ingest.MAX_SETTLE_SECONDS)
    assert request and cursor.ingested == "c"
