"""Durable state in an S3 bucket (MRI_STORE=s3://bucket/prefix): the few calls the model store and
the caches need, with conditional writes, and errors that name the object and what to do.

Conditional writes (``If-Match``/``If-None-Match`` on PutObject, offered by S3 since 2024 and by
moto's server) give one winner when two writers race for the same object: the loser's request
is refused with ``412 Precondition Failed`` and nothing it sent is stored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mri_assets.core.files import replaced_atomically
from mri_assets.core.landing import S3_CLIENT_SETTINGS, parse_s3_location

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class ObjectStoreError(OSError):
    """An S3 call failed (unreachable endpoint, denied, timed out): never a statement about the
    data, so the caller fails and a retry tries again."""


class WriteConflict(ObjectStoreError):
    """A conditional write lost: the object changed (or appeared) since it was read."""


def default_s3_client() -> Any:
    """A boto3 S3 client from the environment (AWS_ENDPOINT_URL, AWS_* keys and region), with
    the landing zone's bounded waits, so an unreachable store fails a call in seconds."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", config=Config(**S3_CLIENT_SETTINGS))


class S3Objects:
    """Objects under ``s3://bucket/prefix``; keys given to its methods are relative to it."""

    def __init__(self, client: Any, location: str) -> None:
        self.client = client
        self.location = location.rstrip("/")
        self.bucket, self.prefix = parse_s3_location(location)

    def child(self, folder: str) -> S3Objects:
        """The same bucket, one folder down (``models``, ``pixels``)."""
        return S3Objects(self.client, f"{self.location}/{folder.strip('/')}")

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def put_bytes(
        self, key: str, data: bytes, *, if_match: str | None = None, if_absent: bool = False
    ) -> str:
        """Store ``data`` at ``key``; returns the new ETag. ``if_match``: only over the object
        with that ETag; ``if_absent``: only if no object is there. A lost condition raises
        WriteConflict and stores nothing."""
        extra: dict[str, str] = {}
        if if_match is not None:
            extra["IfMatch"] = if_match
        if if_absent:
            extra["IfNoneMatch"] = "*"
        try:
            response = self._call(
                "write", key, self.client.put_object, Key=self._key(key), Body=data, **extra
            )
        except _Missing as missing:  # If-Match on an object that is gone: it changed too
            raise WriteConflict(f"{self.url(key)} was removed while it was being updated") from (
                missing
            )
        return response["ETag"]

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> str:
        with open(path, "rb") as handle:
            return self.put_bytes(key, handle.read(), if_absent=if_absent)

    def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        """(content, ETag) of ``key``, or None when there is no such object."""
        try:
            response = self._call("read", key, self.client.get_object, Key=self._key(key))
            return response["Body"].read(), response["ETag"]
        except _Missing:
            return None

    def download(self, key: str, target: Path) -> bool:
        """Copy ``key`` to ``target`` through a temp file and a rename (never half a file);
        False when there is no such object."""
        found = self.get_bytes(key)
        if found is None:
            return False
        with replaced_atomically(target, durable=False) as handle:
            handle.write(found[0])
        return True

    def exists(self, key: str) -> bool:
        try:
            self._call("check", key, self.client.head_object, Key=self._key(key))
            return True
        except _Missing:
            return False

    def list_keys(self, folder: str = "") -> list[str]:
        """Every key under ``folder`` (relative to this store), in S3's (sorted) order."""
        keys: list[str] = []
        start = self._key(folder)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            )
            for page in pages:
                keys += [item["Key"][len(self.prefix) :] for item in page.get("Contents", [])]
        except Exception as error:  # noqa: BLE001 - botocore's errors share no useful base
            raise self._failure("list", folder, error) from error
        return keys

    def list_ages(self, folder: str = "") -> dict[str, float]:
        """Every key under ``folder`` with its age in seconds (from the server's clock)."""
        ages: dict[str, float] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(folder)
            )
            now = time.time()
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) :]
                    ages[key] = now - item["LastModified"].timestamp()
        except Exception as error:  # noqa: BLE001 - botocore's errors share no useful base
            raise self._failure("list", folder, error) from error
        return ages

    def delete(self, keys: list[str]) -> None:
        """Remove ``keys`` (a missing one is no error)."""
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self._call("delete", keys[start], self.client.delete_objects, Delete={"Objects": batch})

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _call(self, action: str, key: str, method, **kwargs):
        try:
            return method(Bucket=self.bucket, **kwargs)
        except Exception as error:  # noqa: BLE001 - translated below, the original chained
            code = _error_code(error)
            if code in _MISSING_CODES:
                raise _Missing from error
            if code in _CONFLICT_CODES:
                raise WriteConflict(
                    f"{self.url(key)} changed while it was being updated "
                    "(another writer got there first)"
                ) from error
            raise self._failure(action, key, error) from error

    def _failure(self, action: str, key: str, error: Exception) -> ObjectStoreError:
        return ObjectStoreError(
            f"could not {action} {self.url(key)}: {type(error).__name__}: {error}. Check that "
            "the endpoint (AWS_ENDPOINT_URL) answers and MRI_STORE names a bucket you may "
            "write, then try again"
        )


class _Missing(Exception):
    """No object at the key (404): an answer, not a failure."""


def _error_code(error: Exception) -> str | None:
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(code) if code else (str(status) if status else None)
