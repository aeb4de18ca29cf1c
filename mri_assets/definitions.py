"""The one place that puts the pipeline together."""

import dagster as dg
from dagster_aws.s3 import S3Resource

from mri_assets.defs.ingest import landing_sensors, raw_image_assets
from mri_assets.defs.tables import table_assets, table_checks
from mri_assets.resources import (
    LandingZoneResource,
    MriSettingsResource,
    PixelCacheResource,
    WarehouseResource,
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
    }


defs = dg.Definitions(
    assets=[*raw_image_assets, *table_assets],
    asset_checks=table_checks,
    sensors=landing_sensors,
    resources=build_resources(),
)
