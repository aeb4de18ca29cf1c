"""Declarative automation, tick by tick: what the automation sensor asks for after each landing.

`dg.evaluate_automation_conditions` evaluates the real `defs` against a test instance. Between
ticks the requested assets are "run" by stand-ins: assets with the same keys, parents, skippable
outputs and blocking check, executed as one real run per tick with the requested selection, as the
automation sensor would launch it. Real runs matter here: an asset whose parent yields nothing is
skipped inside the run, a failed blocking check holds its children, and a parent's update is
ignored by a child the same run had planned (`executed_with_root_target`). No model is trained.
"""

from collections.abc import Callable, Iterable

import dagster as dg
import pytest

from mri_assets.definitions import defs

GRAPH = defs.resolve_asset_graph()
ASSET_KEYS = sorted(GRAPH.materializable_asset_keys)
GATE = dg.AssetCheckKey(
    dg.AssetKey("candidate_evaluation"), "candidate_beats_deployed_and_baseline"
)

TABLES = {"images", "rejected_images", "train_images", "test_images"}
MODELS = {"baseline", "fine_tuned_model", "candidate_evaluation"}


def keys(names: Iterable[str]) -> list[dg.AssetKey]:
    return [dg.AssetKey(name) for name in sorted(names)]


class Pipeline:
    """A test instance, the automation cursor, and stand-in runs of what each tick requested.

    `unchanged` names the skippable tables (train_images, test_images) whose content the next runs
    find unchanged, so they yield nothing; `failing` names assets whose runs fail; `gate_passes`
    is the blocking check's verdict.
    """

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.cursor = None
        self.unchanged: set[str] = set()
        self.failing: set[str] = set()
        self.gate_passes = True
        self.last_run: dg.ExecuteInProcessResult | None = None
        # Called inside an asset's stand-in, before it yields: a tick while that run is going on.
        self.during: dict[str, Callable[[], None]] = {}
        self.job = self._stand_in_job()

    def _stand_in_job(self) -> dg.JobDefinition:
        def body(key: dg.AssetKey):
            def materialize(context: dg.AssetExecutionContext):
                name = key.to_user_string()
                if name in self.failing:
                    raise dg.Failure(f"{name} failed")
                if name in self.during:
                    self.during[name]()
                if name == "deployed_model" and not self.gate_passes:
                    return  # as the real one: a refused candidate is not materialized
                if name not in self.unchanged:
                    yield dg.MaterializeResult(asset_key=key, metadata={"stand_in": True})

            return materialize

        def check_body(blocking: bool):
            def check() -> dg.AssetCheckResult:
                # As the real gate: a refusal fails with WARN severity, and the run goes on.
                return dg.AssetCheckResult(
                    passed=self.gate_passes or not blocking, severity=dg.AssetCheckSeverity.WARN
                )

            return check

        assets = []
        for key in ASSET_KEYS:
            node = GRAPH.get(key)
            spec = next(s for s in node.assets_def.specs if s.key == key)
            stand_in_spec = dg.AssetSpec(
                key, deps=sorted(node.parent_keys), skippable=spec.skippable
            )
            assets.append(
                dg.multi_asset(
                    name=f"stand_in_{key.to_python_identifier()}", specs=[stand_in_spec]
                )(body(key))
            )
        checks = [
            dg.asset_check(asset=ck.asset_key, name=ck.name, blocking=GRAPH.get(ck).blocking)(
                check_body(GRAPH.get(ck).blocking)
            )
            for ck in GRAPH.asset_check_keys
        ]
        return dg.Definitions(
            assets=assets, asset_checks=checks
        ).resolve_implicit_global_asset_job_def()

    def tick(self) -> set[str]:
        """One automation tick: the names of the assets it requests."""
        result = dg.evaluate_automation_conditions(defs, self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        return {key.to_user_string() for key in ASSET_KEYS if result.get_num_requested(key)}

    def run(self, names: Iterable[str]) -> dg.ExecuteInProcessResult:
        """One run of these assets (and, as the sensor does, the checks that ride along)."""
        self.last_run = self.job.execute_in_process(
            instance=self.instance, asset_selection=keys(names), raise_on_error=False
        )
        return self.last_run

    def run_gate(self) -> dg.ExecuteInProcessResult:
        """A run of the blocking check alone, against candidate_evaluation's latest materialization."""
        job = self.job.get_subset(asset_selection=set(), asset_check_selection={GATE})
        return job.execute_in_process(instance=self.instance, raise_on_error=False)

    def land(self, *splits: str) -> None:
        """What a landing sensor does when new objects settle: a run of raw_<split>_images."""
        for split in splits:
            assert self.run([f"raw_{split}_images"]).success

    def settle(self, limit: int = 6) -> list[set[str]]:
        """Tick, run what was requested, repeat until a tick requests nothing.

        Returns the request of every tick that requested something; more than `limit` such ticks
        means automation keeps asking (a loop).
        """
        requests = []
        while requested := self.tick():
            requests.append(requested)
            assert len(requests) <= limit, f"automation does not settle: {requests}"
            self.run(requested)
        return requests

    def materialized_since(self, storage_id: int) -> list[str]:
        """The assets materialized after this event-log position, one entry per materialization."""
        return sorted(
            key.to_user_string()
            for key in ASSET_KEYS
            for _ in self.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, after_storage_id=storage_id), limit=100
            ).records
        )

    def latest_storage_id(self) -> int:
        return max(
            (
                record.storage_id
                for key in ASSET_KEYS
                for record in self.instance.fetch_materializations(key, limit=1).records
            ),
            default=0,
        )


@pytest.fixture
def pipeline():
    with dg.instance_for_test() as instance:
        yield Pipeline(instance)


@pytest.fixture
def deployed(pipeline):
    """Everything materialized once: base model, first train and test sets, a deployed model."""
    pipeline.settle()
    pipeline.land("train", "test")
    pipeline.settle()
    assert pipeline.instance.get_latest_materialization_event(dg.AssetKey("deployed_model"))
    assert pipeline.tick() == set()
    return pipeline


def skippable(graph, key: dg.AssetKey) -> bool:
    return next(s for s in graph.get(key).assets_def.specs if s.key == key).skippable


def test_stand_ins_have_the_real_graph():
    stand_ins = Pipeline(dg.DagsterInstance.ephemeral()).job.asset_layer.asset_graph
    for key in ASSET_KEYS:
        assert stand_ins.get(key).parent_keys == GRAPH.get(key).parent_keys
        assert skippable(stand_ins, key) == skippable(GRAPH, key)
    assert {k.to_user_string() for k in ASSET_KEYS if skippable(GRAPH, k)} == {
        "train_images",
        "test_images",
        "deployed_model",
    }
    assert stand_ins.asset_check_keys == GRAPH.asset_check_keys
    assert GRAPH.get(GATE).blocking and stand_ins.get(GATE).blocking


def test_base_model_is_requested_once_when_missing_and_not_retried_after_a_failure(pipeline):
    assert pipeline.tick() == {"base_model"}
    pipeline.failing = {"base_model"}
    assert not pipeline.run({"base_model"}).success
    assert pipeline.tick() == set()
    assert pipeline.tick() == set()

    # A by-hand materialization brings it back; automation does not ask for it again.
    pipeline.failing = set()
    assert pipeline.run({"base_model"}).success
    assert pipeline.tick() == set()


def test_first_landing_goes_all_the_way_to_deployment(pipeline):
    assert pipeline.settle() == [{"base_model"}]
    pipeline.land("train")
    # images needs both landing folders: one split alone does not start anything.
    assert pipeline.settle() == []
    pipeline.land("test")
    assert pipeline.settle() == [
        TABLES,
        MODELS,
        # The gate has never run, so deployed_model waits for the run that evaluates the candidate.
        {"deployed_model"},
    ]
    assert pipeline.instance.get_latest_materialization_event(dg.AssetKey("deployed_model"))


def test_train_images_reported_requests_the_training_chain(deployed):
    deployed.instance.report_runless_asset_event(dg.AssetMaterialization("train_images"))
    assert deployed.tick() == {"fine_tuned_model", "candidate_evaluation", "deployed_model"}
    assert deployed.tick() == set()


def test_test_images_reported_requests_evaluation_but_no_training(deployed):
    deployed.instance.report_runless_asset_event(dg.AssetMaterialization("test_images"))
    assert deployed.tick() == {"baseline", "candidate_evaluation", "deployed_model"}
    assert deployed.tick() == set()


def test_new_train_data_retrains_evaluates_and_deploys(deployed):
    deployed.unchanged = {"test_images"}
    since = deployed.latest_storage_id()
    deployed.land("train")
    assert deployed.settle() == [
        TABLES,  # train_images yields, test_images does not
        {"fine_tuned_model", "candidate_evaluation", "deployed_model"},
    ]
    assert deployed.materialized_since(since) == [
        "candidate_evaluation",
        "deployed_model",
        "fine_tuned_model",
        "images",
        "raw_train_images",
        "rejected_images",
        "train_images",
    ]


def test_new_test_data_reevaluates_without_retraining(deployed):
    deployed.unchanged = {"train_images"}
    since = deployed.latest_storage_id()
    deployed.land("test")
    assert deployed.settle() == [TABLES, {"baseline", "candidate_evaluation", "deployed_model"}]
    assert deployed.materialized_since(since) == [
        "baseline",
        "candidate_evaluation",
        "deployed_model",
        "images",
        "raw_test_images",
        "rejected_images",
        "test_images",
    ]


def test_new_data_in_both_splits_retrains_once(deployed):
    deployed.land("train", "test")
    requests = deployed.settle()
    assert requests == [TABLES, MODELS | {"deployed_model"}]


def test_a_failed_gate_holds_deployed_model_and_a_passed_one_lets_it_go(deployed):
    deployed.gate_passes = False
    deployed.unchanged = {"test_images"}
    since = deployed.latest_storage_id()
    deployed.land("train")
    # deployed_model is in the same run; after the refusal it does not materialize, and the run
    # does not fail.
    assert deployed.settle() == [
        TABLES,
        {"fine_tuned_model", "candidate_evaluation", "deployed_model"},
    ]
    assert "deployed_model" not in deployed.materialized_since(since)
    assert deployed.last_run.success
    assert (
        deployed.instance.event_log_storage.get_latest_asset_check_execution_by_key([GATE])[
            GATE
        ].status.value
        == "FAILED"
    )
    assert deployed.tick() == set()

    # The next candidate passes. The gate's last verdict was a failure, so deployed_model waits for
    # the run that evaluates the candidate, then goes.
    deployed.gate_passes = True
    since = deployed.latest_storage_id()
    deployed.land("train")
    assert deployed.settle() == [
        TABLES,
        {"fine_tuned_model", "candidate_evaluation"},
        {"deployed_model"},
    ]
    assert "deployed_model" in deployed.materialized_since(since)


def test_after_a_failed_gate_deployed_model_waits_for_a_passing_check(pipeline):
    """A refused first candidate: deployed_model is held until the gate, executed again, passes."""
    pipeline.settle()
    pipeline.gate_passes = False
    pipeline.land("train", "test")
    assert pipeline.settle() == [TABLES, MODELS]
    assert pipeline.tick() == set()
    assert pipeline.instance.get_latest_materialization_event(dg.AssetKey("deployed_model")) is None

    # The gate is executed again and passes (the real one reads the recorded standing, so say
    # candidate_evaluation was re-decided by hand with a smaller MRI_PROMOTION_MARGIN).
    pipeline.gate_passes = True
    result = pipeline.run_gate()
    assert result.success and [e.check_name for e in result.get_asset_check_evaluations()] == [
        GATE.name
    ]
    assert pipeline.tick() == {"deployed_model"}
    pipeline.run({"deployed_model"})
    assert pipeline.tick() == set()


def test_models_wait_for_the_whole_tables_run(deployed):
    """A tick between test_images' and train_images' materializations (same run) asks for nothing:
    the models then run together once, not baseline first and the rest later."""
    mid_run = []

    def tick_between_the_two():
        assert (
            deployed.instance.get_latest_materialization_event(dg.AssetKey("test_images")).run_id
            == deployed.instance.get_latest_materialization_event(dg.AssetKey("images")).run_id
        )
        mid_run.append(deployed.tick())

    deployed.during = {"train_images": tick_between_the_two}
    deployed.land("train", "test")
    tables = deployed.tick()
    assert tables == TABLES
    assert deployed.run(tables).success
    assert mid_run == [set()]
    assert deployed.settle() == [MODELS | {"deployed_model"}]


def test_nothing_new_requests_nothing(deployed):
    assert deployed.tick() == set()
    assert deployed.tick() == set()


def test_a_relanded_duplicate_retrains_nothing(deployed):
    """Copies of landed files: raw assets and images change, the frozen sets do not."""
    deployed.unchanged = {"train_images", "test_images"}
    since = deployed.latest_storage_id()
    deployed.land("train", "test")
    assert deployed.settle() == [TABLES]
    assert deployed.materialized_since(since) == [
        "images",
        "raw_test_images",
        "raw_train_images",
        "rejected_images",
    ]
    assert deployed.tick() == set()


def test_a_failed_training_run_is_not_retried_by_automation(deployed):
    deployed.unchanged = {"test_images"}
    deployed.failing = {"fine_tuned_model"}
    deployed.land("train")
    assert deployed.settle() == [
        TABLES,
        {"fine_tuned_model", "candidate_evaluation", "deployed_model"},
    ]
    assert deployed.tick() == set()


def test_a_new_base_model_rebaselines_and_retrains(deployed):
    deployed.instance.report_runless_asset_event(dg.AssetMaterialization("base_model"))
    assert deployed.settle() == [MODELS | {"deployed_model"}]


def test_rejected_images_does_not_wait_for_an_inbox_that_was_never_used(pipeline):
    pipeline.settle()
    pipeline.land("train", "test")
    pipeline.settle()
    assert pipeline.instance.get_latest_materialization_event(dg.AssetKey("rejected_images"))
    assert not pipeline.instance.get_latest_materialization_event(dg.AssetKey("predictions"))


def test_inbox_scans_are_scored_and_a_new_deployment_scores_them_again(deployed):
    deployed.land("inbox")
    assert deployed.settle() == [{"rejected_images", "predictions"}]

    deployed.unchanged = {"test_images"}
    deployed.land("train")
    assert deployed.settle() == [
        TABLES,
        {"fine_tuned_model", "candidate_evaluation", "deployed_model", "predictions"},
    ]

    # A refused candidate deploys nothing: the inbox is not scored again.
    deployed.gate_passes = False
    since = deployed.latest_storage_id()
    deployed.land("train")
    deployed.settle()
    assert "predictions" not in deployed.materialized_since(since)
