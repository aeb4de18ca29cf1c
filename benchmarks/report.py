"""The markdown report: targets first, then every figure, then what each benchmark measured."""

from __future__ import annotations

import math
from typing import Any


def value(number: float | None, unit: str) -> str:
    """A figure with its unit, to three significant digits."""
    if number is None or (isinstance(number, float) and math.isnan(number)):
        return "-"
    if unit == "img/s":
        return f"{number:,.0f} img/s"
    if unit == "s" and number < 1:
        return f"{number * 1000:.0f} ms"
    return f"{number:.3g} {unit}"


def ratio(figure: dict[str, Any]) -> str:
    number = figure.get("ratio")
    if number is None:
        return "-"
    meaning = figure["ratio_meaning"]
    text = f"{number:.1%}" if number < 0.2 else f"{number:.3g}"
    return f"**{text}** ({meaning})"


BUSY_CORES = 0.5  # other processes' load above which a benchmark's figures are flagged


def verdict(figure: dict[str, Any], bench: dict[str, Any]) -> str:
    text = {True: "met", False: "**not met**"}.get(figure.get("met"), "-")
    if figure.get("unit") == "MiB":
        return text  # a memory figure: other processes' load does not change it
    load = bench.get("other_load_cores", 0.0)
    return text + (f" (busy machine: other load {load:.1f} cores)" if load > BUSY_CORES else "")


def peaks(figure: dict[str, Any]) -> str:
    rss = figure.get("peak_rss_mb") or {}
    return " / ".join(f"{k} {v:,.0f}" for k, v in rss.items()) or "-"


def markdown(report: dict[str, Any]) -> str:
    """Render the whole report."""
    lines = _header(report)
    lines += [
        "## Targets",
        "",
        "| target | figure | ours | reference | ratio | met |",
        "|---|---|---|---|---|---|",
    ]
    for bench, figure in _figures(report):
        if figure.get("target"):
            lines.append(
                f"| {figure['target']} | {figure['label']} | {value(figure['ours'], figure['unit'])} "
                f"| {value(figure['reference'], figure['unit'])} | {ratio(figure)} "
                f"| {verdict(figure, bench)} |"
            )
    for bench in report["benchmarks"]:
        if bench.get("error") or bench.get("skipped"):
            lines.append(
                f"| - | {bench['title']} | {bench.get('error') or bench['skipped']} | | | |"
            )
    lines += [
        "",
        "## All figures",
        "",
        "| figure | ours | reference | ratio | peak RSS (MiB) | note |",
        "|---|---|---|---|---|---|",
    ]
    for _, figure in _figures(report):
        lines.append(
            f"| {figure['label']} | {value(figure['ours'], figure['unit'])} | "
            f"{value(figure['reference'], figure['unit'])} | {ratio(figure)} | {peaks(figure)} | "
            f"{figure.get('note', '')} |"
        )
    lines += ["", "## What was measured", ""]
    for bench in report["benchmarks"]:
        lines += _section(bench)
    if report.get("gpu_check"):
        lines += gpu_check_section(report["gpu_check"])
    return "\n".join(lines) + "\n"


def gpu_check_section(check: dict[str, Any]) -> list[str]:
    """The GPU check's figures (`make gpu-check`, run on a machine with a GPU; its JSON is copied
    to benchmarks/results/gpu_check.json), since this machine has none to measure them."""
    env = check.get("environment", {})
    lines = [
        "## GPU check",
        "",
        f"From `benchmarks/results/gpu_check.json` (`make gpu-check`): status **{check.get('status')}** "
        f"({check.get('mode')}), {check.get('duration_seconds', 0):.0f} s; {env.get('gpu', 'no GPU')}, "
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"{env.get('cpu_count')} CPUs.",
        "",
    ]
    models = check.get("models") or {}
    if not models:
        return lines
    lines += [
        "| model | training on the GPU | test AUC (GPU / CPU fp32) | predict img/s (CPU fp32 / GPU fp32 / GPU bf16) | train img/s, bare loop (CPU fp32 / GPU bf16) | GPU agrees with CPU |",
        "|---|---|---|---|---|---|",
    ]
    for name, model in models.items():
        training = model.get("training", {})
        predict = model.get("predict_images_per_second", {})
        train = model.get("throughput", {}).get("train", {})
        agreement = model.get("agreement", {})
        lines.append(
            f"| {name} ({model.get('parameters', 0):,} parameters, {model.get('image_size')} px) "
            f"| {training.get('epochs')} epochs in {training.get('duration_seconds')} s "
            f"({training.get('precision')}) "
            f"| {model.get('test_auc')} / {model.get('test_auc_cpu_fp32')} "
            f"| {_rate(predict.get('cpu_fp32'))} / {_rate(predict.get('gpu_fp32'))} / "
            f"{_rate(predict.get('gpu_bf16'))} "
            f"| {_rate(train.get('cpu_fp32', {}).get('images_per_second'))} / "
            f"{_rate(train.get('gpu_bf16', {}).get('images_per_second'))} "
            f"| {'yes' if agreement and all(a.get('ok') for a in agreement.values()) else 'no'} |"
        )
    return [*lines, ""]


def _rate(number: float | None) -> str:
    return "-" if number is None else f"{number:,.0f}"


def _header(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    return [
        f"# Benchmark report ({report['mode']} mode)",
        "",
        f"`{report['command']}`, {report['started']}, {report.get('total_seconds', 0) / 60:.1f} min. "
        f"Machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, Python {m['python']}, torch "
        f"{m['torch']}, load average {m['load_average_at_start']:.1f} at start. Torch ran with "
        f"{m['torch_threads']} thread(s) on both sides of every comparison (`--threads`): with two, "
        "OpenMP threads wait on each other whenever another process takes a core.",
        "",
        "Every figure is a ratio against a reference measured in the same process (or the same "
        "run), because absolute times on this shared machine swing by up to 2-3x from one run "
        "to the next. `other load` says how many cores other processes took meanwhile; above "
        f"{BUSY_CORES} the figures are flagged as taken on a busy machine.",
        "",
    ]


def _figures(report: dict[str, Any]):
    for bench in report["benchmarks"]:
        for figure in bench.get("figures", []):
            yield bench, figure


def _section(bench: dict[str, Any]) -> list[str]:
    facts = f"{bench.get('wall_seconds', bench.get('seconds', 0)):.0f} s"
    if bench.get("peak_rss_mb") and not bench.get("skipped"):
        facts += f", peak RSS of the benchmark process {bench['peak_rss_mb']:,.0f} MiB"
    if "other_load_cores" in bench:
        facts += f", other load {bench['other_load_cores']:.2f} cores"
    lines = [f"### {bench['title']} ({facts})", ""]
    if bench.get("error") or bench.get("skipped"):
        lines.append(f"- {bench.get('error') or bench['skipped']}")
    lines += [f"- {note}" for note in bench.get("notes", [])]
    for figure in bench.get("figures", []):
        if figure.get("met") is False and figure.get("reason"):
            lines.append(f"- **Not met: {figure['label']}.** {figure['reason']}")
    return [*lines, ""]
