"""A process that promotes the same version many times into an S3 model store: the racing
writer of test_store_s3. Kept apart from the tests so a spawned process imports no torch."""

from __future__ import annotations

import boto3
from botocore.config import Config

from mri_assets.core.object_store import S3Objects
from mri_assets.core.store import ModelStore, ModelStoreError


def promote_many(endpoint, bucket, cache, version, worker, rounds, start) -> tuple[list, int]:
    """Promote ``version`` ``rounds`` times after ``start`` (a barrier); returns the reasons
    of the promotions told they won, and how many were told they lost the race."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(),
    )
    store = ModelStore(cache, S3Objects(client, f"s3://{bucket}/mri").child("models"))
    won, lost = [], 0
    start.wait()
    for attempt in range(rounds):
        reason = f"{worker}-{attempt}"
        try:
            store.promote(version, 0.9, "s1", reason)
            won.append(reason)
        except ModelStoreError as error:
            assert "another promotion or rollback won" in str(error), error
            lost += 1
    return won, lost
