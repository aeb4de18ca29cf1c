"""The pipeline on Kubernetes: definitions.py's `defs`, with each step of a run in its own pod.

On one machine a run's steps share its process (`in_process_executor`, definitions.py). On a
cluster the steps want different machines: training on a GPU node, ingest with memory to spare.
`k8s_job_executor` launches each step as a Kubernetes job whose pod takes the step's
`dagster-k8s/config` tags (defs/conventions.py) and, for everything else (image, env, volumes),
the K8sRunLauncher's settings. The Helm values (deploy/helm/values.yaml) load this module.
"""

from dagster_k8s import k8s_job_executor

# Definitions is a Dagster record: `copy` rebuilds it through its constructor (and its checks)
# with one field changed. Internal but stable across 1.x; pinned by pyproject's dagster==1.13.*
# and covered by mri_assets_tests/test_kubernetes.py.
from dagster_shared.record import copy

from mri_assets.definitions import defs as one_machine_defs

defs = copy(one_machine_defs, executor=k8s_job_executor)
