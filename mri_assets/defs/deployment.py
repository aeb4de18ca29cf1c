"""Deployment stage: the promotion gate (a blocking check) and the deployed model itself.

Both read the standing candidate_evaluation recorded; neither compares models again.

A refusal is a decision, not an incident. The gate then fails with WARN severity: the check shows
as failed on candidate_evaluation and its Slack message says why, but the run stays green and the
run-failure alert stays quiet. In Dagster only an ERROR-severity failure of a blocking check
stops downstream steps, by failing the check's step and so the run (red run, second Slack
message); so deployed_model reads the same standing and skips (no materialization) when the
candidate was refused. Automation holds deployed_model too: `all_deps_blocking_checks_passed`
needs the gate's latest execution to have passed, whatever its severity.
"""

from collections.abc import Iterator

import dagster as dg

from mri_assets.core.catalog import sync_deployments
from mri_assets.core.evaluation import evaluation_plots_markdown
from mri_assets.core.evaluation_records import find_evaluation
from mri_assets.core.notify import promotion_message, refusal_message
from mri_assets.core.promotion import deployment_step
from mri_assets.defs.models import (
    MODEL_ASSET,
    candidate_evaluation,
    recorded_standing,
    standing_metadata,
)
from mri_assets.resources import (
    ModelStoreResource,
    MriSettingsResource,
    SlackAlerts,
    WarehouseResource,
)


@dg.asset_check(
    asset=candidate_evaluation,
    blocking=True,
    description=(
        "The candidate's ROC AUC must beat the baseline's and the deployed model's, on the same "
        "test-set version, by MRI_PROMOTION_MARGIN, as recorded by candidate_evaluation. A "
        "refusal fails it with WARN severity and one Slack message; deployed_model then skips. "
        "Executed alone it reads the same record: to decide again (say, with another margin), "
        "materialize candidate_evaluation."
    ),
)
def candidate_beats_deployed_and_baseline(
    context: dg.AssetCheckExecutionContext,
    model_store: ModelStoreResource,
    warehouse: WarehouseResource,
    alerts: SlackAlerts,
) -> dg.AssetCheckResult:
    standing, _ = recorded_standing(warehouse, model_store)
    if not standing.decision.allowed:
        alerts.post(
            refusal_message(standing, alerts.dagster_url(), context.run.run_id), log=context.log
        )
    return dg.AssetCheckResult(
        passed=standing.decision.allowed,
        severity=dg.AssetCheckSeverity.WARN,  # refused is a decision; see the module docstring
        description=standing.decision.reason,
        metadata=standing_metadata(standing),
    )


def history_markdown(history) -> str:
    rows = ["| when (UTC) | action | version | ROC AUC | test set |", "|---|---|---|---|---|"]
    for e in reversed(history[-20:]):
        auc = "n/a" if e["auc"] is None else f"{e['auc']:.4f}"
        rows.append(
            f"| {e['deployed_at']} | {e['action']} | {e['version']} | {auc} "
            f"| {e['test_set_version']} |"
        )
    return "\n".join(rows)


@dg.asset(
    **{**MODEL_ASSET, "group_name": "deployment"},
    deps=[candidate_evaluation],
    kinds={"pytorch", "duckdb"},
    output_required=False,  # a refused candidate: no materialization, and no failed run
    automation_condition=(
        dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
    ),
    description=(
        "The model `mri-assets predict` serves. Promotes the candidate only when the standing "
        "candidate_evaluation recorded allows it (else it skips, with no materialization); the "
        "store's pointer flips atomically (a crash leaves the previous model deployed), and each "
        "promotion is appended to DuckDB `deployments`."
    ),
)
def deployed_model(
    context: dg.AssetExecutionContext,
    settings: MriSettingsResource,
    model_store: ModelStoreResource,
    warehouse: WarehouseResource,
    alerts: SlackAlerts,
) -> Iterator[dg.MaterializeResult]:
    standing, test_set = recorded_standing(warehouse, model_store)
    store = model_store.open()
    deployed_now = store.deployed()
    step = deployment_step(standing, deployed_now["version"] if deployed_now else None)
    if step.action == "skip":
        context.log.info(f"deployed_model is not materialized: {step.reason}")
        return
    if step.action == "stale":
        raise dg.Failure(step.reason)
    candidate = standing.candidate
    if step.action == "promote":
        store.promote(candidate.version, candidate.roc_auc, standing.test_set_version, step.reason)
        alerts.post(
            promotion_message(standing, alerts.dagster_url(), context.run.run_id), log=context.log
        )
    history = store.deployment_history()
    classes = settings.resolve().classes
    with warehouse.connection() as conn:
        added = sync_deployments(conn, history)
        evaluation = find_evaluation(conn, candidate.version, test_set, classes)
    plots = evaluation_plots_markdown(evaluation, classes, "deployed") if evaluation else ""
    yield dg.MaterializeResult(
        metadata={
            **standing_metadata(standing),
            "deployed_version": candidate.version,
            "deployed_roc_auc": candidate.roc_auc,
            "deployments_recorded": added,
            "plots": dg.MetadataValue.md(plots),
            "history": dg.MetadataValue.md(history_markdown(history)),
        },
        data_version=dg.DataVersion(candidate.version),
    )


deployment_assets = [deployed_model]
deployment_checks = [candidate_beats_deployed_and_baseline]
