"""Decoded pixels stored once per content hash, so no image is decoded twice.

Layout under ``root``::

    packs/<uuid>.pack   raw array bytes of many images, back to back
    packs/<uuid>.idx    JSON: sha256 -> offset, shape, dtype of each array in the pack

Creating a file has a fixed cost whatever its size, which made one file per image the larger
part of ingest; a pack holds a whole ingest chunk. The index is the commit point: the
data is written first, then the index through a temp file and a rename, so a pack without an
index (a crash mid-write) is simply ignored; both files and the folder are fsynced before the
rename, so the rows DuckDB records afterwards never outlive their pixels, even across a power
loss. Pack names are uuids, so any number of processes can add packs without coordination.

A writer holds a lock on its pack's data file until the index is in place, so the next
``writer()`` (in any process) removes the data and temp files of writers that were killed, and
never those of a writer still at work (see core/files.py).

With a ``remote`` (MRI_STORE=s3://...) every pack is also an object, written once under its
uuid: the data first, then the index, which is again the commit point; both are in the bucket
before the local index is, so rows recorded afterwards never point at pixels only one machine
holds. Another machine reads the remote indexes it has not seen and downloads a pack the first
time one of its images is read.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mri_assets.core.files import (
    LEFTOVER_GRACE_SECONDS,
    fsync_file,
    held_for_writing,
    remove_if_abandoned,
    replaced_atomically,
    sweep_temp_files,
)
from mri_assets.core.object_store import ObjectStoreError, S3Objects

log = logging.getLogger(__name__)

PACK_FORMAT = 1
PACK_MAX_IMAGES = 64  # ~12 MB at 256 px: small enough that the last pack's fsync is short
PACK_MAX_BYTES = 64 * 1024 * 1024
# Raw bytes are only ever read back as plain numbers: never objects, never pickle.
_NUMERIC_KINDS = "biuf"
_RECOVER = (
    "delete it and its .idx file, then rewrite (touch, or upload again) the landed files it "
    "held so the next ingest decodes them again"
)


class PixelCacheError(OSError):
    """The cache itself failed: an ingest batch must fail whole rather than blame one object."""


class CorruptPack(PixelCacheError):
    """A pack's data file is shorter than its index says (truncated or overwritten)."""


class PackWriteFailed(PixelCacheError):
    """A pack could not be written (disk full, permissions, out of memory): the whole ingest
    batch must fail, since the images buffered with it were already reported as examined."""


class CacheUnreadable(PixelCacheError):
    """The packs folder cannot be listed (permissions, a stale network mount)."""


@dataclass(frozen=True)
class PackEntry:
    """Where one array lives: its pack data file, byte offset, shape and dtype."""

    data: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class PixelCache:
    """The (H, W, 3) uint8 RGB pixels of each sha256, in packs (see the module docstring)."""

    def __init__(self, root: str | Path, remote: S3Objects | None = None) -> None:
        self.root = Path(root)
        self.packs = self.root / "packs"
        self.remote = remote  # the bucket's pixels/ folder; root is then its cache
        self._entries: dict[str, PackEntry] = {}
        self._indexes_read: set[str] = set()
        self._lock = threading.Lock()

    def has(self, sha256: str) -> bool:
        return self._locate(sha256) is not None

    def put(self, sha256: str, pixels: np.ndarray) -> None:
        """Store one image (a pack of one); ingest uses ``writer()`` to pack many at once."""
        with self.writer() as writer:
            writer.put(sha256, pixels)

    @contextmanager
    def writer(
        self, max_images: int = PACK_MAX_IMAGES, max_bytes: int = PACK_MAX_BYTES
    ) -> Iterator[PackWriter]:
        """A thread-safe batched writer; every image put is on disk when the block exits
        normally. On an exception the images not yet flushed are dropped (nothing records them).
        Leftovers of killed writers are swept first; ``writer.swept`` lists them."""
        swept = self.sweep_leftovers()
        self.refresh()  # so content another process already packed is not packed again
        writer = PackWriter(self, max_images, max_bytes)
        writer.swept = swept
        try:
            yield writer
        except BaseException:
            writer.abandon()
            raise
        writer.flush()

    def sweep_leftovers(self, grace_seconds: float = LEFTOVER_GRACE_SECONDS) -> list[Path]:
        """Remove pack data files that never got their index, and index temp files, left by
        writers that were killed (no live writer holds their lock) more than ``grace_seconds``
        ago. Returns the paths removed (and logs them)."""
        try:
            names = set(os.listdir(self.packs))
        except FileNotFoundError:
            return []
        except OSError as error:
            raise CacheUnreadable(
                f"cannot list the pixel cache's packs in {self.packs}: {error}"
            ) from error
        swept = []
        for name in sorted(
            n for n in names if n.endswith(".pack") and f"{n[:-5]}.idx" not in names
        ):
            data, index = self.packs / name, self.packs / f"{name[:-5]}.idx"
            # Asked again under the lock: the writer may have committed since the listing.
            if remove_if_abandoned(data, data, grace_seconds, lambda i=index: not i.exists()):
                swept.append(data)
        swept += sweep_temp_files(self.packs, grace_seconds)
        if swept:
            log.warning(
                "removed %d leftover(s) of pixel-cache writers that were killed: %s",
                len(swept),
                ", ".join(str(p) for p in swept),
            )
        return swept

    def get(self, sha256: str) -> np.ndarray:
        return self.get_many([sha256])[0]

    def get_many(self, sha256s: Iterable[str]) -> list[np.ndarray]:
        """Arrays in the order asked; each pack file is opened once and read in offset order."""
        wanted = list(sha256s)
        found: dict[int, np.ndarray] = {}
        by_pack: dict[Path, list[tuple[int, PackEntry]]] = {}
        if any(sha not in self._entries for sha in wanted):
            self.refresh()  # once per call, not once per miss
        for position, sha in enumerate(wanted):
            entry = self._entries.get(sha)
            if entry is not None:
                by_pack.setdefault(entry.data, []).append((position, entry))
            else:
                raise KeyError(
                    f"no cached pixels for sha256 {sha} under {self.root}; touch or upload again "
                    "the landed file that holds it, so the next ingest decodes it again"
                )
        for data, entries in by_pack.items():
            self._fetch_pack(data)
            try:
                handle = open(data, "rb")  # noqa: SIM115 - closed below; the error needs the name
            except FileNotFoundError as error:
                raise CorruptPack(
                    f"pixel-cache pack {data} is missing but indexed; {_RECOVER}"
                ) from error
            with handle:
                for position, entry in sorted(entries, key=lambda item: item[1].offset):
                    found[position] = _read_array(handle, entry)
        return [found[position] for position in range(len(wanted))]

    def _locate(self, sha256: str) -> PackEntry | None:
        entry = self._entries.get(sha256)
        if entry is None:
            # Other processes add packs while we run: a miss reads the indexes not yet seen.
            self.refresh()
            entry = self._entries.get(sha256)
        return entry

    def _fetch_pack(self, data: Path) -> None:
        """Download a pack known from a remote index the first time it is read here."""
        if self.remote is None or data.exists():
            return
        try:
            self.remote.download(f"packs/{data.name}", data)
        except ObjectStoreError as error:
            raise PixelCacheError(f"could not fetch pixel-cache pack {data.name}: {error}") from (
                error
            )

    def refresh(self) -> None:
        """Read every pack index not read yet (cheap when there is none); with a remote, the
        bucket's indexes not read yet are downloaded first."""
        if self.remote is not None:
            self._refresh_remote()
        with self._lock:
            try:
                names = [e.name for e in os.scandir(self.packs) if e.name.endswith(".idx")]
            except FileNotFoundError:
                return
            except OSError as error:
                raise CacheUnreadable(
                    f"cannot list the pixel cache's packs in {self.packs}: {error}"
                ) from error
            for name in names:
                if name not in self._indexes_read:
                    self._entries.update(self._read_index(self.packs / name))
                    self._indexes_read.add(name)

    def _refresh_remote(self) -> None:
        try:
            keys = self.remote.list_keys("packs/")
            for key in keys:
                name = key.rsplit("/", 1)[-1]
                if name.endswith(".idx") and name not in self._indexes_read:
                    target = self.packs / name
                    if not target.exists():
                        self.remote.download(key, target)
        except ObjectStoreError as error:
            raise CacheUnreadable(f"cannot read the remote pixel cache: {error}") from error

    def _read_index(self, path: Path) -> dict[str, PackEntry]:
        """The entries of one index; a corrupt one is skipped with a warning (its images are
        decoded again on the next ingest that needs them)."""
        try:
            index = json.loads(path.read_bytes())
            if index["format"] != PACK_FORMAT:
                raise ValueError(f"format {index['format']!r}, expected {PACK_FORMAT}")
            data = self.packs / Path(index["data"]).name
            entries = {}
            for sha, offset, shape, dtype_name in index["entries"]:
                dtype = np.dtype(dtype_name)
                if dtype.kind not in _NUMERIC_KINDS:
                    raise ValueError(f"dtype {dtype_name!r} is not a plain number type")
                dims = tuple(int(n) for n in shape)
                if int(offset) < 0 or any(n < 0 for n in dims):
                    raise ValueError(f"negative offset or shape for {sha}")
                entries[sha] = PackEntry(data, int(offset), dims, dtype)
            return entries
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning(
                "ignoring pixel-cache pack index %s: %s: %s", path, type(error).__name__, error
            )
            return {}

    def _add(self, entries: dict[str, PackEntry], index_name: str) -> None:
        with self._lock:
            self._entries.update(entries)
            self._indexes_read.add(index_name)


def _read_array(handle, entry: PackEntry) -> np.ndarray:
    array = np.empty(entry.shape, dtype=entry.dtype)
    handle.seek(entry.offset)
    got = handle.readinto(memoryview(array).cast("B"))
    if got != entry.nbytes:
        raise CorruptPack(
            f"pixel-cache pack {entry.data} is truncated: {entry.nbytes} bytes expected at "
            f"offset {entry.offset}, {got} found; {_RECOVER}"
        )
    return array


class PackWriter:
    """Buffers decoded images and writes a pack every ``max_images`` images or ``max_bytes``.

    Packs are written and fsynced by one background thread: the fsync waits on the disk, not a
    core, so decoding goes on meanwhile instead of waiting for each pack's fsync.
    """

    def __init__(self, cache: PixelCache, max_images: int, max_bytes: int) -> None:
        self.cache = cache
        self.max_images = max_images
        self.max_bytes = max_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixel-packs")
        self._writes: list[Future] = []
        self.swept: list[Path] = []  # leftovers of killed writers removed before this one began

    def put(self, sha256: str, pixels: np.ndarray) -> None:
        """Buffer one image (called from worker threads); a full buffer becomes a pack."""
        self._raise_if_a_write_failed()
        array = np.ascontiguousarray(pixels, dtype=np.uint8)
        with self._lock:
            # Only what this process already knows: a duplicate across packs is harmless.
            if sha256 in self._pending or sha256 in self.cache._entries:
                return
            self._pending[sha256] = array
            self._pending_bytes += array.nbytes
            if len(self._pending) >= self.max_images or self._pending_bytes >= self.max_bytes:
                self._writes.append(self._io.submit(self._write_pack, self._take()))

    def flush(self) -> None:
        """Write what is buffered and wait until every pack is on disk (raises if one is not)."""
        with self._lock:
            if self._pending:
                self._writes.append(self._io.submit(self._write_pack, self._take()))
        self._io.shutdown(wait=True)
        for write in self._writes:
            write.result()

    def abandon(self) -> None:
        """Drop what is buffered and wait for writes in flight (the batch is failing anyway)."""
        with self._lock:
            self._take()
        self._io.shutdown(wait=True, cancel_futures=True)

    def _raise_if_a_write_failed(self) -> None:
        for write in [w for w in self._writes if w.done()]:
            write.result()

    def _take(self) -> dict[str, np.ndarray]:
        pending, self._pending, self._pending_bytes = self._pending, {}, 0
        return pending

    def _write_pack(self, arrays: dict[str, np.ndarray]) -> None:
        packs = self.cache.packs
        name = uuid.uuid4().hex
        data = packs / f"{name}.pack"
        entries, rows, offset = {}, [], 0
        try:
            packs.mkdir(parents=True, exist_ok=True)
            # Locked until the index is in place: only then is the pack no leftover.
            with held_for_writing(data):
                with open(data, "wb") as handle:
                    for sha, array in arrays.items():
                        handle.write(memoryview(array).cast("B"))
                        entries[sha] = PackEntry(data, offset, array.shape, array.dtype)
                        rows.append([sha, offset, list(array.shape), array.dtype.name])
                        offset += array.nbytes
                    fsync_file(handle)
                # The index is the commit point; its rename and the pack's entry are fsynced
                # with it.
                with replaced_atomically(packs / f"{name}.idx", "w") as handle:
                    index = {"format": PACK_FORMAT, "data": data.name, "entries": rows}
                    text = json.dumps(index)
                    remote = self.cache.remote
                    if remote is not None:  # in the bucket before it is committed here
                        remote.put_file(f"packs/{data.name}", data, if_absent=True)
                        remote.put_bytes(f"packs/{name}.idx", text.encode(), if_absent=True)
                    handle.write(text)
        except Exception as error:  # any failure (disk, memory) loses every image of this pack
            _discard(data)
            raise PackWriteFailed(
                f"could not write a pixel-cache pack under {packs}: {type(error).__name__}: "
                f"{error}; free space or fix permissions there and re-run the ingest"
            ) from error
        except BaseException:
            _discard(data)
            raise
        self.cache._add(entries, f"{name}.idx")


def _discard(data: Path) -> None:
    """Best-effort removal of a failed pack's data (the original error is the one to report)."""
    with suppress(OSError):
        data.unlink(missing_ok=True)
