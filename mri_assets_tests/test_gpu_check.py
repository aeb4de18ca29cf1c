"""The GPU check: says so and exits 0 without a GPU; its CPU dry run runs every step end to end,
without Dagster, and a disagreement fails it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mri_assets import gpu_check
from mri_assets.core.model import RESNET50_ARCHITECTURE

REPO = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_says_so_and_exits_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    status = gpu_check.main([str(tmp_path / "report")])

    assert status == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    report = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    assert report["status"] == "skipped" and "no CUDA GPU" in report["reason"]
    assert "no CUDA GPU" in (tmp_path / "report" / "gpu_check.md").read_text()


def test_cpu_dry_run_from_a_checkout_needs_no_dagster(tmp_path: Path) -> None:
    # As on the GPU machine: PYTHONPATH=. from the checkout, in a fresh interpreter. Every step
    # and both models as they are (the ResNet-50-shaped one at full width), on fewer images and
    # with the shortest bare-loop measurements.
    script = (
        "import dataclasses, sys\n"
        "from mri_assets import gpu_check\n"
        "gpu_check.DRY_RUN_SIZES = dataclasses.replace(gpu_check.DRY_RUN_SIZES, n_train=16,\n"
        "    n_test=8, cpu_batch=2, seconds_per_measurement=0.0)\n"
        f"status = gpu_check.main([{str(tmp_path / 'out')!r}, '--cpu-dry-run'])\n"
        "heavy = {'dagster', 'duckdb', 'boto3', 'slack_sdk', 'matplotlib'}\n"
        "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "IMPORTED []" in done.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["status"] == "ok" and report["mode"] == "cpu-dry-run"
    for name in ("embedded", "resnet50"):
        model = report["models"][name]
        assert model["training"]["precision"] == "bf16"  # CPU bfloat16 stands in for the GPU
        assert set(model["agreement"]) == {"cpu_fp32", "cpu_bf16"}
        assert model["agreement"]["cpu_fp32"]["max_abs_difference"] == 0.0
        assert all(cell["ok"] for cell in model["agreement"].values())
        for kind in ("train", "inference"):
            for cell in ("cpu_fp32", "cpu_bf16"):
                assert model["throughput"][kind][cell]["images_per_second"] > 0
    assert report["models"]["resnet50"]["parameters"] > 23_000_000  # ResNet-50-shaped
    assert report["models"]["resnet50"]["training"]["linear_probe"]["epochs"] >= 1
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "## resnet50" in markdown and "| cpu_bf16 |" in markdown


# The ResNet-50 layout (bottleneck blocks in 3-4-6-3 stages) at a sliver of its widths: the check
# handles it exactly as the real one, without building, saving and training 25M parameters.
TINY_RESNET50 = {**RESNET50_ARCHITECTURE, "embedding_size": 8, "hidden_sizes": [16, 32, 64, 128]}


@pytest.fixture
def tiny_dry_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dry-run sizes and a ResNet-50-shaped model smaller still, for tests of the check's own
    logic (test_cpu_dry_run_from_a_checkout_needs_no_dagster runs the real ones)."""
    tiny = dataclasses.replace(
        gpu_check.DRY_RUN_SIZES,
        n_train=16,
        n_test=8,
        phantom_size=32,
        embedded_image_size=16,
        resnet50_image_size=16,
        embedded_epochs=1,
        resnet50_epochs=1,
        probe_epochs=1,
        seconds_per_measurement=0.0,
    )
    monkeypatch.setattr(gpu_check, "DRY_RUN_SIZES", tiny)
    monkeypatch.setattr(gpu_check, "RESNET50_ARCHITECTURE", TINY_RESNET50)


def test_predictions_outside_the_tolerance_fail_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dry_run
) -> None:
    # An impossible tolerance: even identical predictions now count as a disagreement.
    monkeypatch.setattr(gpu_check, "TOLERANCE", {"fp32": -1.0, "fp16": -1.0, "bf16": -1.0})

    status = gpu_check.run_check(tmp_path, cpu_dry_run=True)

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1 and report["status"] == "disagree"
    assert not report["models"]["embedded"]["agreement"]["cpu_bf16"]["ok"]
    assert "**no**" in (tmp_path / "gpu_check.md").read_text()


def test_a_failing_step_is_reported_and_the_other_model_still_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dry_run
) -> None:

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "_probe_run", broken)  # only the resnet50 model probes

    status = gpu_check.run_check(tmp_path, cpu_dry_run=True)

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1 and report["status"] == "error"
    assert "illegal memory access" in report["models"]["resnet50"]["error"]
    assert report["models"]["embedded"]["agreement"]["cpu_bf16"]["ok"]
    assert "**failed**" in (tmp_path / "gpu_check.md").read_text()
