"""Writing files so that a reader, or a crash, never sees half of one; and cleaning up after a
writer that was killed before it could clean up itself.

A writer holds an exclusive ``flock`` on what it is writing for as long as it writes; the kernel
drops the lock when the process dies, ``kill -9`` included. A sweeper therefore removes a leftover
only when it can take that lock without waiting, and only when the leftover is older than a short
grace period, which covers the instant between a writer creating a file and locking it. Locks are
also recorded per process, because on a network filesystem ``flock`` may be emulated with POSIX
locks, which never conflict within one process (and one thread's sweep must not remove another
thread's pack).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

# How old an unlocked leftover must be before a sweep removes it. A live writer locks what it
# creates within microseconds; a minute covers a stalled scheduler many times over.
LEFTOVER_GRACE_SECONDS = 60.0
TEMP_SUFFIX = ".tmp"

_held: set[str] = set()  # paths this process holds a writer's lock on
_held_guard = threading.Lock()


def fsync_file(handle: IO) -> None:
    """Push ``handle``'s data to the disk, not just to the kernel."""
    handle.flush()
    os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    """Persist the entries (new files, renames) of ``folder``; not every filesystem allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replaced_atomically(
    target: Path, mode: str = "wb", durable: bool = True, suffix: str = TEMP_SUFFIX
) -> Iterator[IO]:
    """A temp file beside ``target``, renamed over it when the block succeeds, so readers see the
    old file or the new one. ``durable``: the file and then its folder are fsynced, so the new
    file also survives a power loss. The temp file (``.<name>.<random><suffix>``) stays locked
    until it is renamed, so ``sweep_temp_files`` never takes it from a live writer; it sweeps
    only the default ``.tmp`` suffix."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, mode) as handle, _locked_fd(handle.fileno(), tmp):
            yield handle
            if durable:
                fsync_file(handle)
            # Renamed before the handle closes, i.e. while still locked: a sweeper that gets the
            # lock afterwards finds no temp file left to remove.
            os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(target.parent)


@contextlib.contextmanager
def lock_exclusively(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created with its folder if missing, never
    truncated) until the block exits, waiting while another process or thread holds it. The
    kernel drops the lock when the process dies, so a killed holder never blocks the next."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


@contextlib.contextmanager
def held_for_writing(path: Path) -> Iterator[None]:
    """Hold a writer's lock on ``path`` (created if missing, never truncated) until the block
    exits, so a sweep in any process leaves it alone. Create ``path`` right before entering:
    until it is locked only the grace period protects it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        with _locked_fd(fd, path):
            yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked_fd(fd: int, path: str | Path) -> Iterator[None]:
    key = os.path.abspath(path)
    with _held_guard:
        _held.add(key)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh file: nobody else holds it
        yield
    finally:
        with _held_guard:
            _held.discard(key)


def remove_if_abandoned(
    leftover: Path,
    lock: Path,
    grace_seconds: float = LEFTOVER_GRACE_SECONDS,
    still_leftover: Callable[[], bool] = lambda: True,
) -> bool:
    """Remove ``leftover`` (a file or folder) if no live writer holds ``lock`` and it was last
    modified more than ``grace_seconds`` ago; True when it was removed.

    A missing ``lock`` counts as free (a writer killed before it made one); the grace period
    then decides alone. ``still_leftover`` is asked while the lock is held, for writers that
    release their lock once their work is committed (a pack whose index now exists).
    """
    with _held_guard:
        if os.path.abspath(lock) in _held or os.path.abspath(leftover) in _held:
            return False
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    except OSError:
        return False  # unreadable: not ours to judge
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    return False  # a live writer
                raise
        # Checked only now, under the lock: a writer that finished (renamed or committed) between
        # our listing and the lock must not lose its result.
        try:
            modified = leftover.lstat().st_mtime
        except FileNotFoundError:
            return False
        if time.time() - modified < grace_seconds or not still_leftover():
            return False
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
            return not leftover.exists()
        leftover.unlink(missing_ok=True)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def sweep_temp_files(folder: Path, grace_seconds: float = LEFTOVER_GRACE_SECONDS) -> list[Path]:
    """Remove the temp files of ``replaced_atomically`` calls killed in ``folder``; returns them."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(TEMP_SUFFIX)]
    except FileNotFoundError:
        return []
    return [
        folder / name
        for name in sorted(names)
        if remove_if_abandoned(folder / name, folder / name, grace_seconds)
    ]
