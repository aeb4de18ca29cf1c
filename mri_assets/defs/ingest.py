"""Ingest stage: sensors that watch the landing zone and the raw image assets they materialize."""


import json
import time
from dataclasses import asdict, dataclass

import dagster as dg

from mri_assets.core import catalog
from mri_assets.core.ingest import ingest_new_objects, is_in_progress
from mri_assets.core.landing import SPLITS, listing_digest
from mri_assets.resources import (
    LandingZoneResource,
    MriSettingsResource,
    PixelCacheResource,
    WarehouseResource,
)

# A landing folder still being written is given one more tick to settle, so one upload becomes one
# run; but a folder that never stops changing is ingested after this long anyway.
# The sensor daemon wakes every 5 s; a minimum interval of exactly 5 s is missed by milliseconds on
# every other wake-up (ticks came every 10 s), so 4 s gives a tick on each wake-up, every 5 s.
SENSOR_INTERVAL_SECONDS = 4
MAX_SETTLE_SECONDS = 60


def raw_images_key(split: str) -> dg.AssetKey:
    return dg.AssetKey(f"raw_{split}_images")


def build_raw_images_asset(split: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=raw_images_key(split),
        group_name="ingest",
        kinds={"python", "duckdb", "s3"},
        pool="duckdb",
        description=(
            f"Every object under the landing zone's `{split}/` folder, read once, validated, "
            "hashed (sha256), its decoded pixels cached by hash, and recorded in DuckDB "
            "(`landed_images`, `landing_rejections`, `landing_ledger`). Only new or rewritten "
            "objects are read; nothing is moved or deleted in the landing zone."
        ),
    )
    def raw_images(
        context: dg.AssetExecutionContext,
        settings: MriSettingsResource,
        landing: LandingZoneResource,
        warehouse: WarehouseResource,
        pixels: PixelCacheResource,
    ) -> dg.MaterializeResult:
        resolved = settings.resolve()
        zone = landing.open()
        # Two short connections, not one long one: the DuckDB file lock is free while the files
        # are examined (minutes for a large upload), so processes outside Dagster's `duckdb` pool
        # (a notebook, another instance) are not shut out. It costs ~10 ms per run.
        with warehouse.connection() as conn:
            ledger = catalog.ledger_fingerprints(conn, split)
            known = catalog.known_images(conn)
        batch = ingest_new_objects(
            zone, split, ledger, known, resolved.classes, pixels.open(), resolved.max_image_pixels
        )
        with warehouse.connection() as conn:
            catalog.record_ingest(
                conn, batch.accepted_frame(), batch.rejected_frame(), batch.ledger_frame()
            )
            totals = catalog.landing_totals(conn, split)
        for rejected in batch.rejected:
            context.log.warning(f"rejected {rejected.obj.key}: {rejected.reason} ({rejected.detail})")
        rate = batch.decoded / batch.seconds if batch.seconds else 0.0
        context.log.info(
            f"{split}: {len(batch.examined)} new of {batch.listed} listed, "
            f"{len(batch.accepted)} accepted, {len(batch.rejected)} rejected in {batch.seconds:.1f}s"
        )
        return dg.MaterializeResult(
            metadata={
                "landing_zone": zone.location,
                "objects_listed": batch.listed,
                "new_objects": len(batch.examined),
                "new_accepted": len(batch.accepted),
                "new_rejected": len(batch.rejected),
                "rejection_reasons": batch.rejection_reasons(),
                "decoded": batch.decoded,
                "skipped_in_progress": batch.skipped_in_progress,
                "total_accepted": totals["accepted"],
                "total_rejected": totals["rejected"],
                "seconds": round(batch.seconds, 2),
                "decoded_images_per_second": round(rate, 1),
            },
            data_version=dg.DataVersion(totals["version"] or "empty"),
        )

    return raw_images


@dataclass(frozen=True)
class LandingCursor:
    """What a landing sensor has seen: the listing it last ingested and the one it is watching."""

    ingested: str = ""
    seen: str = ""
    seen_since: float = 0.0

    @classmethod
    def parse(cls, raw: str | None) -> "LandingCursor":
        return cls(**json.loads(raw)) if raw else cls()

    def dump(self) -> str:
        return json.dumps(asdict(self))


def evaluate_landing(cursor: LandingCursor, digest: str, now: float) -> tuple[LandingCursor, bool]:
    """Next cursor, and whether to request an ingest run now.

    A run is requested when the listing differs from the last ingested one and either stood still
    for one tick or has been changing for longer than MAX_SETTLE_SECONDS.
    """
    if digest == cursor.ingested:
        return LandingCursor(cursor.ingested, digest, now), False
    settling = bool(cursor.seen) and cursor.seen != cursor.ingested
    if digest == cursor.seen or (settling and now - cursor.seen_since >= MAX_SETTLE_SECONDS):
        return LandingCursor(digest, digest, now), True
    return LandingCursor(cursor.ingested, digest, cursor.seen_since if settling else now), False


def build_landing_sensor(split: str) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{split}_landing_sensor",
        target=[raw_images_key(split)],
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Lists the landing zone's `{split}/` folder and requests a run of "
            f"raw_{split}_images when objects were added or rewritten."
        ),
    )
    def landing_sensor(context: dg.SensorEvaluationContext, landing: LandingZoneResource):
        listing = [o for o in landing.open().list_objects(split) if not is_in_progress(o)]
        if not listing:
            return dg.SkipReason(f"the landing zone's {split}/ folder is empty")
        digest = listing_digest(listing)
        cursor, request = evaluate_landing(LandingCursor.parse(context.cursor), digest, time.time())
        context.update_cursor(cursor.dump())
        if not request:
            changed = digest != cursor.ingested
            return dg.SkipReason(
                f"{len(listing)} objects; " + ("still changing, waiting a tick" if changed else "nothing new")
            )
        return dg.RunRequest(
            run_key=f"{split}-{digest[:20]}",
            tags={"mri/landing_objects": str(len(listing)), "mri/split": split},
        )

    return landing_sensor


raw_image_assets = [build_raw_images_asset(split) for split in SPLITS]
landing_sensors = [build_landing_sensor(split) for split in SPLITS]
