"""Tables stage: the accepted and rejected images, the frozen train and test sets, and their checks."""

import dagster as dg
import pandas as pd

from mri_assets.core import catalog
from mri_assets.core.images import NEAR_DUPLICATE_BITS, near_duplicate_pairs
from mri_assets.core.landing import SPLITS
from mri_assets.defs.conventions import CODE_VERSION, DUCKDB_POOL, INGEST_STEP_TAGS, OWNERS, TAGS
from mri_assets.defs.ingest import STEP_RETRY_POLICY, raw_images_key
from mri_assets.resources import MriSettingsResource, WarehouseResource, column_schema

REJECTED_SHARE_WARNING = 0.05
RAW_DEPS = [raw_images_key(split) for split in SPLITS]
# Inbox files are validated like any other: their rejections are listed with the rest.
REJECTION_DEPS = [*RAW_DEPS, raw_images_key(catalog.INBOX)]
# Every table asset rebuilds a DuckDB table as soon as what it is made from changes.
TABLE_ASSET = {
    "group_name": "tables",
    "owners": OWNERS,
    "tags": TAGS,
    "op_tags": INGEST_STEP_TAGS,
    "code_version": CODE_VERSION,
    "kinds": {"duckdb", "table"},
    "pool": DUCKDB_POOL,
    "retry_policy": STEP_RETRY_POLICY,
    "automation_condition": dg.AutomationCondition.eager(),
}


def markdown_preview(frame: pd.DataFrame, rows: int = 20) -> dg.MetadataValue:
    if frame.empty:
        return dg.MetadataValue.md("_(no rows)_")
    return dg.MetadataValue.md(frame.head(rows).to_markdown(index=False))


def split_counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    if frame.empty:
        return {}
    grouped = frame.groupby(["split", "label"]).size()
    result: dict[str, dict[str, int]] = {}
    for (split, label), count in grouped.items():
        result.setdefault(split, {})[label] = int(count)
    return result


@dg.asset(
    **TABLE_ASSET,
    deps=RAW_DEPS,
    metadata=column_schema(catalog.IMAGES_COLUMNS),
    description=(
        "DuckDB table `images`: one row per accepted file with its sha256, label and the split it "
        "is used in. A copy of content already seen (the same decoded pixels, whatever the file "
        "format or encoding) goes to split `duplicate` (with the reason), so the `train` and "
        "`test` rows never share content; content labelled both ways goes to `conflict`. Files "
        "removed from the landing zone leave it (see DuckDB `landing_removals`)."
    ),
)
def images(warehouse: WarehouseResource) -> dg.MaterializeResult:
    with warehouse.connection() as conn:
        frame = catalog.rebuild_images(conn)
        version = catalog.table_version(conn, "images")
        removed = catalog.removals(conn)
    excluded = frame[~frame["split"].isin(SPLITS)] if len(frame) else frame
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(frame),
            "counts": split_counts(frame),
            "excluded_copies": len(excluded),
            "excluded_preview": markdown_preview(
                excluded[["source_key", "split", "split_reason"]] if len(excluded) else excluded
            ),
            "preview": markdown_preview(
                frame[["source_key", "sha256", "label", "split"]] if len(frame) else frame
            ),
            "removed_from_landing": len(removed),
            "removed_preview": markdown_preview(
                removed[["source_key", "removed_at"]] if len(removed) else removed
            ),
        },
        data_version=dg.DataVersion(version or "empty"),
    )


@dg.asset(
    **{
        **TABLE_ASSET,
        # An inbox that was never used leaves raw_inbox_images missing; eager() would then never
        # build this table, so only the train and test folders must have been ingested.
        "automation_condition": dg.AutomationCondition.eager().replace(
            "any_deps_missing",
            dg.AutomationCondition.any_deps_missing().ignore(
                dg.AssetSelection.assets(raw_images_key(catalog.INBOX))
            ),
        ),
    },
    deps=REJECTION_DEPS,
    metadata=column_schema(catalog.REJECTED_IMAGES_COLUMNS),
    description=(
        "DuckDB table `rejected_images`: every landed object whose latest version could not be "
        "used, with the reason (empty_file, not_an_image, unsupported_format, multi_frame, "
        "truncated, unknown_label, too_large, hidden_file, bad_file_name, outside_landing, "
        "broken_link, link_loop, not_a_file). A rejection never fails a run or holds back good "
        "files; read errors (I/O, network) are not rejections: the run fails and is retried."
    ),
)
def rejected_images(warehouse: WarehouseResource) -> dg.MaterializeResult:
    with warehouse.connection() as conn:
        frame = catalog.rebuild_rejected_images(conn)
        version = catalog.table_version(conn, "rejected_images")
    reasons = frame["reason"].value_counts().to_dict() if len(frame) else {}
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(frame),
            "reasons": {str(k): int(v) for k, v in reasons.items()},
            "preview": markdown_preview(
                frame[["source_key", "reason", "detail"]] if len(frame) else frame, 50
            ),
        },
        data_version=dg.DataVersion(version or "empty"),
    )


def last_dataset_version(context: dg.AssetExecutionContext) -> str | None:
    """The dataset version of this asset's latest materialization, if any."""
    event = context.instance.get_latest_materialization_event(context.asset_key)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("dataset_version")
    return getattr(value, "value", None)


def build_split_asset(split: str) -> dg.AssetsDefinition:
    @dg.asset(
        **TABLE_ASSET,
        name=f"{split}_images",
        deps=[images],
        output_required=False,
        metadata=column_schema(catalog.SPLIT_TABLE_COLUMNS),
        description=(
            f"DuckDB table `{split}_images`: the frozen {split} set (sha256, label), versioned by "
            "its content. It materializes only when that version changes, so a re-landed copy "
            "or a restart triggers nothing downstream."
        ),
    )
    def split_images(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
        with warehouse.connection() as conn:
            snapshot = catalog.record_split_table(conn, split)
        previous = last_dataset_version(context)
        if snapshot.version == previous:
            context.log.info(
                f"{split} set unchanged (version {snapshot.version}, {len(snapshot)} images): "
                "nothing downstream needs to run"
            )
            return
        yield dg.MaterializeResult(
            metadata={
                "dagster/row_count": len(snapshot),
                "dataset_version": snapshot.version,
                "previous_version": previous or "",
                "counts": snapshot.counts(),
            },
            data_version=dg.DataVersion(snapshot.version),
        )

    return split_images


train_images = build_split_asset("train")
test_images = build_split_asset("test")


@dg.asset_check(
    asset=images,
    description="No file and no decoded image (pixel hash) appears in both the train and the test split.",
)
def no_train_test_overlap(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    with warehouse.connection() as conn:
        shared = catalog.images_in_both_splits(conn)
    return dg.AssetCheckResult(
        passed=not shared,
        metadata={"shared_images": len(shared), "examples": shared[:5]},
    )


@dg.asset_check(
    asset=images,
    description=(
        f"Warns when a train image and a test image are near-duplicates (perceptual hashes within "
        f"{NEAR_DUPLICATE_BITS} of 256 bits): public MRI sets hold near-identical slices across "
        "their folders, which inflates test metrics."
    ),
)
def near_duplicates_across_splits(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    with warehouse.connection() as conn:
        hashes = catalog.perceptual_hashes_by_split(conn)
    pairs = near_duplicate_pairs(hashes["train"], hashes["test"])
    preview = pd.DataFrame(pairs[:50], columns=["train_key", "test_key", "differing_bits"])
    return dg.AssetCheckResult(
        passed=not pairs,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"pairs": len(pairs), "examples": markdown_preview(preview, 50)},
    )


@dg.asset_check(
    asset=images, description="Both classes appear in the train split and in the test split."
)
def both_classes_in_each_split(
    warehouse: WarehouseResource, settings: MriSettingsResource
) -> dg.AssetCheckResult:
    classes = settings.resolve().classes.names
    with warehouse.connection() as conn:
        rows = catalog.label_counts_by_split(conn)
    counts = {split: {label: 0 for label in classes} for split in SPLITS}
    for split, label, count in rows:
        counts[split][label] = count
    missing = [
        f"{split}/{label}" for split in SPLITS for label in classes if not counts[split][label]
    ]
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={"counts": counts, "missing": missing},
        description=f"missing: {', '.join(missing)}" if missing else "every class in every split",
    )


@dg.asset_check(
    asset=rejected_images,
    description=f"Warns when more than {REJECTED_SHARE_WARNING:.0%} of landed files were rejected.",
)
def rejected_share(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    with warehouse.connection() as conn:
        accepted, rejected = catalog.landing_outcomes(conn)
    total = accepted + rejected
    share = rejected / total if total else 0.0
    return dg.AssetCheckResult(
        passed=share <= REJECTED_SHARE_WARNING,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"rejected": rejected, "landed": total, "share": round(share, 4)},
    )


table_assets = [images, rejected_images, train_images, test_images]
table_checks = [
    no_train_test_overlap,
    near_duplicates_across_splits,
    both_classes_in_each_split,
    rejected_share,
]
