"""The model store and caches with MRI_STORE=s3://... against moto's S3 server over HTTP: any
machine starts from an empty local folder, racing promotions have one winner, and a store that
stops answering mid-upload leaves no partial version."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

import boto3
import numpy as np
import pytest
from botocore.config import Config

from mri_assets.core.embedding_cache import EmbeddingCache
from mri_assets.core.model import weights_fingerprint
from mri_assets.core.object_store import S3Objects
from mri_assets.core.pixel_cache import PackWriteFailed, PixelCache
from mri_assets.core.store import ModelStore, ModelStoreError
from mri_assets_tests.conftest import start_moto_server
from mri_assets_tests.core.store_race_worker import promote_many
from mri_assets_tests.core.test_store import PREPROCESSING, RECORD, tiny_model


def remote(endpoint: str, bucket: str, folder: str, **config) -> S3Objects:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(**config),
    )
    return S3Objects(client, f"s3://{bucket}/mri").child(folder)


@pytest.fixture
def bucket_store(moto_server, s3_bucket, tmp_path):
    """Opens a model store on the test bucket with a local cache folder of the given name."""

    def open_store(cache: str) -> ModelStore:
        return ModelStore(tmp_path / cache, remote(moto_server, s3_bucket, "models"))

    return open_store


def test_a_machine_with_an_empty_folder_loads_promotes_and_rolls_back(bucket_store) -> None:
    writer = bucket_store("machine-a")
    first = writer.save_version(tiny_model(0), PREPROCESSING, RECORD)
    second = writer.save_version(tiny_model(1), PREPROCESSING, RECORD)
    writer.promote(first, 0.8, "s1", "first")
    writer.promote(second, 0.9, "s1", "better")

    fresh = bucket_store("machine-b")  # nothing on its disk
    assert not fresh.root.exists()
    assert fresh.versions() == [first, second]
    assert fresh.training_record(first)["version"] == first
    assert not fresh.root.exists(), "a record is read without fetching the weights"
    assert fresh.deployed()["version"] == second
    loaded, preprocessing = fresh.load_version(second)
    assert weights_fingerprint(loaded) == weights_fingerprint(tiny_model(1))
    assert preprocessing == PREPROCESSING
    assert fresh.training_record(second)["version"] == second

    fresh.rollback(reason="regression seen on machine b")
    assert writer.deployed()["version"] == first  # the other machine sees it at once
    assert [e["action"] for e in writer.deployment_history()] == ["promote", "promote", "rollback"]


def test_every_file_of_a_version_folder_is_carried(bucket_store) -> None:
    writer = bucket_store("machine-a")
    version = writer.save_version(tiny_model(0), PREPROCESSING, RECORD)
    # What a later writer may add beside the weights (calibration arrays, ...) travels too:
    # the manifest lists whatever the folder held when it was published.
    names = sorted(p.name for p in writer.version_path(version).iterdir())

    fresh = bucket_store("machine-b")
    fresh.load_version(version)
    assert sorted(p.name for p in fresh.version_path(version).iterdir()) == names


def test_a_promotion_that_lost_the_race_changes_nothing(bucket_store) -> None:
    store_a, store_b = bucket_store("a"), bucket_store("b")
    version = store_a.save_version(tiny_model(0), PREPROCESSING, RECORD)
    other = store_a.save_version(tiny_model(1), PREPROCESSING, RECORD)
    store_a.promote(version, 0.8, "s1", "first")

    def entry_after_a_rival_wrote(history):
        store_b.promote(other, 0.9, "s1", "rival")  # between a's read and a's write
        return {"version": version, "action": "promote"}

    with pytest.raises(ModelStoreError, match="another promotion or rollback won"):
        store_a._update_history(entry_after_a_rival_wrote)

    assert [e["reason"] for e in store_a.deployment_history()] == ["first", "rival"]


@pytest.fixture
def serial_moto(tmp_path):
    """A moto server that answers one request at a time, so its conditional writes are atomic
    as S3's are (moto's threaded server can pass two If-Match checks before either write)."""
    process, endpoint = start_moto_server(serial=True)
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="race")
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


def test_two_processes_promoting_at_once_lose_no_promotion(serial_moto, tmp_path) -> None:
    def store(cache: str) -> ModelStore:
        return ModelStore(tmp_path / cache, remote(serial_moto, "race", "models"))

    version = store("a").save_version(tiny_model(0), PREPROCESSING, RECORD)
    context = multiprocessing.get_context("spawn")
    start = context.Manager().Barrier(2)
    rounds = 15
    with context.Pool(2) as pool:
        results = pool.starmap(
            promote_many,
            [
                (serial_moto, "race", tmp_path / f"p{n}", version, n, rounds, start)
                for n in range(2)
            ],
        )
    won = [reason for reasons, _ in results for reason in reasons]
    lost = sum(count for _, count in results)
    history = store("check").deployment_history()
    # Every promotion told it won is in the history exactly once; every loser was told so.
    assert sorted(e["reason"] for e in history) == sorted(won)
    assert len(won) + lost == 2 * rounds


@pytest.fixture
def private_moto():
    """A moto server of this test's own, which the test may stop (SIGSTOP) and resume."""
    process, endpoint = start_moto_server()
    yield process, endpoint
    os.kill(process.pid, signal.SIGCONT)
    process.terminate()
    process.wait(timeout=10)


def test_a_store_stopped_mid_upload_publishes_nothing_and_a_retry_works(
    private_moto, tmp_path
) -> None:
    process, endpoint = private_moto
    fast = {"connect_timeout": 1, "read_timeout": 1, "retries": {"total_max_attempts": 1}}
    objects = remote(endpoint, "stopped-store", "models", **fast)
    objects.client.create_bucket(Bucket="stopped-store")
    writer = ModelStore(tmp_path / "a", objects)
    uploads = []

    def stop_after_the_first_upload(**_):
        uploads.append(1)
        if len(uploads) == 1:
            os.kill(process.pid, signal.SIGSTOP)

    objects.client.meta.events.register("after-call.s3.PutObject", stop_after_the_first_upload)
    with pytest.raises(ModelStoreError, match="could not publish model version .* Nothing was"):
        writer.save_version(tiny_model(0), PREPROCESSING, RECORD)
    os.kill(process.pid, signal.SIGCONT)

    reader = ModelStore(tmp_path / "b", remote(endpoint, "stopped-store", "models"))
    assert objects.list_keys("versions/"), "the first file did reach the store"
    assert reader.versions() == [] and writer.versions() == []
    assert not list((tmp_path / "a" / "versions").iterdir()), "no local copy of a failed save"

    version = writer.save_version(tiny_model(0), PREPROCESSING, RECORD)
    assert reader.versions() == [version]
    reader.load_version(version)
    # What the cut-off save left is removed once old enough; the published version stays.
    left = {k.split("/")[1] for k in objects.list_keys("versions/")} - {version}
    assert len(left) == 1 and reader.sweep_unpublished(grace_seconds=3600) == []
    swept = reader.sweep_unpublished(grace_seconds=0)
    assert swept and {k.split("/")[1] for k in swept} == left
    assert {k.split("/")[1] for k in objects.list_keys("versions/")} == {version}


def test_an_unreachable_store_is_a_clear_error(tmp_path) -> None:
    from mri_assets_tests.conftest import free_port

    nobody = remote(
        f"http://127.0.0.1:{free_port()}",
        "missing",
        "models",
        connect_timeout=1,
        retries={"total_max_attempts": 1},
    )
    store = ModelStore(tmp_path / "cache", nobody)
    with pytest.raises(ModelStoreError, match=r"could not read s3://missing/mri/models/deploy"):
        store.deployed()


def test_pixel_packs_are_shared_through_the_bucket(moto_server, s3_bucket, tmp_path) -> None:
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    PixelCache(tmp_path / "a", remote(moto_server, s3_bucket, "pixels")).put("ab" * 32, pixels)

    elsewhere = PixelCache(tmp_path / "b", remote(moto_server, s3_bucket, "pixels"))
    assert elsewhere.has("ab" * 32)
    np.testing.assert_array_equal(elsewhere.get("ab" * 32), pixels)


def test_a_pack_the_stopped_store_did_not_take_is_not_kept_locally(private_moto, tmp_path) -> None:
    process, endpoint = private_moto
    fast = {"connect_timeout": 1, "read_timeout": 1, "retries": {"total_max_attempts": 1}}
    objects = remote(endpoint, "stopped-pixels", "pixels", **fast)
    objects.client.create_bucket(Bucket="stopped-pixels")
    objects.client.meta.events.register(
        "after-call.s3.ListObjectsV2", lambda **_: os.kill(process.pid, signal.SIGSTOP)
    )
    cache = PixelCache(tmp_path / "a", objects)
    with pytest.raises(PackWriteFailed, match="could not write a pixel-cache pack"):
        cache.put("cd" * 32, np.zeros((2, 2, 3), np.uint8))
    os.kill(process.pid, signal.SIGCONT)
    # Nothing half-shared: neither this machine's cache nor the bucket's indexes hold it.
    assert not PixelCache(tmp_path / "a").has("cd" * 32)
    assert not PixelCache(tmp_path / "b", remote(endpoint, "stopped-pixels", "pixels")).has(
        "cd" * 32
    )


def test_embeddings_are_shared_through_the_bucket(moto_server, s3_bucket, tmp_path) -> None:
    vector = np.linspace(0, 1, 8, dtype=np.float32)
    EmbeddingCache(tmp_path / "a", remote(moto_server, s3_bucket, "embeddings")).put(
        "k", "ef" * 32, vector
    )
    elsewhere = EmbeddingCache(tmp_path / "b", remote(moto_server, s3_bucket, "embeddings"))
    assert elsewhere.has("k", "ef" * 32) and not elsewhere.has("k", "00" * 32)
    np.testing.assert_array_equal(elsewhere.get("k", "ef" * 32), vector)


def test_predict_from_an_empty_folder_with_only_mri_store_set(
    bucket_store, s3_bucket, mri_env, monkeypatch, tmp_path, capsys
) -> None:
    from mri_assets.cli import main
    from mri_assets.core.labels import ClassSpec
    from mri_assets.core.model import load_base_model
    from mri_assets_tests.conftest import png_bytes

    writer = bucket_store("trainer")
    base = load_base_model("embedded", ClassSpec(), tmp_path / "base")
    version = writer.save_version(base.model, base.preprocessing, {"train_set_version": "t1"})
    writer.promote(version, 0.9, "s1", "first")
    monkeypatch.setenv("MRI_STORE", f"s3://{s3_bucket}/mri")
    image = tmp_path / "scan.png"
    image.write_bytes(png_bytes(3))

    assert not mri_env.exists()
    assert main(["predict", "--json", str(image)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["path"] == str(image) and set(answer["scores"]) == {"glioma", "meningioma"}
    assert (mri_env / "models" / "versions" / version).is_dir()  # downloaded into the cache
    assert main(["status"]) == 0
    assert f"deployed: {version}" in capsys.readouterr().out


def test_a_version_altered_in_the_bucket_is_refused(bucket_store) -> None:
    writer = bucket_store("machine-a")
    version = writer.save_version(tiny_model(0), PREPROCESSING, RECORD)
    writer.remote.put_bytes(f"versions/{version}/config.json", b"{}")

    fresh = bucket_store("machine-b")
    with pytest.raises(ModelStoreError, match="config.json of model version .* does not match"):
        fresh.load_version(version)
    assert not fresh.version_path(version).exists()  # nothing half-checked is kept
