"""Catalogue backends: the embedded DuckDB file, DuckDB's postgres extension (tables in
PostgreSQL), and DuckLake (catalogue in PostgreSQL, Parquet data files in S3).

The workload is the catalogue's own (mri_assets/core/catalog.py): one ingest batch of N images
into ``landed_images`` and the ledger in one transaction, a 10-image increment, rebuilding
``images`` (the window-partition query), and reading ``landed_images`` whole; plus the cost of
opening a connection (every asset opens one or more). Then two processes write at once, with the
one-writer lock and without it, to see what each backend does with concurrent writers.

PostgreSQL is a real server (mri_assets_tests/postgres.py), S3 is moto's server over HTTP. DuckLake
has no PRIMARY KEY and no INSERT ... ON CONFLICT, so its runs use the catalogue's schema without
the keys and MERGE INTO for the upserts (what adopting it would take); the other two run the
project's own functions.

    pip install -e '.[dev]' duckdb-ext-ducklake==1.4.4.* duckdb-ext-httpfs==1.4.4.* \\
        duckdb-ext-parquet==1.4.4.*
    python -m benchmarks.catalogue            # writes benchmarks/results/catalogue.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import boto3
import duckdb
import pandas as pd

from mri_assets.core import catalog, warehouse
from mri_assets.core.warehouse import CatalogLocation, parse_catalog

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "catalogue.md"
ROUNDS = int(os.environ.get("CATALOGUE_ROUNDS", "3"))
INCREMENT = 10
WRITER_BATCHES = 20
WRITER_BATCH = 50
BUCKET = "lake"


# ---------------------------------------------------------------- backends


def ducklake_schema() -> str:
    """catalog.SCHEMA as DuckLake accepts it: no PRIMARY KEY (it has no constraints but NOT NULL)."""
    schema = re.sub(r",\s*PRIMARY KEY \([^)]*\)", "", catalog.SCHEMA)
    return re.sub(r"\s+PRIMARY KEY", "", schema)


LAKE_UPSERT_IMAGES = """
MERGE INTO landed_images t USING (
    SELECT source_key, split_folder, sha256, label, width, height, source_mode, source_format,
           size_bytes, processed_at AS first_seen, processed_at AS updated_at, pixel_sha256,
           perceptual_hash, modality, series_description, pixel_spacing_mm, series_uid_sha256
    FROM batch_accepted) s
ON t.source_key = s.source_key
WHEN MATCHED THEN UPDATE SET sha256 = s.sha256, label = s.label, width = s.width,
    height = s.height, updated_at = s.updated_at, pixel_sha256 = s.pixel_sha256
WHEN NOT MATCHED THEN INSERT BY NAME
"""
LAKE_UPSERT_LEDGER = """
MERGE INTO landing_ledger t USING (
    SELECT source_key, split_folder, fingerprint, outcome, processed_at FROM batch_ledger) s
ON t.source_key = s.source_key
WHEN MATCHED THEN UPDATE SET fingerprint = s.fingerprint, outcome = s.outcome,
    processed_at = s.processed_at
WHEN NOT MATCHED THEN INSERT BY NAME
"""


def record_lake_ingest(conn, accepted: pd.DataFrame, ledger: pd.DataFrame) -> None:
    """catalog.record_ingest's accepted and ledger upserts, as MERGE INTO."""
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.register("batch_accepted", accepted)
        conn.register("batch_ledger", ledger)
        conn.execute(LAKE_UPSERT_IMAGES)
        conn.execute(LAKE_UPSERT_LEDGER)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        conn.unregister("batch_accepted")
        conn.unregister("batch_ledger")


@contextlib.contextmanager
def lake_connection(spec: dict, locked: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    """DuckLake: the catalogue in PostgreSQL, data files in moto's S3; extensions from the
    duckdb-ext-* packages, loaded offline. ``locked``: under the same advisory lock as postgres."""
    location = parse_catalog("postgres:" + spec["dsn"])
    lock = (
        warehouse.writer_lock(location, Path(spec["scratch"]) / "unused")
        if locked
        else contextlib.nullcontext()
    )
    with lock:
        conn = duckdb.connect(config=warehouse.duckdb_config(location))
        try:
            for extension in ("ducklake", "postgres_scanner", "httpfs", "parquet"):
                conn.execute(f"LOAD {extension}")
            host = spec["s3"].removeprefix("http://")
            conn.execute(
                "CREATE SECRET lake_s3 (TYPE s3, KEY_ID 'testing', SECRET 'testing', "
                f"REGION 'us-east-1', ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)"
            )
            conn.execute(
                f"ATTACH 'ducklake:postgres:{spec['dsn']}' AS lake "
                f"(DATA_PATH 's3://{BUCKET}/data/', METADATA_SCHEMA 'lake')"
            )
            conn.execute("USE lake")
            yield conn
        finally:
            conn.close()


@contextlib.contextmanager
def open_backend(spec: dict, locked: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to one backend, with the project's one-writer lock unless ``locked`` is
    False (the concurrency probe)."""
    if spec["name"] == "ducklake":
        with lake_connection(spec, locked) as conn:
            yield conn
        return
    location = (
        CatalogLocation() if spec["name"] == "duckdb file" else parse_catalog(spec["catalog"])
    )
    path = Path(spec["scratch"]) / "mri.duckdb"
    if locked:
        with warehouse.connect(location, path) as conn:
            yield conn
        return
    conn = duckdb.connect(
        warehouse.duckdb_database(location, path), config=warehouse.duckdb_config(location)
    )
    try:
        warehouse.attach(conn, location)
        yield conn
    finally:
        conn.close()


def prepare(conn, spec: dict) -> None:
    if spec["name"] == "ducklake":
        conn.execute(ducklake_schema())
    else:
        catalog.ensure_schema(conn)


def record(conn, spec: dict, accepted: pd.DataFrame, ledger: pd.DataFrame) -> None:
    if spec["name"] == "ducklake":
        record_lake_ingest(conn, accepted, ledger)
    else:
        catalog.record_ingest(conn, accepted, accepted.iloc[0:0], ledger)


# ---------------------------------------------------------------- data


def batch(prefix: str, count: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(accepted, ledger) frames for ``count`` synthetic images, as ingest builds them; one
    image in ten is a copy of another's content, so ``images`` has duplicates to resolve."""
    now = pd.Timestamp.now(tz=None)
    keys = [f"{prefix}/{i:06d}.png" for i in range(count)]
    content = [f"{prefix}-{i // 10 * 10 if i % 10 == 9 else i}" for i in range(count)]
    accepted = pd.DataFrame(
        {
            "source_key": keys,
            "split_folder": ["test" if i % 4 == 0 else "train" for i in range(count)],
            "sha256": [f"sha-{c}" for c in content],
            "label": ["glioma" if i % 2 else "meningioma" for i in range(count)],
            "width": 256,
            "height": 256,
            "source_mode": "L",
            "source_format": "PNG",
            "size_bytes": 40_000,
            "processed_at": now,
            "pixel_sha256": [f"px-{c}" for c in content],
            "perceptual_hash": "0" * 64,
            "modality": None,
            "series_description": None,
            "pixel_spacing_mm": None,
            "series_uid_sha256": None,
        }
    )
    for column in ("modality", "series_description", "pixel_spacing_mm", "series_uid_sha256"):
        accepted[column] = accepted[column].astype("object")
    ledger = pd.DataFrame(
        {
            "source_key": keys,
            "split_folder": accepted["split_folder"],
            "fingerprint": [f"fp-{k}" for k in keys],
            "outcome": "accepted",
            "processed_at": now,
        }
    )
    return accepted, ledger


# ---------------------------------------------------------------- measurements


def clear(spec: dict) -> None:
    with open_backend(spec) as conn:
        for table in ("landed_images", "landing_ledger", "images"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def opened_and_closed(spec: dict) -> None:
    with open_backend(spec):
        pass


EXTENSIONS = {
    "duckdb file": (),
    "postgres extension": ("postgres_scanner",),
    "ducklake": ("ducklake", "postgres_scanner", "httpfs", "parquet"),
}


def extensions_loaded(spec: dict) -> None:
    """Only LOAD, in a fresh in-memory DuckDB: the part of opening that is not the server's."""
    location = parse_catalog("postgres:" + spec["dsn"])
    with duckdb.connect(config=warehouse.duckdb_config(location)) as conn:
        for extension in EXTENSIONS[spec["name"]]:
            conn.execute(f"LOAD {extension}")


def one_round(spec: dict, rows: int, round_: int) -> dict[str, float]:
    clear(spec)
    accepted, ledger = batch(f"r{round_}", rows)
    small_accepted, small_ledger = batch(f"inc{round_}", INCREMENT)
    figures = {}
    figures["open + close (lock, LOAD, ATTACH)"] = seconds(lambda: opened_and_closed(spec))
    figures["LOAD of the extensions alone (a fresh DuckDB)"] = seconds(
        lambda: extensions_loaded(spec)
    )
    with open_backend(spec) as conn:
        prepare(conn, spec)
        figures[f"ingest {rows:,} rows"] = seconds(lambda: record(conn, spec, accepted, ledger))
        figures[f"increment of {INCREMENT}"] = seconds(
            lambda: record(conn, spec, small_accepted, small_ledger)
        )
        figures["images query (rebuild)"] = seconds(lambda: catalog.rebuild_images(conn))
        figures["read landed_images whole"] = seconds(
            lambda: conn.execute("SELECT * FROM landed_images").df()
        )
        count = conn.execute("SELECT count(*) FROM images").fetchall()[0][0]
    assert count == rows + INCREMENT, (spec["name"], count)
    return figures


WRITER_CHILD = """
import json, sys, time
from mri_assets.core import catalog
from benchmarks.catalogue import batch, open_backend, prepare, record
spec, prefix, locked = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
done, errors, start = [], [], time.perf_counter()
for i in range({batches}):
    accepted, ledger = batch(f"{{prefix}}-{{i}}", {size})
    step = "open"
    try:
        with open_backend(spec, locked) as conn:
            prepare(conn, spec)
            step = "record"
            record(conn, spec, accepted, ledger)
            step = "images"
            catalog.rebuild_images(conn)
        done.append(i)
    except Exception as error:
        errors.append(f"{{step}}: {{type(error).__name__}}: {{str(error).splitlines()[0][:140]}}")
print(json.dumps({{"done": done, "errors": errors, "seconds": time.perf_counter() - start}}))
"""


FAILING_STEPS = ("open", "record", "images")


def concurrent_writers(spec: dict, locked: bool, same_images: bool) -> dict:
    """Two processes, each recording WRITER_BATCHES batches and rebuilding ``images`` after
    each (what an ingest run and the images asset do), one connection per batch as each asset
    run opens its own. ``same_images``: both record the same keys (two runs of one split)."""
    clear(spec)
    with open_backend(spec) as conn:
        prepare(conn, spec)
    code = WRITER_CHILD.format(batches=WRITER_BATCHES, size=WRITER_BATCH)
    prefixes = ["both", "both"] if same_images else ["w1", "w2"]
    start = time.perf_counter()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(spec), prefix, "1" if locked else "0"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for prefix in prefixes
    ]
    # The last line is the child's report (anything before it is DuckDB's own output).
    outputs = [
        json.loads(child.communicate(timeout=600)[0].strip().splitlines()[-1]) for child in children
    ]
    wall = time.perf_counter() - start
    with open_backend(spec) as conn:
        rows, keys = conn.execute(
            "SELECT count(*), count(DISTINCT source_key) FROM landed_images"
        ).fetchall()[0]
    errors = [e for output in outputs for e in output["errors"]]
    failed = {step: sum(e.startswith(step + ":") for e in errors) for step in FAILING_STEPS}
    return {
        "wall": wall,
        "failed": " / ".join(str(failed[step]) for step in FAILING_STEPS),
        "rows": rows,
        "duplicated": rows - keys,
        "first_error": errors[0] if errors else "",
    }


# ---------------------------------------------------------------- report


def backends(scratch: Path, dsn: str, s3: str) -> list[dict]:
    base = {"scratch": str(scratch), "dsn": dsn, "s3": s3}
    return [
        {**base, "name": "duckdb file"},
        {**base, "name": "postgres extension", "catalog": "postgres:" + dsn},
        {**base, "name": "ducklake"},
    ]


def fmt(value: float) -> str:
    return f"{value * 1000:,.0f} ms" if value < 10 else f"{value:,.1f} s"


def report(rows: int, figures: dict, concurrency: dict, took: float) -> str:
    names = list(figures)
    measures = list(next(iter(figures.values())))
    lines = [
        "# Catalogue backends",
        "",
        f"`python -m benchmarks.catalogue --rows {rows}`, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {took / 60:.1f} min, "
        f"DuckDB {duckdb.__version__}, {os.cpu_count()} CPUs shared with other work (load average "
        f"{os.getloadavg()[1]:.1f} over the last 5 minutes at the end). PostgreSQL "
        "and moto's S3 server run on the same machine (loopback), so network latency to a real "
        f"remote server is not in these figures. Median of {ROUNDS} rounds.",
        "",
        "| operation | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for measure in measures:
        cells = [fmt(statistics.median(figures[n][measure])) for n in names]
        lines.append(f"| {measure} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Two processes writing at once ({WRITER_BATCHES} batches of {WRITER_BATCH} "
        "images each, `images` rebuilt after each, one connection per batch)",
        "",
        "`failed open / record / images`: batches that failed opening the catalogue, recording "
        "the batch, or rebuilding `images`. `duplicated rows`: rows of `landed_images` beyond "
        "one per source_key (each key must appear once).",
        "",
        "| backend | one-writer lock | images | wall | failed open / record / images | rows "
        "| duplicated rows | first error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, locked, same), c in concurrency.items():
        lines.append(
            f"| {name} | {'held' if locked else 'none'} | "
            f"{'the same' if same else 'different'} | {fmt(c['wall'])} | "
            f"{c['failed']} | {c['rows']:,} | {c['duplicated']:,} | "
            f"{c['first_error'].replace('|', '/') or '-'} |"
        )
    return "\n".join(lines) + "\n"


def run(rows: int) -> str:
    from mri_assets_tests.conftest import start_moto_server
    from mri_assets_tests.postgres import DATABASE, USERNAME, running_postgres

    started = time.perf_counter()
    moto, s3 = start_moto_server()
    try:
        boto3.client(
            "s3",
            endpoint_url=s3,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=BUCKET)
        with running_postgres() as server, tempfile.TemporaryDirectory() as scratch:
            os.environ["PGPASSWORD"] = server.password
            dsn = f"host=127.0.0.1 port={server.port} user={USERNAME} dbname={DATABASE}"
            specs = backends(Path(scratch), dsn, s3)
            figures: dict[str, dict[str, list[float]]] = {s["name"]: {} for s in specs}
            for round_ in range(ROUNDS):
                for spec in specs:  # interleaved, so a busy moment hits every backend
                    print(f"round {round_ + 1}: {spec['name']}", file=sys.stderr)
                    for measure, value in one_round(spec, rows, round_).items():
                        figures[spec["name"]].setdefault(measure, []).append(value)
            concurrency = {}
            for spec in specs:
                for locked, same in ((True, True), (False, False), (False, True)):
                    print(f"writers: {spec['name']} locked={locked} same={same}", file=sys.stderr)
                    concurrency[spec["name"], locked, same] = concurrent_writers(spec, locked, same)
    finally:
        moto.kill()
    return report(rows, figures, concurrency, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000, help="images in the ingest batch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = run(args.rows)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
