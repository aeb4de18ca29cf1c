"""The DuckDB catalogue: what landed, what was accepted or rejected, and the train/test sets.

Every function takes an open DuckDB connection; none opens one, so the caller decides locking.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from mri_assets.core.files import lock_exclusively
from mri_assets.core.landing import INBOX

SCHEMA = """
CREATE TABLE IF NOT EXISTS landing_ledger (
    source_key VARCHAR PRIMARY KEY,
    split_folder VARCHAR NOT NULL,
    fingerprint VARCHAR NOT NULL,
    outcome VARCHAR NOT NULL,           -- accepted | rejected
    processed_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS landed_images (
    source_key VARCHAR PRIMARY KEY,
    split_folder VARCHAR NOT NULL,
    sha256 VARCHAR NOT NULL,
    label VARCHAR NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    source_mode VARCHAR,
    source_format VARCHAR,
    size_bytes BIGINT,
    first_seen TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    pixel_sha256 VARCHAR,               -- of the decoded pixels: one id per content, any encoding
    perceptual_hash VARCHAR,            -- 256-bit dHash, hex: near-identical slices are close
    modality VARCHAR,                   -- DICOM only, and nothing that identifies a patient
    series_description VARCHAR,
    pixel_spacing_mm VARCHAR,           -- row x column spacing
    series_uid_sha256 VARCHAR           -- the series UID, hashed
);
-- Catalogues made before content hashes existed gain the columns (their rows keep NULL).
ALTER TABLE landed_images ADD COLUMN IF NOT EXISTS pixel_sha256 VARCHAR;
ALTER TABLE landed_images ADD COLUMN IF NOT EXISTS perceptual_hash VARCHAR;
ALTER TABLE landed_images ADD COLUMN IF NOT EXISTS modality VARCHAR;
ALTER TABLE landed_images ADD COLUMN IF NOT EXISTS series_description VARCHAR;
ALTER TABLE landed_images ADD COLUMN IF NOT EXISTS pixel_spacing_mm VARCHAR;
ALTER TABLE landed_images ADD COLUMN IF NOT EXISTS series_uid_sha256 VARCHAR;
CREATE TABLE IF NOT EXISTS landing_removals (
    source_key VARCHAR NOT NULL,
    split_folder VARCHAR NOT NULL,
    sha256 VARCHAR,                     -- of the content it held, when it had been accepted
    removed_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS landing_rejections (
    source_key VARCHAR NOT NULL,
    split_folder VARCHAR NOT NULL,
    fingerprint VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    detail VARCHAR,
    rejected_at TIMESTAMP NOT NULL,
    PRIMARY KEY (source_key, fingerprint)
);
-- Unlabelled scans landed under <landing>/inbox/** to be scored (the predictions asset). Kept
-- apart from landed_images so they never enter `images` or the train and test sets.
CREATE TABLE IF NOT EXISTS inbox_images (
    source_key VARCHAR PRIMARY KEY,
    sha256 VARCHAR NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    source_mode VARCHAR,
    source_format VARCHAR,
    size_bytes BIGINT,
    first_seen TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    pixel_sha256 VARCHAR,
    perceptual_hash VARCHAR,
    modality VARCHAR,
    series_description VARCHAR,
    pixel_spacing_mm VARCHAR,
    series_uid_sha256 VARCHAR
);
CREATE TABLE IF NOT EXISTS dataset_versions (
    version VARCHAR NOT NULL,
    split VARCHAR NOT NULL,
    images INTEGER NOT NULL,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (version, split)
);
CREATE TABLE IF NOT EXISTS dataset_members (
    version VARCHAR NOT NULL,
    split VARCHAR NOT NULL,
    sha256 VARCHAR NOT NULL,
    label VARCHAR NOT NULL
);
"""


@dataclass(frozen=True)
class Column:
    """One column of a catalogue table: its name, its DuckDB type and what it holds. The Dagster
    layer shows these as each table asset's column schema; a test compares them with DuckDB."""

    name: str
    type: str
    description: str = ""


# The columns ingest records per accepted object (the raw_<split>_images assets).
LANDED_IMAGES_COLUMNS = (
    Column("source_key", "VARCHAR", "Path of the object below the landing zone"),
    Column("split_folder", "VARCHAR", "Landing folder it was found in: train or test"),
    Column("sha256", "VARCHAR", "sha256 of the file's bytes"),
    Column("label", "VARCHAR", "Class, from the nearest folder or the file name"),
    Column("width", "INTEGER", "Width in pixels"),
    Column("height", "INTEGER", "Height in pixels"),
    Column("source_mode", "VARCHAR", "Pixel mode of the file (L, RGB, I;16, ...)"),
    Column("source_format", "VARCHAR", "Format of the file (PNG, JPEG, DICOM, ...)"),
    Column("size_bytes", "BIGINT", "Size of the file"),
    Column("first_seen", "TIMESTAMP", "When the key was first ingested"),
    Column("updated_at", "TIMESTAMP", "When its current content was ingested"),
    Column("pixel_sha256", "VARCHAR", "sha256 of the decoded pixels: one id per content"),
    Column("perceptual_hash", "VARCHAR", "256-bit dHash, hex: near-identical slices are close"),
    Column("modality", "VARCHAR", "DICOM modality (DICOM only)"),
    Column("series_description", "VARCHAR", "DICOM series description (DICOM only)"),
    Column("pixel_spacing_mm", "VARCHAR", "DICOM row x column spacing (DICOM only)"),
    Column("series_uid_sha256", "VARCHAR", "sha256 of the DICOM series UID (DICOM only)"),
)


# First come, first served: an image belongs to the split it was first seen in (test wins a tie,
# so the held-out set is never thinned by a simultaneous train copy); later copies of the same
# content are recorded as duplicates with the reason, and content carrying two labels is excluded.
# "Same content" means the same decoded pixels, so a PNG and a BMP of one slice are one image.
IMAGES_QUERY = """
WITH content AS (
    SELECT *, coalesce(pixel_sha256, sha256) AS content_id FROM landed_images
),
ranked AS (
    SELECT *,
        row_number() OVER owner_order AS copy_rank,
        first_value(source_key) OVER owner_order AS owner_key,
        first_value(split_folder) OVER owner_order AS owner_split,
        min(label) OVER (PARTITION BY content_id) AS min_label,
        max(label) OVER (PARTITION BY content_id) AS max_label
    FROM content
    WINDOW owner_order AS (
        PARTITION BY content_id
        ORDER BY first_seen, CASE split_folder WHEN 'test' THEN 0 ELSE 1 END, source_key
        ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING
    )
)
SELECT
    source_key,
    sha256,
    label,
    split_folder AS landing_split,
    CASE
        WHEN min_label <> max_label THEN 'conflict'
        WHEN copy_rank = 1 THEN split_folder
        ELSE 'duplicate'
    END AS split,
    CASE
        WHEN min_label <> max_label
            THEN 'the same content is labelled both ' || min_label || ' and ' || max_label
        WHEN copy_rank = 1 THEN NULL
        WHEN owner_split <> split_folder
            THEN 'same content as ' || owner_key || ', already in the ' || owner_split || ' split'
        ELSE 'same content as ' || owner_key
    END AS split_reason,
    width,
    height,
    source_format,
    first_seen,
    content_id,
    perceptual_hash,
    modality,
    series_description,
    pixel_spacing_mm,
    series_uid_sha256
FROM ranked
ORDER BY source_key
"""

_LANDED = {column.name: column for column in LANDED_IMAGES_COLUMNS}
IMAGES_COLUMNS = (
    *(_LANDED[name] for name in ("source_key", "sha256", "label")),
    Column("landing_split", "VARCHAR", "Landing folder it was found in: train or test"),
    Column("split", "VARCHAR", "Split it is used in: train, test, duplicate or conflict"),
    Column("split_reason", "VARCHAR", "Why a duplicate or conflict is left out of the sets"),
    *(_LANDED[name] for name in ("width", "height", "source_format", "first_seen")),
    Column("content_id", "VARCHAR", "Decoded-pixel sha256 (file sha256 for older rows)"),
    *(
        _LANDED[name]
        for name in (
            "perceptual_hash",
            "modality",
            "series_description",
            "pixel_spacing_mm",
            "series_uid_sha256",
        )
    ),
)

REJECTED_QUERY = """
SELECT r.source_key, r.split_folder, r.reason, r.detail, r.rejected_at,
       a.source_key IS NOT NULL OR i.source_key IS NOT NULL AS earlier_version_kept
FROM landing_rejections r
JOIN landing_ledger l ON l.source_key = r.source_key AND l.fingerprint = r.fingerprint
LEFT JOIN landed_images a ON a.source_key = r.source_key
LEFT JOIN inbox_images i ON i.source_key = r.source_key
ORDER BY r.source_key
"""


REJECTED_IMAGES_COLUMNS = (
    Column("source_key", "VARCHAR", "Path of the object below the landing zone"),
    Column("split_folder", "VARCHAR", "Landing folder it was found in: train, test or inbox"),
    Column("reason", "VARCHAR", "Why it could not be used (empty_file, truncated, ...)"),
    Column("detail", "VARCHAR", "What exactly was wrong"),
    Column("rejected_at", "TIMESTAMP", "When it was rejected"),
    Column("earlier_version_kept", "BOOLEAN", "An earlier, accepted content of the key is kept"),
)

# The frozen train_images and test_images tables: a projection of `images`.
SPLIT_TABLE_COLUMNS = tuple(
    column
    for column in IMAGES_COLUMNS
    if column.name in ("source_key", "sha256", "label", "width", "height", "first_seen")
)


@contextmanager
def exclusive_lock(database: str | Path) -> Iterator[None]:
    """Hold ``<database>.lock`` exclusively: DuckDB allows one writing process per file, so
    writers queue on this lock instead of failing, whichever Dagster instance launched them."""
    path = Path(database)
    with lock_exclusively(path.with_name(path.name + ".lock")):
        yield


# DuckDB keeps a result open until it is fully fetched, so single rows are read with fetchall().


# Connections whose schema is in place: the DDL is not free and every function here needs it, so
# it runs once per connection (a small increment's fixed cost has a tight budget).
_schema_ready: weakref.WeakSet = weakref.WeakSet()


def ensure_schema(conn) -> None:
    """Create the catalogue tables if missing (once per connection)."""
    if conn not in _schema_ready:
        conn.execute(SCHEMA)
        _schema_ready.add(conn)


def ledger_fingerprints(conn, split_folder: str) -> dict[str, str]:
    """source_key -> fingerprint of every object already processed in one landing split."""
    ensure_schema(conn)
    rows = conn.execute(
        "SELECT source_key, fingerprint FROM landing_ledger WHERE split_folder = ?", [split_folder]
    ).fetchall()
    return dict(rows)


def record_ingest(
    conn,
    accepted: pd.DataFrame,
    rejected: pd.DataFrame,
    ledger: pd.DataFrame,
    removed: pd.DataFrame | None = None,
) -> None:
    """Upsert one ingest batch in a single transaction: all of it lands or none of it.

    ``removed`` (source_key, split_folder, removed_at): objects gone from the landing zone. They
    leave ``landed_images``, the ledger and the rejections, and are kept in ``landing_removals``.
    """
    ensure_schema(conn)
    conn.execute("BEGIN TRANSACTION")
    try:
        if removed is not None and len(removed):
            _record_removals(conn, removed)
        inbox = accepted["split_folder"] == INBOX if len(accepted) else None
        if inbox is not None and inbox.any():
            _upsert_images(conn, "inbox_images", accepted[inbox], ())
            accepted = accepted[~inbox]
        if len(accepted):
            _upsert_images(conn, "landed_images", accepted, ("split_folder", "label"))
        if len(rejected):
            conn.register("batch_rejected", rejected)
            conn.execute(
                """
                INSERT INTO landing_rejections
                SELECT source_key, split_folder, fingerprint, reason, detail, processed_at
                FROM batch_rejected ON CONFLICT DO NOTHING
                """
            )
            conn.unregister("batch_rejected")
        if len(ledger):
            conn.register("batch_ledger", ledger)
            conn.execute(
                """
                INSERT INTO landing_ledger
                SELECT source_key, split_folder, fingerprint, outcome, processed_at FROM batch_ledger
                ON CONFLICT (source_key) DO UPDATE SET
                    fingerprint = excluded.fingerprint, outcome = excluded.outcome,
                    processed_at = excluded.processed_at
                """
            )
            conn.unregister("batch_ledger")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# What ingest records of every accepted image, in landed_images and inbox_images alike.
_IMAGE_FIELDS = (
    "sha256",
    "width",
    "height",
    "source_mode",
    "source_format",
    "size_bytes",
    "pixel_sha256",
    "perceptual_hash",
    "modality",
    "series_description",
    "pixel_spacing_mm",
    "series_uid_sha256",
)


def _upsert_images(conn, table: str, accepted: pd.DataFrame, own_fields: tuple[str, ...]) -> None:
    """Upsert accepted images into ``table`` by source_key: ``landed_images`` (own fields
    split_folder and label) or ``inbox_images`` (none: unlabelled scans, to be scored). A
    rewritten key keeps its first_seen (the update leaves it out): its place is unchanged."""
    fields = (*own_fields, *_IMAGE_FIELDS)
    updates = ", ".join(f"{name} = excluded.{name}" for name in (*fields, "updated_at"))
    conn.register("batch_images", accepted)
    conn.execute(
        f"""
        INSERT INTO {table} BY NAME
        SELECT source_key, {", ".join(fields)},
               processed_at AS first_seen, processed_at AS updated_at
        FROM batch_images
        ON CONFLICT (source_key) DO UPDATE SET {updates}
        """
    )
    conn.unregister("batch_images")


def _record_removals(conn, removed: pd.DataFrame) -> None:
    conn.register("batch_removed", removed)
    conn.execute(
        """
        INSERT INTO landing_removals
        SELECT r.source_key, r.split_folder, coalesce(a.sha256, i.sha256), r.removed_at
        FROM batch_removed r LEFT JOIN landed_images a USING (source_key)
        LEFT JOIN inbox_images i USING (source_key)
        """
    )
    for table in ("landed_images", "inbox_images", "landing_ledger", "landing_rejections"):
        conn.execute(
            f"DELETE FROM {table} WHERE source_key IN (SELECT source_key FROM batch_removed)"
        )
    conn.unregister("batch_removed")


def removals(conn) -> pd.DataFrame:
    """Every object removed from the landing zone after it was ingested, newest first."""
    ensure_schema(conn)
    return conn.execute("SELECT * FROM landing_removals ORDER BY removed_at DESC").df()


def inbox_scans(conn) -> list[tuple[str, str]]:
    """(source_key, sha256) of every accepted inbox scan, by key."""
    ensure_schema(conn)
    return conn.execute(
        "SELECT source_key, sha256 FROM inbox_images ORDER BY source_key"
    ).fetchall()


def rebuild_images(conn) -> pd.DataFrame:
    """Recreate the ``images`` table (one row per accepted file, its split resolved)."""
    ensure_schema(conn)
    conn.execute(f"CREATE OR REPLACE TABLE images AS {IMAGES_QUERY}")
    return conn.execute("SELECT * FROM images").df()


def rebuild_rejected_images(conn) -> pd.DataFrame:
    """Recreate ``rejected_images``: every landed object whose latest version was rejected."""
    ensure_schema(conn)
    conn.execute(f"CREATE OR REPLACE TABLE rejected_images AS {REJECTED_QUERY}")
    return conn.execute("SELECT * FROM rejected_images").df()


def images_in_both_splits(conn) -> list[str]:
    """One source_key per content (decoded pixels, or file bytes) that ``images`` has in both
    the train and the test split: what must never happen."""
    rows = conn.execute(
        "SELECT any_value(source_key) FROM images WHERE split IN ('train', 'test') "
        "GROUP BY content_id HAVING count(DISTINCT split) > 1 "
        "UNION ALL SELECT any_value(source_key) FROM images WHERE split IN ('train', 'test') "
        "GROUP BY sha256 HAVING count(DISTINCT split) > 1"
    ).fetchall()
    return [row[0] for row in rows]


def perceptual_hashes_by_split(conn) -> dict[str, list[tuple[str, str]]]:
    """split -> (source_key, perceptual hash) of the train and test images that have one."""
    rows = conn.execute(
        "SELECT source_key, split, perceptual_hash FROM images "
        "WHERE split IN ('train', 'test') AND perceptual_hash IS NOT NULL"
    ).fetchall()
    result: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for key, split, phash in rows:
        result[split].append((key, phash))
    return result


def label_counts_by_split(conn) -> list[tuple[str, str, int]]:
    """(split, label, images) of the train and test rows of ``images``."""
    return conn.execute(
        "SELECT split, label, count(*) FROM images WHERE split IN ('train', 'test') "
        "GROUP BY split, label"
    ).fetchall()


def landing_outcomes(conn) -> tuple[int, int]:
    """(accepted, rejected): how the latest version of every landed object ended."""
    return conn.execute(
        "SELECT count(*) FILTER (WHERE outcome = 'accepted'), "
        "count(*) FILTER (WHERE outcome = 'rejected') FROM landing_ledger"
    ).fetchall()[0]


@dataclass(frozen=True)
class SplitSnapshot:
    """The images of one split at one moment, with a version derived from their content."""

    split: str
    version: str
    sha256s: tuple[str, ...]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.sha256s)

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for label in self.labels:
            result[label] = result.get(label, 0) + 1
        return dict(sorted(result.items()))


def dataset_version(sha256s: tuple[str, ...], labels: tuple[str, ...]) -> str:
    """Content version of a set of labelled images: order-free, 16 hex digits."""
    digest = hashlib.sha256()
    for sha, label in sorted(zip(sha256s, labels, strict=True)):
        digest.update(f"{sha}\t{label}\n".encode())
    return digest.hexdigest()[:16]


def snapshot_from_images(conn, split: str) -> SplitSnapshot:
    """Select one split out of the ``images`` table."""
    rows = conn.execute(
        "SELECT sha256, label FROM images WHERE split = ? ORDER BY sha256", [split]
    ).fetchall()
    sha256s = tuple(r[0] for r in rows)
    labels = tuple(r[1] for r in rows)
    return SplitSnapshot(split, dataset_version(sha256s, labels), sha256s, labels)


def record_split_table(conn, split: str) -> SplitSnapshot:
    """Freeze the current ``split`` rows of ``images`` into the ``<split>_images`` table.

    Also records the version and its members so evaluations can name exactly what they used.
    """
    ensure_schema(conn)
    snapshot = snapshot_from_images(conn, split)
    table = f"{split}_images"
    columns = ", ".join(column.name for column in SPLIT_TABLE_COLUMNS)
    conn.execute(
        f"CREATE OR REPLACE TABLE {table} AS "
        f"SELECT {columns} FROM images WHERE split = ? ORDER BY sha256",
        [split],
    )
    exists = conn.execute(
        "SELECT count(*) FROM dataset_versions WHERE version = ? AND split = ?",
        [snapshot.version, split],
    ).fetchall()[0][0]
    if not exists:
        members = pd.DataFrame(
            {
                "version": snapshot.version,
                "split": split,
                "sha256": list(snapshot.sha256s),
                "label": list(snapshot.labels),
            }
        )
        conn.register("new_members", members)
        conn.execute("INSERT INTO dataset_members SELECT * FROM new_members")
        conn.unregister("new_members")
        conn.execute(
            "INSERT INTO dataset_versions VALUES (?, ?, ?, now())",
            [snapshot.version, split, len(snapshot)],
        )
    return snapshot


def read_split_table(conn, split: str) -> SplitSnapshot:
    """The last frozen ``<split>_images`` table, as a snapshot (empty if never materialized)."""
    table = f"{split}_images"
    present = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
    ).fetchall()[0][0]
    if not present:
        raise LookupError(f"table {table} does not exist yet: materialize the {table} asset first")
    rows = conn.execute(f"SELECT sha256, label FROM {table} ORDER BY sha256").fetchall()
    sha256s = tuple(r[0] for r in rows)
    labels = tuple(r[1] for r in rows)
    return SplitSnapshot(split, dataset_version(sha256s, labels), sha256s, labels)


class KnownImage(NamedTuple):
    """What the catalogue already knows about accepted content, so it is not decoded again.

    A tuple, not a dataclass: a run builds one per accepted image, and a tuple is the cheapest
    record per image, which matters to a small increment's budget."""

    width: int
    height: int
    source_mode: str | None
    source_format: str | None
    pixel_sha256: str | None
    perceptual_hash: str | None


def known_images(conn) -> dict[str, KnownImage]:
    """sha256 -> KnownImage for all accepted content, so re-landed content is not decoded."""
    ensure_schema(conn)
    rows = conn.execute(
        "SELECT sha256, any_value(width), any_value(height), any_value(source_mode), "
        "any_value(source_format), any_value(pixel_sha256), any_value(perceptual_hash) "
        "FROM landed_images GROUP BY sha256"
    ).fetchall()
    return {row[0]: KnownImage(*row[1:]) for row in rows}


def landing_totals(conn, split_folder: str) -> dict[str, int]:
    """Accepted and rejected object counts of one landing split, and a version of its ledger."""
    ensure_schema(conn)
    accepted, rejected, version = conn.execute(
        """
        SELECT count(*) FILTER (WHERE outcome = 'accepted'),
               count(*) FILTER (WHERE outcome = 'rejected'),
               coalesce(md5(string_agg(source_key || '\t' || fingerprint, '\n' ORDER BY source_key)), '')
        FROM landing_ledger WHERE split_folder = ?
        """,
        [split_folder],
    ).fetchall()[0]
    return {"accepted": accepted, "rejected": rejected, "version": version[:16]}


def table_version(conn, table: str) -> str:
    """A content hash of a whole table, used as the asset's data version."""
    row = conn.execute(
        f"SELECT coalesce(md5(string_agg(CAST(t AS VARCHAR), '\n' ORDER BY CAST(t AS VARCHAR))), '') FROM {table} t"
    ).fetchall()[0]
    return row[0][:16]


DEPLOYMENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    seq INTEGER PRIMARY KEY,            -- position in the store's append-only history
    version VARCHAR NOT NULL,
    action VARCHAR NOT NULL,            -- promote | rollback
    roc_auc DOUBLE,
    test_set_version VARCHAR,
    deployed_at VARCHAR NOT NULL,
    reason VARCHAR
);
"""


def sync_deployments(conn, history: list[dict]) -> int:
    """Mirror the store's deployment history into DuckDB; returns the rows added.

    The store is the source of truth (its pointer flips atomically) and its history only grows,
    so a crash between the two writes is repaired here on the next run.
    """
    conn.execute(DEPLOYMENTS_SCHEMA)
    recorded = conn.execute("SELECT count(*) FROM deployments").fetchall()[0][0]
    missing = [
        [
            seq,
            e["version"],
            e["action"],
            e["auc"],
            e["test_set_version"],
            e["deployed_at"],
            e["reason"],
        ]
        for seq, e in enumerate(history)
        if seq >= recorded
    ]
    if missing:
        conn.executemany("INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?)", missing)
    return len(missing)
