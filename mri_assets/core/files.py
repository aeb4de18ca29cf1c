"""Writing files so that a reader, or a crash, never sees half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


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
def replaced_atomically(target: Path, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """A temp file beside ``target``, renamed over it when the block succeeds, so readers see the
    old file or the new one. ``durable``: the file and then its folder are fsynced, so the new
    file also survives a power loss."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            if durable:
                fsync_file(handle)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(target.parent)
