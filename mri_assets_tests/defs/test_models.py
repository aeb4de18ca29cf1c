"""The model chain on small generated data: baseline, fine-tuning, evaluation, promotion."""

import json
import shutil

import dagster as dg
import duckdb
import numpy as np
import pytest

from mri_assets.core.phantoms import write_dataset
from mri_assets.core.store import ModelStore
from mri_assets.definitions import defs
from mri_assets_tests.defs.helpers import declared_columns, duckdb_columns, resources_for

ALL = [*defs.assets, *defs.asset_checks]
# An unchanged train set does not re-materialize train_images (so automation never retrains on
# nothing new); a deliberate retrain selects the model assets themselves.
RETRAIN = ["fine_tuned_model", "candidate_evaluation", "deployed_model"]
# Enough training to beat the baseline clearly (the one test that needs a good model): ROC AUC
# about 0.9 on these phantoms at 48 px, against 0.94 for 15 epochs at 96 px in a tenth the time.
FAST = {"epochs": 14, "image_size": 48, "batch_size": 16}
# A candidate that cannot learn anything: one tiny step.
USELESS = {"epochs": 1, "image_size": 32, "batch_size": 16, "learning_rate": 1e-9}
# Any model will do where the test is about the gate's plumbing, not the model's quality; a
# negative MRI_PROMOTION_MARGIN then makes it eligible for promotion.
TINY = {"epochs": 1, "image_size": 32, "batch_size": 16}
ANY_CANDIDATE = {"promotion_margin": -1.0}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, seed=3, n_glioma=120, n_meningioma=120, size=128, progress=False)
    return root


@pytest.fixture
def landed(mri_env, small_dataset):
    shutil.copytree(small_dataset, mri_env / "landing")
    return mri_env


def run(instance, training: dict, selection=None, raise_on_error=True, **settings):
    return dg.materialize(
        ALL,
        resources=resources_for(**settings),
        instance=instance,
        selection=selection,
        run_config=(
            {"ops": {"fine_tuned_model": {"config": training}}}
            if selection is None or "fine_tuned_model" in selection
            else None
        ),
        raise_on_error=raise_on_error,
    )


def meta(result, key):
    return {k: v.value for k, v in result.asset_materializations_for_node(key)[-1].metadata.items()}


def check(result, name):
    return next(e for e in result.get_asset_check_evaluations() if e.check_name == name)


def test_chain_promotes_a_trained_model_and_refuses_a_worse_one(landed, fake_slack):
    store = ModelStore(landed / "models")
    with dg.instance_for_test() as instance:
        first = run(instance, FAST)
        baseline, candidate = meta(first, "baseline"), meta(first, "candidate_evaluation")
        assert abs(baseline["roc_auc"] - 0.5) < 0.2, baseline
        assert candidate["roc_auc"] > baseline["roc_auc"] + 0.25, candidate
        assert candidate["log_loss"] > 0 and "data:image/png;base64" in candidate["plots"]
        assert 0 <= candidate["expected_calibration_error"] < 0.5
        assert "reliability diagram" in candidate["plots"]
        assert candidate["decision"] == "promote" and "| baseline |" in candidate["comparison"]
        trained = meta(first, "fine_tuned_model")
        assert "data:image/png;base64" in trained["training_curve"]
        assert trained["epochs"].count("\n") == trained["epochs_run"] + 1  # header, rule, rows
        record = store.training_record(trained["model_version"])  # train.training_record's
        assert record["data_snapshot"]["sha256"] == record["train_set_version"]
        # Calibration and the OOD detector are fitted once, here, and stored with the version.
        assert record["calibration"]["temperature"] == pytest.approx(
            trained["temperature"], abs=1e-4
        )
        assert record["calibration"]["fitted_on"] == trained["validation_images"]
        assert record["ood"]["available"] and record["ood"]["threshold"] == pytest.approx(
            trained["ood_threshold"], abs=1e-3
        )
        assert set(store.load_arrays(trained["model_version"])) == {
            "ood.class_means",
            "ood.precision",
        }
        assert record["data_snapshot"]["n_images"] == sum(
            record["data_snapshot"]["n_per_class"].values()
        )
        deployed = meta(first, "deployed_model")
        assert deployed["decision"] == "promote"
        assert store.deployed()["version"] == trained["model_version"]
        [promoted] = fake_slack.texts()
        assert promoted.startswith(":white_check_mark: Promoted")
        assert f"/runs/{first.run_id}|" in promoted
        good_version = deployed["deployed_version"]

        # A refusal is a decision: the run succeeds, the gate fails (as a warning), one Slack
        # message says why, and deployed_model is not materialized.
        worse = run(instance, USELESS, selection=RETRAIN, raise_on_error=False)
        assert worse.success
        gate = check(worse, "candidate_beats_deployed_and_baseline")
        assert not gate.passed and "does not beat" in gate.description
        assert gate.severity == dg.AssetCheckSeverity.WARN
        assert worse.asset_materializations_for_node("deployed_model") == []
        assert store.deployed()["version"] == good_version
        [_, refused] = fake_slack.texts()
        assert refused.startswith(":no_entry: Candidate") and f"/runs/{worse.run_id}|" in refused

        # Materializing deployed_model by hand cannot sneak the refused candidate in.
        forced = run(instance, USELESS, selection=["deployed_model"], raise_on_error=False)
        assert forced.asset_materializations_for_node("deployed_model") == []
        assert store.deployed()["version"] == good_version
        assert len(fake_slack.texts()) == 2

    with duckdb.connect(str(landed / "mri.duckdb"), read_only=True) as conn:
        rows = conn.execute("SELECT model_version, test_set_version FROM evaluations").fetchall()
        assert len(rows) == len(set(rows)) == 3  # baseline, good and worse candidates: once each
        assert conn.execute("SELECT version, action FROM deployments").fetchall() == [
            (good_version, "promote")
        ]
        standings = conn.execute(
            "SELECT action, deployed_version FROM standings ORDER BY decided_at"
        ).fetchall()
        assert standings == [("promote", None), ("refuse", good_version)]
        assert declared_columns("candidate_evaluation") == duckdb_columns(conn, "standings")


def test_crash_between_saving_and_promoting_keeps_the_previous_model(landed, monkeypatch):
    store = ModelStore(landed / "models")
    with dg.instance_for_test() as instance:
        run(instance, TINY, **ANY_CANDIDATE)
        previous = store.deployed()

        def crash(*args, **kwargs):
            raise OSError("power cut while promoting")

        monkeypatch.setattr(ModelStore, "promote", crash)
        result = run(
            instance, dict(TINY, seed=1), selection=RETRAIN, raise_on_error=False, **ANY_CANDIDATE
        )
        assert check(result, "candidate_beats_deployed_and_baseline").passed
        new_version = meta(result, "fine_tuned_model")["model_version"]
        assert store.has_version(new_version)  # the new model is stored...
        assert store.deployed() == previous  # ...but the previous one is still deployed
        assert len(store.deployment_history()) == 1


def test_deployments_table_catches_up_after_a_crash_before_recording(landed, monkeypatch):
    import mri_assets.defs.deployment as deployment

    store = ModelStore(landed / "models")
    real_sync = deployment.sync_deployments

    def crash(*args, **kwargs):
        raise OSError("killed after the pointer flipped")

    with dg.instance_for_test() as instance:
        monkeypatch.setattr(deployment, "sync_deployments", crash)
        assert not run(instance, TINY, raise_on_error=False, **ANY_CANDIDATE).success
        assert store.deployed() is not None  # the pointer flip is the commit point
        monkeypatch.setattr(deployment, "sync_deployments", real_sync)
        again = run(instance, TINY, selection=["deployed_model"], **ANY_CANDIDATE)
        assert meta(again, "deployed_model")["deployments_recorded"] == 1
    with duckdb.connect(str(landed / "mri.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM deployments").fetchall()[0][0] == 1


def test_single_class_test_set_is_refused_with_a_clear_reason(mri_env, small_dataset):
    shutil.copytree(small_dataset / "train", mri_env / "landing" / "train")
    test = mri_env / "landing" / "test"
    for path in (small_dataset / "test").rglob("*"):
        if path.is_file() and "glioma" in str(path.relative_to(small_dataset)).lower():
            target = test / path.relative_to(small_dataset / "test")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    with dg.instance_for_test() as instance:
        result = run(instance, TINY, raise_on_error=False)
    evaluation = meta(result, "candidate_evaluation")
    assert evaluation["roc_auc"] is None and "only class 'glioma'" in evaluation["warning"]
    gate = check(result, "candidate_beats_deployed_and_baseline")
    assert not gate.passed and "undefined" in gate.description
    assert result.success and result.asset_materializations_for_node("deployed_model") == []


def test_launchpad_config_is_train_config_with_help_text():
    from dataclasses import asdict, fields

    from mri_assets.core.recipe import TrainConfig, recommended_config
    from mri_assets.defs.models import FineTuneConfig

    assert FineTuneConfig().to_train_config(pretrained=False) == TrainConfig()
    assert FineTuneConfig().to_train_config(pretrained=True) == recommended_config(True)
    assert list(FineTuneConfig.model_fields) == [f.name for f in fields(TrainConfig)]
    assert all(field.description for field in FineTuneConfig.model_fields.values())
    chosen = FineTuneConfig(epochs=3, augment=False)
    assert asdict(chosen.to_train_config(False))["augment"] is False
    # A value set in the Launchpad wins over either recipe; unset ones follow the base's recipe.
    assert chosen.to_train_config(True).epochs == chosen.to_train_config(False).epochs == 3
    assert chosen.to_train_config(True).probe_epochs == recommended_config(True).probe_epochs
    # Another strategy than the recipe's starts from TrainConfig's defaults for it.
    probe = FineTuneConfig(strategy="linear_probe").to_train_config(True)
    assert probe == TrainConfig(strategy="linear_probe")
    assert (
        str(recommended_config(False).epochs) in FineTuneConfig.model_fields["epochs"].description
    )


def test_launchpad_refuses_a_wrong_strategy_before_a_run_starts():
    job = defs.resolve_implicit_global_asset_job_def()
    config = {"ops": {"fine_tuned_model": {"config": {"strategy": "everything"}}}}
    with pytest.raises(dg.DagsterInvalidConfigError, match="strategy"):
        dg.validate_run_config(job, config)
    dg.validate_run_config(job, {"ops": {"fine_tuned_model": {"config": {"num_threads": 1}}}})


def test_an_out_of_range_value_fails_before_anything_is_trained(mri_env):
    result = dg.materialize(
        [defs.get_assets_def("fine_tuned_model")],
        resources=resources_for(),
        run_config={"ops": {"fine_tuned_model": {"config": {"validation_fraction": 0.7}}}},
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "validation_fraction must be in [0, 0.5)" in str(failure.event_specific_data.error)
    assert not (mri_env / "models" / "versions").exists()


def _separable_scans(landing, counts: dict[str, int], size: int = 48) -> None:
    """Scans a model learns in one go (gliomas dark, meningiomas bright, each with its own noise):
    the test below is about the plumbing of a pretrained base, not about telling tumours apart."""
    from mri_assets.core.phantoms import encode_image

    rng = np.random.default_rng(0)
    for split, count in counts.items():
        for label, level in (("glioma", 60), ("meningioma", 190)):
            for index in range(count):
                pixels = np.clip(rng.normal(level, 20, (size, size)), 0, 255).astype(np.uint8)
                target = landing / split / f"{label} ({index + 1}).png"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(encode_image(pixels, jpeg=False))


def test_a_resnet50_shaped_checkpoint_trains_with_its_recipe_and_is_promoted_and_served(
    mri_env, tmp_path, monkeypatch, capsys
):
    """MRI_BASE_MODEL names a save_pretrained folder of a ResNet-50-shaped ImageNet-style model
    (1000 classes, random weights): it loads with a fresh two-class head, trains with the
    pretrained recipe (linear-probe warm start, then the whole network at a lower backbone
    learning rate) for an epoch at a small size, is evaluated, promoted and served."""
    from mri_assets.cli import main as cli_main
    from mri_assets.core.model import RESNET50_ARCHITECTURE, random_resnet, save_preprocessing
    from mri_assets.core.preprocessing import Preprocessing
    from mri_assets.core.recipe import PRETRAINED_RECIPE

    folder = tmp_path / "resnet-50-random"
    random_resnet(RESNET50_ARCHITECTURE, num_labels=1000).save_pretrained(folder)
    save_preprocessing(Preprocessing(64), folder)
    monkeypatch.setenv("MRI_BASE_MODEL", str(folder))
    _separable_scans(mri_env / "landing", {"train": 12, "test": 6})
    training = {"epochs": 1, "probe_epochs": 2, "image_size": 32, "batch_size": 8}

    with dg.instance_for_test() as instance:
        result = run(instance, training)

    base = meta(result, "base_model")
    assert base["architecture"] == "ResNetForImageClassification" and base["parameters"] > 2e7
    baseline = meta(result, "baseline")
    assert baseline["roc_auc"] == 0.5 and baseline["measures"].startswith("chance")
    trained = meta(result, "fine_tuned_model")
    assert trained["recipe"].startswith("pretrained base")
    config = trained["train_config"]
    assert config["learning_rate"] == PRETRAINED_RECIPE["learning_rate"]
    assert config["backbone_lr_factor"] == PRETRAINED_RECIPE["backbone_lr_factor"]
    assert (config["epochs"], config["probe_epochs"], config["image_size"]) == (1, 2, 32)
    assert trained["epochs_run"] == 3  # two linear-probe epochs, then one of the whole network
    candidate = meta(result, "candidate_evaluation")
    assert candidate["decision"] == "promote" and candidate["roc_auc"] > 0.9, candidate
    store = ModelStore(mri_env / "models")
    assert store.deployed()["version"] == trained["model_version"]

    capsys.readouterr()
    scans = sorted((mri_env / "landing" / "test").glob("*.png"))
    assert cli_main(["predict", "--json", *map(str, scans)]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["label"] for a in answers] == [p.name.split(" ")[0] for p in scans]
