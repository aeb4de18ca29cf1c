"""Every setting in one place: environment variables with embedded defaults.

Read when a resource is used (never at import), so `dagster dev` picks up the environment of the
process that runs the work. Secrets (SLACK_BOT_TOKEN, AWS keys) are not here: they are read only
where they are used, through dagster's EnvVar or boto3's own chain.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mri_assets.core.labels import ClassSpec

DEFAULT_HOME = ".mri"

# name -> (default, what it means); a test keeps the README's settings table in step with this.
SETTINGS_HELP: dict[str, tuple[str, str]] = {
    "MRI_HOME": (DEFAULT_HOME, "Folder for local state: DuckDB file, local landing zone, pixel cache, model store."),
    "MRI_LANDING": ("$MRI_HOME/landing", "Landing zone: a local folder or s3://bucket/prefix (train/** and test/** below it)."),
    "MRI_BASE_MODEL": ("embedded", "Base model: `embedded` (small ResNet made locally), a hub id such as microsoft/resnet-50, or a save_pretrained folder."),
    "MRI_CLASSES": ("glioma,meningioma", "The two class names, comma-separated, in logit order."),
    "MRI_POSITIVE_CLASS": ("meningioma", "The class whose probability ROC AUC scores."),
    "MRI_PROMOTION_MARGIN": ("0.005", "AUC a candidate must gain over the deployed model and the baseline to be promoted."),
    "MRI_MAX_IMAGE_PIXELS": ("50000000", "Decompression-bomb guard: larger images are rejected as too_large."),
    "MRI_SLACK_CHANNEL": ("#mri-models", "Slack channel for promotion, refusal and failure messages."),
    "SLACK_BOT_TOKEN": ("(unset)", "Slack bot token (secret). Unset: messages go to the run log instead."),
    "MRI_SLACK_API_URL": ("(unset)", "Slack Web API base URL, for a Slack-compatible endpoint or a local test server."),
    "AWS_ENDPOINT_URL": ("(unset)", "S3-compatible endpoint (MinIO, moto, ...); with the usual AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION."),
}


@dataclass(frozen=True)
class Settings:
    home: Path
    landing: str
    base_model: str
    classes: ClassSpec
    promotion_margin: float
    max_image_pixels: int
    slack_channel: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("MRI_HOME") or DEFAULT_HOME).expanduser().resolve()
        return cls(
            home=home,
            landing=env.get("MRI_LANDING") or str(home / "landing"),
            base_model=env.get("MRI_BASE_MODEL") or "embedded",
            classes=ClassSpec.parse(env.get("MRI_CLASSES"), env.get("MRI_POSITIVE_CLASS")),
            promotion_margin=_number(env, "MRI_PROMOTION_MARGIN", 0.005, float),
            max_image_pixels=_number(env, "MRI_MAX_IMAGE_PIXELS", 50_000_000, int),
            slack_channel=env.get("MRI_SLACK_CHANNEL") or "#mri-models",
        )

    @property
    def duckdb_path(self) -> Path:
        return self.home / "mri.duckdb"

    @property
    def pixel_cache_dir(self) -> Path:
        return self.home / "pixels"

    @property
    def embedding_cache_dir(self) -> Path:
        return self.home / "embeddings"

    @property
    def model_store_dir(self) -> Path:
        return self.home / "models"


def _number(env: Mapping[str, str], name: str, default, kind):
    raw = env.get(name)
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError as error:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from error
