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


def declared_columns(key: str) -> list[tuple[str, str]]:
    """(name, type) of each column in the asset's ``dagster/column_schema`` metadata."""
    from mri_assets.definitions import defs

    spec = defs.resolve_assets_def(key).specs_by_key[dg.AssetKey(key)]
    return [(c.name, c.type) for c in spec.metadata["dagster/column_schema"].columns]


def duckdb_columns(conn, table: str) -> list[tuple[str, str]]:
    """(name, type) of each column of a real DuckDB table, in table order."""
    return [(row[0], row[1]) for row in conn.execute(f"DESCRIBE {table}").fetchall()]
