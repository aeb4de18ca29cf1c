"""Every landed entry ends in exactly one place, and faults never turn into rejections.

Faults here are real: a moto server stopped mid-run (SIGSTOP), names that are not UTF-8, links,
FIFOs, files deleted from the landing zone.
"""

import io
import os
import signal
import threading

import boto3
import duckdb
import numpy as np
import pytest
from botocore.config import Config
from PIL import Image

from mri_assets.core import catalog
from mri_assets.core.images import MemoryBudget, decode_image, near_duplicate_pairs
from mri_assets.core.ingest import EmptyListingRefused
from mri_assets.core.labels import ClassSpec
from mri_assets.core.landing import LocalLanding, S3Landing
from mri_assets.core.pixel_cache import PixelCache
from mri_assets_tests.conftest import png_bytes, start_moto_server
from mri_assets_tests.core.test_ingest import ingest

CLASSES = ClassSpec()


@pytest.fixture
def store(tmp_path):
    landing = LocalLanding(tmp_path / "landing")
    with duckdb.connect(str(tmp_path / "mri.duckdb")) as conn:
        yield landing, conn, PixelCache(tmp_path / "px")


def encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def outcomes(batch) -> dict[str, str | None]:
    return {e.obj.key: e.reason for e in batch.examined}


def test_a_name_that_is_not_utf8_is_recorded_and_does_not_block_the_split(store):
    landing, conn, cache = store
    landing.write("train/glioma/good.png", png_bytes(1))
    folder = os.fsencode(landing.root / "train" / "glioma")
    with open(folder + b"/bad\xff name.png", "wb") as handle:
        handle.write(png_bytes(2))
    batch = ingest(landing, conn, cache)
    assert outcomes(batch) == {
        "train/glioma/good.png": None,
        "train/glioma/bad\\xff name.png": "bad_file_name",
    }
    rejected = catalog.rebuild_rejected_images(conn)
    assert rejected["source_key"].tolist() == ["train/glioma/bad\\xff name.png"]
    assert ingest(landing, conn, cache).examined == []  # recorded once, not again every run


def test_links_never_read_outside_the_landing_zone(store, tmp_path):
    landing, conn, cache = store
    landing.write("train/glioma/real/a.png", png_bytes(1))
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(2))
    glioma = landing.root / "train" / "glioma"
    (glioma / "to-outside.png").symlink_to(outside / "secret.png")
    (glioma / "outside-folder").symlink_to(outside)
    (glioma / "dangling.png").symlink_to(glioma / "missing.png")
    (glioma / "inside.png").symlink_to(glioma / "real" / "a.png")
    (glioma / "real" / "loop").symlink_to(glioma)
    (glioma / "linked-folder").symlink_to(glioma / "real")
    os.mkfifo(glioma / "pipe.png")  # reading it would hang the run
    got = outcomes(ingest(landing, conn, cache))
    assert got["train/glioma/to-outside.png"] == "outside_landing"
    assert got["train/glioma/outside-folder"] == "outside_landing"
    assert got["train/glioma/dangling.png"] == "broken_link"
    assert got["train/glioma/inside.png"] is None
    assert got["train/glioma/linked-folder/a.png"] is None
    assert got["train/glioma/pipe.png"] == "not_a_file"
    assert "link_loop" in got.values()
    assert not any("secret" in key for key in got)
    with pytest.raises(PermissionError, match="climbs out of the landing zone"):
        landing.read("train/../../private/secret.png")


def test_formats_outside_the_allow_list_and_multi_frame_files_are_rejected(store):
    landing, conn, cache = store
    gray = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    frames = [Image.fromarray(gray), Image.fromarray(255 - gray)]
    tiff, apng = io.BytesIO(), io.BytesIO()
    frames[0].save(tiff, format="TIFF", save_all=True, append_images=frames[1:])
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:])
    files = {
        "train/glioma/scan.eps": encoded(gray, "EPS"),
        "train/glioma/scan.gif": encoded(gray, "GIF"),
        "train/glioma/scan.webp": encoded(np.stack([gray] * 3, axis=2), "WEBP"),
        "train/glioma/series.tif": tiff.getvalue(),
        "train/glioma/cine.png": apng.getvalue(),
        "train/glioma/scan.bmp": encoded(gray, "BMP"),
        "train/glioma/scan.tif": encoded(gray, "TIFF"),
    }
    for key, data in files.items():
        landing.write(key, data)
    got = outcomes(ingest(landing, conn, cache))
    assert got == {
        "train/glioma/scan.eps": "unsupported_format",
        "train/glioma/scan.gif": "unsupported_format",
        "train/glioma/scan.webp": "unsupported_format",
        "train/glioma/series.tif": "multi_frame",
        "train/glioma/cine.png": "multi_frame",
        "train/glioma/scan.bmp": None,
        "train/glioma/scan.tif": None,
    }
    details = dict(catalog.rebuild_rejected_images(conn)[["source_key", "detail"]].values)
    assert "EPS is not an accepted format" in details["train/glioma/scan.eps"]


def test_re_encoded_copies_are_one_image_and_never_in_both_splits(store):
    landing, conn, cache = store
    slice_ = np.random.default_rng(3).integers(0, 255, (32, 32), dtype=np.uint8)
    landing.write("train/glioma/a.png", encoded(slice_, "PNG", compress_level=9))
    landing.write("train/meningioma/b.png", png_bytes(9))
    ingest(landing, conn, cache, "train")
    landing.write("test/glioma/a-fast.png", encoded(slice_, "PNG", compress_level=1))
    landing.write("test/glioma/a.bmp", encoded(slice_, "BMP"))
    landing.write("test/glioma/other.png", png_bytes(10))
    ingest(landing, conn, cache, "test")
    images = catalog.rebuild_images(conn).set_index("source_key")
    assert images.loc["test/glioma/a-fast.png", "split"] == "duplicate"
    assert images.loc["test/glioma/a.bmp", "split"] == "duplicate"
    assert "already in the train split" in images.loc["test/glioma/a.bmp", "split_reason"]
    used = images[images["split"].isin(["train", "test"])]
    assert used.groupby("content_id")["split"].nunique().max() == 1
    assert len(catalog.record_split_table(conn, "test")) == 1


def test_near_duplicates_are_paired_by_perceptual_hash():
    slice_ = np.zeros((64, 64), dtype=np.uint8)
    slice_[16:48, 20:44] = np.linspace(40, 220, 24, dtype=np.uint8)
    brighter = np.clip(slice_.astype(int) + 6, 0, 255).astype(np.uint8)
    other = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    train = [("train/a.png", decode_image(encoded(slice_, "PNG")).perceptual_hash)]
    test = [
        (
            "test/a-brighter.jpg",
            decode_image(encoded(brighter, "JPEG", quality=80)).perceptual_hash,
        ),
        ("test/other.png", decode_image(encoded(other, "PNG")).perceptual_hash),
    ]
    pairs = near_duplicate_pairs(train, test)
    assert [(a, b) for a, b, _ in pairs] == [("train/a.png", "test/a-brighter.jpg")]


def test_a_removed_file_leaves_the_set_and_its_removal_is_recorded(store):
    landing, conn, cache = store
    for i in range(3):
        landing.write(f"train/glioma/{i}.png", png_bytes(i))
    ingest(landing, conn, cache)
    catalog.rebuild_images(conn)
    before = catalog.record_split_table(conn, "train")
    (landing.root / "train" / "glioma" / "1.png").unlink()  # consent withdrawn
    batch = ingest(landing, conn, cache)
    assert batch.removed == ["train/glioma/1.png"]
    catalog.rebuild_images(conn)
    after = catalog.record_split_table(conn, "train")
    assert len(after) == 2 and after.version != before.version
    removals = catalog.removals(conn)
    assert removals["source_key"].tolist() == ["train/glioma/1.png"]
    assert removals["sha256"].notna().all() and removals["removed_at"].notna().all()
    assert ingest(landing, conn, cache).removed == []  # recorded once


def test_an_empty_listing_never_wipes_an_ingested_split(store):
    landing, conn, cache = store
    landing.write("train/glioma/a.png", png_bytes(1))
    ingest(landing, conn, cache)
    (landing.root / "train" / "glioma" / "a.png").unlink()
    with pytest.raises(EmptyListingRefused, match="volume is mounted"):
        ingest(landing, conn, cache)
    assert list(catalog.ledger_fingerprints(conn, "train")) == ["train/glioma/a.png"]


class StopsServerMidRun(S3Landing):
    """An S3 landing zone whose server is really stopped (SIGSTOP) after ``after`` reads."""

    def __init__(self, client, location, server, after):
        super().__init__(client, location)
        self.server, self.after, self.reads = server, after, 0
        self.lock = threading.Lock()

    def read(self, key):
        with self.lock:
            self.reads += 1
            if self.reads == self.after + 1:
                os.kill(self.server.pid, signal.SIGSTOP)
        return super().read(key)


def test_an_s3_server_stopped_mid_run_fails_reads_without_rejecting_them(tmp_path, monkeypatch):
    # Two timed-out reads call the zone down (MAX_FAILURES_PER_RUN's 8 would wait out 8 timeouts):
    # the other seven are left for the retry untried.
    monkeypatch.setattr("mri_assets.core.ingest.MAX_FAILURES_PER_RUN", 2)
    server, endpoint = start_moto_server()
    try:
        fast = Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1})
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            config=fast,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket="scans")
        writer = S3Landing(client, "s3://scans/in")
        for i in range(12):
            writer.write(f"train/glioma/{i:02}.png", png_bytes(i))
        landing = StopsServerMidRun(client, "s3://scans/in", server, after=3)
        with duckdb.connect(str(tmp_path / "mri.duckdb")) as conn:
            cache = PixelCache(tmp_path / "px")
            batch = ingest(landing, conn, cache, workers=1)
            assert len(batch.accepted) == 3 and batch.rejected == []
            assert len(batch.failed) == 2 and batch.not_tried == 7
            assert "ReadTimeout" in batch.failed[0].error or "timed out" in batch.failed[0].error
            assert len(catalog.ledger_fingerprints(conn, "train")) == 3
            os.kill(server.pid, signal.SIGCONT)  # the fault clears
            healed = ingest(S3Landing(client, "s3://scans/in"), conn, cache, workers=1)
            assert len(healed.accepted) == 9 and healed.failed == []
            assert len(catalog.ledger_fingerprints(conn, "train")) == 12
            assert catalog.rebuild_rejected_images(conn).empty
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait()


def decode_concurrently(budget: MemoryBudget, sizes: list[int]) -> list[tuple[int, int]]:
    """Threads that each hold ``size`` bytes of ``budget`` for 10 ms; every (bytes held, holders)
    state they went through."""
    held, holders, states, lock = [0], [0], [], threading.Lock()

    def decode(size):
        with budget.reserve(size):
            with lock:
                held[0] += size
                holders[0] += 1
                states.append((held[0], holders[0]))
            threading.Event().wait(0.01)
            with lock:
                held[0] -= size
                holders[0] -= 1

    threads = [threading.Thread(target=decode, args=(size,)) for size in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return states


def test_concurrent_decodes_stay_within_the_memory_budget():
    sizes = [60, 50, 40, 30, 150, 20] * 3
    states = decode_concurrently(MemoryBudget(100), sizes)
    assert len(states) == len(sizes)
    # Never more than the budget at once, except an image larger than it, which decodes alone.
    assert all(held <= 100 or holders == 1 for held, holders in states)
    assert (150, 1) in states
    # Without the bound the same threads overlap far beyond it: the check above can fail.
    unbounded = decode_concurrently(MemoryBudget(10**9), sizes)
    assert max(held for held, _ in unbounded) > 100


def test_a_sixteen_bit_scan_is_stretched_without_a_full_float_copy():
    ramp = (np.arange(600 * 700, dtype=np.uint32).reshape(600, 700) % 4000 + 1000).astype(np.uint16)
    decoded = decode_image(encoded(ramp, "PNG"))
    expected = np.rint((ramp.astype(np.float64) - 1000) * (255 / 3999)).astype(np.uint8)
    assert np.abs(decoded.pixels[:, :, 0].astype(int) - expected).max() <= 1
    assert (decoded.pixels[:, :, 0] == decoded.pixels[:, :, 2]).all()
