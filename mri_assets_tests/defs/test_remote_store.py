"""The whole pipeline with MRI_STORE=s3://... (moto's server over HTTP): what a run makes
durable lands in the bucket, and a machine with an empty MRI_HOME serves the deployed model."""

import json
import shutil

import boto3
import dagster as dg

from mri_assets.cli import main
from mri_assets.core.phantoms import write_dataset
from mri_assets.definitions import defs
from mri_assets_tests.conftest import png_bytes
from mri_assets_tests.defs.helpers import resources_for


def test_a_pipeline_run_keeps_its_durable_state_in_the_bucket(
    mri_env, s3_bucket, moto_server, monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("MRI_STORE", f"s3://{s3_bucket}/state")
    write_dataset(
        mri_env / "landing", seed=5, n_glioma=24, n_meningioma=24, size=64, progress=False
    )
    training = {"strategy": "linear_probe", "epochs": 1, "image_size": 32, "batch_size": 16}
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*defs.assets, *defs.asset_checks],
            resources=resources_for(promotion_margin=-1.0),  # any candidate will do here
            instance=instance,
            run_config={"ops": {"fine_tuned_model": {"config": training}}},
        )
    version = (
        result.asset_materializations_for_node("deployed_model")[0]
        .metadata["deployed_version"]
        .value
    )

    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert f"state/models/manifests/{version}.json" in keys
    assert "state/models/deployments.json" in keys
    assert any(k.startswith("state/pixels/packs/") and k.endswith(".idx") for k in keys)
    assert any(k.startswith("state/embeddings/") and k.endswith(".npy") for k in keys)

    # Another machine: nothing local at all, only MRI_STORE.
    monkeypatch.setenv("MRI_HOME", str(tmp_path / "empty-home"))
    image = tmp_path / "scan.png"
    image.write_bytes(png_bytes(1))
    assert main(["predict", "--json", str(image)]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(image)
    shutil.rmtree(tmp_path / "empty-home")
    assert main(["status"]) == 0
    assert f"deployed: {version}" in capsys.readouterr().out
