import json
import logging
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mri_assets.core import pixel_cache
from mri_assets.core.pixel_cache import (
    CacheUnreadable,
    CorruptPack,
    PackWriteFailed,
    PixelCache,
)


def sha(i: int) -> str:
    return f"{i:064x}"


def image(i: int, size: int = 4) -> np.ndarray:
    return np.full((size, size + 1, 3), i % 256, dtype=np.uint8)


def write(cache: PixelCache, indices, max_images: int = 3) -> None:
    with cache.writer(max_images=max_images) as writer:
        for i in indices:
            writer.put(sha(i), image(i))


def test_writer_packs_many_images_per_file_and_reads_them_back_in_order(tmp_path):
    cache = PixelCache(tmp_path)
    write(cache, range(7), max_images=3)
    assert len(list(tmp_path.glob("packs/*.idx"))) == 3  # 3 + 3 + the flush of 1
    order = [5, 0, 6, 3]
    got = PixelCache(tmp_path).get_many(sha(i) for i in order)
    for i, array in zip(order, got, strict=True):
        np.testing.assert_array_equal(array, image(i))
    assert got[0].flags.writeable
    assert not list(tmp_path.rglob("*.tmp"))


def test_threads_share_one_writer(tmp_path):
    cache = PixelCache(tmp_path)
    with cache.writer(max_images=5) as writer:
        threads = [
            threading.Thread(
                target=lambda t=t: [writer.put(sha(i), image(i)) for i in range(t, 60, 4)]
            )
            for t in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    fresh = PixelCache(tmp_path)
    assert all(fresh.has(sha(i)) for i in range(60))
    np.testing.assert_array_equal(fresh.get(sha(59)), image(59))


def test_a_failed_batch_writes_nothing_it_had_not_flushed(tmp_path):
    cache = PixelCache(tmp_path)
    with pytest.raises(RuntimeError), cache.writer(max_images=2) as writer:
        for i in range(3):
            writer.put(sha(i), image(i))
        raise RuntimeError("the ingest failed")
    fresh = PixelCache(tmp_path)
    assert fresh.has(sha(0)) and fresh.has(sha(1))  # a full pack was already committed
    assert not fresh.has(sha(2))


def test_a_pack_without_index_is_ignored(tmp_path):
    cache = PixelCache(tmp_path)
    write(cache, [1])
    (tmp_path / "packs" / "orphan.pack").write_bytes(b"\0" * 100)  # a crash before the index
    (tmp_path / "packs" / ".orphan.idx.tmp").write_text("{")
    fresh = PixelCache(tmp_path)
    assert fresh.has(sha(1)) and not fresh.has(sha(2))


@pytest.mark.parametrize(
    "index",
    [
        "{not json",
        json.dumps({"format": 99, "data": "x.pack", "entries": []}),
        json.dumps({"format": 1, "data": "x.pack"}),
        json.dumps({"format": 1, "data": "x.pack", "entries": [[sha(2), 0, [1], "object"]]}),
        json.dumps({"format": 1, "data": "x.pack", "entries": [[sha(2), 0]]}),
        json.dumps({"format": 1, "data": "x.pack", "entries": [[sha(2), -5, [1], "uint8"]]}),
    ],
    ids=["not-json", "unknown-format", "no-entries", "object-dtype", "short-entry", "negative"],
)
def test_a_corrupt_index_is_ignored_with_a_warning(tmp_path, caplog, index):
    cache = PixelCache(tmp_path)
    write(cache, [1])
    (tmp_path / "packs" / "x.pack").write_bytes(b"\0" * 100)
    (tmp_path / "packs" / "x.idx").write_text(index)
    fresh = PixelCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mri_assets.core.pixel_cache"):
        assert not fresh.has(sha(2))
    assert "x.idx" in caplog.text
    np.testing.assert_array_equal(fresh.get(sha(1)), image(1))
    with pytest.raises(KeyError, match="upload again"):
        fresh.get(sha(2))


def test_a_truncated_pack_raises_a_clear_error(tmp_path):
    cache = PixelCache(tmp_path)
    write(cache, range(3), max_images=3)
    [data] = (tmp_path / "packs").glob("*.pack")
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(CorruptPack, match=f"{data.name} is truncated.*delete it"):
        PixelCache(tmp_path).get_many([sha(0), sha(1), sha(2)])


def test_a_missing_pack_data_file_raises_a_clear_error(tmp_path):
    cache = PixelCache(tmp_path)
    write(cache, [1])
    [data] = (tmp_path / "packs").glob("*.pack")
    data.unlink()
    with pytest.raises(CorruptPack, match=f"{data.name} is missing.*touch"):
        PixelCache(tmp_path).get(sha(1))


def test_a_pack_that_cannot_be_written_fails_loudly_and_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pixel_cache.os, "replace", disk_full)
    cache = PixelCache(tmp_path)
    with pytest.raises(PackWriteFailed, match="No space left"):
        cache.put(sha(1), image(1))
    monkeypatch.undo()
    assert not cache.has(sha(1)) and not PixelCache(tmp_path).has(sha(1))
    assert list((tmp_path / "packs").iterdir()) == []  # the half-written pack was removed


def test_a_packs_path_that_cannot_be_listed_fails_loudly(tmp_path):
    tmp_path.joinpath("packs").write_text("a file where the packs folder should be")
    with pytest.raises(CacheUnreadable, match="cannot list"):
        PixelCache(tmp_path).put(sha(1), image(1))
    with pytest.raises(CacheUnreadable, match="cannot list"):
        PixelCache(tmp_path).has(sha(1))


def test_packs_added_later_are_found_by_an_open_cache(tmp_path):
    reader = PixelCache(tmp_path)
    write(PixelCache(tmp_path), [1])
    assert reader.has(sha(1))
    write(PixelCache(tmp_path), [2])  # another process, after the reader's first look
    np.testing.assert_array_equal(reader.get(sha(2)), image(2))


def _write_in_a_process(root: str, start: int) -> None:
    write(PixelCache(root), range(start, start + 20), max_images=6)


def test_two_processes_writing_at_once_both_land(tmp_path):
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        list(pool.map(_write_in_a_process, [str(tmp_path)] * 2, [0, 100]))
    cache = PixelCache(tmp_path)
    for i in [*range(20), *range(100, 120)]:
        np.testing.assert_array_equal(cache.get(sha(i)), image(i))


# A real writer in another process that stops in the middle of a pack: after the data file is
# written ("data") or while the index's temp file is open ("index").
STALLED_WRITER = """
import json, sys, time, types
import numpy as np
from mri_assets.core import pixel_cache

def stall(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(600)

if sys.argv[2] == "data":
    pixel_cache.fsync_file = stall
else:
    pixel_cache.json = types.SimpleNamespace(dumps=stall, loads=json.loads)
pixel_cache.PixelCache(sys.argv[1]).put("ff" * 32, np.zeros((4, 5, 3), np.uint8))
"""


def start_stalled_writer(root, stage: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", STALLED_WRITER, str(root), stage], stdout=subprocess.PIPE, text=True
    )
    ready, _, _ = select.select([child.stdout], [], [], 120)
    if not ready or child.stdout.readline().strip() != "writing":
        child.kill()
        pytest.fail("the writer process never reached the middle of its pack")
    return child


def kill_9(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL


def set_age(paths, seconds: float) -> None:
    moment = time.time() - seconds
    for path in paths:
        os.utime(path, (moment, moment))


@pytest.mark.parametrize("stage", ["data", "index"])
def test_a_killed_writers_pack_is_swept_but_a_live_writers_never(tmp_path, caplog, stage):
    child = start_stalled_writer(tmp_path, stage)
    try:
        in_progress = sorted((tmp_path / "packs").iterdir())
        assert [p.suffix for p in in_progress] == (
            [".pack"] if stage == "data" else [".tmp", ".pack"]
        )
        set_age(in_progress, 3600)  # older than any grace period: only the lock protects it
        with PixelCache(tmp_path).writer() as writer:
            writer.put(sha(1), image(1))
        assert writer.swept == []
        assert all(p.exists() for p in in_progress)  # the live writer's files are untouched
    finally:
        kill_9(child)

    set_age(in_progress, 0)  # just written: could be a writer that has not locked it yet
    with PixelCache(tmp_path).writer() as writer:
        writer.put(sha(2), image(2))
    assert writer.swept == [] and all(p.exists() for p in in_progress)

    set_age(in_progress, 120)
    with (
        caplog.at_level(logging.WARNING, logger="mri_assets.core.pixel_cache"),
        PixelCache(tmp_path).writer() as writer,
    ):
        writer.put(sha(3), image(3))
    assert sorted(writer.swept) == sorted(in_progress)
    assert not any(p.exists() for p in in_progress)
    assert in_progress[-1].name in caplog.text
    names = sorted(p.name for p in (tmp_path / "packs").iterdir())
    assert {Path(n).stem for n in names if n.endswith(".pack")} == {
        Path(n).stem for n in names if n.endswith(".idx")
    }  # only committed packs are left
    fresh = PixelCache(tmp_path)
    for i in (1, 2, 3):
        np.testing.assert_array_equal(fresh.get(sha(i)), image(i))
    assert not fresh.has("ff" * 32)
