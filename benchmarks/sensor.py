"""Benchmark 5: landing-sensor tick time on big landing zones, local and S3.

A tick is a real sensor evaluation: ``train_landing_sensor`` from ``mri_assets.defs.ingest``
evaluated through ``dg.build_sensor_context`` with the production resources
(``build_resources(landing=...)``), exactly as the daemon runs it: build the landing resource,
list ``train/``, digest the listing, compare with the cursor. The reference is a bare listing of
the same objects (``os.scandir`` + ``stat``, or a boto3 ``list_objects_v2`` paginator), which
is the least any change detector must do. S3 is moto's standalone server on a loopback port.

With change notifications (MRI_LANDING_QUEUE: S3 events into an SQS queue, moto's server
serves both), the S3 zone's ticks are timed again at each size: an idle tick reads an empty
queue and never lists, so its cost does not depend on the number of objects. The zone is not
grown to a million objects here (hours of uploads to moto); benchmarks/notified_million.py
puts a million objects straight into an in-process moto's backend and times the same tick.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from benchmarks.common import (
    Figure,
    Result,
    RssSampler,
    free_port,
    fresh_dir,
    log,
    main,
    median,
    small_key,
    timed,
)

SIZES = {"quick": (10_000,), "full": (10_000, 100_000)}
NEW = 100
REPEATS = 3
# moto lists ~5,000 objects a second, so a 100,000-object S3 listing takes ~30 s: time it once.
SLOW_LISTING = 50_000
TARGET_SECONDS = 2.0
TARGET_NOTIFIED_SECONDS = 1.0  # idle tick through notifications, for a zone of any size
BUCKET = "bench-landing"
PLACEHOLDER = b"x"  # the sensor only lists, so the objects' bytes do not matter


# --------------------------------------------------------------------------- ticks


def train_sensor():
    from mri_assets.defs.ingest import landing_sensors

    return next(s for s in landing_sensors if s.name == "train_landing_sensor")


@cache
def instance():
    """The Dagster instance the ticks read (the latest raw_train_images materialization, the
    sensor's active runs): in memory, as cheap to query as it gets."""
    import dagster as dg

    return dg.DagsterInstance.ephemeral()


def tick(location: str, home: Path, cursor: str | None):
    """One real evaluation of the train landing sensor; returns (seconds, run requests, cursor)."""
    import dagster as dg

    from mri_assets.definitions import build_resources
    from mri_assets.resources import MriSettingsResource

    sensor = train_sensor()
    started = time.perf_counter()
    resources = build_resources(MriSettingsResource(home=str(home)), landing=location)
    with dg.build_sensor_context(
        cursor=cursor, resources={"landing": resources["landing"]}, instance=instance()
    ) as ctx:
        result = sensor.evaluate_tick(ctx)
    return time.perf_counter() - started, result.run_requests, result.cursor


def record_listing(location: str, home: Path) -> str:
    """What a successful ingest run leaves for the sensor: a raw_train_images materialization
    whose listing_digest is the current listing. Returns that digest."""
    import dagster as dg

    from mri_assets.core.ingest import settled_listing
    from mri_assets.core.landing import listing_digest
    from mri_assets.definitions import build_resources
    from mri_assets.resources import MriSettingsResource

    landing = build_resources(MriSettingsResource(home=str(home)), landing=location)["landing"]
    digest = listing_digest(settled_listing(landing.open().list_objects("train")))
    instance().report_runless_asset_event(
        dg.AssetMaterialization("raw_train_images", metadata={"listing_digest": digest})
    )
    return digest


def settle(location: str, home: Path, cursor: str | None) -> str:
    """Tick until the sensor has requested its run for the current listing (two ticks), then
    record that listing as its run would."""
    for _ in range(3):
        _, requests, cursor = tick(location, home, cursor)
        if requests:
            record_listing(location, home)
            return cursor
    raise RuntimeError("the sensor never requested a run for a settled landing zone")


# --------------------------------------------------------------------------- landing zones


def write_local(root: Path, start: int, stop: int) -> None:
    """Placeholder files ``start..stop`` under ``root`` (class folders, 500 per sub-folder)."""
    made: set[Path] = set()
    for index in range(start, stop):
        path = root / small_key(index)
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(PLACEHOLDER)


def bare_local_listing(root: Path) -> int:
    """The least a local change detector does: walk the tree and stat every file."""
    count, stack = 0, [str(root / "train")]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    entry.stat()
                    count += 1
    return count


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port, with the AWS environment set."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    try:
        _wait_for_port(port, process)
        os.environ.update({**_AWS_ENV, "AWS_ENDPOINT_URL": endpoint})
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": "",
}


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError("moto server exited at start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def s3_client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(max_pool_connections=32)
    )


def write_s3(client, start: int, stop: int) -> None:
    """Placeholder objects ``start..stop`` under ``s3://BUCKET/in/``, 16 uploads at a time."""

    def put(index: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"in/{small_key(index)}", Body=PLACEHOLDER)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, range(start, stop)))


def bare_s3_listing(client) -> int:
    """The least an S3 change detector does: page through ``list_objects_v2`` (1,000 a page)."""
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="in/train/"):
        count += len(page.get("Contents", []))
    return count


# --------------------------------------------------------------------------- one zone, all sizes


def measure_zone(
    kind: str,
    location: str,
    home: Path,
    sizes: tuple[int, ...],
    grow: Callable[[int, int], None],
    bare: Callable[[], int],
    sampler: RssSampler,
    notified: Callable[[int, int, float], list[Figure]] | None = None,
) -> list[Figure]:
    """Grow the zone to each size; time idle ticks, the bare listing, and ticks after 100 new;
    ``notified(size, objects now, bare listing seconds)`` adds the ticks through
    notifications (it lands NEW more objects)."""
    figures, have, cursor = [], 0, None
    for size in sizes:
        seconds, _ = timed(lambda: grow(have, size))  # noqa: B023 - called at once
        log(f"{kind}: landed {size - have:,} placeholder objects in {seconds:.0f}s")
        have = size
        slow = kind == "s3" and size >= SLOW_LISTING
        # A slow listing is done as few times as possible: the settled cursor comes from one
        # listing instead of two ticks, and the tick that requests the run is not repeated.
        cursor = settled_cursor(location, home) if slow else settle(location, home, cursor)
        repeats = 1 if slow else REPEATS
        with sampler.window() as peak:
            idle = [tick(location, home, cursor) for _ in range(repeats)]
        assert not any(requests for _, requests, _ in idle), "an idle tick requested a run"
        listings = [timed(bare) for _ in range(repeats)]
        assert all(count == size for _, count in listings), (size, listings)
        grow(have, have + NEW)
        have += NEW
        detect, requests, cursor = tick(location, home, cursor)
        assert not requests, "a tick that first sees new objects waits for them to settle"
        request = None
        if not slow:
            request, requests, cursor = tick(location, home, cursor)
            assert len(requests) == 1, "100 new objects must give one run request"
        log(
            f"{kind} {size:,}: idle tick {median([t for t, _, _ in idle]):.2f}s, "
            f"bare listing {median([t for t, _ in listings]):.2f}s, 100 new {detect:.2f}s"
        )
        figures += _zone_figures(kind, size, idle, listings, detect, request, peak.mb)
        if notified is not None:
            figures += notified(size, have, median([t for t, _ in listings]))
            have += NEW
    return figures


@contextmanager
def notifications(endpoint: str, client, bucket: str = BUCKET) -> Iterator[str]:
    """S3 event notifications of ``bucket`` into an SQS queue, with MRI_LANDING_QUEUE set;
    yields the queue's URL. Off again afterwards, so growing the zone sends no messages."""
    import boto3

    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    url = sqs.create_queue(QueueName=f"{bucket}-events")["QueueUrl"]
    sqs.purge_queue(QueueUrl=url)
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]
    events = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
    client.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn["QueueArn"], "Events": events}]
        },
    )
    os.environ["MRI_LANDING_QUEUE"] = url
    try:
        yield url
    finally:
        os.environ.pop("MRI_LANDING_QUEUE", None)
        client.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={})


def measure_notified(
    location: str, home: Path, endpoint: str, client, size: int, have: int, bare_s: float
) -> list[Figure]:
    """Idle ticks through notifications on a zone of ``have`` objects (about ``size``), then
    the ticks that see NEW objects land (one message each) and ask for a run of those keys."""
    from mri_assets.defs.ingest import LandingCursor

    with notifications(endpoint, client):
        # A cursor whose reconciling full listing was just asked for and recorded.
        cursor = LandingCursor(listed_at=time.time()).dump()
        idle = [tick(location, home, cursor) for _ in range(REPEATS)]
        assert not any(requests for _, requests, _ in idle), "an idle notified tick asked"
        write_s3(client, have, have + NEW)
        detect, requests, cursor = tick(location, home, cursor)
        assert not requests, "a tick that first sees new objects waits for them to settle"
        request, requests, _ = tick(location, home, cursor)
        assert len(requests) == 1, "100 notified objects must give one run request"
        keys = requests[0].run_config["ops"]["raw_train_images"]["config"]["changed_keys"]
        assert len(keys) == NEW, len(keys)
    idle_s = median([t for t, _, _ in idle])
    log(f"s3 {have:,} notified: idle tick {idle_s:.3f}s, {NEW} new {detect:.2f}s")
    return [
        Figure(
            f"sensor_s3_{size}_notified_idle",
            f"sensor tick, S3 with notifications (SQS), {have:,} objects, nothing new",
            idle_s,
            bare_s,
            "s",
            idle_s / bare_s,
            "tick time / bare listing time",
            target=f"< {TARGET_NOTIFIED_SECONDS:g} s at any size",
            met=idle_s < TARGET_NOTIFIED_SECONDS,
            note=f"median of {len(idle)} ticks: one empty SQS receive, no listing",
        ),
        Figure(
            f"sensor_s3_{size}_notified_new",
            f"sensor tick, S3 with notifications (SQS), {have:,} objects, {NEW} new",
            detect,
            bare_s,
            "s",
            detect / bare_s,
            "tick time / bare listing time",
            note=f"reads {NEW} messages; the next tick, which requests a run of exactly those "
            f"{NEW} keys, took {request:.2f}s",
        ),
    ]


def settled_cursor(location: str, home: Path) -> str:
    """The cursor the sensor holds once the current listing is ingested, from one listing."""
    from mri_assets.defs.ingest import LandingCursor

    digest = record_listing(location, home)
    now = time.time()
    return LandingCursor(digest, now, digest, 1, now).dump()


def _zone_figures(kind, size, idle, listings, detect, request, peak_mb) -> list[Figure]:
    idle_s = median([t for t, _, _ in idle])
    bare_s = median([t for t, _ in listings])
    target = kind == "local" and size >= 100_000
    return [
        Figure(
            f"sensor_{kind}_{size}_idle",
            f"sensor tick, {kind}, {size:,} objects, nothing new",
            idle_s,
            bare_s,
            "s",
            idle_s / bare_s,
            "tick time / bare listing time",
            target=f"< {TARGET_SECONDS:g} s" if target else "",
            met=idle_s < TARGET_SECONDS if target else None,
            peak_rss_mb={"ours": peak_mb},
            note=f"median of {len(idle)} ticks" if len(idle) > 1 else "one tick",
        ),
        Figure(
            f"sensor_{kind}_{size}_new",
            f"sensor tick, {kind}, {size:,} objects, {NEW} new",
            detect,
            bare_s,
            "s",
            detect / bare_s,
            "tick time / bare listing time",
            note="tick that sees them (it waits a tick for them to settle)"
            + (
                f"; the next tick, which requests the run, took {request:.2f}s"
                if request is not None
                else ""
            ),
        ),
    ]


def run(quick: bool, scratch: Path) -> Result:
    """Local and S3 zones, each grown through the mode's sizes."""
    sizes = SIZES["quick" if quick else "full"]
    work = fresh_dir(scratch / "work-sensor")
    result = Result("sensor", "Landing sensor: tick time on big landing zones")
    with RssSampler() as sampler:
        root = work / "landing"
        result.figures += measure_zone(
            "local",
            str(root),
            work / "home",
            sizes,
            lambda a, b: write_local(root, a, b),
            lambda: bare_local_listing(root),
            sampler,
        )
        fresh_dir(root)  # free the inodes before the S3 part
        with moto_server() as endpoint:
            client = s3_client(endpoint)
            client.create_bucket(Bucket=BUCKET)
            result.figures += measure_zone(
                "s3",
                f"s3://{BUCKET}/in",
                work / "home",
                sizes,
                lambda a, b: write_s3(client, a, b),
                lambda: bare_s3_listing(client),
                sampler,
                notified=lambda size, have, bare_s: measure_notified(
                    f"s3://{BUCKET}/in", work / "home", endpoint, client, size, have, bare_s
                ),
            )
    result.params = {"sizes": list(sizes), "new": NEW, "repeats": REPEATS}
    result.notes = [
        "A tick includes building the resources (a boto3 client per tick for S3), listing "
        "train/, the sha256 digest of the sorted listing and the cursor update.",
        "The bare listing keeps nothing: no objects built, no sorting, no digest.",
        "A notified tick (MRI_LANDING_QUEUE) reads the SQS queue and lists nothing; its "
        "figures are taken on the same zone at each size, so a flat time across sizes is the "
        "evidence for any size, 1,000,000 objects included.",
        "S3 figures are dominated by moto's own listing speed (a Python server on this "
        "machine's two cores); a real S3 endpoint lists at a different pace.",
    ]
    shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    raise SystemExit(main(run))
