"""Shared helpers: timers, peak-RSS sampling, cached data sets, ingest, and the result records."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def log(message: str) -> None:
    """Progress on stderr, so a long run shows where it is."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- records


@dataclass
class Figure:
    """One reported number: ours, the reference, their ratio and the target it is held to."""

    name: str
    label: str
    ours: float
    reference: float | None
    unit: str
    ratio: float | None
    ratio_meaning: str
    target: str = ""
    met: bool | None = None
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    note: str = ""
    reason: str = ""  # why a target is not met, when it is not


@dataclass
class Result:
    """What one benchmark module reports; ``run.py`` adds nothing but machine context."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _rounded(asdict(self))


def _rounded(value: Any) -> Any:
    """Four significant digits everywhere: the JSON is committed, so keep it small and stable."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


# --------------------------------------------------------------------------- timing and stats


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def rotated(
    rounds: int,
    sides: dict[str, Callable[[], float]],
    budget: float = float("inf"),
    min_rounds: int = 3,
) -> dict[str, list[float]]:
    """Run every side ``rounds`` times, rotating which goes first, so a change in the machine's
    load during the run hits all sides alike. Each callable returns the seconds it measured.

    Stops after ``min_rounds`` once ``budget`` seconds have passed: on a machine slowed down by
    other work, fewer rounds keep the whole report within its time limit.
    """
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for index in range(rounds):
        if index >= min_rounds and time.perf_counter() - started > budget:
            log(f"time budget spent: {index} rounds instead of {rounds}")
            break
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(sides[name]())
    return times


def paired_ratio(ours: list[float], reference: list[float]) -> float:
    """Median over rounds of ours / reference measured in the same round, i.e. seconds apart:
    on a machine whose speed drifts, adjacent runs are the fairest comparison."""
    return median([o / r for o, r in zip(ours, reference, strict=True)])


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> float:
    """(max - min) / median: how much repeats of one measurement disagree."""
    middle = median(values)
    return (max(values) - min(values)) / middle if middle else 0.0


# --------------------------------------------------------------------------- memory


def rss_mb(pid: str | int = "self") -> float:
    """Resident set size of one process in MiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE_MB
    except (OSError, ValueError, IndexError):
        return 0.0


def session_rss_mb(session: int) -> tuple[float, float]:
    """(sum, largest) RSS in MiB over every process of one session (e.g. a ``setsid`` server)."""
    sizes = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # state ppid pgrp session ...
            sizes.append(rss_mb(name))
    return sum(sizes), max(sizes, default=0.0)


@dataclass
class Peak:
    """Peak RSS seen while a window was open."""

    mb: float = 0.0


class RssSampler:
    """Samples RSS in a daemon thread: of this process, or (``session``) the sum over a session.

    ``ru_maxrss`` only ever grows, so per-phase peaks inside one process come from ``window()``.
    Sampling misses spikes shorter than ``interval``; the process-wide ru_maxrss is exact.
    """

    def __init__(self, interval: float = 0.05, session: int | None = None) -> None:
        self.interval, self.session = interval, session
        self.peak = Peak()
        self.largest_process_mb = 0.0
        self._windows: list[Peak] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        if self.session is None:
            total = rss_mb()
            self.largest_process_mb = max(self.largest_process_mb, total)
        else:
            total, largest = session_rss_mb(self.session)
            self.largest_process_mb = max(self.largest_process_mb, largest)
        for peak in [self.peak, *self._windows]:
            peak.mb = max(peak.mb, total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    @contextmanager
    def window(self) -> Iterator[Peak]:
        """The peak RSS while the block runs (sampled, plus once at either end)."""
        peak = Peak()
        self._windows.append(peak)
        self.sample()
        try:
            yield peak
        finally:
            self.sample()
            self._windows.remove(peak)


def max_rss_mb() -> float:
    """Exact peak RSS of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- data sets


def _cached(root: Path, build: Callable[[Path], Any]) -> Path:
    """Build ``root`` once (in a staging folder, then renamed); later runs reuse it."""
    marker = root.with_name(root.name + ".complete")
    if marker.exists() and root.is_dir():
        return root
    staging = root.with_name(root.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    staging.mkdir(parents=True)
    build(staging)
    staging.rename(root)
    marker.touch()
    return root


def default_dataset(scratch: Path) -> Path:
    """The default generated data set (``write_dataset`` seed 0: 675 slices at 256 px)."""
    from mri_assets.core.phantoms import write_dataset

    def build(folder: Path) -> None:
        log("generating the default data set (675 slices, once; not timed)")
        write_dataset(folder, seed=0, progress=False)

    return _cached(scratch / "datasets" / "default-seed0", build)


def small_dataset(scratch: Path, count: int, size: int = 128) -> Path:
    """``count`` distinct phantom PNGs of ``size`` px under ``train/`` (half per class)."""

    def build(folder: Path) -> None:
        log(f"generating {count} phantoms at {size} px (once; not timed)")
        chunks = [(folder, start, min(start + 500, count), size) for start in range(0, count, 500)]
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(_write_small_chunk, chunks))

    return _cached(scratch / "datasets" / f"small-{count}-{size}px", build)


def small_key(index: int) -> str:
    """Landing key of small-set image ``index``: class folders, 500 files per sub-folder."""
    label = "Glioma T2" if index % 2 == 0 else "Meningioma T2"
    return f"train/{label}/part-{index // 1000:03d}/{index:06d}.png"


def _write_small_chunk(job: tuple[Path, int, int, int]) -> None:
    import numpy as np

    from mri_assets.core.phantoms import encode_image, generate_slice

    folder, start, stop, size = job
    for index in range(start, stop):
        rng = np.random.default_rng([7, index])
        pixels = generate_slice(rng, "glioma" if index % 2 == 0 else "meningioma", size)
        target = folder / small_key(index)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_image(pixels, jpeg=False))


def dataset_files(root: Path, split: str) -> list[Path]:
    """Every file under ``root/split``, sorted."""
    return sorted(p for p in (root / split).rglob("*") if p.is_file())


def warm_page_cache(files: list[Path]) -> None:
    """Read every file once so neither side of a comparison pays for the first disk read."""
    for path in files:
        path.read_bytes()


# --------------------------------------------------------------------------- the pipeline's ingest


def ingest_split(landing_root: Path, home: Path, split: str, workers: int | None = None):
    """Ingest one split into ``home`` (pixel cache + DuckDB file), as the pipeline does: read
    the ledger and known content, ``ingest_new_objects``, ``IngestBatch.record`` in one transaction.

    One connection (and lock) for the whole split; the ``raw_<split>_images`` asset opens a
    second one to record and also reads the landing totals for its data version.
    """
    import duckdb

    from mri_assets.core import catalog
    from mri_assets.core.ingest import ingest_new_objects
    from mri_assets.core.labels import ClassSpec
    from mri_assets.core.landing import LocalLanding
    from mri_assets.core.pixel_cache import PixelCache

    database = home / "mri.duckdb"
    with catalog.exclusive_lock(database), duckdb.connect(str(database)) as conn:
        batch = ingest_new_objects(
            LocalLanding(landing_root),
            split,
            catalog.ledger_fingerprints(conn, split),
            catalog.known_images(conn),
            ClassSpec(),
            PixelCache(home / "pixels"),
            workers=workers,
        )
        batch.record(conn)
    return batch


def accepted_images(batch) -> tuple[list[str], list[int]]:
    """(sha256s, class indices) of a batch's accepted images, in landing-key order."""
    from mri_assets.core.labels import ClassSpec

    classes = ClassSpec()
    rows = sorted((e.obj.key, e.sha256, classes.index(e.label)) for e in batch.accepted)
    return [r[1] for r in rows], [r[2] for r in rows]


def balanced(sha256s: list[str], labels: list[int], count: int) -> tuple[list[str], list[int]]:
    """The first ``count / 2`` images of each class, classes alternating (any prefix of the
    result holds both classes)."""
    by_class = [[s for s, lab in zip(sha256s, labels, strict=True) if lab == c] for c in (0, 1)]
    half = count // 2
    pairs = [
        (s, c)
        for group in zip(by_class[0][:half], by_class[1][:half], strict=False)
        for c, s in enumerate(group)
    ]
    return [s for s, _ in pairs], [c for _, c in pairs]


# --------------------------------------------------------------------------- misc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def quiet(_: str) -> None:
    """A ``log`` callback that drops training chatter."""


# One torch thread for both sides of every comparison: on this shared 2-core machine, two
# OpenMP threads wait on each other whenever another process takes a core (measured at load 6:
# a forward pass 2.5x slower and twice as variable as with one thread).
DEFAULT_THREADS = 1


def set_torch_threads(count: int) -> None:
    """Set before torch is imported (OMP_NUM_THREADS), so every torch op in this process obeys."""
    if count > 0:
        os.environ["OMP_NUM_THREADS"] = str(count)
        os.environ["MKL_NUM_THREADS"] = str(count)


def main(run: Callable[[bool, Path], Result], argv: list[str] | None = None) -> int:
    """Command line of one benchmark module: ``python -m benchmarks.X [--quick] [--json F]``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--scratch", type=Path, default=RESULTS / "tmp", help="work folder")
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"torch threads for both sides of every comparison "
        f"(default {DEFAULT_THREADS}; 0: torch's default, one per core)",
    )
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    args.scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = run(args.quick, args.scratch.resolve())
    result.seconds = time.perf_counter() - started
    result.peak_rss_mb = max_rss_mb()
    payload = result.to_dict()
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1))
    else:
        print(json.dumps(payload, indent=1))
    return 0
