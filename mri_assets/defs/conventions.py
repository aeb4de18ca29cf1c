"""What every asset of the pipeline carries in the UI: its owners, its tags, its code version."""

from mri_assets.core.store import code_version

# Shown on every asset in the UI (Overview, asset catalog filters).
OWNERS = ["team:mri-ml"]
TAGS = {"domain": "mri", "modality": "t2"}
# The source hash the model store also writes into each version's training record: a change to
# the code marks every asset's materializations as made by older code.
CODE_VERSION = code_version()
