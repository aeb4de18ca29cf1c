"""Models stage: the base model, its baseline on the test set, the fine-tuned candidate and its
evaluation next to the deployed model."""

import time
from typing import Literal

import dagster as dg

from mri_assets.core import catalog
from mri_assets.core.evaluation import (
    Evaluation,
    evaluate,
    evaluation_plots_markdown,
    find_evaluation,
    metrics_metadata,
    record_evaluation,
)
from mri_assets.resources import (
    ModelStoreResource,
    MriSettingsResource,
    PixelCacheResource,
    WarehouseResource,
)

TRAIN_IMAGES = dg.AssetKey("train_images")
TEST_IMAGES = dg.AssetKey("test_images")

AC = dg.AutomationCondition

# eager() treats an asset already missing on the automation sensor's first tick as "handled" (the
# initial evaluation resets it), so base_model, which has no parents to update, would never be
# built. Request it while it is missing; never again after a failed run (no retry loop).
WHEN_MISSING = (AC.missing() & ~AC.in_progress() & ~AC.execution_failed()).with_label(
    "missing, not in progress, not failed"
)


def eager_after_frozen_sets() -> dg.AutomationCondition:
    """eager(), except that train_images and test_images count only once their run has ended.

    Those two yield nothing when their content did not change. eager() would request their children
    in the same run ("will be requested" counts as an update); there a child is skipped when its
    parent yields nothing, and on the next tick the parent's real update is ignored because that run
    had planned the child. So the model assets wait while either set is requested or being rebuilt,
    then count a real materialization as an update. Waiting for both sets also keeps a tick that
    falls between the two materializations from splitting the models into several runs (and from
    evaluating the old candidate on the new test set just before the new candidate exists).
    """
    frozen = dg.AssetSelection.assets(TRAIN_IMAGES, TEST_IMAGES)
    updated = (AC.newly_updated() & ~AC.executed_with_root_target()).with_label(
        "newly_updated_without_root"
    )
    any_deps_updated = (
        AC.any_deps_match(updated | AC.will_be_requested()).ignore(frozen)
        | AC.any_deps_match(updated).allow(frozen)
    ).with_label("any_deps_updated")
    busy = AC.in_progress() | AC.will_be_requested()
    rebuilding = AC.asset_matches(TRAIN_IMAGES, busy) | AC.asset_matches(TEST_IMAGES, busy)
    return (
        AC.eager().replace("any_deps_updated", any_deps_updated)
        & ~rebuilding.with_label("train_images or test_images requested or in progress")
    ).with_label("eager after train_images and test_images")


class FineTuneConfig(dg.Config):
    """How the candidate is trained; the defaults are calibrated for the embedded model."""

    strategy: Literal["full", "linear_probe"] = "full"
    epochs: int = 15
    learning_rate: float | None = None
    batch_size: int = 32
    image_size: int | None = None
    seed: int = 0
    validation_fraction: float = 0.15
    early_stopping_patience: int = 5


def base_model_version(fingerprint: str) -> str:
    return f"base-{fingerprint[:12]}"


def load_base(settings: MriSettingsResource, model_store: ModelStoreResource):
    from mri_assets.core.model import load_base_model, weights_fingerprint

    resolved = settings.resolve()
    base = load_base_model(resolved.base_model, resolved.classes, model_store.base_root())
    return base, base_model_version(weights_fingerprint(base.model))


def latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, name: str):
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get(name)
    return getattr(value, "value", None)


def current_test_set(warehouse: WarehouseResource) -> catalog.SplitSnapshot:
    with warehouse.connection() as conn:
        return catalog.read_split_table(conn, "test")


def evaluate_once(
    warehouse: WarehouseResource,
    pixels: PixelCacheResource,
    settings: MriSettingsResource,
    model_version: str,
    role: str,
    test_set: catalog.SplitSnapshot,
    load_model,
) -> Evaluation:
    """This model's evaluation on this test set: read back if recorded, else computed and recorded."""
    classes = settings.resolve().classes
    with warehouse.connection() as conn:
        found = find_evaluation(conn, model_version, test_set, classes)
    if found is not None:
        return found
    model, preprocessing = load_model()
    result = evaluate(model, preprocessing, test_set, pixels.open(), classes, model_version)
    with warehouse.connection() as conn:
        record_evaluation(conn, result, role)
    return result


def evaluation_metadata(evaluation: Evaluation, settings: MriSettingsResource, title: str) -> dict:
    classes = settings.resolve().classes
    metrics = evaluation.metrics
    return {
        **metrics_metadata(metrics),
        "model_version": evaluation.model_version,
        "test_set_version": evaluation.test_set_version,
        "test_images": metrics["n"],
        "confusion_matrix": metrics["confusion_matrix"],
        "warning": metrics.get("warning") or "",
        "reused_recorded_evaluation": evaluation.reused,
        "plots": dg.MetadataValue.md(evaluation_plots_markdown(evaluation, classes, title)),
    }


@dg.asset(
    group_name="models",
    kinds={"pytorch", "huggingface"},
    automation_condition=WHEN_MISSING,
    description=(
        "The base classifier named by MRI_BASE_MODEL: the embedded small ResNet (created once, "
        "then read from the model store), a hub id, or a save_pretrained folder. Safetensors only."
    ),
)
def base_model(settings: MriSettingsResource, model_store: ModelStoreResource) -> dg.MaterializeResult:
    base, version = load_base(settings, model_store)
    parameters = sum(p.numel() for p in base.model.parameters())
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "spec": base.spec,
            "source": base.source,
            "parameters": parameters,
            "architecture": type(base.model).__name__,
            "preprocessing": base.preprocessing.to_dict(),
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset(
    deps=[base_model, TEST_IMAGES],
    group_name="models",
    kinds={"pytorch", "duckdb"},
    automation_condition=eager_after_frozen_sets(),
    description=(
        "The base model evaluated on the current test set before any fine-tuning: the bar every "
        "candidate must clear. One row in DuckDB `evaluations` per test-set version."
    ),
)
def baseline(
    settings: MriSettingsResource,
    model_store: ModelStoreResource,
    warehouse: WarehouseResource,
    pixels: PixelCacheResource,
) -> dg.MaterializeResult:
    test_set = current_test_set(warehouse)
    base, version = load_base(settings, model_store)
    result = evaluate_once(
        warehouse, pixels, settings, version, "baseline", test_set,
        lambda: (base.model, base.preprocessing),
    )
    return dg.MaterializeResult(
        metadata=evaluation_metadata(result, settings, "baseline"),
        data_version=dg.DataVersion(f"{version}@{test_set.version}"),
    )


@dg.asset(
    deps=[base_model, TRAIN_IMAGES],
    group_name="models",
    kinds={"pytorch", "huggingface"},
    automation_condition=eager_after_frozen_sets(),
    description=(
        "A candidate classifier fine-tuned on the current train set (strategy `full` or "
        "`linear_probe`), saved as a new immutable version in the model store: safetensors "
        "weights, config, preprocessing and a training record."
    ),
)
def fine_tuned_model(
    context: dg.AssetExecutionContext,
    config: FineTuneConfig,
    settings: MriSettingsResource,
    model_store: ModelStoreResource,
    warehouse: WarehouseResource,
    pixels: PixelCacheResource,
) -> dg.MaterializeResult:
    from mri_assets.core.train import TrainConfig, data_snapshot_hash, fine_tune

    resolved = settings.resolve()
    with warehouse.connection() as conn:
        train_set = catalog.read_split_table(conn, "train")
    if not len(train_set):
        raise dg.Failure(
            "the train set is empty: land scans under <landing>/train/ and materialize train_images"
        )
    train_config = TrainConfig(**config.model_dump())
    base, base_version = load_base(settings, model_store)
    started = time.perf_counter()
    result = fine_tune(
        base.model,
        base.preprocessing,
        list(train_set.sha256s),
        [resolved.classes.index(label) for label in train_set.labels],
        pixels.open().get_many,
        train_config,
        embedding_cache=model_store.embedding_cache(),
        log=context.log.info,
    )
    record = {
        "base_model": {"spec": base.spec, "source": base.source, "version": base_version},
        "train_set_version": train_set.version,
        "data_snapshot": data_snapshot_hash(train_set.sha256s, train_set.labels),
        "classes": list(resolved.classes.names),
        "positive_class": resolved.classes.positive,
        "dagster_run_id": context.run.run_id,
        **result.summary(),
    }
    version = model_store.open().save_version(result.model, result.preprocessing, record)
    best = next(e for e in result.epochs if e.epoch == result.best_epoch)
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "strategy": train_config.strategy,
            "train_set_version": train_set.version,
            "train_images": result.n_train,
            "validation_images": result.n_validation,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.epochs),
            "validation_auc": best.val_auc,
            "training_seconds": round(time.perf_counter() - started, 1),
            "epochs": dg.MetadataValue.md(epochs_markdown(result.epochs)),
        },
        data_version=dg.DataVersion(version),
    )


def epochs_markdown(epochs) -> str:
    rows = ["| epoch | train loss | val loss | val AUC | val accuracy | seconds |", "|---|---|---|---|---|---|"]
    for e in epochs:
        cells = [e.epoch, e.train_loss, e.val_loss, e.val_auc, e.val_accuracy, e.seconds]
        rows.append("| " + " | ".join("" if c is None else f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(rows)


def candidate_version(instance: dg.DagsterInstance) -> str:
    version = latest_metadata(instance, dg.AssetKey("fine_tuned_model"), "model_version")
    if not version:
        raise dg.Failure("no fine_tuned_model has been materialized yet: materialize it first")
    return version


@dg.asset(
    deps=[fine_tuned_model, baseline, TEST_IMAGES],
    group_name="models",
    kinds={"pytorch", "duckdb"},
    automation_condition=eager_after_frozen_sets(),
    description=(
        "The latest candidate and the currently deployed model, evaluated on the same, current "
        "test-set version (ROC AUC from probabilities, accuracy, precision, recall, F1, log loss). "
        "Its blocking check decides whether the candidate may be promoted."
    ),
)
def candidate_evaluation(
    context: dg.AssetExecutionContext,
    settings: MriSettingsResource,
    model_store: ModelStoreResource,
    warehouse: WarehouseResource,
    pixels: PixelCacheResource,
) -> dg.MaterializeResult:
    store = model_store.open()
    version = candidate_version(context.instance)
    test_set = current_test_set(warehouse)
    candidate = evaluate_once(
        warehouse, pixels, settings, version, "candidate", test_set,
        lambda: store.load_version(version),
    )
    metadata = evaluation_metadata(candidate, settings, "candidate")
    deployed = store.deployed()
    if deployed is not None and deployed["version"] != version:
        current = evaluate_once(
            warehouse, pixels, settings, deployed["version"], "deployed", test_set,
            lambda: store.load_version(deployed["version"]),
        )
        metadata["deployed_version"] = deployed["version"]
        metadata["deployed_roc_auc"] = metrics_metadata(current.metrics)["roc_auc"]
    return dg.MaterializeResult(
        metadata=metadata, data_version=dg.DataVersion(f"{version}@{test_set.version}")
    )


model_assets = [base_model, baseline, fine_tuned_model, candidate_evaluation]
