"""A watchdog for Dagster's pool queue: a step left waiting while its pool has a free slot.

Dagster hands a pool's freed slot to the next waiting step when the slot is freed, and a step
that starts to wait decides then whether a slot is free for it. A step that starts to wait in the
instant between another step freeing the last slot and that slot being handed on is never
assigned one: its run stays "Started" for ever and every ingest behind it waits (seen in CI:
raw_test_images blocked on the `duckdb` pool for nine minutes with the pool's slot free, after
the train and test landing sensors' runs started together). This sensor hands such slots on.
"""

import dagster as dg

from mri_assets.defs.conventions import DUCKDB_POOL

WATCHED_POOLS = (DUCKDB_POOL,)


def stranded_steps(info) -> list[str]:
    """Steps of ``info`` (a pool's ConcurrencyKeyInfo) that wait while a slot is free for them."""
    assigned = sum(1 for step in info.pending_steps if step.assigned_timestamp is not None)
    free = info.slot_count - len(info.claimed_slots) - assigned
    waiting = [step for step in info.pending_steps if step.assigned_timestamp is None]
    return [f"{step.run_id[:8]}/{step.step_key}" for step in waiting[: max(free, 0)]]


@dg.sensor(
    name="pool_watchdog",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=15,
    description=(
        "Hands a free slot of the `duckdb` pool to a step that waits for one: Dagster can leave "
        "a step waiting for ever when it starts to wait just as the last slot is freed. "
        "Requests no runs."
    ),
)
def pool_watchdog(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    storage = context.instance.event_log_storage
    handed = []
    for pool in WATCHED_POOLS:
        stranded = stranded_steps(storage.get_concurrency_info(pool))
        if stranded:
            storage.assign_pending_steps([pool])
            context.log.warning(f"pool {pool}: handed a free slot to {', '.join(stranded)}")
            handed += stranded
    if handed:
        return dg.SkipReason(f"handed free slots to {', '.join(handed)}")
    return dg.SkipReason("no step waits while its pool has a free slot")
