"""Benchmark 3: ingest throughput against bare PIL decoding, the cost of a small increment, and
the peak memory of decoding one very large 16-bit scan.

Ours is what a ``raw_<split>_images`` run does without Dagster: read the ledger and known content
from DuckDB, list, validate, sha256, decode, cache the pixels, record the batch in DuckDB. The
reference only decodes and resizes the same files with PIL. Both use a pool of one thread per
core (PIL releases the GIL while decoding), and both read from a warm page cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import (
    REPO,
    Figure,
    Result,
    RssSampler,
    dataset_files,
    default_dataset,
    fresh_dir,
    ingest_split,
    log,
    main,
    median,
    paired_ratio,
    rotated,
    small_dataset,
    small_key,
    spread,
    timed,
    warm_page_cache,
)

# (throughput rounds, increments); the incremental store always holds 5,000 images.
SIZES = {"quick": (4, 3), "full": (7, 5)}
STORE_SIZE = 5000
INCREMENT = 10
TARGET_THROUGHPUT = 0.80
TARGET_INCREMENT = 0.02
# A 16-bit grayscale PNG just under the 50 MP pixel guard; its peak RSS in decode_image, above
# the process's RSS just before, against the decoded 8-bit output (issue 8: at most 4x).
BIG_SIDE = 7000
TARGET_DECODE_MEMORY = 4.0
# Measured in a fresh child, so nothing this process allocated earlier hides the peak. The peak
# (VmHWM) is reset just before the decode where the kernel allows it (clear_refs "5"); where it
# does not, the high-water mark of the imports is reported with it, to show it stayed below.
DECODE_PEAK_CHILD = """
import json, sys
from pathlib import Path
from mri_assets.core.images import decode_image

def status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

data = Path(sys.argv[1]).read_bytes()
try:
    Path("/proc/self/clear_refs").write_text("5")
    reset = True
except OSError:
    reset = False
before_kb, hwm_before_kb = status_kb("VmRSS"), status_kb("VmHWM")
decoded = decode_image(data)
print(json.dumps({
    "before_kb": before_kb, "hwm_before_kb": hwm_before_kb, "peak_kb": status_kb("VmHWM"),
    "hwm_reset": reset, "output_bytes": int(decoded.pixels.nbytes),
    "shape": list(decoded.pixels.shape), "source_mode": decoded.source_mode,
}))
"""


def pil_decode_resize(path: Path):
    """The reference's work per file: decode with PIL, convert to RGB, resize to 224."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((224, 224), Image.BILINEAR))


def reference_decode(files: list[Path]) -> float:
    """Seconds for a pool of one thread per core to decode and resize every file."""
    seconds, _ = timed(lambda: _pool_map(pil_decode_resize, files))
    return seconds


def _pool_map(fn, items) -> list:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(fn, items))


def throughput(quick: bool, scratch: Path, sampler: RssSampler) -> Figure:
    """Images per second of our ingest vs bare decode+resize, on the default data set."""
    rounds = SIZES["quick" if quick else "full"][0]
    root = default_dataset(scratch)
    files = dataset_files(root, "train") + dataset_files(root, "test")
    warm_page_cache(files)
    peaks = {"ours": 0.0, "reference": 0.0}

    def ours() -> float:
        home = fresh_dir(scratch / "work-ingest" / "home")
        os.sync()  # the previous round's dirty pages must not be flushed on this one's clock
        with sampler.window() as peak:
            seconds, _ = timed(lambda: [ingest_split(root, home, s) for s in ("train", "test")])
        peaks["ours"] = max(peaks["ours"], peak.mb)
        shutil.rmtree(home)
        log(f"ingest: {seconds:.2f}s")
        return seconds

    def reference() -> float:
        os.sync()
        with sampler.window() as peak:
            seconds = reference_decode(files)
        peaks["reference"] = max(peaks["reference"], peak.mb)
        log(f"PIL decode+resize: {seconds:.2f}s")
        return seconds

    warm_up(files[:8], scratch / "work-ingest")
    times = rotated(rounds, {"ours": ours, "reference": reference}, budget=30.0)
    mine, theirs = times["ours"], times["reference"]
    ours_rate, ref_rate = len(files) / median(mine), len(files) / median(theirs)
    ratio = paired_ratio(theirs, mine)  # a rate ratio: reference time / our time
    without_cache = _without_cache_writes(root, scratch / "work-ingest")
    return Figure(
        "ingest_throughput",
        f"ingest throughput, {len(files)} files of the default data set (256 px PNG/JPEG)",
        ours_rate,
        ref_rate,
        "img/s",
        ratio,
        "our img/s / PIL decode+resize img/s",
        target=f">= {TARGET_THROUGHPUT:.0%}",
        met=ratio >= TARGET_THROUGHPUT,
        peak_rss_mb=peaks,
        note=f"median of {len(mine)} interleaved rounds' ratios; spread ours {spread(mine):.0%}, "
        f"reference {spread(theirs):.0%}",
        reason=f"Writing the decoded pixels to the pixel cache (packs of up to 256 images, "
        f"256x256x3 bytes each) is {1 - without_cache / median(mine):.0%} of our time (one "
        "diagnostic run with the write skipped). Besides the decode both sides do, ours also "
        "hashes each file twice (once to skip known content, once in decode_image) and opens, "
        "writes and closes DuckDB once per split; the reference keeps nothing but resizes. The "
        "ratio swings with other load on this shared 2-core machine (see the spread).",
    )


def _without_cache_writes(root: Path, work: Path) -> float:
    """Diagnosis only: seconds of the same ingest with the pixel-cache write skipped."""
    from unittest import mock

    from mri_assets.core.pixel_cache import PackWriter

    home = fresh_dir(work / "home")
    os.sync()
    with mock.patch.object(PackWriter, "put", lambda self, sha, pixels: None):
        seconds, _ = timed(lambda: [ingest_split(root, home, s) for s in ("train", "test")])
    shutil.rmtree(home)
    return seconds


def warm_up(files: list[Path], work: Path) -> None:
    """Run both sides once on a few files, untimed: imports and DuckDB's first open."""
    reference_decode(files)
    landing = fresh_dir(work / "warm-up")
    for path in files:
        target = landing / "train" / "glioma" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    ingest_split(landing, work / "warm-up-home", "train")
    shutil.rmtree(work, ignore_errors=True)


def new_files(count: int, seed: int) -> dict[str, bytes]:
    """``count`` never-seen phantom PNGs (keys outside the 5,000-image store's range)."""
    import numpy as np

    from mri_assets.core.phantoms import encode_image, generate_slice

    files = {}
    for offset in range(count):
        index = 10**6 + seed * count + offset
        pixels = generate_slice(np.random.default_rng([seed, index]), "glioma", 128)
        files[small_key(index)] = encode_image(pixels, jpeg=False)
    return files


def increment(quick: bool, scratch: Path, sampler: RssSampler) -> Figure:
    """Seconds to ingest 10 new files into a store of 5,000, against ingesting all 5,000."""
    repeats = SIZES["quick" if quick else "full"][1]
    source = small_dataset(scratch, STORE_SIZE)
    work = fresh_dir(scratch / "work-ingest")
    landing, home = work / "landing", work / "home"
    shutil.copytree(source, landing, copy_function=os.link)  # hard links: instant, same bytes
    warm_page_cache(dataset_files(landing, "train"))
    batches = [new_files(INCREMENT, seed) for seed in range(repeats)]  # rendered untimed
    with sampler.window() as full_peak:
        full_seconds, batch = timed(lambda: ingest_split(landing, home, "train"))
    log(f"ingest of {len(batch.accepted)} files: {full_seconds:.2f}s")
    increments = []
    with sampler.window() as inc_peak:
        for files in batches:
            for key, data in files.items():
                (landing / key).parent.mkdir(parents=True, exist_ok=True)
                (landing / key).write_bytes(data)
            seconds, batch = timed(lambda: ingest_split(landing, home, "train"))
            assert len(batch.accepted) == INCREMENT, batch.rejection_reasons()
            increments.append(seconds)
            log(f"increment of {INCREMENT}: {seconds * 1000:.0f}ms")
    parts = _increment_parts(landing, home, batch)
    shutil.rmtree(work, ignore_errors=True)
    share = median(increments) / full_seconds
    return Figure(
        "ingest_increment",
        f"{INCREMENT} new files into a store of {STORE_SIZE:,} (128 px PNG)",
        median(increments),
        full_seconds,
        "s",
        share,
        f"increment time / time to ingest all {STORE_SIZE:,}",
        target=f"<= {TARGET_INCREMENT:.0%}",
        met=share <= TARGET_INCREMENT,
        peak_rss_mb={"ours": inc_peak.mb, "reference": full_peak.mb},
        note=f"median of {len(increments)} increments (each a full run: DuckDB ledger read, "
        f"listing of {STORE_SIZE:,}+ files, examine the new ones, record)",
        reason=f"Fixed costs that do not shrink with the increment, against a budget of "
        f"{TARGET_INCREMENT * full_seconds * 1000:.0f} ms: opening and closing DuckDB took "
        f"{parts['duckdb_open_close'] * 1000:.0f} ms with nothing read or written (its "
        f"start-up, the same for an empty database), recording the 10 rows and the checkpoint "
        f"on close {parts['record_and_close'] * 1000:.0f} ms more, reading the ledger and known "
        f"content {parts['duckdb_read'] * 1000:.0f} ms, listing and stat-ing {STORE_SIZE:,} "
        f"files {parts['listing'] * 1000:.0f} ms (one stat per file: a rewrite in place shows "
        f"only there); examining the {INCREMENT} files themselves (read, hash, decode, one pack) "
        f"took {parts['examine'] * 1000:.0f} ms.",
    )


NOTIFIED_BUCKET = "bench-ingest"


def increment_notified(quick: bool, scratch: Path, sampler: RssSampler) -> Figure:
    """The same increment on an S3 landing zone driven by change notifications (S3 events into
    SQS, moto's server): read the messages, look up only the notified keys, examine them,
    record, delete the messages; against ingesting all 5,000 from the same zone."""
    from benchmarks.sensor import moto_server, notifications, s3_client

    repeats = SIZES["quick" if quick else "full"][1]
    source = small_dataset(scratch, STORE_SIZE)
    work = fresh_dir(scratch / "work-ingest-notified")
    home = work / "home"
    batches = [new_files(INCREMENT, 100 + seed) for seed in range(repeats)]
    with moto_server() as endpoint:
        client = s3_client(endpoint)
        client.create_bucket(Bucket=NOTIFIED_BUCKET)
        files = dataset_files(source, "train")
        _upload(client, {f.relative_to(source).as_posix(): f.read_bytes() for f in files})
        landing = _s3_landing(client)
        with sampler.window() as full_peak:
            full_seconds, batch = timed(lambda: ingest_landing(landing, home, "train"))
        assert len(batch.accepted) == STORE_SIZE, batch.rejection_reasons()
        log(f"ingest of {STORE_SIZE} files from S3: {full_seconds:.2f}s")
        increments = []
        with notifications(endpoint, client, NOTIFIED_BUCKET) as url, sampler.window() as peak:
            queue = _landing_queue(endpoint, url)
            for files_ in batches:
                _upload(client, files_)  # one notification each, sent by the server at once
                seconds, batch = timed(lambda: notified_increment(landing, queue, home))
                assert len(batch.accepted) == INCREMENT, batch.rejection_reasons()
                increments.append(seconds)
                log(f"notified increment of {INCREMENT}: {seconds * 1000:.0f}ms")
        # For comparison, the same increment found by listing the zone (no notifications).
        _upload(client, new_files(INCREMENT, 999))
        listed_seconds, batch = timed(lambda: ingest_landing(landing, home, "train"))
        assert len(batch.accepted) == INCREMENT, batch.rejection_reasons()
    shutil.rmtree(work, ignore_errors=True)
    share = median(increments) / full_seconds
    return Figure(
        "ingest_increment_notified",
        f"{INCREMENT} new files into a store of {STORE_SIZE:,}, S3 landing zone with "
        "notifications (SQS)",
        median(increments),
        full_seconds,
        "s",
        share,
        f"increment time / time to ingest all {STORE_SIZE:,} from the same S3 zone",
        target=f"<= {TARGET_INCREMENT:.0%}",
        met=share <= TARGET_INCREMENT,
        peak_rss_mb={"ours": peak.mb, "reference": full_peak.mb},
        note=f"median of {len(increments)} increments, each: read the SQS messages, the DuckDB "
        f"ledger, one-key lookups of the {INCREMENT} notified keys (no listing), examine, "
        f"record, delete the messages. Found by listing the zone instead, the same increment "
        f"took {listed_seconds * 1000:.0f} ms ({listed_seconds / full_seconds:.1%})",
    )


def notified_increment(landing, queue, home: Path):
    """What the sensor and the run it asks for do about new notifications, without Dagster."""
    received = queue.receive()
    keys = sorted({c.key for m in received for c in m.changes if c.split == "train"})
    batch = ingest_landing(landing, home, "train", keys=keys)
    queue.delete(m.receipt for m in received)
    return batch


def ingest_landing(landing, home: Path, split: str, keys: list[str] | None = None):
    """``ingest_split`` for any landing zone, optionally only ``keys``."""
    import duckdb

    from mri_assets.core import catalog
    from mri_assets.core.ingest import ingest_new_objects
    from mri_assets.core.labels import ClassSpec
    from mri_assets.core.pixel_cache import PixelCache

    database = home / "mri.duckdb"
    database.parent.mkdir(parents=True, exist_ok=True)
    with catalog.exclusive_lock(database), duckdb.connect(str(database)) as conn:
        catalog.ensure_schema(conn)
        batch = ingest_new_objects(
            landing,
            split,
            catalog.ledger_fingerprints(conn, split),
            catalog.known_images(conn),
            ClassSpec(),
            PixelCache(home / "pixels"),
            keys=keys,
        )
        batch.record(conn)
    return batch


def _s3_landing(client):
    from mri_assets.core.landing import S3Landing

    return S3Landing(client, f"s3://{NOTIFIED_BUCKET}/in")


def _landing_queue(endpoint: str, url: str):
    import boto3

    from mri_assets.core.landing_events import LandingQueue

    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    return LandingQueue(sqs, url, f"s3://{NOTIFIED_BUCKET}/in")


def _upload(client, files: dict[str, bytes]) -> None:
    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=NOTIFIED_BUCKET, Key=f"in/{item[0]}", Body=item[1])

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, files.items()))


def _increment_parts(landing: Path, home: Path, last) -> dict[str, float]:
    """Diagnosis only: the fixed costs inside one increment, timed one by one."""
    import duckdb

    from mri_assets.core import catalog
    from mri_assets.core.landing import LocalLanding

    database = str(home / "mri.duckdb")

    def open_close() -> None:
        duckdb.connect(database).close()

    def record_close() -> None:  # the last increment again: an idempotent upsert of its rows
        with duckdb.connect(database) as conn:
            catalog.record_ingest(
                conn, last.accepted_frame(), last.rejected_frame(), last.ledger_frame()
            )

    with duckdb.connect(database) as conn:
        catalog.ensure_schema(conn)
        read = median(
            [
                timed(
                    lambda: (catalog.ledger_fingerprints(conn, "train"), catalog.known_images(conn))
                )[0]
                for _ in range(3)
            ]
        )
    opened = median([timed(open_close)[0] for _ in range(3)])
    listing = median(
        [timed(lambda: list(LocalLanding(landing).list_objects("train")))[0] for _ in range(3)]
    )
    return {
        "duckdb_open_close": opened,
        "record_and_close": max(0.0, median([timed(record_close)[0] for _ in range(3)]) - opened),
        "duckdb_read": read,
        "listing": listing,
        "examine": max(0.0, last.seconds - listing),  # the run's own clock includes its listing
    }


def big_16bit_png(scratch: Path) -> Path:
    """A BIG_SIDE x BIG_SIDE 16-bit grayscale PNG of smooth ramps (compressible: a few hundred
    KB on disk, 49 MP decoded), written once, in a child so this process never holds it."""
    path = scratch / "datasets" / f"gray16-{BIG_SIDE}px.png"
    if not path.exists():
        log(f"writing a {BIG_SIDE}x{BIG_SIDE} 16-bit PNG (once; not timed)")
        path.parent.mkdir(parents=True, exist_ok=True)
        code = (
            "import sys, numpy as np; from PIL import Image\n"
            f"side = {BIG_SIDE}\n"
            "rows = np.arange(side, dtype=np.uint16)[:, None] * np.uint16(3)\n"
            "cols = np.arange(side, dtype=np.uint16)[None, :] * np.uint16(9)\n"
            "image = Image.fromarray(rows + cols)\n"  # wraps at 65536: a full 16-bit range
            "assert image.mode == 'I;16', image.mode\n"
            "image.save(sys.argv[1] + '.partial', format='PNG')\n"
        )
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=REPO)
        os.replace(f"{path}.partial", path)
    return path


def decode_memory(quick: bool, scratch: Path) -> Figure:
    """Peak RSS of decode_image on a 49 MP 16-bit PNG, as a multiple of the decoded output."""
    path = big_16bit_png(scratch)
    repeats = 1 if quick else 3
    runs = []
    for _ in range(repeats):
        child = subprocess.run(
            [sys.executable, "-c", DECODE_PEAK_CHILD, str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            return _decode_memory_failed(path, child.stderr)
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    worst = max(runs, key=lambda r: r["peak_kb"] - r["before_kb"])
    peak_mb = (worst["peak_kb"] - worst["before_kb"]) / 1024
    output_mb = worst["output_bytes"] / 2**20
    ratio = peak_mb / output_mb
    log(
        f"decode of a {BIG_SIDE}x{BIG_SIDE} 16-bit PNG: peak +{peak_mb:.0f} MiB, output "
        f"{output_mb:.0f} MiB ({ratio:.2f}x)"
    )
    hwm = (
        "peak reset just before the decode"
        if worst["hwm_reset"]
        else f"peak not resettable here; the imports' peak was {worst['hwm_before_kb'] / 1024:.0f}"
        f" MiB against {worst['before_kb'] / 1024:.0f} MiB at the start of the decode"
    )
    return Figure(
        "decode_peak_memory",
        f"decode_image peak memory, {BIG_SIDE}x{BIG_SIDE} 16-bit grayscale PNG "
        f"({BIG_SIDE**2 / 1e6:.0f} MP, {path.stat().st_size / 1024:,.0f} KB file)",
        peak_mb,
        output_mb,
        "MiB",
        ratio,
        "peak RSS above the pre-decode RSS / decoded 8-bit output size",
        target=f"<= {TARGET_DECODE_MEMORY:g}x the output",
        met=ratio <= TARGET_DECODE_MEMORY,
        peak_rss_mb={"decode child": worst["peak_kb"] / 1024},
        note=f"worst of {len(runs)} fresh child process(es) (VmHWM - VmRSS before the decode; "
        f"{hwm}); output {tuple(worst['shape'])} uint8 from mode {worst['source_mode']}",
        reason="The decode holds more than the target allows above the output itself: the "
        "source image in PIL (2 bytes per pixel for 16-bit), any full-size converted copy "
        "(a float64 stretch is 8 bytes per pixel) and the RGB output (3 bytes per pixel).",
    )


def _decode_memory_failed(path: Path, stderr: str) -> Figure:
    tail = " ".join(stderr.strip().splitlines()[-3:])
    return Figure(
        "decode_peak_memory",
        f"decode_image peak memory, {BIG_SIDE}x{BIG_SIDE} 16-bit grayscale PNG",
        float("nan"),
        None,
        "MiB",
        None,
        "peak RSS above the pre-decode RSS / decoded output",
        target=f"<= {TARGET_DECODE_MEMORY:g}x the output",
        met=False,
        reason=f"decode_image failed on {path.name}: {tail}",
    )


def run(quick: bool, scratch: Path) -> Result:
    result = Result("ingest", "Ingest: throughput vs bare PIL, incremental cost, decode memory")
    with RssSampler() as sampler:
        result.figures.append(throughput(quick, scratch, sampler))
        result.figures.append(increment(quick, scratch, sampler))
        result.figures.append(increment_notified(quick, scratch, sampler))
    result.figures.append(decode_memory(quick, scratch))
    result.notes = [
        "Ours includes DuckDB (ledger read, one transaction per split), sha256, full decode and "
        "validation, conversion to RGB and the pixel-cache write (packs, fsynced); it does not resize. "
        "The reference decodes, converts and resizes to 224 px, and keeps nothing.",
        f"Both sides use {os.cpu_count()} threads (one per core).",
    ]
    return result


if __name__ == "__main__":
    raise SystemExit(main(run))
