"""Ingestion of new landing-zone objects: read once, validate, hash, cache pixels, label.

Pure: it reads the landing zone, adds decoded pixels to the pixel cache and returns the rows to
record; the caller writes them to the catalogue in one transaction. Every pixel is on disk before
the rows are returned, so no recorded row can point at pixels a crash lost.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple

import pandas as pd

from mri_assets.core.images import DEFAULT_MAX_PIXELS, ImageRejected, content_hash, decode_image
from mri_assets.core.labels import ClassSpec, resolve_label
from mri_assets.core.landing import LandedObject, Landing
from mri_assets.core.pixel_cache import PackWriter, PixelCache, PixelCacheError

# Files a copy tool is still writing: never read, never recorded; they reappear under their name.
IN_PROGRESS_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download")
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024


class KnownImage(NamedTuple):
    """What the catalogue already knows about accepted content, so it is not decoded again.

    A tuple, not a dataclass: a run builds one per accepted image and a frozen dataclass cost
    ~10 ms per 5,000, most of a small increment's budget."""

    width: int
    height: int
    source_mode: str | None
    source_format: str | None


@dataclass(frozen=True)
class Examined:
    obj: LandedObject
    label: str | None
    sha256: str | None = None
    width: int = 0
    height: int = 0
    source_mode: str | None = None
    source_format: str | None = None
    reason: str | None = None  # set when rejected
    detail: str | None = None
    decoded: bool = False

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass
class IngestBatch:
    """Rows for ``record_ingest`` plus the figures a person wants to see."""

    split: str
    listed: int
    examined: list[Examined] = field(default_factory=list)
    skipped_in_progress: int = 0
    vanished: int = 0
    seconds: float = 0.0
    processed_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc).replace(tzinfo=None))

    @property
    def accepted(self) -> list[Examined]:
        return [e for e in self.examined if e.accepted]

    @property
    def rejected(self) -> list[Examined]:
        return [e for e in self.examined if not e.accepted]

    @property
    def decoded(self) -> int:
        return sum(e.decoded for e in self.examined)

    def rejection_reasons(self) -> dict[str, int]:
        return dict(Counter(e.reason for e in self.rejected))

    def accepted_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "source_key": e.obj.key, "split_folder": self.split, "sha256": e.sha256,
                    "label": e.label, "width": e.width, "height": e.height,
                    "source_mode": e.source_mode, "source_format": e.source_format,
                    "size_bytes": e.obj.size, "processed_at": self.processed_at,
                }
                for e in self.accepted
            ],
            columns=["source_key", "split_folder", "sha256", "label", "width", "height",
                     "source_mode", "source_format", "size_bytes", "processed_at"],
        )

    def rejected_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "source_key": e.obj.key, "split_folder": self.split,
                    "fingerprint": e.obj.fingerprint, "reason": e.reason, "detail": e.detail,
                    "processed_at": self.processed_at,
                }
                for e in self.rejected
            ],
            columns=["source_key", "split_folder", "fingerprint", "reason", "detail", "processed_at"],
        )

    def ledger_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "source_key": e.obj.key, "split_folder": self.split,
                    "fingerprint": e.obj.fingerprint,
                    "outcome": "accepted" if e.accepted else "rejected",
                    "processed_at": self.processed_at,
                }
                for e in self.examined
            ],
            columns=["source_key", "split_folder", "fingerprint", "outcome", "processed_at"],
        )


def is_in_progress(obj: LandedObject) -> bool:
    """True for a file a copy tool is still writing (``*.part``, ``*.tmp``, ...)."""
    # The suffix of the key is the suffix of its file name: no need to split off the folders
    # (the sensor calls this for every object of every listing).
    return obj.key.lower().endswith(IN_PROGRESS_SUFFIXES)


def new_or_changed(objects: Iterable[LandedObject], ledger: dict[str, str]) -> list[LandedObject]:
    """Objects never processed, or rewritten since (their fingerprint changed)."""
    return [obj for obj in objects if ledger.get(obj.key) != obj.fingerprint]


def examine_object(
    landing: Landing,
    obj: LandedObject,
    classes: ClassSpec,
    cache: PixelCache,
    writer: PackWriter,
    known: dict[str, KnownImage],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Examined:
    """Decide one object's fate; reads it at most once and decodes only content never seen.

    Decoded pixels go to ``writer`` (a batch of ``cache``); they are on disk once it is flushed.
    """
    if obj.is_hidden:
        return Examined(obj, None, reason="hidden_file", detail="hidden or system file, not a scan")
    label = resolve_label(obj.key_in_split, classes)
    if label is None:
        return Examined(
            obj, None, reason="unknown_label",
            detail=f"neither a folder nor the file name starts with a class name {list(classes.names)}",
        )
    if obj.size > max_file_bytes:
        return Examined(obj, label, reason="too_large",
                        detail=f"{obj.size:,} bytes exceeds the {max_file_bytes:,}-byte limit")
    data = landing.read(obj.key)
    sha = content_hash(data) if data else None
    if sha is not None and sha in known and cache.has(sha):
        info = known[sha]
        return Examined(obj, label, sha, info.width, info.height, info.source_mode, info.source_format)
    try:
        image = decode_image(data, max_pixels=max_pixels, sha256=sha)
    except ImageRejected as rejection:
        return Examined(obj, label, sha, reason=rejection.reason, detail=rejection.detail, decoded=True)
    writer.put(image.sha256, image.pixels)
    return Examined(
        obj, label, image.sha256, image.width, image.height, image.source_mode,
        image.source_format, decoded=True,
    )


def default_workers(landing: Landing) -> int:
    cores = os.cpu_count() or 1
    # Object-store reads wait on the network; local decodes want one thread per core.
    return max(8, 2 * cores) if landing.location.startswith("s3://") else cores


def ingest_new_objects(
    landing: Landing,
    split: str,
    ledger: dict[str, str],
    known: dict[str, KnownImage],
    classes: ClassSpec,
    cache: PixelCache,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> IngestBatch:
    """List one split, examine every new or rewritten object, and return the batch to record.

    ``ledger`` maps already-processed keys to their fingerprints; ``known`` maps accepted sha256s
    to their image facts. An object that disappears between listing and reading is left for the
    next run rather than recorded. The pixels of every accepted object are in ``cache`` (its packs
    flushed) when this returns, so recording the batch afterwards is safe.
    """
    started = time.perf_counter()
    listed = list(landing.list_objects(split))
    batch = IngestBatch(split=split, listed=len(listed))
    candidates = []
    for obj in new_or_changed(listed, ledger):
        if is_in_progress(obj):
            batch.skipped_in_progress += 1
        else:
            candidates.append(obj)

    def examine(obj: LandedObject) -> Examined | None:
        try:
            return examine_object(landing, obj, classes, cache, writer, known, max_pixels)
        except FileNotFoundError:
            return None
        except PixelCacheError:
            raise  # the cache, not this object, failed (and maybe lost others' pixels): fail the batch
        except Exception as error:  # noqa: BLE001 - one bad object must never sink the batch
            if _is_missing_object(error):
                return None
            return Examined(obj, None, reason="unreadable", detail=f"{type(error).__name__}: {error}")

    with cache.writer() as writer:
        pool = ThreadPoolExecutor(max_workers=workers or default_workers(landing))
        try:
            for done, result in enumerate(pool.map(examine, candidates), start=1):
                if result is None:
                    batch.vanished += 1
                else:
                    batch.examined.append(result)
                if on_progress:
                    on_progress(done, len(candidates))
        finally:
            # On a failure (or a cancelled run), objects not yet started are dropped rather
            # than read and decoded for a batch that will not be recorded.
            pool.shutdown(wait=True, cancel_futures=True)
    batch.seconds = time.perf_counter() - started
    return batch


def _is_missing_object(error: Exception) -> bool:
    response = getattr(error, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return code in {"NoSuchKey", "404"}
