"""The `mri-assets` command, run as a user would (in-process through main())."""

import json

import boto3
import numpy as np
import pytest
from PIL import Image

from mri_assets.cli import main, served_statistics
from mri_assets.core.calibration import Temperature
from mri_assets.core.images import decode_image
from mri_assets.core.labels import ClassSpec
from mri_assets.core.landing import S3Landing
from mri_assets.core.model import load_base_model
from mri_assets.core.store import ModelStore


@pytest.fixture
def store_with_two_versions(mri_env):
    """Two stored, deployed versions of the embedded model (untrained: the CLI only serves them)."""
    store = ModelStore(mri_env / "models")
    base = load_base_model("embedded", ClassSpec(), store.base_root)
    first = store.save_version(base.model, base.preprocessing, {"train_set_version": "t1"})
    second = store.save_version(base.model, base.preprocessing, {"train_set_version": "t2"})
    store.promote(first, 0.9, "s1", "first")
    store.promote(second, 0.95, "s1", "better")
    return store, first, second


def test_make_dataset_is_deterministic(tmp_path, capsys):
    for name in ("a", "b"):
        assert (
            main(
                [
                    "make-dataset",
                    str(tmp_path / name),
                    "--glioma",
                    "3",
                    "--meningioma",
                    "2",
                    "--size",
                    "64",
                    "--quiet",
                ]
            )
            == 0
        )
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert len(files) == 5
    assert all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files
    )
    assert '"train": {"glioma": 3, "meningioma": 2}' in capsys.readouterr().out


def test_upload_to_s3_and_seed_landing_leaves_existing_scans_alone(tmp_path, s3_bucket, capsys):
    main(
        [
            "make-dataset",
            str(tmp_path / "ds"),
            "--glioma",
            "2",
            "--meningioma",
            "2",
            "--size",
            "32",
            "--quiet",
        ]
    )
    location = f"s3://{s3_bucket}/landing"
    assert main(["upload", str(tmp_path / "ds"), "--landing", location, "--quiet"]) == 0
    landing = S3Landing(boto3.client("s3"), location)
    assert len(list(landing.list_objects("train"))) == 4
    assert main(["seed-landing", "--landing", location, "--quiet"]) == 0
    assert "already holds scans" in capsys.readouterr().out
    assert len(list(landing.list_objects("train"))) == 4


def test_upload_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["upload", str(tmp_path / "nope"), "--landing", str(tmp_path / "l")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_predict_says_clearly_when_nothing_is_deployed(mri_env, capsys):
    assert main(["predict", "x.png"]) == 2
    assert "no model is deployed" in capsys.readouterr().err


def test_predict_json_lines_in_input_order(store_with_two_versions, tmp_path, capsys):
    main(
        [
            "make-dataset",
            str(tmp_path / "ds"),
            "--glioma",
            "1",
            "--meningioma",
            "1",
            "--size",
            "64",
            "--quiet",
        ]
    )
    images = sorted(str(p) for p in (tmp_path / "ds").rglob("*") if p.is_file())
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    capsys.readouterr()
    assert main(["predict", "--json", images[0], str(bad), images[1]]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == [images[0], str(bad), images[1]]
    assert lines[1]["error"] == "not_an_image"
    for line in (lines[0], lines[2]):
        assert set(line["scores"]) == {"glioma", "meningioma"}
        assert sum(line["scores"].values()) == pytest.approx(1.0, abs=1e-3)
        assert line["label"] == max(line["scores"], key=line["scores"].get)


def test_status_and_rollback(store_with_two_versions, mri_env, capsys):
    store, first, second = store_with_two_versions
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"deployed: {second}" in out and "0.9500" in out and first in out
    # A version stored without statistics: served uncalibrated and unflagged, and status says so.
    assert f"calibration: none (temperature 1): model version {second} was stored before" in out
    assert f"out-of-distribution flag: none: model version {second} was stored before" in out
    assert main(["rollback"]) == 0
    assert store.deployed()["version"] == first
    assert "recorded 3 deployment row(s)" in capsys.readouterr().out
    assert main(["rollback"]) == 2  # nothing earlier than the first version
    assert "error:" in capsys.readouterr().err
    import duckdb

    with duckdb.connect(str(mri_env / "mri.duckdb"), read_only=True) as conn:
        actions = conn.execute("SELECT action FROM deployments ORDER BY seq").fetchall()
    assert [a for (a,) in actions] == ["promote", "promote", "rollback"]


@pytest.fixture
def deployed_with_statistics(mri_env, tmp_path):
    """The embedded model deployed with statistics fitted on 20 generated 64 px slices."""
    from mri_assets.core.serving import fit_statistics

    main(
        ["make-dataset", str(tmp_path / "ds"), "--glioma", "10", "--meningioma", "10"]
        + ["--size", "64", "--test-fraction", "0.0", "--quiet"]
    )
    files = sorted(p for p in (tmp_path / "ds").rglob("*") if p.is_file())
    labels = [0 if "glioma" in str(p).lower() else 1 for p in files]
    pixels = [decode_image(p.read_bytes()).pixels for p in files]
    store = ModelStore(mri_env / "models")
    base = load_base_model("embedded", ClassSpec(), store.base_root)
    preprocessing = base.preprocessing.with_size(64)
    statistics = fit_statistics(base.model, preprocessing, pixels, labels, range(12), range(12, 20))
    version = store.save_version(
        base.model, preprocessing, statistics.to_record(), arrays=statistics.to_arrays()
    )
    store.promote(version, 0.9, "s1", "first")
    return version, files, statistics


def test_status_shows_the_temperature_and_ood_threshold_served(deployed_with_statistics, capsys):
    version, _, statistics = deployed_with_statistics
    capsys.readouterr()

    assert main(["status"]) == 0

    out = capsys.readouterr().out
    assert f"deployed: {version}" in out
    # 8 validation images: too few to fit a temperature, and status gives the recorded reason.
    assert f"calibration: none (temperature 1): {statistics.temperature.reason}" in out
    assert f"Mahalanobis distance above {statistics.ood.threshold:.4g} (the 99th percentile" in out


def test_status_shows_a_fitted_temperature():
    fitted = Temperature(value=0.61, fitted_on=76, nll_before=0.5, nll_after=0.4)
    lines = served_statistics("v1", {"calibration": fitted.to_record()})
    assert lines[0] == "calibration: temperature 0.61, fitted on 76 validation images"


def test_predict_reports_ood_score_and_flag_and_explains(
    deployed_with_statistics, tmp_path, capsys
):
    version, files, statistics = deployed_with_statistics
    inverted = tmp_path / "inverted.png"
    Image.fromarray(255 - np.asarray(Image.open(files[0]).convert("L"))).save(inverted)
    capsys.readouterr()

    code = main(
        ["predict", "--json", "--explain", str(tmp_path / "why"), str(files[0]), str(inverted)]
    )

    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for line in lines:
        assert line["model_version"] == version
        assert line["ood_threshold"] == pytest.approx(statistics.ood.threshold, abs=1e-3)
        assert line["ood_flag"] == (line["ood_score"] > line["ood_threshold"])
        overlay = Image.open(line["saliency"])
        assert overlay.format == "PNG" and overlay.size == (64, 64)
    assert lines[1]["ood_score"] > lines[0]["ood_score"]
    assert sorted(p.name for p in (tmp_path / "why").iterdir()) == [
        "0001-" + files[0].stem + ".gradcam.png",
        "0002-inverted.gradcam.png",
    ]


def test_predict_says_why_an_old_version_has_no_ood_score(
    store_with_two_versions, tmp_path, capsys
):
    _, _, second = store_with_two_versions
    image = tmp_path / "scan.png"
    Image.fromarray(np.full((40, 40), 90, dtype=np.uint8)).save(image)

    assert main(["predict", str(image)]) == 0

    captured = capsys.readouterr()
    assert captured.out.rstrip().endswith("ood=n/a")
    assert f"probabilities not calibrated: model version {second} was stored before" in captured.err
    assert "no out-of-distribution score" in captured.err


def test_make_dataset_hard_variation_writes_every_encoding_and_differs(tmp_path, capsys):
    from PIL import Image

    common = ["--glioma", "6", "--meningioma", "6", "--size", "48", "--quiet"]
    assert main(["make-dataset", str(tmp_path / "hard"), "--variation", "hard", *common]) == 0
    assert main(["make-dataset", str(tmp_path / "plain"), *common]) == 0
    modes = set()
    for path in (tmp_path / "hard").rglob("*.*"):
        with Image.open(path) as image:
            modes.add(image.mode)
    assert modes == {"L", "RGB", "RGBA", "P"}
    plain = {p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*.*")}
    for path in (tmp_path / "plain").rglob("*.*"):
        with Image.open(path) as image:
            assert image.mode == "L"  # the default data set stays gray PNG and JPEG
    assert len(plain) == 12


def test_variation_choices_are_the_generators():
    from mri_assets.cli import build_parser
    from mri_assets.core.phantoms import VARIATIONS

    for command in ("make-dataset", "seed-landing"):
        parser = build_parser()
        with pytest.raises(SystemExit):
            parser.parse_args(
                [command, *(["out"] if command == "make-dataset" else []), "--variation", "harder"]
            )
        for name in VARIATIONS:
            args = parser.parse_args(
                [command, *(["out"] if command == "make-dataset" else []), "--variation", name]
            )
            assert args.variation == name
