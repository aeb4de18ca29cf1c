"""The pool watchdog hands a free slot to a step Dagster left waiting (defs/pools.py)."""

import dagster as dg

from mri_assets.defs.pools import pool_watchdog

POOL = "duckdb"


def stranded_instance(tmp_path) -> dg.DagsterInstance:
    """An instance whose `duckdb` pool (one slot) is free while run B's step waits unassigned:
    the interleaving of CI's hang. A claims the slot; B, seeing no free slot, decides to wait;
    A frees the slot and Dagster finds nobody to hand it to; B's wait is then recorded."""
    instance = dg.DagsterInstance.local_temp(str(tmp_path))
    storage = instance.event_log_storage
    storage.set_concurrency_slots(POOL, 1)
    assert storage.claim_concurrency_slot(POOL, "run-a", "raw_train_images").is_claimed
    b_sees_a_free_slot = storage.has_unassigned_slots(POOL)
    storage.free_concurrency_slot_for_step("run-a", "raw_train_images")
    storage.add_pending_step(POOL, "run-b", "raw_test_images", should_assign=b_sees_a_free_slot)
    return instance


def test_a_step_left_waiting_with_a_free_slot_stays_blocked_until_the_watchdog_ticks(tmp_path):
    instance = stranded_instance(tmp_path)
    storage = instance.event_log_storage
    # What the blocked run's step retries: without the watchdog it never gets the slot.
    for _ in range(3):
        assert not storage.claim_concurrency_slot(POOL, "run-b", "raw_test_images").is_claimed

    with dg.build_sensor_context(instance=instance) as context:
        result = pool_watchdog(context)

    assert "handed free slots to run-b/raw_test_images" in result.skip_message
    assert storage.claim_concurrency_slot(POOL, "run-b", "raw_test_images").is_claimed


def test_the_watchdog_leaves_a_busy_pool_alone(tmp_path):
    instance = dg.DagsterInstance.local_temp(str(tmp_path))
    storage = instance.event_log_storage
    storage.set_concurrency_slots(POOL, 1)
    assert storage.claim_concurrency_slot(POOL, "run-a", "raw_train_images").is_claimed
    assert not storage.claim_concurrency_slot(POOL, "run-b", "raw_test_images").is_claimed

    with dg.build_sensor_context(instance=instance) as context:
        result = pool_watchdog(context)

    assert result.skip_message == "no step waits while its pool has a free slot"
    assert not storage.claim_concurrency_slot(POOL, "run-b", "raw_test_images").is_claimed
    storage.free_concurrency_slot_for_step("run-a", "raw_train_images")  # Dagster hands it on
    assert storage.claim_concurrency_slot(POOL, "run-b", "raw_test_images").is_claimed
