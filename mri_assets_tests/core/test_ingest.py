import boto3
import duckdb
import pytest

from mri_assets.core import catalog, pixel_cache
from mri_assets.core.ingest import ingest_new_objects
from mri_assets.core.labels import ClassSpec
from mri_assets.core.landing import LocalLanding, S3Landing, listing_digest, parse_s3_location
from mri_assets.core.pixel_cache import PackWriteFailed, PixelCache, PixelCacheError
from mri_assets_tests.bad_files import BAD_FILES
from mri_assets_tests.conftest import png_bytes

CLASSES = ClassSpec()


def ingest(landing, conn, cache, split="train", workers=None):
    """One ingest run of ``split``, recorded as the raw asset records it."""
    batch = ingest_new_objects(
        landing,
        split,
        catalog.ledger_fingerprints(conn, split),
        catalog.known_images(conn),
        CLASSES,
        cache,
        workers=workers,
    )
    batch.record(conn)
    return batch


@pytest.fixture
def store(tmp_path):
    return (
        LocalLanding(tmp_path / "landing"),
        duckdb.connect(str(tmp_path / "mri.duckdb")),
        PixelCache(tmp_path / "px"),
    )


def test_bad_corpus_is_rejected_with_reasons_and_good_files_survive(store):
    landing, conn, cache = store
    for key, (data, _) in BAD_FILES.items():
        landing.write(f"train/{key}", data)
    batch = ingest(landing, conn, cache)
    got = {e.obj.key_in_split: e.reason for e in batch.examined}
    assert got == {key: reason for key, (_, reason) in BAD_FILES.items()}
    rejected = catalog.rebuild_rejected_images(conn)
    assert set(rejected["reason"]) == {r for _, r in BAD_FILES.values() if r}
    images = catalog.rebuild_images(conn)
    assert len(images) == sum(r is None for _, r in BAD_FILES.values())
    assert all(cache.has(sha) for sha in images["sha256"])


def test_ingesting_the_same_files_twice_adds_nothing(store):
    landing, conn, cache = store
    for i in range(5):
        landing.write(f"train/glioma/{i}.png", png_bytes(i))
    first = ingest(landing, conn, cache)
    second = ingest(landing, conn, cache)
    assert len(first.accepted) == 5
    assert second.examined == [] and second.listed == 5
    assert conn.execute("SELECT count(*) FROM landed_images").fetchone()[0] == 5


def test_relanded_content_is_not_decoded_again(store):
    landing, conn, cache = store
    landing.write("train/glioma/a.png", png_bytes(1))
    ingest(landing, conn, cache)
    landing.write("train/glioma/copy of a.png", png_bytes(1))
    batch = ingest(landing, conn, cache)
    assert len(batch.accepted) == 1 and batch.decoded == 0


def test_rewritten_file_is_examined_again_and_a_bad_rewrite_keeps_the_good_version(store):
    landing, conn, cache = store
    landing.write("train/glioma/a.png", png_bytes(1))
    ingest(landing, conn, cache)
    landing.write("train/glioma/a.png", b"")  # clobbered with an empty file
    batch = ingest(landing, conn, cache)
    assert [e.reason for e in batch.examined] == ["empty_file"]
    images = catalog.rebuild_images(conn)
    assert list(images["source_key"]) == ["train/glioma/a.png"]
    rejected = catalog.rebuild_rejected_images(conn)
    assert rejected["earlier_version_kept"].tolist() == [True]


def test_pixels_are_on_disk_for_other_processes_when_the_batch_is_returned(store, tmp_path):
    landing, conn, cache = store
    for i in range(5):
        landing.write(f"train/glioma/{i}.png", png_bytes(i))
    batch = ingest_new_objects(landing, "train", {}, {}, CLASSES, cache)
    other_process = PixelCache(tmp_path / "px")
    assert len(other_process.get_many(e.sha256 for e in batch.accepted)) == 5


def test_a_pixel_cache_that_cannot_be_written_fails_the_batch_before_recording(
    store, tmp_path, monkeypatch
):
    landing, conn, _ = store
    for i in range(4):
        landing.write(f"train/glioma/{i}.png", png_bytes(i))
    # Packs of two: the failing write happens in a worker thread, after other objects were
    # already examined, and with an error that is not an OSError.
    writer = PixelCache.writer
    monkeypatch.setattr(PixelCache, "writer", lambda self: writer(self, max_images=2))

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no memory for the index")

    monkeypatch.setattr(pixel_cache.json, "dumps", out_of_memory)
    with pytest.raises(PackWriteFailed, match="MemoryError"):
        ingest(landing, conn, PixelCache(tmp_path / "px-failing"))
    assert catalog.ledger_fingerprints(conn, "train") == {}  # retried in full next run


def test_an_unreadable_pixel_cache_fails_the_batch_instead_of_rejecting_objects(store, tmp_path):
    landing, conn, cache = store
    landing.write("train/glioma/a.png", png_bytes(1))
    ingest(landing, conn, cache)
    landing.write(
        "train/glioma/copy_of_a.png", png_bytes(1)
    )  # known content: looked up in the cache
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "packs").write_text("a file where the packs folder should be")
    with pytest.raises(PixelCacheError, match="cannot list"):
        ingest(landing, conn, PixelCache(broken))
    assert set(catalog.ledger_fingerprints(conn, "train")) == {"train/glioma/a.png"}


def test_a_rewritten_key_keeps_its_first_seen(store):
    landing, conn, cache = store
    landing.write("train/glioma/a.png", png_bytes(1))
    ingest(landing, conn, cache)
    landing.write("train/glioma/a.png", png_bytes(2))
    ingest(landing, conn, cache)
    first_seen, updated_at, sha = conn.execute(
        "SELECT first_seen, updated_at, sha256 FROM landed_images"
    ).fetchall()[0]
    assert first_seen < updated_at and cache.has(sha)


def test_in_progress_uploads_are_left_for_later(store):
    landing, conn, cache = store
    landing.write("train/glioma/.a.png.x1.part", png_bytes(1))
    batch = ingest(landing, conn, cache)
    assert batch.skipped_in_progress == 1 and batch.examined == []


def test_duplicates_across_splits_never_share_a_sha256(store):
    landing, conn, cache = store
    landing.write("train/glioma/a.png", png_bytes(1))
    landing.write("train/glioma/b.png", png_bytes(2))
    ingest(landing, conn, cache, "train")
    landing.write("test/glioma/a-again.png", png_bytes(1))  # leaked copy of a training image
    landing.write("test/glioma/c.png", png_bytes(3))
    landing.write("test/meningioma/c-relabelled.png", png_bytes(3))
    ingest(landing, conn, cache, "test")
    images = catalog.rebuild_images(conn).set_index("source_key")
    assert images.loc["train/glioma/a.png", "split"] == "train"
    assert images.loc["test/glioma/a-again.png", "split"] == "duplicate"
    assert "already in the train split" in images.loc["test/glioma/a-again.png", "split_reason"]
    assert set(images.loc[["test/glioma/c.png", "test/meningioma/c-relabelled.png"], "split"]) == {
        "conflict"
    }
    used = images[images["split"].isin(["train", "test"])]
    assert used.groupby("sha256")["split"].nunique().max() == 1
    train = catalog.record_split_table(conn, "train")
    test = catalog.record_split_table(conn, "test")
    assert len(train) == 2 and len(test) == 0
    assert train.version == catalog.record_split_table(conn, "train").version


def test_split_version_ignores_order_and_changes_with_labels():
    a = catalog.dataset_version(("x", "y"), ("glioma", "meningioma"))
    assert a == catalog.dataset_version(("y", "x"), ("meningioma", "glioma"))
    assert a != catalog.dataset_version(("x", "y"), ("meningioma", "glioma"))


def test_s3_landing_lists_every_page_and_reads(s3_bucket, moto_server):
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    landing = S3Landing(client, f"s3://{s3_bucket}/scans", page_size=7)
    for i in range(23):
        landing.write(f"train/glioma/{i:03}.png", png_bytes(i, size=8))
    client.put_object(Bucket=s3_bucket, Key="scans/train/folder/", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="elsewhere/train/x.png", Body=b"x")
    listed = list(landing.list_objects("train"))
    assert len(listed) == 23 and listed[0].key.startswith("train/glioma/")
    assert landing.read(listed[0].key) == png_bytes(int(listed[0].key[-7:-4]), size=8)
    before = listing_digest(listed)
    landing.write("train/glioma/000.png", png_bytes(99, size=8))
    assert listing_digest(list(landing.list_objects("train"))) != before


def test_s3_location_parsing():
    assert parse_s3_location("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_s3_location("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="names no bucket"):
        parse_s3_location("s3:///x")


def test_local_listing_sees_copies_that_keep_their_mtime(tmp_path):
    import os
    import shutil

    landing = LocalLanding(tmp_path)
    source = tmp_path / "outside.png"
    source.write_bytes(png_bytes(1))
    os.utime(source, ns=(0, 0))
    (tmp_path / "train").mkdir()
    before = listing_digest(list(landing.list_objects("train")))
    shutil.copy2(source, tmp_path / "train" / "glioma 1.png")  # mtime 1970
    after = list(landing.list_objects("train"))
    assert len(after) == 1 and listing_digest(after) != before
