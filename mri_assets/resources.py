"""Dagster resources: thin handles on the core objects, configured from the environment.

Every field is optional: left unset, it falls back to the setting of the same meaning in
`mri_assets.settings` (environment variable or embedded default), read when the resource is used.
"""

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr

from mri_assets.core import warehouse
from mri_assets.core.catalog import Column
from mri_assets.core.embedding_cache import EmbeddingCache
from mri_assets.core.landing import S3_CLIENT_SETTINGS, Landing, LocalLanding, S3Landing
from mri_assets.core.landing_events import LandingQueue
from mri_assets.core.pixel_cache import PixelCache
from mri_assets.core.store import ModelStore
from mri_assets.core.warehouse import CatalogLocation
from mri_assets.settings import SETTING, Settings


class MriSettingsResource(dg.ConfigurableResource):
    """Pipeline settings; unset fields come from MRI_* environment variables (see the README)."""

    home: str | None = Field(default=None, description=SETTING["MRI_HOME"].help)
    base_model: str | None = Field(default=None, description=SETTING["MRI_BASE_MODEL"].help)
    classes: str | None = Field(default=None, description=SETTING["MRI_CLASSES"].help)
    positive_class: str | None = Field(default=None, description=SETTING["MRI_POSITIVE_CLASS"].help)
    promotion_margin: float | None = Field(
        default=None, description=SETTING["MRI_PROMOTION_MARGIN"].help
    )
    _resolved: Settings | None = PrivateAttr(default=None)

    def resolve(self) -> Settings:
        """The settings, read from the environment on first use and kept by this instance
        (Dagster builds resources afresh for each run, so a run sees its own environment)."""
        if self._resolved is None:
            overrides = {
                "MRI_HOME": self.home,
                "MRI_BASE_MODEL": self.base_model,
                "MRI_CLASSES": self.classes,
                "MRI_POSITIVE_CLASS": self.positive_class,
                "MRI_PROMOTION_MARGIN": (
                    None if self.promotion_margin is None else str(self.promotion_margin)
                ),
            }
            given = {k: v for k, v in overrides.items() if v is not None}
            self._resolved = Settings.from_env({**os.environ, **given})
        return self._resolved


class LandingZoneResource(dg.ConfigurableResource):
    """Where scans land: a local folder or s3://bucket/prefix (MRI_LANDING)."""

    location: str | None = None
    settings: dg.ResourceDependency[MriSettingsResource]
    s3: dg.ResourceDependency[S3Resource]

    def resolved_location(self) -> str:
        return self.location or self.settings.resolve().landing

    def open(self) -> Landing:
        location = self.resolved_location()
        if location.startswith("s3://"):
            return S3Landing(self.s3_client(), location)
        return LocalLanding(Path(location).expanduser().resolve())

    def queue(self) -> LandingQueue | None:
        """The SQS queue of the landing zone's change notifications (MRI_LANDING_QUEUE), or
        None when the sensors list the zone on every tick."""
        url = self.settings.resolve().landing_queue
        if not url:
            return None
        location = self.resolved_location()
        if not location.startswith("s3://"):
            raise ValueError(
                f"MRI_LANDING_QUEUE is set but the landing zone {location} is not s3://: "
                "notifications come from S3 only; unset MRI_LANDING_QUEUE for a local folder"
            )
        return LandingQueue(self.s3_client("sqs"), url, location)

    def s3_client(self, service: str = "s3"):
        """A boto3 client (S3, or SQS for the queue) from the ``s3`` resource's settings, with
        bounded waits (landing.S3_CLIENT_SETTINGS): S3Resource.get_client has no timeouts to
        set."""
        import boto3
        from botocore.config import Config

        s3 = self.s3
        session = boto3.session.Session(profile_name=s3.profile_name)
        return session.client(
            service,
            region_name=s3.region_name,
            # S3Resource's endpoint is S3's; SQS takes AWS_ENDPOINT_URL (boto3 reads it).
            endpoint_url=s3.endpoint_url if service == "s3" else None,
            use_ssl=s3.use_ssl,
            verify=s3.verify,
            aws_access_key_id=s3.aws_access_key_id,
            aws_secret_access_key=s3.aws_secret_access_key,
            aws_session_token=s3.aws_session_token,
            config=Config(**S3_CLIENT_SETTINGS),
        )


class WarehouseResource(dg.ConfigurableResource):
    """The catalogue, opened through dagster-duckdb: the DuckDB file ($MRI_HOME/mri.duckdb), or
    a PostgreSQL database several machines share (MRI_CATALOG=postgres:..., core/warehouse.py).

    One writer at a time: every connection holds the catalogue's lock (a sibling ``.lock`` file,
    or a PostgreSQL advisory lock), so runs queue instead of failing, whichever Dagster instance
    or machine launched them. ``database`` (a file) overrides MRI_CATALOG.
    """

    database: str | None = None
    settings: dg.ResourceDependency[MriSettingsResource]

    def path(self) -> Path:
        return Path(self.database) if self.database else self.settings.resolve().duckdb_path

    def location(self) -> CatalogLocation:
        return CatalogLocation() if self.database else self.settings.resolve().catalog

    @contextmanager
    def connection(self) -> Iterator:
        path, location = self.path(), self.location()
        duckdb = DuckDBResource(
            database=warehouse.duckdb_database(location, path),
            connection_config=warehouse.duckdb_config(location),
        )
        with warehouse.writer_lock(location, path), duckdb.get_connection() as conn:
            # get_connection closes only on success; a failed step must not keep the file open.
            try:
                warehouse.attach(conn, location)
                yield conn
            finally:
                conn.close()


def column_schema(columns: Iterable[Column]) -> dict[str, dg.TableSchema]:
    """Asset metadata naming a DuckDB table's columns (``dagster/column_schema``), from the
    table's description in core (catalog, evaluation_records)."""
    return {
        "dagster/column_schema": dg.TableSchema(
            columns=[
                dg.TableColumn(name=c.name, type=c.type, description=c.description or None)
                for c in columns
            ]
        )
    }


class PixelCacheResource(dg.ConfigurableResource):
    """Decoded pixels keyed by sha256 ($MRI_HOME/pixels)."""

    root: str | None = None
    settings: dg.ResourceDependency[MriSettingsResource]

    def open(self) -> PixelCache:
        settings = self.settings.resolve()
        return PixelCache(self.root or settings.pixel_cache_dir, settings.remote("pixels"))


class SlackAlerts(dg.ConfigurableResource):
    """Posts alerts through dagster-slack's SlackResource; never fails the run that alerts.

    The token comes only from SLACK_BOT_TOKEN. Without it, alerts go to the run log.
    ``api_url`` (MRI_SLACK_API_URL) points the client at a Slack-compatible endpoint.
    """

    channel: str | None = Field(default=None, description=SETTING["MRI_SLACK_CHANNEL"].help)
    api_url: str | None = Field(default=None, description=SETTING["MRI_SLACK_API_URL"].help)
    timeout_seconds: int = 10
    settings: dg.ResourceDependency[MriSettingsResource]

    def dagster_url(self) -> str:
        """Base URL of the Dagster UI, for the run link every message carries."""
        return self.settings.resolve().dagster_url

    def post(self, text: str, log=None) -> bool:
        """Send ``text``; True when Slack accepted it. Errors are logged, never raised."""
        settings = self.settings.resolve()
        channel = self.channel or settings.slack_channel
        token = dg.EnvVar("SLACK_BOT_TOKEN").get_value()
        if not token:
            if log is not None:
                log.info(f"[slack disabled: SLACK_BOT_TOKEN unset] {channel}: {text}")
            return False
        from dagster_slack import SlackResource

        client = SlackResource(token=token).get_client()
        client.timeout = self.timeout_seconds
        api_url = self.api_url or settings.slack_api_url
        if api_url:
            client.base_url = api_url if api_url.endswith("/") else api_url + "/"
        try:
            client.chat_postMessage(channel=channel, text=text)
            return True
        except Exception as error:  # noqa: BLE001 - an alert outage must never fail the pipeline
            if log is not None:
                log.warning(
                    f"Slack post to {channel} failed ({type(error).__name__}: {error}); "
                    f"message was: {text}"
                )
            return False


class ModelStoreResource(dg.ConfigurableResource):
    """Model versions, the deployed pointer and base models (``root``, default $MRI_HOME/models),
    and the linear-probe embedding cache, which is always $MRI_HOME/embeddings: outside the
    store, because embeddings are recomputable and never part of a model version."""

    root: str | None = None
    settings: dg.ResourceDependency[MriSettingsResource]

    def root_path(self) -> Path:
        return Path(self.root) if self.root else self.settings.resolve().model_store_dir

    def open(self) -> ModelStore:
        return ModelStore(self.root_path(), self.settings.resolve().remote("models"))

    def base_root(self) -> Path:
        return self.open().base_root

    def embedding_cache(self) -> EmbeddingCache:
        settings = self.settings.resolve()
        return EmbeddingCache(settings.embedding_cache_dir, settings.remote("embeddings"))
