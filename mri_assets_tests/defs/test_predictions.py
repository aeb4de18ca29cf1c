"""The inbox: unlabelled scans ingested with the usual rules, scored by the deployed model into
DuckDB `predictions` (one row per scan and model version), with the drift check."""

import io

import boto3
import dagster as dg
import duckdb
import numpy as np
import pytest
from PIL import Image

from mri_assets.core.labels import ClassSpec
from mri_assets.core.landing import LocalLanding
from mri_assets.core.model import load_base_model
from mri_assets.core.phantoms import generate_slice
from mri_assets.core.serving import fit_statistics
from mri_assets.core.store import ModelStore
from mri_assets.defs.ingest import raw_image_assets
from mri_assets.defs.predictions import predictions
from mri_assets.defs.tables import rejected_images
from mri_assets.settings import Settings
from mri_assets_tests.defs.helpers import (
    declared_columns,
    duckdb_columns,
    materialize,
    resources_for,
)

SIZE = 64
ASSETS = [*raw_image_assets, rejected_images, predictions]
COLUMNS = [
    "source_key",
    "sha256",
    "model_version",
    "label",
    "p_glioma",
    "p_meningioma",
    "ood_score",
    "ood_flag",
    "predicted_at",
]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def phantoms(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [generate_slice(rng, ClassSpec().names[i % 2], SIZE) for i in range(n)]


@pytest.fixture
def store(mri_env) -> ModelStore:
    return ModelStore(mri_env / "models")


def deploy_version(store: ModelStore, with_statistics: bool = True) -> str:
    """The embedded model (untrained: only its features matter here) with statistics fitted on
    40 generated slices, stored and deployed."""
    base = load_base_model("embedded", ClassSpec(), store.base_root)
    preprocessing = base.preprocessing.with_size(SIZE)
    record, arrays = {"train_set_version": "t"}, None
    if with_statistics:
        slices = [np.repeat(s[..., None], 3, axis=2) for s in phantoms(40, seed=0)]
        statistics = fit_statistics(
            base.model, preprocessing, slices, [i % 2 for i in range(40)], range(30), range(30, 40)
        )
        record, arrays = {**record, **statistics.to_record()}, statistics.to_arrays()
    version = store.save_version(base.model, preprocessing, record, arrays=arrays)
    store.promote(version, 0.9, "s", "test")
    return version


def land_inbox(landing: LocalLanding) -> None:
    for i, image in enumerate(phantoms(6, seed=1)):
        landing.write(f"inbox/ward 3/scan {i}.png", png(image))
    landing.write("inbox/ward 3/copy of scan 0.png", png(phantoms(6, seed=1)[0]))
    for i, image in enumerate(phantoms(2, seed=2)):
        landing.write(f"inbox/other site/inverted {i}.png", png(255 - image))
    landing.write("inbox/notes.png", b"not an image")
    landing.write("inbox/.DS_Store", b"\0\0")


def table(mri_env, query: str) -> list[tuple]:
    with duckdb.connect(str(mri_env / "mri.duckdb"), read_only=True) as conn:
        return conn.execute(query).fetchall()


def checks(result) -> dict:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def metadata(result, key: str) -> dict:
    events = result.asset_materializations_for_node(key)
    return {k: v.value for k, v in events[-1].metadata.items()}


def test_inbox_scans_are_scored_and_a_new_model_scores_them_again(mri_env, store, monkeypatch):
    monkeypatch.setenv("MRI_OOD_DRIFT_SHARE", "0.1")
    first = deploy_version(store)
    land_inbox(LocalLanding(mri_env / "landing"))
    with dg.instance_for_test() as instance:
        result = materialize(ASSETS, resources_for(), instance)

        scored = metadata(result, "predictions")
        assert scored["model_version"] == first and scored["scored_now"] == 9
        assert scored["new_scans"] == 8  # the copy holds content already counted
        rejected = table(mri_env, "SELECT source_key, split_folder, reason FROM rejected_images")
        assert sorted(rejected) == [
            ("inbox/.DS_Store", "inbox", "hidden_file"),
            ("inbox/notes.png", "inbox", "not_an_image"),
        ]
        assert table(mri_env, "SELECT count(*) FROM landed_images") == [(0,)]  # not training data
        assert [name for name, _ in duckdb_columns_of(mri_env)] == COLUMNS
        assert declared_columns("predictions") == duckdb_columns_of(mri_env)
        rows = table(
            mri_env,
            "SELECT source_key, label, p_glioma, p_meningioma, ood_score, ood_flag "
            "FROM predictions ORDER BY source_key",
        )
        threshold = store.training_record(first)["ood"]["threshold"]
        for key, label, p_glioma, p_meningioma, score, flag in rows:
            assert p_glioma + p_meningioma == pytest.approx(1.0, abs=1e-5)
            assert label == ("glioma" if p_glioma >= p_meningioma else "meningioma")
            assert flag == (score > threshold), key
        flags = {key: flag for key, *_, flag in rows}
        assert flags["inbox/other site/inverted 0.png"] and flags["inbox/other site/inverted 1.png"]
        drift = checks(result)["flagged_share_of_new_scans"]
        flagged = sum(flags[k] for k in flags if k != "inbox/ward 3/copy of scan 0.png")
        assert drift.passed is (flagged / 8 <= 0.1)
        assert drift.passed is False and drift.severity == dg.AssetCheckSeverity.WARN
        assert f"{flagged} of 8 new scans" in drift.description
        overlays = sorted((mri_env / "saliency" / first).glob("*.png"))
        assert len(overlays) >= 2 and "flagged" in scored["explained"]

        again = materialize(ASSETS, resources_for(), instance)
        assert metadata(again, "predictions")["scored_now"] == 0
        assert checks(again)["flagged_share_of_new_scans"].passed

        second = deploy_version(store, with_statistics=False)  # stored as before this change
        rescored = materialize(ASSETS, resources_for(), instance)

    assert metadata(rescored, "predictions")["scored_now"] == 9
    assert "stored before calibration" in metadata(rescored, "predictions")["ood_note"]
    by_version = dict(
        table(mri_env, "SELECT model_version, count(*) FROM predictions GROUP BY ALL")
    )
    assert by_version == {first: 9, second: 9}  # earlier rows kept for audit
    assert table(
        mri_env,
        f"SELECT count(*) FROM predictions WHERE model_version = '{second}' "
        "AND ood_score IS NULL AND ood_flag IS NULL",
    ) == [(9,)]
    assert checks(rescored)["flagged_share_of_new_scans"].passed


def duckdb_columns_of(mri_env) -> list[tuple[str, str]]:
    with duckdb.connect(str(mri_env / "mri.duckdb"), read_only=True) as conn:
        return duckdb_columns(conn, "predictions")


def test_predictions_without_a_deployed_model_say_what_to_do(mri_env):
    LocalLanding(mri_env / "landing").write("inbox/a.png", png(phantoms(1, seed=3)[0]))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            ASSETS, resources=resources_for(), instance=instance, raise_on_error=False
        )
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert "no model is deployed" in failure.step_failure_data.error.message


def test_with_the_store_in_a_bucket_the_overlays_are_kept_there(mri_env, s3_bucket, monkeypatch):
    # MRI_HOME may be a run's scratch folder, removed when the run ends (launcher.py).
    monkeypatch.setenv("MRI_STORE", f"s3://{s3_bucket}/state")
    settings = Settings.from_env()
    version = deploy_version(ModelStore(settings.model_store_dir, settings.remote("models")))
    land_inbox(LocalLanding(mri_env / "landing"))
    with dg.instance_for_test() as instance:
        result = materialize(ASSETS, resources_for(), instance)
    scored = metadata(result, "predictions")
    folder = f"s3://{s3_bucket}/state/saliency/{version}"
    assert scored["saliency_folder"] == folder
    local = sorted(p.name for p in (mri_env / "saliency" / version).glob("*.png"))
    listed = boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket, Prefix=f"state/saliency/{version}/"
    )
    in_bucket = sorted(o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", []))
    assert len(local) >= 2 and in_bucket == local
