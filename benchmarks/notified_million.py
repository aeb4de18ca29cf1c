"""Issue 10's target: a landing-sensor tick with nothing new, on an S3 zone of 1,000,000 objects,
through change notifications (MRI_LANDING_QUEUE), under 1 s.

    python -m benchmarks.notified_million [--objects N] [--json OUT]

benchmarks/sensor.py times the same tick at 10,000 and 100,000 objects, uploaded over HTTP.
A million uploads to moto take hours, so here moto's server runs in this process
(ThreadedMotoServer) and the placeholder objects are put straight into its S3 backend. From
then on everything goes over HTTP as in production: the zone's size is checked with a listing
page and a HEAD of the last key, the sensor's tick reads the SQS queue through boto3, and the
tick that follows NEW uploads must ask for a run of exactly those keys.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import free_port, log, median, small_key
from benchmarks.sensor import (
    _AWS_ENV,
    BUCKET,
    NEW,
    REPEATS,
    TARGET_NOTIFIED_SECONDS,
    notifications,
    s3_client,
    tick,
    write_s3,
)

OBJECTS = 1_000_000


def fill_backend(count: int) -> None:
    """``count`` placeholder objects under ``s3://BUCKET/in/``, written into moto's backend."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import FakeKey, s3_backends

    bucket = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[BUCKET]
    for index in range(count):
        name = f"in/{small_key(index)}"
        bucket.keys[name] = FakeKey(
            name, b"x", account_id=DEFAULT_ACCOUNT_ID, region_name="us-east-1", bucket_name=BUCKET
        )


def run(objects: int) -> dict:
    from moto.server import ThreadedMotoServer

    from mri_assets.defs.ingest import LandingCursor

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({**_AWS_ENV, "AWS_ENDPOINT_URL": endpoint})
    try:
        client = s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        started = time.perf_counter()
        fill_backend(objects)
        log(f"{objects:,} objects put into moto's backend in {time.perf_counter() - started:.1f}s")
        # Over HTTP: the zone really holds them (first page full, last key there).
        page = client.list_objects_v2(Bucket=BUCKET, Prefix="in/train/")
        assert page["KeyCount"] == 1000 and page["IsTruncated"], page["KeyCount"]
        client.head_object(Bucket=BUCKET, Key=f"in/{small_key(objects - 1)}")
        location = f"s3://{BUCKET}/in"
        with tempfile.TemporaryDirectory() as home, notifications(endpoint, client):
            cursor = LandingCursor(listed_at=time.time()).dump()
            idle = [tick(location, Path(home), cursor) for _ in range(REPEATS)]
            assert not any(requests for _, requests, _ in idle), "an idle notified tick asked"
            write_s3(client, objects, objects + NEW)
            detect, requests, cursor = tick(location, Path(home), cursor)
            request, requests, _ = tick(location, Path(home), cursor)
            keys = requests[0].run_config["ops"]["raw_train_images"]["config"]["changed_keys"]
            assert len(requests) == 1 and len(keys) == NEW, (len(requests), len(keys))
    finally:
        server.stop()
    idle_s = median([seconds for seconds, _, _ in idle])
    result = {
        "objects": objects,
        "idle_tick_seconds": round(idle_s, 4),
        "idle_ticks": [round(seconds, 4) for seconds, _, _ in idle],
        "target_seconds": TARGET_NOTIFIED_SECONDS,
        "met": idle_s < TARGET_NOTIFIED_SECONDS,
        "tick_reading_new_messages_seconds": round(detect, 3),
        "tick_requesting_the_run_seconds": round(request, 3),
        "new_keys_requested": len(keys),
    }
    log(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=OBJECTS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.objects)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
