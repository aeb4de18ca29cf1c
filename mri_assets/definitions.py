"""The one place that puts the pipeline together."""

import dagster as dg
from dagster_aws.s3 import S3Resource

from mri_assets.defs.alerts import alert_sensors
from mri_assets.defs.deployment import deployment_assets, deployment_checks
from mri_assets.defs.ingest import landing_sensors, raw_image_assets
from mri_assets.defs.models import model_assets
from mri_assets.defs.pools import pool_watchdog
from mri_assets.defs.predictions import prediction_assets
from mri_assets.defs.tables import table_assets, table_checks
from mri_assets.resources import (
    LandingZoneResource,
    ModelStoreResource,
    MriSettingsResource,
    PixelCacheResource,
    SlackAlerts,
    WarehouseResource,
)

# Evaluated every few seconds: each tick is a cheap read of the instance's event log. The daemon
# wakes every 5 s; at exactly 5 s some wake-ups are missed by milliseconds (10 s gaps), so 4.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=4,
    description="Runs every asset whose automation condition is met (new data, passed checks).",
)


def build_resources(
    settings: MriSettingsResource | None = None, landing: str | None = None
) -> dict:
    """The resources every stage uses; arguments override the environment (tests, scripts)."""
    settings = settings or MriSettingsResource()
    return {
        "settings": settings,
        "landing": LandingZoneResource(location=landing, settings=settings, s3=S3Resource()),
        "warehouse": WarehouseResource(settings=settings),
        "pixels": PixelCacheResource(settings=settings),
        "model_store": ModelStoreResource(settings=settings),
        "alerts": SlackAlerts(settings=settings),
    }


defs = dg.Definitions(
    assets=[
        *raw_image_assets,
        *table_assets,
        *model_assets,
        *deployment_assets,
        *prediction_assets,
    ],
    asset_checks=[*table_checks, *deployment_checks],
    sensors=[*landing_sensors, automation_sensor, *alert_sensors, pool_watchdog],
    resources=build_resources(),
    # Steps of a run share its process: a step's own process would re-import Dagster, torch and
    # transformers (seconds each), and on two cores the steps gain nothing from running side by
    # side. Pools still apply. On Kubernetes, each run is one pod (K8sRunLauncher) either way.
    executor=dg.in_process_executor,
)
