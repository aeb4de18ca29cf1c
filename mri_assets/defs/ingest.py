"""Ingest stage: sensors that watch the landing zone and the raw image assets they materialize.

Healing: a landing sensor asks for a run until the catalogue confirms it recorded the listing
(the asset's ``listing_digest``), not merely until it asked once. A failed or killed run is asked
for again with backoff, up to MAX_ATTEMPTS times for one listing; a new listing starts afresh.

With MRI_LANDING_QUEUE set, a sensor reads S3's change notifications instead of listing: the
changed keys wait in its cursor until a run that looked at exactly those keys is recorded (the
run echoes the digest of what it was asked for as its ``listing_digest``, so the same healing
applies), and every MRI_LANDING_FULL_LISTING_SECONDS a full-listing run reconciles whatever a
lost notification missed. A message is deleted on the tick after the one that read it: only
then is the cursor that accounts for it committed.
"""

import json
import time
from dataclasses import asdict, dataclass, field, fields, replace

import dagster as dg
from pydantic import Field

from mri_assets.core import catalog
from mri_assets.core.ingest import EmptyListingRefused, ingest_new_objects, settled_listing
from mri_assets.core.landing import LANDING_FOLDERS, listing_digest
from mri_assets.core.landing_events import LandingChange, changes_digest
from mri_assets.defs.conventions import (
    CODE_VERSION,
    DUCKDB_POOL,
    INGEST_STEP_TAGS,
    OWNERS,
    TAGS,
)
from mri_assets.resources import (
    LandingZoneResource,
    MriSettingsResource,
    PixelCacheResource,
    WarehouseResource,
    column_schema,
)

# A landing folder still being written is given one more tick to settle, so one upload becomes one
# run; but a folder that never stops changing is ingested after this long anyway.
# The sensor daemon wakes every 5 s; a minimum interval of exactly 5 s is missed by milliseconds on
# every other wake-up (ticks came every 10 s), so 4 s gives a tick on each wake-up, every 5 s.
SENSOR_INTERVAL_SECONDS = 4
MAX_SETTLE_SECONDS = 60
# Runs asked for one listing before the sensor waits for the landing zone to change; the waits
# between them double from RETRY_BASE_SECONDS (10, 20, 40, 80 s: a fault has minutes to clear).
MAX_ATTEMPTS = 5
RETRY_BASE_SECONDS = 10
# Within a run, a step that failed (DuckDB held by another program, an S3 blip) is tried again
# after 2 s, then 4 s, before the run fails.
STEP_RETRY_POLICY = dg.RetryPolicy(
    max_retries=2, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)
ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
ATTEMPT_TAG = "mri/attempt"
# Notified changes one run is asked to look at, at most: beyond that a full listing is cheaper
# than one lookup per key, and the run config and the cursor stay small.
MAX_NOTIFIED_KEYS = 5000
FULL_LISTING_PREFIX = "full:"


class IngestRequest(dg.Config):
    """What a landing sensor asks an ingest run to look at (empty: list the whole split)."""

    changed_keys: list[str] = Field(
        default=[],
        description="Only these keys changed (from S3 notifications): look at them alone "
        "instead of listing the split. Empty: list the whole split.",
    )
    request_digest: str = Field(
        default="",
        description="Digest of the request, recorded as the run's listing_digest once "
        "everything it covers is recorded (set by the landing sensor).",
    )


def raw_images_key(split: str) -> dg.AssetKey:
    return dg.AssetKey(f"raw_{split}_images")


def build_raw_images_asset(split: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=raw_images_key(split),
        group_name="ingest",
        owners=OWNERS,
        tags=TAGS,
        op_tags=INGEST_STEP_TAGS,
        code_version=CODE_VERSION,
        kinds={"python", "duckdb", "s3"},
        pool=DUCKDB_POOL,
        retry_policy=STEP_RETRY_POLICY,
        metadata=column_schema(catalog.LANDED_IMAGES_COLUMNS),  # its rows in `landed_images`
        description=(
            f"Every object under the landing zone's `{split}/` folder, read once, validated, "
            "hashed (file sha256 and decoded-pixel sha256), its decoded pixels cached, and "
            f"recorded in DuckDB (`{_accepted_table(split)}`, `landing_rejections`, "
            "`landing_ledger`, `landing_removals`). Only new or rewritten objects are read; "
            "objects deleted from the landing zone leave the sets. Nothing is moved or deleted "
            "in the landing zone."
            + (
                " Inbox scans need no label: the `predictions` asset scores them."
                if split == catalog.INBOX
                else ""
            )
        ),
    )
    def raw_images(
        context: dg.AssetExecutionContext,
        config: IngestRequest,
        settings: MriSettingsResource,
        landing: LandingZoneResource,
        warehouse: WarehouseResource,
        pixels: PixelCacheResource,
    ):
        resolved = settings.resolve()
        zone = landing.open()
        # Two short connections, not one long one: the DuckDB file lock is free while the files
        # are examined (minutes for a large upload), so processes outside Dagster's `duckdb` pool
        # (a notebook, another instance) are not shut out.
        with warehouse.connection() as conn:
            ledger = catalog.ledger_fingerprints(conn, split)
            known = catalog.known_images(conn)
        try:
            batch = ingest_new_objects(
                zone,
                split,
                ledger,
                known,
                resolved.classes,
                pixels.open(),
                resolved.max_image_pixels,
                on_progress=_progress_logger(context, split),
                keys=config.changed_keys or None,
            )
        except EmptyListingRefused as refusal:
            raise dg.Failure(str(refusal), allow_retries=False) from refusal
        with warehouse.connection() as conn:
            batch.record(conn)
            totals = catalog.landing_totals(conn, split)
        _log_batch(context, batch, split)
        complete = not (batch.failed or batch.not_tried)
        if config.request_digest and complete:
            batch.recorded_digest = config.request_digest  # the sensor's proof, see module doc
        yield dg.MaterializeResult(
            metadata={
                **_batch_metadata(batch, zone.location, totals),
                "looked_at": (
                    f"{len(config.changed_keys)} notified keys"
                    if config.changed_keys
                    else "full listing"
                ),
            },
            data_version=dg.DataVersion(totals["version"] or "empty"),
        )
        if batch.failed or batch.not_tried:
            # What could be recorded is recorded (and downstream may use it); the rest is read
            # again by the retry, so the run fails to say the split is not complete.
            raise dg.Failure(
                f"{len(batch.failed)} objects could not be read and {batch.not_tried} were left "
                f"for the retry ({batch.failure_summary()}); they were not recorded and will be "
                "read again when the fault clears",
                metadata={"failed": len(batch.failed), "not_tried": batch.not_tried},
            )

    return raw_images


def _accepted_table(split: str) -> str:
    return "inbox_images" if split == catalog.INBOX else "landed_images"


def _progress_logger(context: dg.AssetExecutionContext, split: str):
    """Logs ingest progress about every 10 % of the objects (at least every 500)."""
    last = [0]

    def report(done: int, total: int) -> None:
        step = max(1, min(500, total // 10))
        if done == total or done - last[0] >= step:
            last[0] = done
            context.log.info(f"{split}: examined {done} of {total} new or rewritten objects")

    return report


def _log_batch(context: dg.AssetExecutionContext, batch, split: str) -> None:
    for rejected in batch.rejected:
        context.log.warning(f"rejected {rejected.obj.key}: {rejected.reason} ({rejected.detail})")
    for failed in batch.failed:
        context.log.error(f"could not read {failed.obj.key}: {failed.error} (will retry)")
    for key in batch.removed:
        context.log.info(f"removed from the landing zone, leaves the {split} set: {key}")
    context.log.info(
        f"{split}: {len(batch.examined)} new of {batch.listed} listed, "
        f"{len(batch.accepted)} accepted, {len(batch.rejected)} rejected, "
        f"{len(batch.removed)} removed, {len(batch.failed)} failed in {batch.seconds:.1f}s"
    )


def _batch_metadata(batch, location: str, totals: dict) -> dict:
    rate = batch.decoded / batch.seconds if batch.seconds else 0.0
    return {
        "landing_zone": location,
        "objects_listed": batch.listed,
        "new_objects": len(batch.examined),
        "new_accepted": len(batch.accepted),
        "new_rejected": len(batch.rejected),
        "rejection_reasons": batch.rejection_reasons(),
        "removed": len(batch.removed),
        "failed_reads": len(batch.failed),
        "not_tried": batch.not_tried,
        "vanished_while_reading": batch.vanished,
        "decoded": batch.decoded,
        "skipped_in_progress": batch.skipped_in_progress,
        "total_accepted": totals["accepted"],
        "total_rejected": totals["rejected"],
        "seconds": round(batch.seconds, 2),
        "decoded_images_per_second": round(rate, 1),
        # The sensor's proof that this listing is recorded (see evaluate_landing).
        "listing_digest": batch.recorded_digest,
    }


@dataclass(frozen=True)
class LandingCursor:
    """What a landing sensor has seen and asked for."""

    seen: str = ""  # digest of the latest listing
    seen_since: float = 0.0  # when that listing first appeared
    requested: str = ""  # digest the latest run was asked for
    attempts: int = 0  # runs asked for `requested`
    requested_at: float = 0.0
    # With notifications (MRI_LANDING_QUEUE) only:
    pending: dict = field(default_factory=dict)  # notified key -> token, not yet recorded
    covered: dict = field(default_factory=dict)  # the pending changes `requested` covers
    acknowledged: list = field(default_factory=list)  # receipts to delete on the next tick
    full_listing: str = ""  # digest of a due reconciling full listing, until it is recorded
    listed_at: float = 0.0  # when the latest reconciling full listing was asked for

    @classmethod
    def parse(cls, raw: str | None) -> "LandingCursor":
        if not raw:
            return cls()
        known = {f.name for f in fields(cls)}  # cursors written by earlier releases had others
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})

    def dump(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class LandingDecision:
    request: bool
    reason: str  # why not, or which attempt


def evaluate_landing(
    cursor: LandingCursor, digest: str, recorded: str | None, run_active: bool, now: float
) -> tuple[LandingCursor, LandingDecision]:
    """Next cursor, and whether to request an ingest run now.

    ``digest``: the current listing; ``recorded``: the listing the catalogue last confirmed (the
    latest materialization's ``listing_digest``); ``run_active``: a run of this sensor is queued
    or running. A listing is requested once it stood still for one tick (or has been changing
    for MAX_SETTLE_SECONDS); requested again, with backoff, while it is not recorded.
    """
    changed = digest != cursor.seen
    if changed:
        # A listing that keeps changing keeps the time it started changing, so that an upload
        # that never pauses is still ingested after MAX_SETTLE_SECONDS.
        was_settling = bool(cursor.seen) and cursor.seen not in (recorded, cursor.requested)
        since = cursor.seen_since if was_settling else now
        cursor = replace(cursor, seen=digest, seen_since=since)
    if digest == recorded:
        return cursor, LandingDecision(False, "nothing new")
    if run_active:
        return cursor, LandingDecision(False, "an ingest run is queued or running")
    if changed and now - cursor.seen_since < MAX_SETTLE_SECONDS:
        return cursor, LandingDecision(False, "still changing, waiting a tick")
    if digest != cursor.requested:
        return _requested(cursor, digest, 1, now), LandingDecision(True, "attempt 1")
    if cursor.attempts >= MAX_ATTEMPTS:
        return cursor, LandingDecision(
            False,
            f"gave up after {cursor.attempts} failed runs for this listing; "
            "will try again when the landing zone changes",
        )
    wait = RETRY_BASE_SECONDS * 2 ** (cursor.attempts - 1)
    if now - cursor.requested_at < wait:
        left = wait - (now - cursor.requested_at)
        return cursor, LandingDecision(
            False, f"run {cursor.attempts} did not record the listing; retrying in {left:.0f}s"
        )
    attempt = cursor.attempts + 1
    return _requested(cursor, digest, attempt, now), LandingDecision(True, f"attempt {attempt}")


def _requested(cursor: LandingCursor, digest: str, attempt: int, now: float) -> LandingCursor:
    return replace(cursor, requested=digest, attempts=attempt, requested_at=now)


def forget_recorded(cursor: LandingCursor, recorded: str | None) -> LandingCursor:
    """Drop the notified changes the catalogue has recorded: those the latest request covered,
    unless notified again since (another token). A recorded full listing covers them all."""
    full = bool(cursor.full_listing) and cursor.requested == cursor.full_listing
    if not cursor.requested or recorded != cursor.requested or not (cursor.covered or full):
        return cursor
    pending = {k: t for k, t in cursor.pending.items() if cursor.covered.get(k) != t}
    if full:
        return replace(cursor, pending=pending, covered={}, full_listing="")
    return replace(cursor, pending=pending, covered={})


def notified_request(
    cursor: LandingCursor,
    changes: list[LandingChange],
    now: float,
    full_listing_seconds: float,
    max_keys: int = MAX_NOTIFIED_KEYS,
) -> tuple[LandingCursor, str | None]:
    """Add ``changes`` to the pending ones; return the cursor and the digest of what to ask a
    run for: a full listing when one is due (first tick, every ``full_listing_seconds``, or
    more than ``max_keys`` pending), else the pending changes, else None (nothing new)."""
    pending = {**cursor.pending, **{c.key: c.token for c in changes}}
    full = cursor.full_listing
    if not full and now - cursor.listed_at >= full_listing_seconds:
        full = f"{FULL_LISTING_PREFIX}{now:.3f}"
        cursor = replace(cursor, listed_at=now)
    full_asked_for = bool(full) and cursor.requested == full
    if len(pending) > max_keys and not full_asked_for:
        # A full listing asked for after this moment sees every one of them.
        pending, full = {}, full or f"{FULL_LISTING_PREFIX}{now:.3f}"
    cursor = replace(cursor, pending=pending, full_listing=full)
    if full:
        return cursor, full
    return cursor, changes_digest(pending) if pending else None


def recorded_listing(instance: dg.DagsterInstance, split: str) -> str | None:
    """The listing digest of the latest materialization of ``raw_<split>_images``, if any."""
    event = instance.get_latest_materialization_event(raw_images_key(split))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("listing_digest")
    return getattr(value, "value", None)


def has_active_run(instance: dg.DagsterInstance, sensor_name: str) -> bool:
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            tags={"dagster/sensor_name": sensor_name}, statuses=ACTIVE_RUN_STATUSES
        ),
        limit=1,
    )
    return bool(runs)


def build_landing_sensor(split: str) -> dg.SensorDefinition:
    name = f"{split}_landing_sensor"

    @dg.sensor(
        name=name,
        target=[raw_images_key(split)],
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Lists the landing zone's `{split}/` folder and requests a run of "
            f"raw_{split}_images until the catalogue has recorded what it lists (added, "
            f"rewritten or removed objects), retrying failed runs with backoff."
        ),
    )
    def landing_sensor(context: dg.SensorEvaluationContext, landing: LandingZoneResource):
        queue = landing.queue()
        if queue is not None:
            return _notified_tick(context, landing, queue, split, name)
        listing = settled_listing(landing.open().list_objects(split))
        digest = listing_digest(listing)
        recorded = recorded_listing(context.instance, split)
        if not listing and not recorded:
            return dg.SkipReason(f"the landing zone's {split}/ folder is empty")
        cursor, decision = evaluate_landing(
            LandingCursor.parse(context.cursor),
            digest,
            recorded,
            has_active_run(context.instance, name),
            time.time(),
        )
        context.update_cursor(cursor.dump())
        if not decision.request:
            return dg.SkipReason(f"{len(listing)} objects; {decision.reason}")
        return dg.RunRequest(
            run_key=_run_key(split, digest, cursor.attempts),
            tags={
                "mri/landing_objects": str(len(listing)),
                "mri/split": split,
                ATTEMPT_TAG: f"{cursor.attempts}/{MAX_ATTEMPTS}",
                # This sensor retries with backoff; the instance's immediate run retries would
                # only race it.
                "dagster/max_retries": "0",
            },
        )

    return landing_sensor


def _run_key(split: str, digest: str, attempt: int) -> str:
    return f"{split}-{digest.rsplit(':', 1)[-1][:20]}-{attempt}"


def _notified_tick(context, landing: LandingZoneResource, queue, split: str, name: str):
    """One tick driven by notifications: costs in proportion to what is new, never a listing
    (except the periodic reconciling run, which lists in the run, not in the tick)."""
    cursor = LandingCursor.parse(context.cursor)
    if cursor.acknowledged:  # this tick started from the cursor that accounts for them
        queue.delete(cursor.acknowledged)
    received = queue.receive()
    ours = [m for m in received if any(c.split == split for c in m.changes)]
    theirs = [m for m in received if m.changes and m not in ours]
    queue.release(m.receipt for m in theirs)  # the other split's sensor reads them
    changes = [c for m in ours for c in m.changes if c.split == split]
    recorded = recorded_listing(context.instance, split)
    cursor = forget_recorded(cursor, recorded)
    cursor, digest = notified_request(
        cursor, changes, time.time(), landing.settings.resolve().full_listing_seconds
    )
    # Messages naming nothing in the landing zone (S3's test event) are acknowledged too.
    cursor = replace(cursor, acknowledged=[m.receipt for m in received if m not in theirs])
    if digest is None:
        context.update_cursor(cursor.dump())
        return dg.SkipReason(f"no change notified ({len(received)} messages read)")
    cursor, decision = evaluate_landing(
        cursor, digest, recorded, has_active_run(context.instance, name), time.time()
    )
    if decision.request:
        cursor = replace(cursor, covered=dict(cursor.pending))
    context.update_cursor(cursor.dump())
    full = digest.startswith(FULL_LISTING_PREFIX)
    what = "a full listing" if full else f"{len(cursor.pending)} notified changes"
    if not decision.request:
        return dg.SkipReason(f"{what}; {decision.reason}")
    return dg.RunRequest(
        run_key=_run_key(split, digest, cursor.attempts),
        run_config=dg.RunConfig(
            ops={
                raw_images_key(split).to_python_identifier(): IngestRequest(
                    changed_keys=[] if full else sorted(cursor.pending), request_digest=digest
                )
            }
        ),
        tags={
            "mri/landing_changes": "full listing" if full else str(len(cursor.pending)),
            "mri/split": split,
            ATTEMPT_TAG: f"{cursor.attempts}/{MAX_ATTEMPTS}",
            "dagster/max_retries": "0",
        },
    )


# train/ and test/ feed the model; inbox/ holds unlabelled scans for the predictions asset.
raw_image_assets = [build_raw_images_asset(folder) for folder in LANDING_FOLDERS]
landing_sensors = [build_landing_sensor(folder) for folder in LANDING_FOLDERS]
