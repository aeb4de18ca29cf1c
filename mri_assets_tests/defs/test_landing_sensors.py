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


def tick(cursor, landing_location, instance=None):
    """One sensor evaluation, as the daemon would run it; returns (run requests, next cursor)."""
    resources = {"landing": resources_for(landing=landing_location)["landing"]}
    with dg.build_sensor_context(cursor=cursor, resources=resources, instance=instance) as context:
        result = TRAIN_SENSOR.evaluate_tick(context)
    return result.run_requests, result.cursor


def settle(cursor, location, instance):
    """Ticks until the sensor requests or stops changing its mind (at most three)."""
    requests = []
    for _ in range(3):
        requests, cursor = tick(cursor, location, instance)
        if requests:
            break
    return requests, cursor


def run_ingest(instance, location, request=None):
    """The run the sensor asked for: a real materialization of raw_train_images."""
    return dg.materialize(
        [ingest.raw_image_assets[0]],
        resources=resources_for(landing=location),
        instance=instance,
        tags=dict(request.tags) if request else None,
        raise_on_error=False,
    )


@pytest.fixture
def instance(mri_env):
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture(params=["local", "s3"])
def landing_zone(request, tmp_path):
    if request.param == "local":
        return LocalLanding(tmp_path / "landing"), str(tmp_path / "landing")
    bucket = request.getfixturevalue("s3_bucket")
    location = f"s3://{bucket}/in"
    return S3Landing(boto3.client("s3"), location, page_size=10), location


def test_sensor_requests_once_per_change_and_nothing_when_idle(landing_zone, instance):
    landing, location = landing_zone
    requests, cursor = tick(None, location, instance)
    assert requests == []  # empty folder
    for i in range(25):  # many objects in the same second, over several listing pages
        landing.write(f"train/glioma/{i}.png", png_bytes(i, size=8))
    first, cursor = tick(cursor, location, instance)
    assert first == []  # waits one tick for the upload to settle
    requests, cursor = tick(cursor, location, instance)
    assert len(requests) == 1 and requests[0].tags["mri/landing_objects"] == "25"
    assert run_ingest(instance, location, requests[0]).success
    assert tick(cursor, location, instance)[0] == []  # recorded: nothing requested

    # A restart re-reads the stored cursor: still nothing to do.
    assert tick(LandingCursor.parse(cursor).dump(), location, instance)[0] == []

    landing.write("train/glioma/25.png", png_bytes(25, size=8))
    landing.write("train/glioma/3.png", png_bytes(300, size=8))  # rewritten in place
    again, cursor = settle(cursor, location, instance)
    assert len(again) == 1 and again[0].run_key != requests[0].run_key
    assert again[0].tags["mri/landing_objects"] == "26"


def test_in_progress_files_do_not_trigger(tmp_path, instance):
    landing = LocalLanding(tmp_path)
    landing.write("train/glioma/1.png", png_bytes(1))
    _, cursor = settle(None, str(tmp_path), instance)
    assert run_ingest(instance, str(tmp_path)).success
    (tmp_path / "train" / "glioma" / ".2.png.abc.part").write_bytes(b"half")
    assert settle(cursor, str(tmp_path), instance)[0] == []


def test_local_copy_preserving_old_mtime_is_still_seen(tmp_path, instance):
    landing = LocalLanding(tmp_path)
    landing.write("train/glioma/1.png", png_bytes(1))
    _, cursor = settle(None, str(tmp_path), instance)
    assert run_ingest(instance, str(tmp_path)).success
    old = tmp_path / "train" / "glioma" / "old.png"
    old.write_bytes(png_bytes(2))
    os.utime(old, ns=(0, 0))
    assert len(settle(cursor, str(tmp_path), instance)[0]) == 1


def test_a_landing_that_never_settles_is_ingested_after_the_limit():
    cursor = LandingCursor(seen="a", seen_since=1000.0, requested="old", attempts=1)
    cursor, decision = evaluate_landing(cursor, "b", "old", False, 1010.0)
    assert not decision.request and cursor.seen_since == 1000.0
    cursor, decision = evaluate_landing(
        cursor, "c", "old", False, 1000.0 + ingest.MAX_SETTLE_SECONDS
    )
    assert decision.request and cursor.requested == "c" and cursor.attempts == 1


def test_a_listing_not_recorded_is_requested_again_with_backoff_then_given_up():
    cursor, decision = evaluate_landing(LandingCursor(seen="d"), "d", None, False, 0.0)
    assert decision.request and cursor.attempts == 1
    now, asked = 0.0, [0.0]
    while now < 10_000:
        now += 1
        cursor, decision = evaluate_landing(cursor, "d", "older", False, now)
        if decision.request:
            asked.append(now)
    assert len(asked) == ingest.MAX_ATTEMPTS
    waits = [b - a for a, b in zip(asked, asked[1:], strict=False)]
    assert waits == [ingest.RETRY_BASE_SECONDS * 2**i for i in range(len(waits))]
    assert "gave up" in decision.reason
    # While a run is going on nothing is asked; a new listing starts afresh at attempt 1.
    assert not evaluate_landing(cursor, "e", "older", True, now + 1)[1].request
    cursor, _ = evaluate_landing(cursor, "e", "older", False, now + 1)
    cursor, decision = evaluate_landing(cursor, "e", "older", False, now + 2)
    assert decision.request and cursor.attempts == 1
    assert evaluate_landing(cursor, "e", "e", False, now + 3)[1].reason == "nothing new"


def test_an_earlier_releases_cursor_is_read():
    cursor = LandingCursor.parse('{"ingested": "x", "seen": "y", "seen_since": 3.0}')
    assert (cursor.seen, cursor.seen_since, cursor.attempts) == ("y", 3.0, 0)
