"""The landing zone: a local folder or an S3 prefix, listed and read the same way."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any, Protocol

from mri_assets.core.files import replaced_atomically

SPLITS = ("train", "test")
# Unlabelled scans for the predictions asset: ingested like a split, never trained or tested on.
INBOX = "inbox"
LANDING_FOLDERS = (*SPLITS, INBOX)
# botocore client settings for the landing zone. A sensor tick must end well inside Dagster's
# sensor timeout (60 s) even when the endpoint accepts connections and never answers: each call
# gives up after 2 attempts of at most 3 s to connect and 10 s of silence while reading.
S3_CLIENT_SETTINGS = {
    "connect_timeout": 3,
    "read_timeout": 10,
    "retries": {"total_max_attempts": 2, "mode": "standard"},
}


@dataclass(frozen=True)
class LandedObject:
    """One object in the landing zone; ``key`` is relative to the landing root (``train/a.png``)."""

    key: str
    size: int
    fingerprint: str  # changes whenever the object is rewritten
    # Set when the listing itself shows the entry cannot be used (a link out of the zone, a name
    # that is not UTF-8, a FIFO): it is recorded as rejected without being read.
    reason: str | None = None
    detail: str | None = None

    @property
    def split_folder(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def key_in_split(self) -> str:
        return self.key.split("/", 1)[1] if "/" in self.key else self.key

    @property
    def is_hidden(self) -> bool:
        # .DS_Store, editor swap files and in-progress uploads (``.name.part``) are not scans.
        return any(part.startswith(".") for part in self.key.split("/"))


class Landing(Protocol):
    location: str

    def list_objects(self, split: str) -> Iterator[LandedObject]: ...

    def stat_objects(self, keys: list[str]) -> list[LandedObject]: ...

    def read(self, key: str) -> bytes: ...

    def write(self, key: str, data: bytes) -> None: ...


def listing_digest(objects: list[LandedObject]) -> str:
    """A digest of a listing: equal digests mean nothing was added, rewritten or removed."""
    # One hash over one joined string: the same bytes (so the same digest, and stored sensor
    # cursors stay valid) as one update per object, at a fraction of the cost per object.
    lines = "".join(f"{obj.key}\0{obj.fingerprint}\n" for obj in sorted(objects, key=_key_of))
    return hashlib.sha256(lines.encode()).hexdigest()


def _key_of(obj: LandedObject) -> str:
    return obj.key


class LocalLanding:
    """A landing zone on the local file system (or any mounted volume).

    It never reads outside itself: a link that resolves outside the zone is listed as rejected
    (``outside_landing``), and links inside it are followed (a loop is rejected, not followed)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def list_objects(self, split: str) -> Iterator[LandedObject]:
        """Every entry under ``root/split`` (any depth), with size and a change fingerprint."""
        # Plain strings, not Path objects: building and relativising a Path per file cost more
        # than the stat itself on large listings (see benchmarks/sensor.py).
        root = os.path.join(os.fspath(self.root), "")
        base = root + split
        if not os.path.isdir(base):
            return
        real_root = os.path.join(os.path.realpath(root), "")
        followed: set[str] = set()  # real folders entered through a link: a second visit is a loop
        stack = [base]
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    key = entry.path[len(root) :]
                    if os.sep != "/":
                        key = key.replace(os.sep, "/")
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        yield _local_object(key, entry.stat(follow_symlinks=False))
                    elif entry.is_symlink():
                        followed_folder = self._follow_link(entry, key, real_root, followed)
                        if isinstance(followed_folder, str):
                            stack.append(followed_folder)
                        else:
                            yield followed_folder
                    else:
                        yield _rejected_entry(
                            key,
                            entry.stat(follow_symlinks=False),
                            "not_a_file",
                            "a FIFO, socket or device, not a regular file",
                        )

    def stat_objects(self, keys: list[str]) -> list[LandedObject]:
        """The objects at ``keys`` (relative to the root) that exist, exactly as list_objects
        would give them; a key that is not a plain file is looked up in its split's listing."""
        found, unusual = [], set()
        for key in keys:
            if ".." in key.split("/"):
                continue  # never a key of this zone
            try:
                stat = os.lstat(os.path.join(self.root, key))
            except FileNotFoundError:
                continue
            if S_ISREG(stat.st_mode) and _is_utf8(key):
                found.append(_local_object(key, stat))
            else:  # links, FIFOs, odd names: the listing's rules decide, for these few
                unusual.add(key)
        for split in sorted({key.split("/", 1)[0] for key in unusual}):
            found += [obj for obj in self.list_objects(split) if obj.key in unusual]
        return found

    @staticmethod
    def _follow_link(entry: os.DirEntry, key: str, real_root: str, followed: set[str]):
        """A link's target: a folder path to descend into, or the object to yield."""
        link_stat = entry.stat(follow_symlinks=False)
        target = os.path.realpath(entry.path)
        if not (target + os.sep).startswith(real_root):
            return _rejected_entry(
                key,
                link_stat,
                "outside_landing",
                "a link to a file outside the landing zone; copy the scan into the zone instead",
            )
        try:
            stat = os.stat(target)
        except OSError:
            return _rejected_entry(
                key, link_stat, "broken_link", "a link whose target does not exist"
            )
        if os.path.isdir(target):
            if target in followed:
                return _rejected_entry(
                    key, link_stat, "link_loop", "a link to a folder already listed"
                )
            followed.add(target)
            return entry.path
        if not os.path.isfile(target):
            return _rejected_entry(
                key, link_stat, "not_a_file", "a link to a FIFO, socket or device"
            )
        return _local_object(key, stat)

    def read(self, key: str) -> bytes:
        # Keys come from list_objects, which rejects links that leave the zone; resolving every
        # path again here would cost a stat per folder level of every file read.
        if ".." in key.split("/"):
            raise PermissionError(f"{key} climbs out of the landing zone {self.root}")
        with open(self.root / key, "rb") as handle:
            return handle.read()

    def write(self, key: str, data: bytes) -> None:
        """Write through a hidden temp file and rename, so no listing sees a partial file. The
        temp file ends in ``.part``, a name the landing sensor leaves alone as a copy in
        progress (and no sweep removes: nothing is deleted from the landing zone)."""
        with replaced_atomically(self.root / key, durable=False, suffix=".part") as handle:
            handle.write(data)


def _local_object(key: str, stat: os.stat_result) -> LandedObject:
    # ctime changes on every write or rename, even when a copy keeps mtime.
    fingerprint = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    if not _is_utf8(key):
        return LandedObject(
            _escaped(key),
            stat.st_size,
            fingerprint,
            "bad_file_name",
            "the name is not valid UTF-8 (shown with \\x escapes); rename the file",
        )
    return LandedObject(key, stat.st_size, fingerprint)


def _rejected_entry(key: str, stat: os.stat_result, reason: str, detail: str) -> LandedObject:
    fingerprint = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    return LandedObject(_escaped(key), stat.st_size, fingerprint, reason, detail)


def _is_utf8(name: str) -> bool:
    # os.scandir decodes undecodable bytes to lone surrogates, which no UTF-8 encoder accepts.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(name: str) -> str:
    """The name's bytes as text: valid UTF-8 kept, other bytes as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def parse_s3_location(location: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix/``)."""
    if not location.startswith("s3://"):
        raise ValueError(f"not an S3 location: {location!r}")
    bucket, _, prefix = location[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"MRI_LANDING {location!r} names no bucket; use s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Landing:
    """A landing zone under an S3 prefix; ``client`` is a boto3 S3 client."""

    def __init__(self, client: Any, location: str, page_size: int = 1000) -> None:
        self.client = client
        self.page_size = page_size
        self.location = location
        self.bucket, self.prefix = parse_s3_location(location)

    def list_objects(self, split: str) -> Iterator[LandedObject]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=f"{self.prefix}{split}/",
            PaginationConfig={"PageSize": self.page_size},
        )
        for page in pages:
            for item in page.get("Contents", []):
                obj = self._landed(item)
                if obj is not None:
                    yield obj

    def stat_objects(self, keys: list[str], workers: int = 8) -> list[LandedObject]:
        """The objects at ``keys`` that exist, each from a one-key listing (not HEAD), so its
        fingerprint is exactly the one a full listing gives."""

        def one(key: str) -> LandedObject | None:
            full = f"{self.prefix}{key}"
            reply = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1)
            items = [i for i in reply.get("Contents", []) if i["Key"] == full]
            return self._landed(items[0]) if items else None

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(keys)))) as pool:
            return [obj for obj in pool.map(one, keys) if obj is not None]

    def _landed(self, item: dict) -> LandedObject | None:
        """A listing entry as a LandedObject; None for a console's folder placeholder."""
        key = item["Key"][len(self.prefix) :]
        etag = item.get("ETag", "").strip('"')
        fingerprint = f"{item['Size']}:{etag}:{item['LastModified'].timestamp()}"
        if key.endswith("/"):
            if not item["Size"]:
                return None  # a folder placeholder made by consoles: a folder, not a scan
            return LandedObject(
                key,
                int(item["Size"]),
                fingerprint,
                "not_a_file",
                "an object whose key ends in '/' holds data; give it a file name",
            )
        return LandedObject(key, int(item["Size"]), fingerprint)

    def read(self, key: str) -> bytes:
        response = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}{key}")
        return response["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}{key}", Body=data)
