"""What can be checked of the Kubernetes deployment without a cluster, with dagster-k8s itself:

- each step's `dagster-k8s/config` tags become the pod dagster-k8s would launch for that step
  (a GPU, its node selector and toleration for the torch steps; memory for ingest and tables);
- mri_assets.kubernetes is definitions.py's defs with the k8s_job_executor;
- the Helm values' run launcher block, rendered as the chart renders it, is a valid K8sRunLauncher
  config, and the values keep dagster.yaml's healing and DuckDB pool settings;
- the Dockerfile installs the project as the Makefile (`make install`, the README's) does.

Docker, Helm and a cluster are not on these machines: README's "Beyond one machine" has the
commands for the rest.
"""

import re
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.execution.api import create_execution_plan
from dagster_k8s import K8sRunLauncher
from dagster_k8s.job import (
    DagsterK8sJobConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)

from mri_assets import definitions, kubernetes
from mri_assets.defs.conventions import GPU_STEP_TAGS, INGEST_STEP_TAGS

REPO = Path(__file__).resolve().parents[1]
VALUES = yaml.safe_load((REPO / "deploy/helm/values.yaml").read_text())

GPU = "gpu"
INGEST = "ingest"
# Every asset and what its pod asks for: None is the run's own default (no step tags).
EXPECTED_PROFILE = {
    "raw_train_images": INGEST,
    "raw_test_images": INGEST,
    "raw_inbox_images": INGEST,
    "images": INGEST,
    "rejected_images": INGEST,
    "train_images": INGEST,
    "test_images": INGEST,
    "base_model": None,
    "baseline": GPU,
    "fine_tuned_model": GPU,
    "candidate_evaluation": GPU,
    "deployed_model": None,
    "predictions": GPU,
}


def step_tags() -> dict[str, dict[str, str]]:
    """The tags of each step of the all-assets job, as the k8s_job_executor reads them."""
    job = kubernetes.defs.resolve_implicit_global_asset_job_def()
    plan = create_execution_plan(job)
    return {step.key: dict(step.tags) for step in plan.steps}


def step_pod(tags: dict[str, str]) -> dict:
    """The Kubernetes job dagster-k8s builds for a step with these tags, as a dict."""
    job_config = DagsterK8sJobConfig(
        job_image="registry.example.com/mri-assets:cuda",
        dagster_home="/opt/dagster/dagster_home",
        image_pull_policy="IfNotPresent",
    )
    job = construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-test",
        user_defined_k8s_config=get_user_defined_k8s_config(tags),
    )
    return job.to_dict()["spec"]["template"]["spec"]


def test_the_kubernetes_definitions_are_the_same_pipeline_with_step_pods():
    assert kubernetes.defs.resolve_implicit_global_asset_job_def().executor_def.name == "k8s"
    one_machine = definitions.defs.resolve_implicit_global_asset_job_def()
    assert one_machine.executor_def.name == "in_process"
    keys = kubernetes.defs.resolve_asset_graph().get_all_asset_keys()
    assert keys == definitions.defs.resolve_asset_graph().get_all_asset_keys()
    assert {key.to_user_string() for key in keys} == set(EXPECTED_PROFILE)


def test_each_step_pod_asks_for_what_its_step_needs():
    tags = step_tags()
    assert set(EXPECTED_PROFILE) <= set(tags)
    # Asset checks are steps too (their own pods): short DuckDB queries, the run's defaults.
    checks = {step: None for step in set(tags) - set(EXPECTED_PROFILE)}
    assert "candidate_evaluation_candidate_beats_deployed_and_baseline" in checks
    for step, profile in {**EXPECTED_PROFILE, **checks}.items():
        pod = step_pod(tags[step])
        container = pod["containers"][0]
        resources = container["resources"] or {}
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        if profile == GPU:
            assert requests.get("nvidia.com/gpu") == "1", step
            assert limits.get("nvidia.com/gpu") == "1", step
            assert pod["node_selector"] == {"nvidia.com/gpu.present": "true"}, step
            assert [t["key"] for t in pod["tolerations"] or []] == ["nvidia.com/gpu"], step
        elif profile == INGEST:
            assert requests.get("memory") == "2Gi", step
            assert limits.get("memory") == "4Gi", step
            assert "nvidia.com/gpu" not in limits, step
            assert not pod.get("node_selector"), step
        else:
            assert not requests and not limits, step
            assert not pod.get("node_selector"), step


@pytest.mark.parametrize("tags", [GPU_STEP_TAGS, INGEST_STEP_TAGS], ids=["gpu", "ingest"])
def test_dagster_k8s_refuses_a_misspelt_field_in_the_same_tags(tags):
    """The check above can fail: dagster-k8s validates the tag against its schema."""
    (key,) = tags
    broken = {key: {**tags[key], "container_confg": {}}}

    @dg.asset(op_tags=broken)
    def probe() -> None: ...

    job = dg.Definitions(assets=[probe]).resolve_implicit_global_asset_job_def()
    step = create_execution_plan(job).get_step_by_key("probe")
    with pytest.raises(dg.DagsterInvalidConfigError, match="container_confg"):
        get_user_defined_k8s_config(dict(step.tags))


def rendered_run_launcher_config(values: dict) -> dict:
    """The `run_launcher.config` the chart writes into dagster.yaml from these values (the
    chart's templates/helpers/instance/_run-launcher.tpl, K8sRunLauncher branch)."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    config = {
        "load_incluster_config": launcher.get("loadInclusterConfig", True),
        "job_namespace": launcher.get("jobNamespace") or "mri",
        "image_pull_policy": launcher["imagePullPolicy"],
        "service_account_name": "mri-dagster",
        "dagster_home": "/opt/dagster/dagster_home",
        "instance_config_map": "mri-dagster-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
    }
    names = {
        "envConfigMaps": "env_config_maps",
        "envSecrets": "env_secrets",
    }
    for key, field in names.items():
        if launcher.get(key):
            config[field] = [item["name"] for item in launcher[key] if "name" in item]
    copied = {
        "envVars": "env_vars",
        "volumeMounts": "volume_mounts",
        "volumes": "volumes",
        "labels": "labels",
        "resources": "resources",
        "schedulerName": "scheduler_name",
        "securityContext": "security_context",
    }
    for key, field in copied.items():
        if launcher.get(key):
            config[field] = launcher[key]
    if launcher.get("failPodOnRunFailure"):
        config["fail_pod_on_run_failure"] = True
    return config


def test_the_helm_run_launcher_block_is_a_valid_k8s_run_launcher_config():
    assert VALUES["runLauncher"]["type"] == "K8sRunLauncher"
    result = validate_config(K8sRunLauncher.config_type(), rendered_run_launcher_config(VALUES))
    assert result.success, [error.message for error in result.errors]


def test_a_wrong_run_launcher_value_fails_the_same_validation():
    broken = yaml.safe_load(yaml.safe_dump(VALUES))
    broken["runLauncher"]["config"]["k8sRunLauncher"]["resources"] = "4Gi"
    result = validate_config(K8sRunLauncher.config_type(), rendered_run_launcher_config(broken))
    assert not result.success


def test_the_code_location_loads_the_kubernetes_definitions_and_shares_mri_home():
    (deployment,) = VALUES["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", kubernetes.__name__]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    (mount,) = deployment["volumeMounts"]
    assert deployment["env"]["MRI_HOME"] == mount["mountPath"]
    assert {volume["name"] for volume in deployment["volumes"]} == {mount["name"]}
    # Secrets by reference only: no credential value in the values file.
    text = (REPO / "deploy/helm/values.yaml").read_text()
    assert not re.search(r"(?i)(password|secret_access_key)\s*:\s*\S", text)


def test_the_cluster_keeps_the_healing_and_pool_settings_of_dagster_yaml():
    instance = yaml.safe_load((REPO / "dagster.yaml").read_text())
    daemon = VALUES["dagsterDaemon"]
    camel = {
        "poll_interval_seconds": "pollIntervalSeconds",
        "start_timeout_seconds": "startTimeoutSeconds",
        "max_resume_run_attempts": "maxResumeRunAttempts",
        "free_slots_after_run_end_seconds": "freeSlotsAfterRunEndSeconds",
        "max_retries": "maxRetries",
        "retry_on_asset_or_op_failure": "retryOnAssetOrOpFailure",
        "enabled": "enabled",
    }
    for section, values_key in (("run_monitoring", "runMonitoring"), ("run_retries", "runRetries")):
        assert {camel[k]: v for k, v in instance[section].items()} == daemon[values_key]
    pools, runs = instance["concurrency"]["pools"], instance["concurrency"]["runs"]
    assert VALUES["concurrency"]["pools"]["defaultLimit"] == pools["default_limit"] == 1
    assert VALUES["concurrency"]["runs"]["maxConcurrentRuns"] == runs["max_concurrent_runs"]
    queue = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert queue["dequeueIntervalSeconds"] == instance["run_queue"]["dequeue_interval_seconds"]
    postgres_db = yaml.safe_load((REPO / "dagster.postgres.yaml").read_text())["storage"]
    assert (
        VALUES["postgresql"]["postgresqlScheme"] == postgres_db["postgres"]["postgres_db"]["scheme"]
    )


def install_commands(text: str) -> list[str]:
    """The `pip install ...` commands in a Makefile or Dockerfile, variables and quotes as written."""
    return [m.strip() for m in re.findall(r"pip install ([^\n&]+)", text)]


def test_the_image_installs_the_project_as_make_install_does():
    makefile = (REPO / "Makefile").read_text()
    dockerfile = (REPO / "Dockerfile").read_text()
    make_torch, make_package = [c for c in install_commands(makefile) if "upgrade" not in c]
    docker_torch, docker_package = install_commands(dockerfile)
    # The same torch release, first, pinned exactly; the image picks the build by its index.
    pin = re.search(r'"torch==([^"]+)"', make_torch).group(1)
    assert re.search(r"ARG TORCH_VERSION=(\S+)", dockerfile).group(1) == pin
    assert docker_torch.startswith('"torch==${TORCH_VERSION}" --index-url')
    assert "download.pytorch.org/whl/${TORCH_INDEX}" in docker_torch
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"torch=={pin}"' in pyproject
    # Then the package itself, editable, with an extra: dev on a workstation, k8s in the image.
    assert re.fullmatch(r'-e "\.\[dev\]"', make_package)
    assert re.fullmatch(r'-e "\.\[k8s\]"', docker_package)
    assert "k8s = [" in pyproject
    # The image serves the definitions the Helm values load.
    assert '"-m", "mri_assets.kubernetes"' in dockerfile
