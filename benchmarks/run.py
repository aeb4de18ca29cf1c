"""Run every benchmark, each in its own process, and write the report.

    python -m benchmarks.run [--quick] [--out DIR] [--only NAME ...]

Writes ``DIR/latest.md`` and ``DIR/latest.json`` (and a copy named after the mode, ``quick.*``
or ``full.*``, so the last run of each mode is kept). DIR defaults to ``benchmarks/results``;
generated data sets and work folders go to ``DIR/tmp`` (git-ignored). A benchmark that fails or
times out is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import DEFAULT_THREADS, REPO, RESULTS, log
from benchmarks.report import markdown

BENCHMARKS = (
    "training",
    "full_finetune",
    "ingest",
    "inference",
    "resnet50",
    "sensor",
    "landing_to_deployed",
    "generalisation",
)
# Per-benchmark limits (seconds): a hung benchmark must not hold up the report.
TIMEOUTS = {"quick": 600, "full": 1500}
# Training on the hard phantoms through dagster dev can take many times longer on a busy machine.
TIMEOUT_OVERRIDES = {"generalisation": 2700}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores, from /proc/stat)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(name: str, quick: bool, scratch: Path, threads: int) -> dict:
    """Run ``benchmarks.<name>`` in a child process; its result plus wall time and the load
    other processes put on the machine meanwhile (in cores: 1.0 = one core fully taken)."""
    out = scratch / f"{name}.json"
    out.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        f"benchmarks.{name}",
        "--json",
        str(out),
        "--scratch",
        str(scratch),
        "--threads",
        str(threads),
    ] + (["--quick"] if quick else [])
    log(f"=== {name}")
    busy, mine, started = busy_cpu_seconds(), children_cpu_seconds(), time.time()
    try:
        code = subprocess.run(
            command,
            cwd=REPO,
            timeout=TIMEOUT_OVERRIDES.get(name, TIMEOUTS["quick" if quick else "full"]),
        ).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    wall = time.time() - started
    others = (busy_cpu_seconds() - busy) - (children_cpu_seconds() - mine)
    if code == 0 and out.exists():
        result = json.loads(out.read_text())
    else:
        result = {
            "name": name,
            "title": name,
            "figures": [],
            "notes": [],
            "error": f"benchmark failed (exit {code}); see the console output",
        }
    result.update(wall_seconds=round(wall, 1), other_load_cores=round(max(others, 0) / wall, 2))
    return result


def machine(threads: int) -> dict:
    from importlib.metadata import version

    with open("/proc/meminfo") as handle:
        mem_kb = int(handle.readline().split()[1])
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "torch": version("torch"),
        "torch_threads": threads or os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes; a few minutes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="report folder")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"torch threads for both sides of each comparison (default "
        f"{DEFAULT_THREADS}, see benchmarks/common.py; 0: one per core)",
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = args.out.resolve()
    scratch = out / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    report = {
        "mode": mode,
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.run" + (" --quick" if args.quick else ""),
        "machine": machine(args.threads),
        "benchmarks": [],
    }
    started = time.time()
    for name in args.only or BENCHMARKS:
        report["benchmarks"].append(run_one(name, args.quick, scratch, args.threads))
    report["total_seconds"] = round(time.time() - started, 1)
    report["gpu_check"] = gpu_check(out)
    write(report, out, mode)
    return 0 if all("error" not in b for b in report["benchmarks"]) else 1


def gpu_check(out: Path) -> dict | None:
    """The last GPU check's report (`make gpu-check` on a GPU machine, copied to
    ``out/gpu_check.json``), or None where there is none: this machine has no GPU."""
    path = out / "gpu_check.json"
    return json.loads(path.read_text()) if path.exists() else None


def write(report: dict, out: Path, mode: str) -> None:
    """latest.{json,md}, and the same under the mode's name."""
    (out / "latest.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "latest.md").write_text(markdown(report))
    for suffix in ("json", "md"):
        shutil.copy(out / f"latest.{suffix}", out / f"{mode}.{suffix}")
    log(f"report written to {out / 'latest.md'} ({report['total_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    raise SystemExit(main())
