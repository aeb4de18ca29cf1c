"""Landing sensors driven by S3 event notifications through SQS (MRI_LANDING_QUEUE), against
moto's server over HTTP: a tick reads only what is new, a run looks only at the notified keys,
and a periodic full listing reconciles what a lost notification missed."""

import json
import time

import boto3
import dagster as dg
import pytest

from mri_assets.core.ingest import EmptyListingRefused
from mri_assets.core.landing import S3Landing
from mri_assets.core.landing_events import LandingChange, changes_in_message
from mri_assets.defs import ingest
from mri_assets.defs.ingest import (
    LandingCursor,
    forget_recorded,
    landing_sensors,
    notified_request,
)
from mri_assets_tests.conftest import png_bytes
from mri_assets_tests.defs.helpers import resources_for

TRAIN_SENSOR = next(s for s in landing_sensors if s.name == "train_landing_sensor")


def s3_event(bucket: str, key: str, name: str = "ObjectCreated:Put", etag: str = "e1") -> str:
    record = {
        "eventName": name,
        "eventTime": "2026-11-29T20:00:00.000Z",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "eTag": etag}},
    }
    return json.dumps({"Records": [record]})


def test_a_notification_names_the_landing_key_and_nothing_else() -> None:
    location = "s3://scans/in"
    assert changes_in_message(s3_event("scans", "in/train/Glioma+T2/a+b%281%29.png"), location) == (
        LandingChange(
            "train/Glioma T2/a b(1).png", False, "ObjectCreated:Put:e1:2026-11-29T20:00:00.000Z"
        ),
    )
    removed = changes_in_message(
        s3_event("scans", "in/test/x.png", "ObjectRemoved:Delete"), location
    )
    assert removed[0].removed and removed[0].split == "test"
    for ignored in (
        s3_event("other-bucket", "in/train/a.png"),
        s3_event("scans", "elsewhere/train/a.png"),
        s3_event("scans", "in/validation/a.png"),
        json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"}),
        "not json",
    ):
        assert changes_in_message(ignored, location) == ()


def test_changes_wait_in_the_cursor_until_a_run_covering_them_is_recorded() -> None:
    change = LandingChange("train/a.png", False, "t1")
    cursor, digest = notified_request(LandingCursor(), [], now=100.0, full_listing_seconds=60)
    assert digest.startswith("full:")  # the first tick reconciles with a full listing
    cursor = ingest._requested(cursor, digest, 1, 100.0)
    cursor = forget_recorded(cursor, recorded=digest)
    assert cursor.full_listing == "" and cursor.pending == {}

    cursor, digest = notified_request(cursor, [change], now=110.0, full_listing_seconds=60)
    assert digest.startswith("events:") and cursor.pending == {"train/a.png": "t1"}
    cursor = ingest._requested(replace_covered(cursor), digest, 1, 110.0)
    # Notified again while its run ran: the newer change stays pending.
    cursor, _ = notified_request(cursor, [LandingChange("train/a.png", False, "t2")], 115.0, 60)
    cursor = forget_recorded(cursor, recorded=digest)
    assert cursor.pending == {"train/a.png": "t2"}
    cursor = forget_recorded(cursor, recorded="something else")  # a failed run: kept
    assert cursor.pending == {"train/a.png": "t2"}

    cursor, digest = notified_request(cursor, [], now=171.0, full_listing_seconds=60)
    assert digest.startswith("full:")  # due again after the interval


def test_a_flood_of_notifications_becomes_one_full_listing() -> None:
    changes = [LandingChange(f"train/{i}.png", False, "t") for i in range(5)]
    cursor, digest = notified_request(
        LandingCursor(listed_at=100.0), changes, now=110.0, full_listing_seconds=600, max_keys=3
    )
    assert digest.startswith("full:") and cursor.pending == {}


def replace_covered(cursor: LandingCursor) -> LandingCursor:
    from dataclasses import replace

    return replace(cursor, covered=dict(cursor.pending))


@pytest.fixture
def notified_zone(s3_bucket, moto_server, monkeypatch, mri_env):
    """An S3 landing zone whose bucket notifies an SQS queue, with MRI_LANDING_QUEUE set."""
    sqs = boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName=s3_bucket)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    s3.put_bucket_notification_configuration(
        Bucket=s3_bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": arn["Attributes"]["QueueArn"],
                    "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
                }
            ]
        },
    )
    monkeypatch.setenv("MRI_LANDING_QUEUE", queue_url)
    location = f"s3://{s3_bucket}/in"
    return S3Landing(s3, location), location, sqs, queue_url


def tick(cursor, location, instance):
    resources = {"landing": resources_for(landing=location)["landing"]}
    with dg.build_sensor_context(cursor=cursor, resources=resources, instance=instance) as context:
        result = TRAIN_SENSOR.evaluate_tick(context)
    return result.run_requests, result.cursor


def settle(cursor, location, instance):
    for _ in range(3):
        requests, cursor = tick(cursor, location, instance)
        if requests:
            return requests[0], cursor
    pytest.fail("the sensor never asked for a run")


def run(instance, location, request):
    return dg.materialize(
        [ingest.raw_image_assets[0]],
        resources=resources_for(landing=location),
        instance=instance,
        run_config=request.run_config,
        tags=dict(request.tags),
    )


def waiting_messages(sqs, queue_url) -> int:
    attributes = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return sum(int(v) for v in attributes.values())


def test_notified_keys_alone_are_looked_at_and_messages_go_once_recorded(notified_zone):
    landing, location, sqs, queue_url = notified_zone
    with dg.instance_for_test() as instance:
        landing.write("train/glioma/old.png", png_bytes(0, size=8))
        landing.write("test/glioma/other-split.png", png_bytes(9, size=8))
        request, cursor = settle(None, location, instance)
        assert request.tags["mri/landing_changes"] == "full listing"  # first tick reconciles
        first = run(instance, location, request)
        assert (
            first.asset_materializations_for_node("raw_train_images")[0]
            .metadata["new_accepted"]
            .value
            == 1
        )

        landing.write("train/meningioma/new.png", png_bytes(1, size=8))
        landing.client.delete_object(
            Bucket=landing.bucket, Key=f"{landing.prefix}train/glioma/old.png"
        )
        request, cursor = settle(cursor, location, instance)
        config = request.run_config["ops"]["raw_train_images"]["config"]
        assert config["changed_keys"] == ["train/glioma/old.png", "train/meningioma/new.png"]
        metadata = (
            run(instance, location, request)
            .asset_materializations_for_node("raw_train_images")[0]
            .metadata
        )
        assert metadata["looked_at"].value == "2 notified keys"
        assert metadata["objects_listed"].value == 1  # one lookup found, not a listing
        assert metadata["new_accepted"].value == 1 and metadata["removed"].value == 1

        requests, cursor = tick(cursor, location, instance)
        assert requests == []
        requests, cursor = tick(cursor, location, instance)  # deletes what the last one read
        assert requests == [] and LandingCursor.parse(cursor).pending == {}
        # Only the test split's notification is left, for the test sensor.
        assert waiting_messages(sqs, queue_url) == 1


def test_a_run_that_fails_leaves_the_changes_pending_and_is_asked_again(notified_zone, monkeypatch):
    landing, location, sqs, queue_url = notified_zone
    with dg.instance_for_test() as instance:
        request, cursor = settle(None, location, instance)
        assert run(instance, location, request).success  # the first full listing (empty)
        landing.write("train/glioma/a.png", png_bytes(2, size=8))
        request, cursor = settle(cursor, location, instance)
        with monkeypatch.context() as patched:
            patched.setattr(ingest, "ingest_new_objects", _fail_at_once)
            failed = dg.materialize(
                [ingest.raw_image_assets[0]],
                resources=resources_for(landing=location),
                instance=instance,
                run_config=request.run_config,
                raise_on_error=False,
            )
        assert not failed.success
        just_now = json.dumps({**json.loads(cursor), "requested_at": time.time()})
        requests, cursor = tick(just_now, location, instance)
        state = LandingCursor.parse(cursor)
        assert requests == [] and list(state.pending) == ["train/glioma/a.png"]
        # The backoff elapsed: the same changes are asked for again.
        cursor = json.dumps({**json.loads(cursor), "requested_at": 0.0})
        requests, cursor = tick(cursor, location, instance)
        assert len(requests) == 1 and requests[0].run_config == request.run_config
        assert run(instance, location, requests[0]).success


def _fail_at_once(*args, **kwargs):
    # Refused without step retries, so the test does not wait them out.
    raise EmptyListingRefused("stands for any failure of the run")
