"""Where the catalogue lives, and how a DuckDB connection reaches it.

Two places (the ``MRI_CATALOG`` setting):

- ``duckdb`` (the default): the embedded file ``$MRI_HOME/mri.duckdb``. DuckDB allows one writing
  process per file, so every connection holds an exclusive lock on a sibling ``.lock`` file.
- ``postgres:<libpq connection string>``: the catalogue's tables live in a PostgreSQL database
  that several machines reach at once. Each connection is an in-memory DuckDB that attaches the
  database through DuckDB's postgres extension and makes it the default (``USE``), so the
  catalogue's SQL runs unchanged. The one-writer rule moves to a PostgreSQL advisory lock, held
  on its own session for as long as the connection is open: a process that dies loses its
  session, and with it the lock.

The extension is loaded from the ``duckdb-ext-postgres`` package (``pip install
'mri-assets[catalogue]'``), never downloaded: the machines may be offline.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

from mri_assets.core.catalog import exclusive_lock

POSTGRES_PREFIX = "postgres:"
# DuckDB's name for the postgres extension (the file postgres_scanner.duckdb_extension).
POSTGRES_EXTENSION = "postgres_scanner"
ATTACHED_NAME = "catalogue"
# pg_advisory_lock's key for the whole catalogue: any fixed bigint that nothing else in the
# database uses.
ADVISORY_LOCK_KEY = 0x2F1C_6B0E_5A4D_3C21
INSTALL_HINT = "pip install 'mri-assets[catalogue]' (duckdb==1.4.4 and duckdb-ext-postgres)"


class CatalogueUnavailable(RuntimeError):
    """The shared catalogue cannot be reached or opened; the message says what to do."""


@dataclass(frozen=True)
class CatalogLocation:
    """The parsed ``MRI_CATALOG``: ``postgres_dsn`` is None for the embedded DuckDB file."""

    postgres_dsn: str | None = None

    @property
    def shared(self) -> bool:
        return self.postgres_dsn is not None

    def describe(self) -> str:
        """Where the catalogue is, for messages and metadata (the password is never in it)."""
        if self.postgres_dsn is None:
            return "the DuckDB file in MRI_HOME"
        return "PostgreSQL " + redact_dsn(self.postgres_dsn)


def parse_catalog(raw: str) -> CatalogLocation:
    """``duckdb`` or ``postgres:<libpq connection string>``; raises ValueError otherwise."""
    if raw == "duckdb":
        return CatalogLocation()
    if raw.startswith(POSTGRES_PREFIX):
        dsn = raw[len(POSTGRES_PREFIX) :].strip()
        if not dsn:
            raise ValueError("postgres: needs a connection string, e.g. postgres:dbname=mri")
        if "password" in dsn.lower() or _uri_password(dsn):
            raise ValueError("put the password in PGPASSWORD, not in the connection string")
        return CatalogLocation(postgres_dsn=dsn)
    raise ValueError("must be `duckdb` or `postgres:<libpq connection string>`")


def _uri_password(dsn: str) -> bool:
    """postgresql://user:secret@host carries a password in its user part."""
    if "://" not in dsn:
        return False
    rest = dsn.split("://", 1)[1]
    return "@" in rest and ":" in rest.rsplit("@", 1)[0]


def redact_dsn(dsn: str) -> str:
    """The host, port, database and user of a key=value or URI connection string."""
    if "://" in dsn:
        rest = dsn.split("://", 1)[1]
        return rest.rsplit("@", 1)[-1].split("?", 1)[0]
    kept = [part for part in dsn.split() if part.split("=", 1)[0] in {"host", "port", "dbname"}]
    return " ".join(kept) or "(libpq defaults)"


def extension_directory() -> Path:
    """The folder of extension files the duckdb-ext-* wheels install (``duckdb_ext/extensions``,
    laid out as DuckDB's own extension directory: ``v<version>/<platform>/<name>``)."""
    spec = importlib.util.find_spec("duckdb_ext")
    if spec is None or not spec.submodule_search_locations:
        raise CatalogueUnavailable(f"MRI_CATALOG=postgres:... needs the extension: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "extensions"


def duckdb_database(location: CatalogLocation, duckdb_file: Path) -> str:
    """What DuckDB opens: the file, or an in-memory database that attaches PostgreSQL."""
    return ":memory:" if location.shared else str(duckdb_file)


def duckdb_config(location: CatalogLocation) -> dict:
    """DuckDB connection settings: extensions only from the installed package, never fetched."""
    if not location.shared:
        return {}
    return {
        "extension_directory": str(extension_directory()),
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
    }


@contextlib.contextmanager
def writer_lock(location: CatalogLocation, duckdb_file: Path) -> Iterator[None]:
    """Hold the catalogue's one-writer lock: the file lock, or a PostgreSQL advisory lock."""
    if not location.shared:
        with exclusive_lock(duckdb_file):
            yield
        return
    import psycopg2

    try:
        session = psycopg2.connect(location.postgres_dsn)
    except psycopg2.Error as error:
        raise CatalogueUnavailable(
            f"MRI_CATALOG: cannot connect to {location.describe()}: {str(error).strip()}"
        ) from error
    try:
        session.autocommit = True
        with session.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        yield
    finally:
        session.close()  # ends the session, which releases the lock


def attach(conn, location: CatalogLocation) -> None:
    """Make the catalogue the connection's default database (nothing to do for the file)."""
    if not location.shared:
        return
    try:
        conn.execute(f"LOAD {POSTGRES_EXTENSION}")
    except duckdb.Error as error:
        raise CatalogueUnavailable(
            f"MRI_CATALOG=postgres:... cannot load DuckDB's postgres extension "
            f"(DuckDB {duckdb.__version__}): {error}. {INSTALL_HINT}"
        ) from error
    quoted = location.postgres_dsn.replace("'", "''")
    try:
        conn.execute(f"ATTACH '{quoted}' AS {ATTACHED_NAME} (TYPE postgres)")
    except duckdb.Error as error:
        # The connection string holds no password (parse_catalog refuses one), so the message
        # may repeat it.
        raise CatalogueUnavailable(
            f"MRI_CATALOG: DuckDB cannot attach {location.describe()}: {error}"
        ) from error
    conn.execute(f"USE {ATTACHED_NAME}")


@contextlib.contextmanager
def connect(location: CatalogLocation, duckdb_file: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A locked connection to the catalogue, for callers outside Dagster (CLI, benchmarks);
    assets get theirs from WarehouseResource, which does the same through dagster-duckdb."""
    with writer_lock(location, duckdb_file):
        conn = duckdb.connect(
            duckdb_database(location, duckdb_file), config=duckdb_config(location)
        )
        try:
            attach(conn, location)
            yield conn
        finally:
            conn.close()
