"""Ingestion of new landing-zone objects: read once, validate, hash, cache pixels, label.

Pure: it reads the landing zone, adds decoded pixels to the pixel cache and returns the rows to
record; the caller writes them to the catalogue in one transaction. Every pixel is on disk before
the rows are returned, so no recorded row can point at pixels a crash lost.

Every listed entry ends in exactly one place: accepted, rejected with a reason (content the
pipeline cannot use), removed (gone from the landing zone), or ``failed``: an I/O, network or
resource error that says nothing about the content. Failed objects are not recorded, so the next
run reads them again; the caller records the rest and then fails the run so that it is retried.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pandas as pd

from mri_assets.core import catalog
from mri_assets.core.catalog import KnownImage
from mri_assets.core.images import (
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    MemoryBudget,
    content_hash,
    decode_image,
)
from mri_assets.core.labels import ClassSpec, resolve_label
from mri_assets.core.landing import LandedObject, Landing, listing_digest
from mri_assets.core.pixel_cache import PackWriter, PixelCache, PixelCacheError

# Files a copy tool is still writing: never read, never recorded; they reappear under their name.
IN_PROGRESS_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download")
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
# After this many I/O failures in one run the landing zone itself is failing (an S3 outage, a
# full disk): the objects not yet read are left for the retry instead of each waiting out its own
# network timeout.
MAX_FAILURES_PER_RUN = 8


def default_decode_memory_bytes() -> int:
    """Bytes that decodes in flight may hold at once: a quarter of the machine's memory, at most
    1 GiB (a 256 px slice needs under 1 MB; a 50 MP image about 550 MB, so it decodes alone)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 4 << 30
    return min(1 << 30, physical // 4)


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
    pixel_sha256: str | None = None
    perceptual_hash: str | None = None
    dicom: dict | None = None  # non-identifying DICOM fields (core/dicom.DicomFields)

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class FailedRead:
    """An object that could not be examined for a reason outside its content; read again later."""

    obj: LandedObject
    error: str


@dataclass
class IngestBatch:
    """Rows for ``record_ingest`` plus the figures a person wants to see."""

    split: str
    listed: int
    examined: list[Examined] = field(default_factory=list)
    failed: list[FailedRead] = field(default_factory=list)
    not_tried: int = 0  # left for the retry once MAX_FAILURES_PER_RUN was reached
    removed: list[str] = field(default_factory=list)  # keys gone from the landing zone
    skipped_in_progress: int = 0
    vanished: int = 0  # deleted between listing and reading: recorded as removed on the next run
    recorded_digest: str = ""  # listing digest of what this batch leaves recorded
    seconds: float = 0.0
    processed_at: datetime = field(
        default_factory=lambda: datetime.now(timezone.utc).replace(tzinfo=None)
    )

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
        columns = [
            "source_key",
            "split_folder",
            "sha256",
            "label",
            "width",
            "height",
            "source_mode",
            "source_format",
            "size_bytes",
            "processed_at",
            "pixel_sha256",
            "perceptual_hash",
            *DICOM_COLUMNS,
        ]
        return pd.DataFrame(
            [
                (
                    e.obj.key,
                    self.split,
                    e.sha256,
                    e.label,
                    e.width,
                    e.height,
                    e.source_mode,
                    e.source_format,
                    e.obj.size,
                    self.processed_at,
                    e.pixel_sha256,
                    e.perceptual_hash,
                    *dicom_values(e.dicom),
                )
                for e in self.accepted
            ],
            columns=columns,
        )

    def rejected_frame(self) -> pd.DataFrame:
        columns = ["source_key", "split_folder", "fingerprint", "reason", "detail", "processed_at"]
        return pd.DataFrame(
            [
                (e.obj.key, self.split, e.obj.fingerprint, e.reason, e.detail, self.processed_at)
                for e in self.rejected
            ],
            columns=columns,
        )

    def ledger_frame(self) -> pd.DataFrame:
        columns = ["source_key", "split_folder", "fingerprint", "outcome", "processed_at"]
        return pd.DataFrame(
            [
                (
                    e.obj.key,
                    self.split,
                    e.obj.fingerprint,
                    "accepted" if e.accepted else "rejected",
                    self.processed_at,
                )
                for e in self.examined
            ],
            columns=columns,
        )

    def removed_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "source_key": self.removed,
                "split_folder": self.split,
                "removed_at": self.processed_at,
            }
        )

    def record(self, conn) -> None:
        """Write this batch to the catalogue in one transaction (catalog.record_ingest)."""
        catalog.record_ingest(
            conn,
            self.accepted_frame(),
            self.rejected_frame(),
            self.ledger_frame(),
            self.removed_frame(),
        )

    def failure_summary(self, limit: int = 5) -> str:
        shown = "; ".join(f"{f.obj.key}: {f.error}" for f in self.failed[:limit])
        more = len(self.failed) - limit
        return shown + (f"; and {more} more" if more > 0 else "")


# The DICOM fields the catalogue keeps: none identifies a patient (see core/dicom.py).
DICOM_COLUMNS = ("modality", "series_description", "pixel_spacing_mm", "series_uid_sha256")


def dicom_values(fields: dict | None) -> tuple:
    """The DICOM_COLUMNS values of one image (all None for other formats)."""
    if not fields:
        return (None,) * len(DICOM_COLUMNS)
    spacing = fields.get("pixel_spacing")
    return (
        fields.get("modality"),
        fields.get("series_description"),
        "x".join(f"{v:g}" for v in spacing) if spacing else None,
        fields.get("series_uid_sha256"),
    )


def is_in_progress(obj: LandedObject) -> bool:
    """True for a file a copy tool is still writing (``*.part``, ``*.tmp``, ...)."""
    # The suffix of the key is the suffix of its file name: no need to split off the folders
    # (the sensor calls this for every object of every listing).
    return obj.key.lower().endswith(IN_PROGRESS_SUFFIXES)


def settled_listing(objects: Iterable[LandedObject]) -> list[LandedObject]:
    """The listing without files a copy tool is still writing: what the sensor digests."""
    return [obj for obj in objects if not is_in_progress(obj)]


def new_or_changed(objects: Iterable[LandedObject], ledger: dict[str, str]) -> list[LandedObject]:
    """Objects never processed, or rewritten since (their fingerprint changed)."""
    return [obj for obj in objects if ledger.get(obj.key) != obj.fingerprint]


@dataclass(frozen=True)
class ExamineContext:
    """What examining one object needs besides the object: shared by every worker of a batch."""

    landing: Landing
    classes: ClassSpec
    cache: PixelCache
    writer: PackWriter
    known: dict[str, KnownImage]
    memory: MemoryBudget
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    needs_label: bool = True  # False for the inbox: scans there are to be classified


def examine_object(obj: LandedObject, ctx: ExamineContext) -> Examined:
    """Decide one object's fate; reads it at most once and decodes only content never seen.

    Decoded pixels go to ``ctx.writer``; they are on disk once it is flushed. Errors that are
    not about the content (I/O, network, memory) propagate: they are not rejections.
    """
    if obj.reason:
        return Examined(obj, None, reason=obj.reason, detail=obj.detail)
    if obj.is_hidden:
        return Examined(obj, None, reason="hidden_file", detail="hidden or system file, not a scan")
    label = resolve_label(obj.key_in_split, ctx.classes) if ctx.needs_label else None
    if label is None and ctx.needs_label:
        names = list(ctx.classes.names)
        return Examined(
            obj,
            None,
            reason="unknown_label",
            detail=f"neither a folder nor the file name starts with a class name {names}",
        )
    if obj.size > ctx.max_file_bytes:
        return Examined(
            obj,
            label,
            reason="too_large",
            detail=f"{obj.size:,} bytes exceeds the {ctx.max_file_bytes:,}-byte limit",
        )
    data = ctx.landing.read(obj.key)
    sha = content_hash(data) if data else None
    if sha is not None and sha in ctx.known and ctx.cache.has(sha):
        info = ctx.known[sha]
        return Examined(
            obj,
            label,
            sha,
            info.width,
            info.height,
            info.source_mode,
            info.source_format,
            pixel_sha256=info.pixel_sha256,
            perceptual_hash=info.perceptual_hash,
        )
    try:
        image = decode_image(
            data, max_pixels=ctx.max_pixels, sha256=sha, memory=ctx.memory, key=obj.key
        )
    except ImageRejected as rejection:
        return Examined(
            obj, label, sha, reason=rejection.reason, detail=rejection.detail, decoded=True
        )
    ctx.writer.put(image.sha256, image.pixels)
    return Examined(
        obj,
        label,
        image.sha256,
        image.width,
        image.height,
        image.source_mode,
        image.source_format,
        decoded=True,
        pixel_sha256=image.pixel_sha256,
        perceptual_hash=image.perceptual_hash,
        dicom=image.dicom,
    )


def default_workers(landing: Landing) -> int:
    cores = os.cpu_count() or 1
    # Object-store reads wait on the network; local decodes want one thread per core.
    return max(8, 2 * cores) if landing.location.startswith("s3://") else cores


class EmptyListingRefused(RuntimeError):
    """The split lists nothing although objects were ingested from it: more likely an unmounted
    volume or a wrong MRI_LANDING than every scan withdrawn, so nothing is removed."""


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
    memory: MemoryBudget | None = None,
    keys: list[str] | None = None,
) -> IngestBatch:
    """List one split, examine every new or rewritten object, and return the batch to record.

    ``ledger`` maps already-processed keys to their fingerprints; ``known`` maps accepted sha256s
    to their image facts. Keys in ``ledger`` that are no longer listed are returned in
    ``removed``. The pixels of every accepted object are in ``cache`` (its packs flushed) when
    this returns, so recording the batch afterwards is safe. ``on_progress(done, total)`` is
    called from this thread as objects finish.

    ``keys``: only these keys changed (change notifications said so): they alone are looked up,
    instead of listing the split, and those gone are removed. ``recorded_digest`` is then empty:
    a digest of part of the zone would say nothing about the whole.
    """
    started = time.perf_counter()
    if keys is not None:
        wanted = sorted({key for key in keys if key.split("/", 1)[0] == split})
        listed = landing.stat_objects(wanted)
    else:
        listed = list(landing.list_objects(split))
    settled = settled_listing(listed)
    if keys is None and not settled and ledger:
        raise EmptyListingRefused(
            f"{landing.location}/{split}/ lists no files, but {len(ledger)} were ingested from it. "
            "Nothing was removed: check that the volume is mounted and MRI_LANDING is right."
        )
    batch = IngestBatch(split=split, listed=len(listed))
    batch.skipped_in_progress = len(listed) - len(settled)
    listed_keys = {obj.key for obj in settled}
    looked_at = ledger if keys is None else [k for k in wanted if k in ledger]
    batch.removed = sorted(key for key in looked_at if key not in listed_keys)
    candidates = new_or_changed(settled, ledger)
    outcomes = _examine_all(
        candidates,
        landing=landing,
        classes=classes,
        cache=cache,
        known=known,
        max_pixels=max_pixels,
        workers=workers or default_workers(landing),
        on_progress=on_progress,
        memory=memory or MemoryBudget(default_decode_memory_bytes()),
        needs_label=split != catalog.INBOX,
    )
    unrecorded = set()
    for obj, outcome in zip(candidates, outcomes, strict=True):
        if isinstance(outcome, Examined):
            batch.examined.append(outcome)
        elif isinstance(outcome, FailedRead):
            batch.failed.append(outcome)
            unrecorded.add(obj.key)
        elif outcome is _VANISHED:
            batch.vanished += 1
        else:
            batch.not_tried += 1
            unrecorded.add(obj.key)
    if keys is None:
        batch.recorded_digest = listing_digest([o for o in settled if o.key not in unrecorded])
    batch.seconds = time.perf_counter() - started
    return batch


_VANISHED = object()  # deleted between listing and reading
_NOT_TRIED = object()  # skipped after too many failures in this run


def _examine_all(
    candidates,
    *,
    landing,
    classes,
    cache,
    known,
    max_pixels,
    workers,
    on_progress,
    memory,
    needs_label=True,
) -> list:
    """One outcome per candidate, in order: Examined, FailedRead, _VANISHED or _NOT_TRIED."""
    failures = 0
    stop = threading.Event()
    lock = threading.Lock()

    def examine(obj: LandedObject):
        nonlocal failures
        if stop.is_set():
            return _NOT_TRIED
        try:
            return examine_object(obj, ctx)
        except FileNotFoundError:
            return _VANISHED
        except PixelCacheError:
            raise  # the cache, not this object, failed (and maybe lost others' pixels): fail all
        except Exception as error:  # noqa: BLE001 - I/O, network, memory: not the content's fault
            if _is_missing_object(error):
                return _VANISHED
            with lock:
                failures += 1
                if failures >= MAX_FAILURES_PER_RUN:
                    stop.set()
            return FailedRead(obj, f"{type(error).__name__}: {error}")

    outcomes = []
    with cache.writer() as writer:
        ctx = ExamineContext(
            landing, classes, cache, writer, known, memory, max_pixels, needs_label=needs_label
        )
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            for done, outcome in enumerate(pool.map(examine, candidates), start=1):
                outcomes.append(outcome)
                if on_progress:
                    on_progress(done, len(candidates))
        finally:
            # On a failure (or a cancelled run), objects not yet started are dropped rather
            # than read and decoded for a batch that will not be recorded.
            pool.shutdown(wait=True, cancel_futures=True)
    return outcomes


def _is_missing_object(error: Exception) -> bool:
    response = getattr(error, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return code in {"NoSuchKey", "404"}
