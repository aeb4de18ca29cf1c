"""Deployment stage: the promotion gate (a blocking check) and the deployed model itself."""

from dataclasses import dataclass

import dagster as dg

from mri_assets.core import catalog
from mri_assets.core.catalog import sync_deployments
from mri_assets.core.evaluation import Evaluation, evaluation_plots_markdown
from mri_assets.core.notify import Contender, promotion_message, refusal_message
from mri_assets.core.promotion import Decision, decide_promotion
from mri_assets.defs.models import (
    baseline,
    candidate_evaluation,
    candidate_version,
    current_test_set,
    evaluate_once,
    latest_metadata,
    load_base,
)
from mri_assets.resources import (
    ModelStoreResource,
    MriSettingsResource,
    PixelCacheResource,
    SlackAlerts,
    WarehouseResource,
)


@dataclass(frozen=True)
class Standing:
    """Candidate, deployed model and baseline on the same test-set version, and the verdict."""

    test_set: catalog.SplitSnapshot
    candidate: Evaluation
    baseline: Evaluation
    deployed_version: str | None
    deployed: Evaluation | None
    decision: Decision

    def contenders(self) -> list[Contender]:
        def entry(role: str, version: str | None, evaluation: Evaluation | None) -> Contender:
            m = evaluation.metrics if evaluation else {}
            return Contender(role, version, m.get("roc_auc"), m.get("accuracy"), m.get("log_loss"))

        return [
            entry("candidate", self.candidate.model_version, self.candidate),
            entry("deployed", self.deployed_version, self.deployed),
            entry("baseline", self.baseline.model_version, self.baseline),
        ]

    def message(self, promoted: bool) -> str:
        args = (self.contenders(), self.candidate.metrics["base_rate_accuracy"],
                self.test_set.version, len(self.test_set))
        if promoted:
            return promotion_message(self.candidate.model_version, *args)
        return refusal_message(self.candidate.model_version, self.decision.reason, *args)

    def metadata(self) -> dict:
        rows = ["| model | version | ROC AUC | accuracy | log loss |", "|---|---|---|---|---|"]
        for c in self.contenders():
            cells = [c.roc_auc, c.accuracy, c.log_loss]
            rows.append(
                f"| {c.role} | {c.version or '-'} | "
                + " | ".join("n/a" if v is None else f"{v:.4f}" for v in cells) + " |"
            )
        rows.append(f"| majority-class guess | - | - | {self.candidate.metrics['base_rate_accuracy']:.4f} | - |")
        return {
            "decision": self.decision.action,
            "reason": self.decision.reason,
            "candidate_version": self.candidate.model_version,
            "candidate_roc_auc": self.candidate.roc_auc,
            "deployed_roc_auc": self.deployed.roc_auc if self.deployed else None,
            "baseline_roc_auc": self.baseline.roc_auc,
            "test_set_version": self.test_set.version,
            "comparison": dg.MetadataValue.md("\n".join(rows)),
        }


def current_standing(
    instance: dg.DagsterInstance,
    settings: MriSettingsResource,
    model_store: ModelStoreResource,
    warehouse: WarehouseResource,
    pixels: PixelCacheResource,
) -> Standing:
    """Evaluations are recorded once per (model, test set), so this is cheap after the first call."""
    store = model_store.open()
    version = candidate_version(instance)
    test_set = current_test_set(warehouse)
    candidate = evaluate_once(warehouse, pixels, settings, version, "candidate", test_set,
                              lambda: store.load_version(version))
    base_version = latest_metadata(instance, baseline.key, "model_version")
    if base_version is None:
        base, base_version = load_base(settings, model_store)
        load = lambda: (base.model, base.preprocessing)  # noqa: E731
    else:
        def load():
            base, _ = load_base(settings, model_store)
            return base.model, base.preprocessing
    base_eval = evaluate_once(warehouse, pixels, settings, base_version, "baseline", test_set, load)
    deployed_entry = store.deployed()
    deployed_version = deployed_entry["version"] if deployed_entry else None
    deployed = None
    if deployed_version == version:
        deployed = candidate
    elif deployed_version is not None:
        deployed = evaluate_once(warehouse, pixels, settings, deployed_version, "deployed", test_set,
                                 lambda: store.load_version(deployed_version))
    decision = decide_promotion(
        version, candidate.roc_auc, base_eval.roc_auc, deployed_version,
        deployed.roc_auc if deployed else None, settings.resolve().promotion_margin,
    )
    return Standing(test_set, candidate, base_eval, deployed_version, deployed, decision)


@dg.asset_check(
    asset=candidate_evaluation,
    blocking=True,
    description=(
        "The candidate's ROC AUC must beat the baseline's and the deployed model's, on the same "
        "test-set version, by MRI_PROMOTION_MARGIN. Blocking: deployed_model waits for it."
    ),
)
def candidate_beats_deployed_and_baseline(
    context: dg.AssetCheckExecutionContext,
    settings: MriSettingsResource,
    model_store: ModelStoreResource,
    warehouse: WarehouseResource,
    pixels: PixelCacheResource,
    alerts: SlackAlerts,
) -> dg.AssetCheckResult:
    standing = current_standing(context.instance, settings, model_store, warehouse, pixels)
    if not standing.decision.allowed:
        alerts.post(standing.message(promoted=False), log=context.log)
    return dg.AssetCheckResult(
        passed=standing.decision.allowed,
        description=standing.decision.reason,
        metadata=standing.metadata(),
    )


def history_markdown(history) -> str:
    rows = ["| when (UTC) | action | version | ROC AUC | test set |", "|---|---|---|---|---|"]
    for e in reversed(history[-20:]):
        auc = "n/a" if e["auc"] is None else f"{e['auc']:.4f}"
        rows.append(
            f"| {e['deployed_at']} | {e['action']} | {e['version']} | {auc} | {e['test_set_version']} |"
        )
    return "\n".join(rows)


@dg.asset(
    deps=[candidate_evaluation],
    group_name="deployment",
    kinds={"pytorch", "duckdb"},
    automation_condition=(
        dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
    ),
    description=(
        "The model `mri-assets predict` serves. Promotes the candidate only when its blocking "
        "check passed; the store's pointer flips atomically (a crash leaves the previous model "
        "deployed), and each promotion is appended to DuckDB `deployments`."
    ),
)
def deployed_model(
    context: dg.AssetExecutionContext,
    settings: MriSettingsResource,
    model_store: ModelStoreResource,
    warehouse: WarehouseResource,
    pixels: PixelCacheResource,
    alerts: SlackAlerts,
) -> dg.MaterializeResult:
    standing = current_standing(context.instance, settings, model_store, warehouse, pixels)
    if not standing.decision.allowed:
        raise dg.Failure(
            f"candidate {standing.candidate.model_version} is not promoted: {standing.decision.reason}",
            metadata=standing.metadata(),
        )
    store = model_store.open()
    if standing.decision.action == "promote":
        store.promote(standing.candidate.model_version, standing.candidate.roc_auc,
                      standing.test_set.version, standing.decision.reason)
        alerts.post(standing.message(promoted=True), log=context.log)
    history = store.deployment_history()
    with warehouse.connection() as conn:
        added = sync_deployments(conn, history)
    current = store.deployed()
    return dg.MaterializeResult(
        metadata={
            **standing.metadata(),
            "deployed_version": current["version"],
            "deployed_roc_auc": standing.candidate.roc_auc,
            "deployments_recorded": added,
            "plots": dg.MetadataValue.md(
                evaluation_plots_markdown(standing.candidate, settings.resolve().classes, "deployed")
            ),
            "history": dg.MetadataValue.md(history_markdown(history)),
        },
        data_version=dg.DataVersion(current["version"]),
    )


deployment_assets = [deployed_model]
deployment_checks = [candidate_beats_deployed_and_baseline]
