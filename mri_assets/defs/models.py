"""Models stage: the base model, its baseline on the test set, the fine-tuned candidate and its
evaluation next to the deployed model."""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import dagster as dg
from pydantic import Field, model_validator

from mri_assets.core import catalog
from mri_assets.core.evaluation import Evaluation, evaluation_plots_markdown, metrics_metadata
from mri_assets.core.evaluation_records import (
    STANDINGS_COLUMNS,
    find_evaluation,
    find_standing,
    record_evaluation,
    record_standing,
)
from mri_assets.core.labels import ClassSpec
from mri_assets.core.metrics import png_markdown, training_curve_png
from mri_assets.core.pixel_cache import PixelCache
from mri_assets.core.promotion import Standing, newest_version_trained_on
from mri_assets.core.recipe import (
    DEFAULT_LEARNING_RATE,
    PRETRAINED_RECIPE,
    STRATEGIES,
    EpochMetrics,
    TrainConfig,
    recipe_description,
    recommended_config,
)
from mri_assets.core.store import ModelStore
from mri_assets.defs.conventions import CODE_VERSION, GPU_STEP_TAGS, OWNERS, TAGS
from mri_assets.resources import (
    ModelStoreResource,
    MriSettingsResource,
    PixelCacheResource,
    WarehouseResource,
    column_schema,
)

TRAIN_IMAGES = dg.AssetKey("train_images")
TEST_IMAGES = dg.AssetKey("test_images")

AC = dg.AutomationCondition

# Shown on every model and deployment asset in the UI (Overview, asset catalog filters).

# eager() treats an asset already missing on the automation sensor's first tick as "handled" (the
# initial evaluation resets it), so base_model, which has no parents to update, would never be
# built. Request it while it is missing. After a failed run, the instance's run retries try again
# (dagster.yaml); once those are spent, the next ingest of training scans tries again, so a
# permanent fault is not retried in a loop and a fixed one heals without a click.
LANDING_UPDATED = AC.asset_matches(dg.AssetKey("raw_train_images"), AC.newly_updated()).with_label(
    "raw_train_images newly updated"
)
WHEN_MISSING = (
    AC.missing() & ~AC.in_progress() & (~AC.execution_failed() | LANDING_UPDATED)
).with_label("missing, not in progress, not failed since the last training ingest")


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


_TRAIN_DEFAULTS = TrainConfig()
# Launchpad fields left unset by default: the recipe that fits the base model picks them.
RECIPE_FIELDS = frozenset(PRETRAINED_RECIPE) - {"strategy"}


class FineTuneConfig(dg.Config):
    """How the candidate is trained (Launchpad: `fine_tuned_model` config).

    Fields, types and defaults are TrainConfig's (core/recipe.py); the checks are its own
    `__post_init__`, run when Dagster builds this config. The fields the recipe sets
    (PRETRAINED_RECIPE's: epochs, learning rate, warm start, backbone learning rate) are unset by
    default, and then take the value of the recipe that fits the base model
    (recipe.recommended_config: from scratch for the embedded model, LP-FT for a checkpoint).
    The strategy is an enum in the Launchpad schema, so a wrong one is refused before a run
    starts; a value of the right type but out of range (epochs 0, batch_size 1, ...) fails the
    step before any data is read or model loaded.
    """

    strategy: Literal[STRATEGIES] = Field(  # type: ignore[valid-type]
        default=_TRAIN_DEFAULTS.strategy,
        description="`full`: every weight trains, on augmented images; `linear_probe`: "
        "the backbone is frozen and only the head trains, on cached embeddings.",
    )
    epochs: int | None = Field(
        default=None,
        description=f"Most epochs to train (>= 1); unset: {recipe_description('epochs')}.",
    )
    learning_rate: float | None = Field(
        default=None,
        description="Peak learning rate of the one-cycle schedule; unset: "
        f"{recipe_description('learning_rate')} (`full`), "
        f"{DEFAULT_LEARNING_RATE['linear_probe']:g} for `linear_probe`.",
    )
    batch_size: int = Field(
        default=_TRAIN_DEFAULTS.batch_size, description="Images per step (>= 2)."
    )
    image_size: int | None = Field(
        default=_TRAIN_DEFAULTS.image_size,
        description="Side in pixels the images are resized to (>= 16); unset: the base model's.",
    )
    seed: int = Field(
        default=_TRAIN_DEFAULTS.seed,
        description="Seed of the validation split, weight init, shuffling and augmentation.",
    )
    validation_fraction: float = Field(
        default=_TRAIN_DEFAULTS.validation_fraction,
        description="Share of the train set held out to pick the best epoch, in [0, 0.5).",
    )
    early_stopping_patience: int = Field(
        default=_TRAIN_DEFAULTS.early_stopping_patience,
        description="Epochs without a better validation loss before training stops (>= 1).",
    )
    weight_decay: float = Field(
        default=_TRAIN_DEFAULTS.weight_decay, description="AdamW weight decay."
    )
    augment: bool = Field(
        default=_TRAIN_DEFAULTS.augment,
        description="Random flips, rotation, scale, shift, contrast gamma, gain and shading of "
        "the training images (`full` only; recipe.Augmentation).",
    )
    num_threads: int | None = Field(
        default=_TRAIN_DEFAULTS.num_threads,
        description="CPU threads torch may use (>= 1); unset: torch's default, one per core. "
        "1 is often faster on a busy shared machine.",
    )
    probe_epochs: int | None = Field(
        default=None,
        description="`full` only: epochs of linear probing (head only) before the whole network "
        f"trains (>= 0; 0 skips the warm start); unset: {recipe_description('probe_epochs')}.",
    )
    backbone_lr_factor: float | None = Field(
        default=None,
        description="`full` only: the backbone's learning rate as a share of the head's, in "
        f"(0, 1]; unset: {recipe_description('backbone_lr_factor')}.",
    )

    @model_validator(mode="after")
    def _valid_for_training(self) -> "FineTuneConfig":
        # TrainConfig's own checks, under both recipes; its ValueError names the field.
        for pretrained in (False, True):
            self.to_train_config(pretrained)
        return self

    def to_train_config(self, pretrained: bool) -> TrainConfig:
        """The TrainConfig for a base model from scratch (False) or pretrained (True): the
        recipe's values (recipe.recommended_config) where a recipe field is unset."""
        values = self.model_dump()
        overrides = {
            name: value
            for name, value in values.items()
            if not (name in RECIPE_FIELDS and value is None)
        }
        return recommended_config(pretrained, **overrides)


def base_model_version(fingerprint: str) -> str:
    return f"base-{fingerprint[:12]}"


def load_base(settings: MriSettingsResource, model_store: ModelStoreResource):
    """The base model MRI_BASE_MODEL names, and its version (a fingerprint of its weights)."""
    from mri_assets.core.model import load_base_model, weights_fingerprint

    resolved = settings.resolve()
    base = load_base_model(resolved.base_model, resolved.classes, model_store.base_root())
    return base, base_model_version(weights_fingerprint(base.model))


def current_split(warehouse: WarehouseResource, split: str) -> catalog.SplitSnapshot:
    with warehouse.connection() as conn:
        return catalog.read_split_table(conn, split)


def current_candidate(store: ModelStore, train_set_version: str) -> str:
    """The candidate: the newest stored version fine_tuned_model trained on this train set."""
    version = newest_version_trained_on(
        store.versions(),
        lambda v: store.training_record(v).get("train_set_version"),
        train_set_version,
    )
    if version is None:
        raise dg.Failure(
            f"no model in {store.versions_root} was trained on the current train set "
            f"{train_set_version}: materialize fine_tuned_model first"
        )
    return version


def recorded_standing(
    warehouse: WarehouseResource, model_store: ModelStoreResource
) -> tuple[Standing, catalog.SplitSnapshot]:
    """The standing candidate_evaluation recorded for the current candidate and test set (and
    that test set). A missing record is an error that says what to materialize."""
    train_set = current_split(warehouse, "train")
    test_set = current_split(warehouse, "test")
    candidate = current_candidate(model_store.open(), train_set.version)
    with warehouse.connection() as conn:
        standing = find_standing(conn, candidate, test_set.version)
    if standing is None:
        raise dg.Failure(
            f"no standing is recorded for candidate {candidate} on test set {test_set.version}: "
            "materialize candidate_evaluation first"
        )
    return standing, test_set


@dataclass(frozen=True)
class TestBench:
    """One test-set version and what evaluating a model on it takes. Each model is evaluated on
    it once: the evaluation is recorded in DuckDB `evaluations` and read back after."""

    warehouse: WarehouseResource
    pixels: PixelCache
    classes: ClassSpec
    device: str
    test_set: catalog.SplitSnapshot

    @classmethod
    def current(
        cls,
        warehouse: WarehouseResource,
        pixels: PixelCacheResource,
        settings: MriSettingsResource,
    ) -> "TestBench":
        resolved = settings.resolve()
        return cls(
            warehouse,
            pixels.open(),
            resolved.classes,
            resolved.device,
            current_split(warehouse, "test"),
        )

    def recorded(self, version: str) -> Evaluation | None:
        with self.warehouse.connection() as conn:
            return find_evaluation(conn, version, self.test_set, self.classes)

    def evaluated(
        self, version: str, role: str, model, preprocessing, temperature: float = 1.0
    ) -> Evaluation:
        """The recorded evaluation of ``version``, else this model's (probabilities calibrated
        by ``temperature``), computed and recorded."""
        from mri_assets.core.inference import evaluate

        found = self.recorded(version)
        if found is not None:
            return found
        result = evaluate(
            model,
            preprocessing,
            self.test_set,
            self.pixels,
            self.classes,
            version,
            device=self.device,
            temperature=temperature,
        )
        with self.warehouse.connection() as conn:
            record_evaluation(conn, result, role)
        return result

    def stored_evaluated(self, store: ModelStore, version: str, role: str) -> Evaluation:
        """As ``evaluated``, for a stored version: loaded only when not evaluated yet, and scored
        as it is served (its own temperature; T = 1 for a version stored before calibration)."""
        from mri_assets.core.serving import ServedModel

        found = self.recorded(version)
        if found is not None:
            return found
        served = ServedModel.load(store, version)
        return self.evaluated(
            version, role, served.model, served.preprocessing, temperature=served.temperature
        )


def evaluation_metadata(evaluation: Evaluation, classes: ClassSpec, title: str) -> dict:
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


def standing_metadata(standing: Standing) -> dict:
    """What the gate, candidate_evaluation and deployed_model show about a standing."""
    return {
        "decision": standing.decision.action,
        "reason": standing.decision.reason,
        "candidate_version": standing.candidate.version,
        "candidate_roc_auc": standing.candidate.roc_auc,
        "deployed_version": standing.deployed.version if standing.deployed else None,
        "deployed_roc_auc": standing.deployed.roc_auc if standing.deployed else None,
        "baseline_roc_auc": standing.baseline.roc_auc,
        "promotion_margin": standing.margin,
        "test_set_version": standing.test_set_version,
        "comparison": dg.MetadataValue.md(standing.comparison_markdown()),
    }


MODEL_ASSET = {
    "group_name": "models",
    "owners": OWNERS,
    "tags": TAGS,
    "code_version": CODE_VERSION,
}


@dg.asset(
    **MODEL_ASSET,
    kinds={"pytorch", "huggingface"},
    automation_condition=WHEN_MISSING,
    description=(
        "The base classifier named by MRI_BASE_MODEL: the embedded small ResNet (created once, "
        "then read from the model store), a hub id, or a save_pretrained folder. Safetensors only."
    ),
)
def base_model(
    settings: MriSettingsResource, model_store: ModelStoreResource
) -> dg.MaterializeResult:
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
    **MODEL_ASSET,
    deps=[base_model, TEST_IMAGES],
    op_tags=GPU_STEP_TAGS,
    kinds={"pytorch", "duckdb"},
    automation_condition=eager_after_frozen_sets(),
    description=(
        "The base model evaluated on the current test set before any fine-tuning: the bar every "
        "candidate must clear by MRI_PROMOTION_MARGIN. A base whose two-class head is new (the "
        "embedded model, or a checkpoint trained on other classes, such as ImageNet's) scores "
        "every image 0.5, so its ROC AUC is 0.5: the bar is chance. A checkpoint that already "
        "has a two-class head (a model fine-tuned earlier) is scored as it is: the bar is what it "
        "does without retraining. Metadata `measures` says which. One row in DuckDB "
        "`evaluations` per test-set version."
    ),
)
def baseline(
    settings: MriSettingsResource,
    model_store: ModelStoreResource,
    warehouse: WarehouseResource,
    pixels: PixelCacheResource,
) -> dg.MaterializeResult:
    bench = TestBench.current(warehouse, pixels, settings)
    base, version = load_base(settings, model_store)
    result = bench.evaluated(version, "baseline", base.model, base.preprocessing)
    return dg.MaterializeResult(
        metadata={
            **evaluation_metadata(result, bench.classes, "baseline"),
            "measures": baseline_measures(base.fresh_head),
            "base_model": base.spec,
        },
        data_version=dg.DataVersion(f"{version}@{bench.test_set.version}"),
    )


@dg.asset(
    **MODEL_ASSET,
    deps=[base_model, TRAIN_IMAGES],
    op_tags=GPU_STEP_TAGS,
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
    from mri_assets.core.serving import fit_statistics
    from mri_assets.core.train import fine_tune, training_record

    resolved = settings.resolve()
    train_set = current_split(warehouse, "train")
    if not len(train_set):
        raise dg.Failure(
            "the train set is empty: land scans under <landing>/train/ and materialize train_images"
        )
    base, base_version = load_base(settings, model_store)
    train_config = config.to_train_config(base.pretrained)
    context.log.info(f"recipe: {recipe_name(base.pretrained)}; {train_config.to_dict()}")
    labels = [resolved.classes.index(label) for label in train_set.labels]
    started, cpu_started = time.perf_counter(), time.process_time()
    result = fine_tune(
        base.model,
        base.preprocessing,
        list(train_set.sha256s),
        labels,
        pixels.open().get_many,
        train_config,
        embedding_cache=model_store.embedding_cache(),
        log=context.log.info,
        device=resolved.device,
    )
    statistics = fit_statistics(
        result.model,
        result.preprocessing,
        pixels.open().get_many(list(train_set.sha256s)),
        labels,
        result.train_indices,
        result.validation_indices,
        device=resolved.device,
    )
    record = training_record(
        result,
        train_set.sha256s,
        labels,
        resolved.classes.names,
        base_model={"spec": base.spec, "source": base.source, "version": base_version},
        # candidate_evaluation finds the candidate by this: the newest version on the train set.
        train_set_version=train_set.version,
        positive_class=resolved.classes.positive,
        dagster_run_id=context.run.run_id,
        **statistics.to_record(),
    )
    version = model_store.open().save_version(
        result.model, result.preprocessing, record, arrays=statistics.to_arrays()
    )
    best = next(e for e in result.epochs if e.epoch == result.best_epoch)
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "strategy": train_config.strategy,
            "recipe": recipe_name(base.pretrained),
            "train_config": train_config.to_dict(),
            "train_set_version": train_set.version,
            "train_images": result.n_train,
            "validation_images": result.n_validation,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.epochs),
            "validation_auc": best.val_auc,
            **statistics_metadata(statistics),
            "training_seconds": round(time.perf_counter() - started, 1),
            # CPU time of this process's threads: unlike the wall time, it barely grows when
            # other programs share the machine.
            "training_cpu_seconds": round(time.process_time() - cpu_started, 1),
            "epochs": dg.MetadataValue.md(epochs_markdown(result.epochs)),
            "training_curve": dg.MetadataValue.md(training_curve_markdown(result.epochs)),
        },
        data_version=dg.DataVersion(version),
    )


def statistics_metadata(statistics) -> dict:
    """The temperature and OOD threshold fitted with the version, or why there are none."""
    temperature = statistics.temperature
    ood = statistics.ood
    return {
        "temperature": round(temperature.value, 4),
        "temperature_note": temperature.reason
        or f"fitted on {temperature.fitted_on} validation "
        f"images: NLL {temperature.nll_before:.4f} -> {temperature.nll_after:.4f}",
        "ood_threshold": None if ood is None else round(ood.threshold, 3),
        "ood_note": statistics.ood_unavailable
        or f"Mahalanobis distance, {ood.percentile:g}th percentile of {ood.fitted_on} "
        "train and validation images",
    }


def recipe_name(pretrained: bool) -> str:
    """The training recipe recipe.recommended_config picks, in words."""
    if pretrained:
        return (
            "pretrained base: linear-probe warm start, then the whole network with a lower "
            "backbone learning rate (LP-FT)"
        )
    return "from scratch: the whole network, on augmented images"


def baseline_measures(fresh_head: bool) -> str:
    """What the baseline's figures mean, for the UI."""
    if fresh_head:
        return (
            "chance: the base model's two-class head is new and untrained (zeroed where it is "
            "one linear layer, so every image scores 0.5 and ROC AUC is 0.5); a candidate must "
            "beat that by the promotion margin"
        )
    return (
        "the base checkpoint's own two-class head, without retraining: a candidate must beat "
        "it by the promotion margin"
    )


def epochs_markdown(epochs: Sequence[EpochMetrics]) -> str:
    def cell(value) -> str:
        if value is None:
            return ""
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = [
        "| epoch | train loss | val loss | val AUC | val accuracy | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for e in epochs:
        cells = [e.epoch, e.train_loss, e.val_loss, e.val_auc, e.val_accuracy, e.seconds]
        rows.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(rows)


def training_curve_markdown(epochs: Sequence[EpochMetrics]) -> str:
    png = training_curve_png(
        [e.epoch for e in epochs],
        [e.train_loss for e in epochs],
        [e.val_loss for e in epochs],
        [e.val_auc for e in epochs],
        title="fine-tuning: loss and validation AUC",
    )
    return png_markdown(png, "training curve: loss and validation AUC per epoch")


@dg.asset(
    **MODEL_ASSET,
    deps=[fine_tuned_model, baseline, TEST_IMAGES],
    op_tags=GPU_STEP_TAGS,
    kinds={"pytorch", "duckdb"},
    automation_condition=eager_after_frozen_sets(),
    metadata=column_schema(STANDINGS_COLUMNS),  # its row in `standings`
    description=(
        "The candidate (the newest model trained on the current train set), the deployed model "
        "and the baseline on the same, current test-set version (ROC AUC from probabilities, "
        "accuracy, precision, recall, F1, log loss), and the promotion decision. The standing is "
        "recorded in DuckDB `standings`; its blocking check and deployed_model read it."
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
    bench = TestBench.current(warehouse, pixels, settings)
    version = current_candidate(store, current_split(warehouse, "train").version)
    candidate = bench.stored_evaluated(store, version, "candidate")
    base_version = store.training_record(version)["base_model"]["version"]
    base = bench.recorded(base_version)
    if base is None:
        raise dg.Failure(
            f"the baseline of {version}'s base model {base_version} on test set "
            f"{bench.test_set.version} is not recorded: materialize baseline first"
        )
    deployed_entry = store.deployed()
    deployed = None
    if deployed_entry is not None:
        deployed = bench.stored_evaluated(store, deployed_entry["version"], "deployed")
    standing = Standing.decide(
        test_set_version=bench.test_set.version,
        n_test=len(bench.test_set),
        base_rate_accuracy=candidate.metrics.get("base_rate_accuracy"),
        candidate=candidate.score,
        baseline=base.score,
        deployed=deployed.score if deployed else None,
        margin=settings.resolve().promotion_margin,
    )
    with warehouse.connection() as conn:
        record_standing(conn, standing, context.run.run_id)
    return dg.MaterializeResult(
        metadata={
            **evaluation_metadata(candidate, bench.classes, "candidate"),
            **standing_metadata(standing),
            "model_version": version,
        },
        data_version=dg.DataVersion(f"{version}@{bench.test_set.version}"),
    )


model_assets = [base_model, baseline, fine_tuned_model, candidate_evaluation]
