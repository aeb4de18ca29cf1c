"""Predictions stage: the deployed model scores the inbox, with no click.

`predictions` runs when inbox scans are ingested and when a model is deployed (the new model
scores the whole inbox again; earlier rows stay). Its drift check reads the verdict the asset
computed on the scans it scored for the first time.
"""

import time

import dagster as dg

from mri_assets.core import catalog
from mri_assets.core.labels import ClassSpec
from mri_assets.core.metrics import png_markdown
from mri_assets.core.predictions import (
    drift_verdict,
    ensure_predictions_table,
    prediction_counts,
    predictions_columns,
    record_predictions,
    scans_to_score,
    score_scans,
    scored_contents,
    to_explain,
)
from mri_assets.defs.conventions import CODE_VERSION, GPU_STEP_TAGS, OWNERS, TAGS
from mri_assets.defs.deployment import deployed_model
from mri_assets.defs.ingest import raw_images_key
from mri_assets.resources import (
    ModelStoreResource,
    MriSettingsResource,
    PixelCacheResource,
    WarehouseResource,
    column_schema,
)

DRIFT_CHECK = "flagged_share_of_new_scans"
INLINE_OVERLAYS = 4  # thumbnails in the metadata; the rest are files under $MRI_HOME/saliency
THUMBNAIL_SIDE = 160


@dg.asset(
    group_name="predictions",
    owners=OWNERS,
    tags=TAGS,
    op_tags=GPU_STEP_TAGS,  # scoring and Grad-CAM run the model: on a cluster, a GPU node
    code_version=CODE_VERSION,
    deps=[deployed_model, raw_images_key(catalog.INBOX)],
    kinds={"pytorch", "duckdb"},
    automation_condition=dg.AutomationCondition.eager(),
    # The default classes' columns: MRI_CLASSES is read when a run starts, not at import.
    metadata=column_schema(predictions_columns(ClassSpec().names)),
    check_specs=[
        dg.AssetCheckSpec(
            DRIFT_CHECK,
            asset="predictions",
            description="Warns when the share of new inbox scans flagged out-of-distribution "
            "passes MRI_OOD_DRIFT_SHARE: the scans arriving no longer look like the training data.",
        )
    ],
    description=(
        "DuckDB table `predictions`: every accepted scan under `<landing>/inbox/**` scored by "
        "the deployed model, one row per (scan, model version): label, calibrated probability "
        "per class (`p_<class>`), out-of-distribution score and flag. A newly deployed model "
        "scores the inbox again (new rows; earlier ones are kept). Grad-CAM overlays of flagged "
        "and low-confidence predictions are written under $MRI_HOME/saliency/<version>/."
    ),
)
def predictions(
    context: dg.AssetExecutionContext,
    settings: MriSettingsResource,
    model_store: ModelStoreResource,
    warehouse: WarehouseResource,
    pixels: PixelCacheResource,
) -> dg.MaterializeResult:
    from mri_assets.core.serving import ServedModel

    resolved = settings.resolve()
    store = model_store.open()
    deployed = store.deployed()
    if deployed is None:
        raise dg.Failure(
            f"no model is deployed in {store.root}: materialize deployed_model first",
            allow_retries=False,
        )
    served = ServedModel.load(store, deployed["version"])
    with warehouse.connection() as conn:
        ensure_predictions_table(conn, served.class_names)
        scans = scans_to_score(conn, served.version)
        seen_before = scored_contents(conn)
    started = time.perf_counter()
    cache = pixels.open()
    frame = score_scans(served, scans, cache.get_many, device=resolved.device)
    scoring_seconds = time.perf_counter() - started
    new = frame[~frame["sha256"].isin(seen_before)].drop_duplicates("sha256")
    verdict = drift_verdict(list(new["ood_flag"]), resolved.ood_drift_share)
    explained = to_explain(frame)
    # With MRI_STORE in a bucket the overlays go there too: MRI_HOME may be a run's scratch folder.
    remote = resolved.remote("saliency")
    remote = remote.child(served.version) if remote else None
    overlays = write_overlays(
        served, explained, cache, resolved.saliency_dir / served.version, resolved.device, remote
    )
    with warehouse.connection() as conn:
        record_predictions(conn, frame)
        counts = prediction_counts(conn, served.version)
    context.log.info(
        f"scored {len(frame)} inbox scans with {served.version} in {scoring_seconds:.1f}s; "
        f"{verdict.description}"
    )
    flagged_now = int(frame["ood_flag"].fillna(False).astype(bool).sum()) if len(frame) else 0
    statistics = served.statistics
    return dg.MaterializeResult(
        metadata={
            "model_version": served.version,
            "scored_now": len(frame),
            "new_scans": verdict.new_scans,
            "flagged_now": flagged_now,
            "new_flagged_share": verdict.share,
            "version_rows": counts["version_rows"],
            "version_flagged_share": (
                round(counts["version_flagged"] / counts["version_rows"], 4)
                if counts["version_rows"]
                else None
            ),
            "dagster/row_count": counts["all_rows"],
            "temperature": statistics.temperature.value,
            "ood_threshold": statistics.ood.threshold if statistics.ood else None,
            "ood_note": statistics.ood_unavailable or "",
            "scoring_seconds": round(scoring_seconds, 2),
            "saliency_folder": (
                remote.location if remote else str(resolved.saliency_dir / served.version)
            ),
            "explained": dg.MetadataValue.md(overlays or "_(nothing flagged or uncertain)_"),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=DRIFT_CHECK,
                passed=verdict.passed,
                severity=dg.AssetCheckSeverity.WARN,
                description=verdict.description,
                metadata={
                    "new_scans": verdict.new_scans,
                    "flagged": verdict.flagged,
                    "share": verdict.share,
                    "limit": verdict.limit,
                },
            )
        ],
        data_version=dg.DataVersion(f"{served.version}:{counts['version_rows']}"),
    )


def write_overlays(served, explained, cache, folder, device, remote=None) -> str:
    """Grad-CAM overlays of ``explained`` as PNG files in ``folder`` (one per content), and in
    ``remote`` (S3Objects) if given; the markdown shows the first INLINE_OVERLAYS as thumbnails
    and lists the rest by path (their S3 URL with ``remote``)."""
    from mri_assets.core.saliency import grad_cam, overlay_png

    if not len(explained):
        return ""
    folder.mkdir(parents=True, exist_ok=True)
    images = cache.get_many(list(explained["sha256"]))
    targets = [served.class_names.index(label) for label in explained["label"]]
    maps = grad_cam(served.model, served.preprocessing, images, targets, device=device)
    lines = []
    for number, (row, image, saliency) in enumerate(
        zip(explained.itertuples(), images, maps, strict=True)
    ):
        path = folder / f"{row.sha256}.png"
        overlay = overlay_png(image, saliency)
        path.write_bytes(overlay)
        if remote:
            remote.put_bytes(path.name, overlay)
        why = "flagged" if row.ood_flag else "low confidence"
        caption = f"{row.source_key}: {row.label} ({why})"
        if number < INLINE_OVERLAYS:
            thumbnail = overlay_png(image, saliency, max_side=THUMBNAIL_SIDE)
            lines.append(f"{png_markdown(thumbnail, caption)}  \n{caption}")
        else:
            lines.append(f"- {caption}: `{remote.url(path.name) if remote else path}`")
    return "\n\n".join(lines)


prediction_assets = [predictions]
