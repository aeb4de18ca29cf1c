"""What every asset of the pipeline carries in the UI: its owners, its tags, its code version."""

from mri_assets.core.store import code_version

# Shown on every asset in the UI (Overview, asset catalog filters).
OWNERS = ["team:mri-ml"]
TAGS = {"domain": "mri", "modality": "t2"}
# The source hash the model store also writes into each version's training record: a change to
# the code marks every asset's materializations as made by older code.
CODE_VERSION = code_version()

# Kubernetes: what each step's pod asks for, read by dagster-k8s when each step is its own pod
# (`k8s_job_executor`, mri_assets/kubernetes.py); on one machine these tags change nothing.
# https://docs.dagster.io/deployment/guides/kubernetes/customizing-your-deployment
# The pool of the steps that write the catalogue: dagster.yaml gives it one slot (DuckDB's one
# writer). defs/pools.py watches it.
DUCKDB_POOL = "duckdb"

K8S_CONFIG_TAG = "dagster-k8s/config"
# Decodes in flight hold at most 1 GiB (core/ingest.py's budget), plus DuckDB and the listing.
INGEST_STEP_TAGS = {
    K8S_CONFIG_TAG: {
        "container_config": {
            "resources": {
                "requests": {"cpu": "1", "memory": "2Gi"},
                "limits": {"memory": "4Gi"},
            }
        }
    }
}
# Training and evaluation run torch: one GPU, on a node that has one. The node label is the one
# NVIDIA's GPU feature discovery (GPU operator) sets; the toleration admits the pod to nodes
# tainted for GPU work only (GKE and AKS taint GPU node pools this way).
GPU_STEP_TAGS = {
    K8S_CONFIG_TAG: {
        "container_config": {
            "resources": {
                "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
            }
        },
        "pod_spec_config": {
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
    }
}
