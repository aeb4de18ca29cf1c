"""Every environment setting, defined once: name, default, help text and validation.

`SETTINGS` drives `Settings.from_env` (what the code reads), the descriptions of
`MriSettingsResource`'s fields (what the Dagster UI shows) and the README's settings table (a test
compares it with `settings_table()`). Values are read when a resource is used, never at import, so
`dagster dev` picks up the environment of the process that runs the work. Secrets
(SLACK_BOT_TOKEN, AWS keys) are documented here but read only where they are used, through
Dagster's EnvVar or boto3's own chain.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mri_assets.core.device_spec import parse_device_spec
from mri_assets.core.labels import ClassSpec
from mri_assets.core.object_store import S3Objects, default_s3_client
from mri_assets.core.warehouse import CatalogLocation, parse_catalog


def _folder(raw: str) -> Path:
    return Path(raw).expanduser().resolve()


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive whole number")
    return value


def _share(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be a share between 0 and 1")
    return value


def _http_url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return raw.rstrip("/")


def _s3_location(raw: str) -> str:
    if not raw.startswith("s3://") or not raw[len("s3://") :].split("/", 1)[0]:
        raise ValueError("must be s3://bucket or s3://bucket/prefix")
    return raw.rstrip("/")


@dataclass(frozen=True)
class Setting:
    """One environment variable.

    ``default`` is the raw value used when the variable is unset or empty (None: no value);
    ``shown_default`` is the README's default cell when it is not simply ``default``; ``parse``
    turns the raw text into the value and raises ValueError when it is not valid.
    ``read_here`` is False for variables read elsewhere (secrets, boto3, Dagster itself), listed
    so that the README documents them from the same place.
    """

    name: str
    help: str
    default: str | None = None
    shown_default: str | None = None
    parse: Callable[[str], Any] = str
    read_here: bool = True
    # A value that may carry a password by mistake is not repeated in error messages.
    may_hold_secret: bool = False

    def read(self, env: Mapping[str, str]) -> Any:
        raw = env.get(self.name) or self.default
        if raw is None:
            return None
        try:
            return self.parse(raw)
        except ValueError as error:
            shown = self.name if self.may_hold_secret else f"{self.name}={raw!r}"
            raise ValueError(f"{shown} is not valid: {error} ({self.help})") from error

    def readme_row(self) -> str:
        shown = self.shown_default or (f"`{self.default}`" if self.default else "(unset)")
        return f"| `{self.name}` | {shown} | {self.help} |"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "MRI_HOME",
        "Folder for local state: DuckDB file, local landing zone, pixel cache, model store.",
        default=".mri",
        parse=_folder,
    ),
    Setting(
        "MRI_LANDING",
        "Landing zone: a local folder or `s3://bucket/prefix` (`train/**`, `test/**` and `inbox/**` below it).",
        shown_default="`$MRI_HOME/landing`",
    ),
    Setting(
        "MRI_LANDING_QUEUE",
        "URL of an SQS queue that receives the S3 event notifications (`s3:ObjectCreated:*`, "
        "`s3:ObjectRemoved:*`) of an `s3://` landing zone: the landing sensors then read changes "
        "from it instead of listing the zone on every tick. Unset: every tick lists.",
        parse=_http_url,
    ),
    Setting(
        "MRI_LANDING_FULL_LISTING_SECONDS",
        "With `MRI_LANDING_QUEUE`: seconds between full listings of the landing zone, which "
        "reconcile anything a lost notification missed (the first tick always lists).",
        default="3600",
        parse=_positive_int,
    ),
    Setting(
        "MRI_STORE",
        "Where durable state lives. Unset: under `MRI_HOME`. `s3://bucket/prefix`: model "
        "versions, the deployment pointer and its history, the pixel and embedding caches are "
        "kept there, and `MRI_HOME` holds only a cache that any run may start without.",
        shown_default="(unset: `MRI_HOME`)",
        parse=_s3_location,
    ),
    Setting(
        "MRI_CATALOG",
        "Where the catalogue's tables live: `duckdb` (the file `$MRI_HOME/mri.duckdb`) or "
        "`postgres:<libpq connection string>` (e.g. `postgres:host=db dbname=mri user=mri`), "
        "a database several machines share; the password goes in `PGPASSWORD`. Needs "
        "`pip install 'mri-assets[catalogue]'`: see Beyond one machine.",
        default="duckdb",
        parse=parse_catalog,
        may_hold_secret=True,
    ),
    Setting(
        "MRI_BASE_MODEL",
        "Base model: `embedded` (small ResNet made locally), a hub id such as "
        "`microsoft/resnet-50`, or a `save_pretrained` folder.",
        default="embedded",
    ),
    Setting(
        "MRI_CLASSES",
        "The two class names, comma-separated, in logit order.",
        default="glioma,meningioma",
    ),
    Setting(
        "MRI_POSITIVE_CLASS",
        "The class whose probability ROC AUC scores.",
        shown_default="the second class (`meningioma`)",
    ),
    Setting(
        "MRI_DEVICE",
        "Where torch work (training, evaluation, `predict`) runs: `cpu`, `auto` (CUDA, then "
        "Apple MPS, then the CPU), `cuda`, `cuda:N` or `mps`.",
        default="cpu",
        parse=parse_device_spec,
    ),
    Setting(
        "MRI_PROMOTION_MARGIN",
        "AUC a candidate must gain over the deployed model and the baseline to be promoted.",
        default="0.005",
        parse=float,
    ),
    Setting(
        "MRI_OOD_DRIFT_SHARE",
        "Share of new inbox scans flagged out-of-distribution above which the `predictions` "
        "asset's drift check warns.",
        default="0.2",
        parse=_share,
    ),
    Setting(
        "MRI_MAX_IMAGE_PIXELS",
        "Decompression-bomb guard: larger images are rejected as `too_large`.",
        default="50000000",
        parse=_positive_int,
    ),
    Setting(
        "MRI_SLACK_CHANNEL",
        "Slack channel for promotion, refusal and failure messages.",
        default="#mri-models",
    ),
    Setting(
        "MRI_DAGSTER_URL",
        "Base URL of the Dagster UI; every Slack message links to its run there.",
        default="http://127.0.0.1:3000",
        parse=_http_url,
    ),
    Setting(
        "SLACK_BOT_TOKEN",
        "Slack bot token (secret). Unset: messages go to the run log instead.",
        read_here=False,
    ),
    Setting(
        "MRI_SLACK_API_URL",
        "Slack Web API base URL, for a Slack-compatible endpoint or a local test server.",
        parse=_http_url,
    ),
    Setting(
        "AWS_ENDPOINT_URL",
        "S3-compatible endpoint (MinIO, moto, ...); with the usual `AWS_ACCESS_KEY_ID`, "
        "`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`.",
        read_here=False,
    ),
    Setting(
        "DAGSTER_HOME",
        "Dagster instance folder; `make dev` copies `dagster.yaml` into it (or copy "
        "`dagster.postgres.yaml` there as `dagster.yaml` for the instance on PostgreSQL, with "
        "the `DAGSTER_PG_*` variables: see Beyond one machine).",
        shown_default="`.dagster_home` (in `make dev`)",
        read_here=False,
    ),
)

SETTING = {s.name: s for s in SETTINGS}


def settings_table() -> str:
    """The README's settings table, row for row."""
    return "\n".join(
        ["| variable | default | meaning |", "|---|---|---|", *(s.readme_row() for s in SETTINGS)]
    )


@dataclass(frozen=True)
class Settings:
    """The settings a run uses, read and validated from the environment (see SETTINGS)."""

    home: Path
    landing: str
    landing_queue: str | None
    full_listing_seconds: int
    store: str | None
    catalog: CatalogLocation
    base_model: str
    device: str
    classes: ClassSpec
    promotion_margin: float
    ood_drift_share: float
    max_image_pixels: int
    slack_channel: str
    dagster_url: str
    slack_api_url: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Every setting of ``env`` (default: the process environment), defaults filled in.

        Raises ValueError naming the variable when a value is not valid.
        """
        env = os.environ if env is None else env
        value = {s.name: s.read(env) for s in SETTINGS if s.read_here}
        home = value["MRI_HOME"]
        return cls(
            home=home,
            landing=value["MRI_LANDING"] or str(home / "landing"),
            landing_queue=value["MRI_LANDING_QUEUE"],
            full_listing_seconds=value["MRI_LANDING_FULL_LISTING_SECONDS"],
            store=value["MRI_STORE"],
            catalog=value["MRI_CATALOG"],
            base_model=value["MRI_BASE_MODEL"],
            device=value["MRI_DEVICE"],
            classes=ClassSpec.parse(value["MRI_CLASSES"], value["MRI_POSITIVE_CLASS"]),
            promotion_margin=value["MRI_PROMOTION_MARGIN"],
            ood_drift_share=value["MRI_OOD_DRIFT_SHARE"],
            max_image_pixels=value["MRI_MAX_IMAGE_PIXELS"],
            slack_channel=value["MRI_SLACK_CHANNEL"],
            dagster_url=value["MRI_DAGSTER_URL"],
            slack_api_url=value["MRI_SLACK_API_URL"],
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

    def remote(self, folder: str) -> S3Objects | None:
        """``folder`` (``models``, ``pixels``, ``embeddings``, ``saliency``) of the MRI_STORE bucket, or None
        when durable state is local (the default)."""
        if not self.store:
            return None
        return S3Objects(default_s3_client(), self.store).child(folder)

    @property
    def saliency_dir(self) -> Path:
        """Grad-CAM overlays the predictions asset writes, per model version."""
        return self.home / "saliency"
