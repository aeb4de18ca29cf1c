import dagster as dg
import duckdb

from mri_assets.core.landing import LocalLanding
from mri_assets.defs.ingest import raw_image_assets
from mri_assets.defs.tables import table_assets, table_checks
from mri_assets_tests.bad_files import BAD_FILES
from mri_assets_tests.conftest import png_bytes
from mri_assets_tests.defs.helpers import (
    declared_columns,
    duckdb_columns,
    materialize,
    resources_for,
)

ASSETS = [*raw_image_assets, *table_assets, *table_checks]


def land_small_dataset(landing: LocalLanding, start: int = 0) -> None:
    for i in range(start, start + 3):
        landing.write(f"train/Glioma T2/{i}.png", png_bytes(i))
        landing.write(f"train/meningioma ({i}).png", png_bytes(100 + i))
        landing.write(f"test/glioma/{i}.png", png_bytes(200 + i))
        landing.write(f"test/meningioma ({i}).png", png_bytes(300 + i))


def metadata(result, key: str) -> dict:
    events = result.asset_materializations_for_node(key)
    return {k: v.value for k, v in events[-1].metadata.items()}


def test_ingest_and_tables_end_to_end_on_a_local_folder(mri_env):
    landing = LocalLanding(mri_env / "landing")
    land_small_dataset(landing)
    for key, (data, _) in BAD_FILES.items():
        landing.write(f"train/{key}", data)
    with dg.instance_for_test() as instance:
        result = materialize(ASSETS, resources_for(), instance)
        assert result.success
        raw = metadata(result, "raw_train_images")
        assert raw["new_objects"] == 6 + len(BAD_FILES)
        assert raw["new_rejected"] == sum(bool(r) for _, r in BAD_FILES.values())
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks == {
            "no_train_test_overlap": True,
            "near_duplicates_across_splits": True,
            "both_classes_in_each_split": True,
            "rejected_share": False,  # five of sixteen files are bad: a warning, not a failure
        }
        assert metadata(result, "test_images")["dagster/row_count"] == 6
        first_version = metadata(result, "train_images")["dataset_version"]

        assert first_version == metadata(result, "train_images")["dataset_version"]
        again = materialize(ASSETS, resources_for(), instance)
        assert metadata(again, "raw_train_images")["new_objects"] == 0
        # Unchanged sets do not materialize again, so nothing downstream is triggered.
        assert again.asset_materializations_for_node("train_images") == []
    with duckdb.connect(str(mri_env / "mri.duckdb"), read_only=True) as conn:
        reasons = dict(conn.execute("SELECT source_key, reason FROM rejected_images").fetchall())
        assert reasons["train/glioma/truncated.jpg"] == "truncated"
        assert reasons["train/.DS_Store"] == "hidden_file"
        assert (
            conn.execute("SELECT count(*) FROM images WHERE split='train'").fetchall()[0][0]
            == 6 + 5
        )


def test_declared_column_schemas_are_the_duckdb_tables(mri_env):
    landing = LocalLanding(mri_env / "landing")
    land_small_dataset(landing)
    landing.write("train/glioma/empty.png", b"")
    with dg.instance_for_test() as instance:
        materialize(ASSETS, resources_for(), instance)
    tables = {
        "raw_train_images": "landed_images",
        "raw_test_images": "landed_images",
        "images": "images",
        "rejected_images": "rejected_images",
        "train_images": "train_images",
        "test_images": "test_images",
    }
    with duckdb.connect(str(mri_env / "mri.duckdb"), read_only=True) as conn:
        for asset, table in tables.items():
            assert declared_columns(asset) == duckdb_columns(conn, table), asset


def test_landing_a_test_copy_of_a_train_image_keeps_the_splits_apart(mri_env):
    landing = LocalLanding(mri_env / "landing")
    land_small_dataset(landing)
    with dg.instance_for_test() as instance:
        materialize(ASSETS, resources_for(), instance)
        landing.write("test/glioma/leak.png", png_bytes(0))  # same content as train/Glioma T2/0.png
        result = materialize(ASSETS, resources_for(), instance)
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks["no_train_test_overlap"]
        assert (
            result.asset_materializations_for_node("test_images") == []
        )  # the test set is unchanged


def test_single_class_split_fails_the_both_classes_check(mri_env):
    landing = LocalLanding(mri_env / "landing")
    landing.write("train/glioma/a.png", png_bytes(1))
    landing.write("test/glioma/b.png", png_bytes(2))
    with dg.instance_for_test() as instance:
        result = materialize(ASSETS, resources_for(), instance)
    check = next(
        e
        for e in result.get_asset_check_evaluations()
        if e.check_name == "both_classes_in_each_split"
    )
    assert not check.passed
    assert check.metadata["missing"].value == ["train/meningioma", "test/meningioma"]


def test_s3_landing_zone_over_http(mri_env, s3_bucket):
    import boto3

    from mri_assets.core.landing import S3Landing

    location = f"s3://{s3_bucket}/landing"
    landing = S3Landing(boto3.client("s3"), location)
    land_small_dataset(landing)
    landing.write("train/glioma/broken.jpg", b"\xff\xd8\xff garbage")
    with dg.instance_for_test() as instance:
        result = materialize(ASSETS, resources_for(landing=location), instance)
    raw = metadata(result, "raw_train_images")
    assert raw["landing_zone"] == location
    assert (raw["new_accepted"], raw["new_rejected"]) == (6, 1)


def test_dicom_slices_are_ingested_and_no_patient_identifier_reaches_tables_or_logs(mri_env):
    import numpy as np

    from mri_assets_tests.core.test_dicom import IDENTIFIERS, build_dicom

    landing = LocalLanding(mri_env / "landing")
    land_small_dataset(landing)
    slice_ = (np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 2).astype(np.uint16)
    landing.write("train/glioma/slice.dcm", build_dicom(slice_, window=(1500, 3000)))
    landing.write("train/glioma/IM0001", build_dicom(slice_[::-1].copy()))  # no extension
    with dg.instance_for_test() as instance:
        result = materialize(ASSETS, resources_for(), instance)
        logs = [
            str(entry.dagster_event.event_specific_data if entry.dagster_event else "")
            + entry.user_message
            for entry in instance.all_logs(result.run_id)
        ]
    with duckdb.connect(str(mri_env / "mri.duckdb"), read_only=True) as conn:
        dicom = conn.execute(
            "SELECT source_key, source_format, modality, series_description, pixel_spacing_mm "
            "FROM images WHERE source_format = 'DICOM' ORDER BY source_key"
        ).fetchall()
        tables = [row[0] for row in conn.execute("SHOW TABLES").fetchall()]
        dumped = "\n".join(
            str(conn.execute(f"SELECT * FROM {table}").fetchall()) for table in tables
        )
    assert dicom == [
        ("train/glioma/IM0001", "DICOM", "MR", "T2 AX", "0.5x0.75"),
        ("train/glioma/slice.dcm", "DICOM", "MR", "T2 AX", "0.5x0.75"),
    ]
    everything = dumped + "\n".join(logs)
    for value in IDENTIFIERS.values():
        assert str(value) not in everything
