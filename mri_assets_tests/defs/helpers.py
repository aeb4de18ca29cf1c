"""Building Dagster resources and running assets against a temporary MRI_HOME."""

import dagster as dg

from mri_assets.definitions import build_resources
from mri_assets.resources import MriSettingsResource


def resources_for(landing: str | None = None, **settings) -> dict:
    """The production resources, with the landing zone (and any settings) overridden."""
    return build_resources(MriSettingsResource(**settings), landing=landing)


def materialize(assets, resources, instance=None, selection=None) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets, resources=resources, instance=instance, selection=selection, raise_on_error=True
    )
