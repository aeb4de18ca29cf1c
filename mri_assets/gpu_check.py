"""GPU check: does training and prediction work, agree and pay off on this machine's GPU?

    PYTHONPATH=. python -m mri_assets.gpu_check OUT_DIR            # on a machine with a GPU
    PYTHONPATH=. python -m mri_assets.gpu_check OUT_DIR --cpu-dry-run   # tiny, CPU only

Needs only torch, transformers, numpy, Pillow, pandas (scikit-learn is not even imported)
and this project's ``core``: no Dagster, no network, no hub download. The ResNet-50-shaped
model is built from a ResNetConfig with random weights and saved as a local checkpoint, so the
checkpoint path (fresh two-class head, linear-probe warm start) is what gets exercised.

On one GPU it, well within 5 minutes:

1. renders phantom slices (core/phantoms.py) for a train and a test set;
2. fine-tunes the embedded default model and the ResNet-50-shaped one on the GPU in mixed
   precision for a few epochs, through ``core.train.fine_tune`` (what the pipeline runs). Both
   have random weights, so both train from scratch (the full strategy); the ResNet-50-shaped
   one also runs a linear probe, which embeds every image on the GPU;
3. measures training and inference images/second with a bare loop on the GPU and on the CPU,
   each in float32 and in mixed precision (bf16 where the GPU has it, else fp16; bf16 on the
   CPU), and ``predict_probabilities`` end to end on both;
4. checks that GPU predictions (float32, which on CUDA uses TF32 convolutions, and mixed
   precision) agree with the CPU float32 reference within TOLERANCE;
5. writes ``gpu_check.md`` and ``gpu_check.json`` into OUT_DIR.

Exit status: 0 when the predictions agree (or when there is no GPU: it says so and checks
nothing), 1 when they do not or a step failed (the report then holds the traceback and
whatever the other model's steps measured). ``--cpu-dry-run`` runs every step at toy sizes on the CPU, with
CPU bfloat16 standing in for the GPU, so the check itself can be tested anywhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from mri_assets.core.devices import (
    Placement,
    fast_cuda_kernels,
    placement,
    resolve_device,
    synchronize,
)
from mri_assets.core.inference import predict_probabilities
from mri_assets.core.labels import ClassSpec
from mri_assets.core.metrics import roc_auc
from mri_assets.core.model import (
    EMBEDDED_ARCHITECTURE,
    RESNET50_ARCHITECTURE,
    BaseModel,
    load_base_model,
    quiet_transformers,
    random_resnet,
    save_preprocessing,
)
from mri_assets.core.phantoms import CLASSES, generate_slice
from mri_assets.core.preprocessing import Preprocessing
from mri_assets.core.recipe import TrainConfig, recommended_config
from mri_assets.core.saliency import grad_cam
from mri_assets.core.serving import ServedModel, fit_statistics
from mri_assets.core.train import fine_tune

# Largest allowed |P(positive) difference| to the CPU float32 prediction of the same model on
# the same image. Float32 on CUDA runs convolutions in TF32 (10-bit mantissa, as float16), so
# it gets the float16 tolerance; bfloat16 keeps 8 bits and gets the widest.
TOLERANCE = {"fp32": 0.02, "fp16": 0.02, "bf16": 0.05}
REPORT_NAME = "gpu_check"


@dataclass(frozen=True)
class CheckSizes:
    """How much work the check does; GPU_SIZES fits 5 minutes with room to spare."""

    n_train: int
    n_test: int
    phantom_size: int
    embedded_image_size: int
    resnet50_image_size: int
    embedded_epochs: int
    resnet50_epochs: int
    probe_epochs: int  # the ResNet-50-shaped model's linear probe
    gpu_batch: int  # bare-loop training batch on the GPU (inference uses twice as many)
    cpu_batch: int  # the same on the CPU, smaller to bound one step's time
    seconds_per_measurement: float
    budget_seconds: float  # CPU measurements still to come are skipped past this


GPU_SIZES = CheckSizes(
    n_train=512,
    n_test=192,  # three full prediction batches of 64: the warm-up batch has their shape
    phantom_size=224,
    embedded_image_size=128,
    resnet50_image_size=224,
    embedded_epochs=8,
    resnet50_epochs=3,
    probe_epochs=5,
    gpu_batch=32,
    cpu_batch=16,
    seconds_per_measurement=4.0,
    budget_seconds=240.0,
)
DRY_RUN_SIZES = CheckSizes(
    n_train=48,
    n_test=24,
    phantom_size=64,
    embedded_image_size=32,
    resnet50_image_size=32,
    embedded_epochs=2,
    resnet50_epochs=1,
    probe_epochs=2,
    gpu_batch=8,
    cpu_batch=8,
    seconds_per_measurement=0.3,
    budget_seconds=480.0,  # a busy CPU must not skip what the dry run is there to exercise
)


@dataclass
class Phantoms:
    train_pixels: list[np.ndarray]
    train_labels: list[int]
    test_pixels: list[np.ndarray]
    test_labels: list[int]

    @property
    def train_sha256s(self) -> list[str]:
        # Stand-ins for content hashes: fine_tune only needs unique keys for its lookup.
        return [f"{i:064x}" for i in range(len(self.train_pixels))]

    def lookup(self, sha256s: list[str]) -> list[np.ndarray]:
        return [self.train_pixels[int(sha, 16)] for sha in sha256s]


def make_phantoms(sizes: CheckSizes, seed: int) -> Phantoms:
    """Balanced, seeded train and test slices as (H, W, 3) uint8 RGB."""
    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple[list[np.ndarray], list[int]]:
        labels = [i % 2 for i in range(n)]
        pixels = [
            np.repeat(generate_slice(rng, CLASSES[label], sizes.phantom_size)[:, :, None], 3, 2)
            for label in labels
        ]
        return pixels, labels

    train, test = draw(sizes.n_train), draw(sizes.n_test)
    return Phantoms(train[0], train[1], test[0], test[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mri_assets.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out", type=Path, help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run every step at toy sizes on the CPU (CPU bfloat16 stands in for the GPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_check(args.out, cpu_dry_run=args.cpu_dry_run, seed=args.seed)


def run_check(out: Path, *, cpu_dry_run: bool = False, seed: int = 0) -> int:
    """Run the check and write the report; the process exit status (see the module doc)."""

    started = time.perf_counter()
    environment = _environment()
    device = resolve_device("auto")
    if device.type != "cuda" and not cpu_dry_run:
        message = (
            f"no CUDA GPU visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'none'}): nothing to check. "
            "--cpu-dry-run exercises the check on the CPU."
        )
        print(f"gpu-check: {message}")
        _write(out, {"status": "skipped", "reason": message, "environment": environment})
        return 0
    sizes = DRY_RUN_SIZES if cpu_dry_run else GPU_SIZES
    # The device under test, in float32 and in mixed precision, against the CPU in float32.
    under_test = [placement(device, False), placement(device, True)]
    cpu_cells = [placement("cpu", False), placement("cpu", True)]
    say = _Progress(started)
    say(
        f"device under test: {device} ({environment.get('gpu', 'CPU dry run')}); "
        f"mixed precision {under_test[1].precision}"
    )
    phantoms = make_phantoms(sizes, seed)
    say(f"{sizes.n_train} + {sizes.n_test} phantom slices at {sizes.phantom_size} px")
    deadline = started + sizes.budget_seconds
    report: dict[str, Any] = {
        "status": "ok",
        "mode": "cpu-dry-run" if cpu_dry_run else "gpu",
        "environment": environment,
        "sizes": asdict(sizes),
        "tolerance": {"max_abs_probability_difference": TOLERANCE},
        "models": {},
    }
    # Both models start from random weights, so both get the from-scratch recipe (TrainConfig's
    # defaults); the checkpoint recipe (linear-probe warm start) would fit a trained backbone.
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        bases = {
            "embedded": (
                lambda: load_base_model("embedded", ClassSpec(), Path(work) / "base"),
                EMBEDDED_ARCHITECTURE,
                TrainConfig(epochs=sizes.embedded_epochs, image_size=sizes.embedded_image_size),
            ),
            "resnet50": (
                lambda: _resnet50_checkpoint(Path(work), sizes.resnet50_image_size),
                RESNET50_ARCHITECTURE,
                recommended_config(
                    False, epochs=sizes.resnet50_epochs, image_size=sizes.resnet50_image_size
                ),
            ),
        }
        for name, (load, architecture, config) in bases.items():
            say(f"{name}: loading")
            try:
                report["models"][name] = _check_model(
                    name,
                    load(),
                    architecture,
                    config,
                    phantoms,
                    under_test,
                    cpu_cells,
                    sizes,
                    deadline,
                    say,
                )
            except Exception as error:  # the check runs once on a borrowed GPU: keep the rest
                say(f"{name}: FAILED: {type(error).__name__}: {error}")
                report["models"][name] = {
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(),
                }
    if any("error" in model for model in report["models"].values()):
        report["status"] = "error"
    else:
        agreements = [
            cell["ok"]
            for model in report["models"].values()
            for cell in [*model["agreement"].values(), model["serving"]]
        ]
        report["status"] = "ok" if all(agreements) else "disagree"
    report["duration_seconds"] = round(time.perf_counter() - started, 1)
    _write(out, report)
    say(f"report: {out / (REPORT_NAME + '.md')} ({report['status']})")
    print(_markdown(report))
    return 0 if report["status"] == "ok" else 1


def _resnet50_checkpoint(work: Path, image_size: int) -> BaseModel:
    """A ResNet-50-shaped 1000-class checkpoint with random weights, saved and loaded back the
    way MRI_BASE_MODEL=<folder> loads one (so the head is replaced by a two-class one)."""
    folder = work / "resnet-50-random"
    with quiet_transformers():
        random_resnet(RESNET50_ARCHITECTURE, num_labels=1000).save_pretrained(folder)
    save_preprocessing(Preprocessing(image_size), folder)
    return load_base_model(str(folder), ClassSpec(), work / "base")


def _check_model(
    name: str,
    base: BaseModel,
    architecture: dict[str, Any],
    config: TrainConfig,
    phantoms: Phantoms,
    under_test: list[Placement],
    cpu_cells: list[Placement],
    sizes: CheckSizes,
    deadline: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    mixed = under_test[1]
    probe = _probe_run(name, base, phantoms, sizes, mixed, say) if name == "resnet50" else None
    result = fine_tune(
        base.model,
        base.preprocessing,
        phantoms.train_sha256s,
        phantoms.train_labels,
        phantoms.lookup,
        config,
        log=lambda line: say(f"{name}: {line}"),
        device=mixed.device,
        mixed_precision=mixed.amp_dtype is not None,
    )
    model, preprocessing = result.model, result.preprocessing
    # Epoch times include validation; the first epoch also pays for warm-up (cuDNN's
    # algorithm search, allocator growth), so it is left out when there are more.
    timed = result.epochs[1:] or result.epochs
    train_seconds = sum(e.seconds for e in timed)
    training = {
        "device": result.device,
        "precision": result.precision,
        "strategy": config.strategy,
        "epochs": len(result.epochs),
        "best_epoch": result.best_epoch,
        "duration_seconds": round(result.duration_seconds, 2),
        "images_per_second": round(result.n_train * len(timed) / train_seconds, 1),
        "val_auc": _round(result.epochs[result.best_epoch - 1].val_auc),
    }
    if probe is not None:
        training["linear_probe"] = probe
    say(
        f"{name}: trained on {result.device} ({result.precision}) in {result.duration_seconds:.1f}s"
    )

    predictions: dict[str, np.ndarray] = {}
    pipeline_rates: dict[str, float] = {}
    for where in [cpu_cells[0], *under_test]:
        cell = _cell_name(where)
        if cell in predictions:
            continue
        # A warm-up call on one batch of the timed batches' shape (cuDNN's algorithm search,
        # oneDNN's kernel creation), so the figure is the steady state.
        predict_probabilities(model, preprocessing, phantoms.test_pixels[:64], **_kwargs(where))
        synchronize(where)
        t0 = time.perf_counter()
        predictions[cell] = predict_probabilities(
            model, preprocessing, phantoms.test_pixels, **_kwargs(where)
        )[:, 1]
        pipeline_rates[cell] = round(len(phantoms.test_pixels) / (time.perf_counter() - t0), 1)
    reference = predictions[_cell_name(cpu_cells[0])]
    truth = np.asarray(phantoms.test_labels) == 1
    agreement = {}
    for where in under_test:
        cell = _cell_name(where)
        difference = np.abs(predictions[cell] - reference)
        tolerance = TOLERANCE[where.precision]
        agreement[cell] = {
            "max_abs_difference": float(difference.max()),
            "mean_abs_difference": float(difference.mean()),
            "same_decision_share": float(((predictions[cell] > 0.5) == (reference > 0.5)).mean()),
            "auc": _round(roc_auc(truth, predictions[cell])),
            "tolerance": tolerance,
            "ok": bool(difference.max() <= tolerance),
        }
        say(
            f"{name}: {cell} vs cpu_fp32: max |dp| {difference.max():.2e} "
            f"(tolerance {tolerance}) -> {'ok' if agreement[cell]['ok'] else 'DISAGREE'}"
        )

    serving = _check_serving(name, model, preprocessing, result, phantoms, mixed, say)

    throughput: dict[str, dict[str, Any]] = {"train": {}, "inference": {}}
    image_size = preprocessing.image_size
    for where in [*under_test, *cpu_cells]:
        cell = _cell_name(where)
        if cell in throughput["train"]:
            continue
        if where.is_cpu and time.perf_counter() > deadline:
            throughput["train"][cell] = throughput["inference"][cell] = "skipped: time budget"
            continue
        batch = sizes.cpu_batch if where.is_cpu else sizes.gpu_batch
        throughput["train"][cell] = _train_rate(
            model, where, image_size, batch, sizes.seconds_per_measurement
        )
        throughput["inference"][cell] = _inference_rate(
            model, where, image_size, 2 * batch, sizes.seconds_per_measurement
        )
        say(
            f"{name}: {cell}: train {throughput['train'][cell]['images_per_second']} img/s, "
            f"inference {throughput['inference'][cell]['images_per_second']} img/s"
        )
    return {
        "architecture": {k: architecture[k] for k in ("hidden_sizes", "depths", "layer_type")},
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "image_size": image_size,
        "training": training,
        "test_auc": agreement[_cell_name(mixed)]["auc"],
        "test_auc_cpu_fp32": _round(roc_auc(truth, reference)),
        "predict_images_per_second": pipeline_rates,
        "agreement": agreement,
        "serving": serving,
        "throughput": throughput,
    }


# Serving on the device must flag the same scans as on the CPU: the share of images (test
# slices and their contrast-inverted twins) whose OOD flag is the same on both.
FLAG_AGREEMENT_FLOOR = 0.95
SALIENCY_IMAGES = 16


def _check_serving(
    name: str,
    model: Any,
    preprocessing: Preprocessing,
    result: Any,
    phantoms: Phantoms,
    where: Placement,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """What serving adds after training (core/serving.py: the temperature and the OOD detector
    fitted on the train and validation images; calibrated scores with OOD flags; Grad-CAM), on
    the device under test against the CPU in float32. Contrast-inverted test slices stand in for
    scans from another scanner: the detector should flag them and not the test slices."""
    cells = {"cpu_fp32": placement("cpu", False), _cell_name(where): where}
    outliers = [255 - pixels for pixels in phantoms.test_pixels]
    scanned = [*phantoms.test_pixels, *outliers]
    n_test = len(phantoms.test_pixels)
    served, scores, rates = {}, {}, {}
    for cell, at in cells.items():
        statistics = fit_statistics(
            model,
            preprocessing,
            phantoms.train_pixels,
            phantoms.train_labels,
            result.train_indices,
            result.validation_indices,
            device=str(at.device),
        )
        served[cell] = ServedModel(f"gpu-check-{cell}", model, preprocessing, statistics)
        served[cell].score(scanned[:64], device=str(at.device))  # warm-up
        synchronize(at)
        t0 = time.perf_counter()
        scores[cell] = served[cell].score(scanned, device=str(at.device))
        rates[cell] = round(len(scanned) / (time.perf_counter() - t0), 1)
    cpu, device = scores["cpu_fp32"], scores[_cell_name(where)]
    if cpu.ood_flags is None or device.ood_flags is None:
        raise RuntimeError(f"{name}: no OOD detector was fitted: {served['cpu_fp32'].statistics}")
    difference = float(np.abs(device.probabilities - cpu.probabilities)[:, 1].max())
    flag_agreement = float((device.ood_flags == cpu.ood_flags).mean())
    tolerance = TOLERANCE[where.precision]
    report = {
        "temperature": {cell: round(s.temperature, 4) for cell, s in served.items()},
        "ood_threshold": {cell: round(s.statistics.ood.threshold, 3) for cell, s in served.items()},
        "calibrated_max_abs_difference": difference,
        "tolerance": tolerance,
        "ood_flag_agreement": round(flag_agreement, 4),
        "flagged_share_test": {
            cell: round(float(s.ood_flags[:n_test].mean()), 4) for cell, s in scores.items()
        },
        "flagged_share_inverted": {
            cell: round(float(s.ood_flags[n_test:].mean()), 4) for cell, s in scores.items()
        },
        "score_images_per_second": rates,
    }
    report["saliency"] = _saliency_agreement(grad_cam, model, preprocessing, phantoms, cells)
    report["ok"] = bool(difference <= tolerance and flag_agreement >= FLAG_AGREEMENT_FLOOR)
    say(
        f"{name}: serving on {_cell_name(where)} vs cpu_fp32: calibrated max |dp| "
        f"{difference:.2e} (tolerance {tolerance}), OOD flags agree on {flag_agreement:.1%}, "
        f"flagged {report['flagged_share_test']} of test slices and "
        f"{report['flagged_share_inverted']} of inverted ones -> "
        f"{'ok' if report['ok'] else 'DISAGREE'}"
    )
    return report


def _saliency_agreement(grad_cam, model, preprocessing, phantoms, cells) -> dict[str, Any]:
    """Grad-CAM maps of a few test slices on each cell (float32 everywhere): time per image and
    the largest difference to the CPU's map (maps are in [0, 1])."""
    images = phantoms.test_pixels[:SALIENCY_IMAGES]
    maps, seconds = {}, {}
    for cell, at in cells.items():
        grad_cam(model, preprocessing, images[:2], device=str(at.device))  # warm-up
        synchronize(at)
        t0 = time.perf_counter()
        maps[cell] = np.stack(grad_cam(model, preprocessing, images, device=str(at.device)))
        seconds[cell] = (time.perf_counter() - t0) / len(images)
    device_cell = next(cell for cell in cells if cell != "cpu_fp32")
    return {
        "images": len(images),
        "milliseconds_per_image": {cell: round(1000 * s, 2) for cell, s in seconds.items()},
        "max_abs_difference": float(np.abs(maps[device_cell] - maps["cpu_fp32"]).max()),
        "mean_abs_difference": float(np.abs(maps[device_cell] - maps["cpu_fp32"]).mean()),
    }


def _probe_run(
    name: str,
    base: BaseModel,
    phantoms: Phantoms,
    sizes: CheckSizes,
    where: Placement,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """A linear probe on a copy of the base: every training image is embedded once on the
    device under test (the embedding path), then the head trains on the features."""
    config = TrainConfig(
        strategy="linear_probe", epochs=sizes.probe_epochs, image_size=sizes.resnet50_image_size
    )
    result = fine_tune(
        copy.deepcopy(base.model),
        base.preprocessing,
        phantoms.train_sha256s,
        phantoms.train_labels,
        phantoms.lookup,
        config,
        log=lambda line: say(f"{name} linear probe: {line}"),
        **_kwargs(where),
    )
    return {
        "epochs": len(result.epochs),
        "duration_seconds": round(result.duration_seconds, 2),
        "images_per_second_incl_embedding": round(
            len(phantoms.train_pixels) / result.duration_seconds, 1
        ),
        "val_auc": _round(result.epochs[result.best_epoch - 1].val_auc),
    }


def _train_rate(
    model: Any, where: Placement, image_size: int, batch: int, seconds: float
) -> dict[str, Any]:
    """Bare training steps (forward, backward, AdamW) on random inputs: the hardware's rate."""

    trainee = copy.deepcopy(model).to(where.device).to(memory_format=torch.channels_last)
    trainee.train()
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-5)
    scaler = where.grad_scaler()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=generator)
    x = where.to_device(x).contiguous(memory_format=torch.channels_last)
    y = where.to_device(torch.arange(batch) % 2)

    def step() -> None:
        with where.autocast():
            logits = trainee(pixel_values=x).logits
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return _measure(step, batch, where, seconds)


def _inference_rate(
    model: Any, where: Placement, image_size: int, batch: int, seconds: float
) -> dict[str, Any]:
    """Bare forward passes in eval and inference mode on preprocessed random inputs."""

    runner = copy.deepcopy(model).to(where.device).to(memory_format=torch.channels_last).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=generator)
    x = where.to_device(x).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.inference_mode(), where.autocast():
            runner(pixel_values=x)

    return _measure(step, batch, where, seconds)


def _measure(
    step: Callable[[], None], batch: int, where: Placement, seconds: float
) -> dict[str, Any]:
    """Images/second over at least two steps and ``seconds`` after one warm-up step (a single
    step when the warm-up alone took longer than ``seconds``: slow CPU cells stay bounded)."""
    with fast_cuda_kernels(where):
        t0 = time.perf_counter()
        step()
        synchronize(where)
        min_steps = 1 if time.perf_counter() - t0 > seconds else 2
        steps, t0 = 0, time.perf_counter()
        while steps < min_steps or time.perf_counter() - t0 < seconds:
            step()
            synchronize(where)  # per step: the wall clock must see the GPU's work
            steps += 1
        elapsed = time.perf_counter() - t0
    return {"images_per_second": round(steps * batch / elapsed, 1), "batch": batch, "steps": steps}


def _cell_name(where: Placement) -> str:
    return f"{'cpu' if where.is_cpu else 'gpu'}_{where.precision}"


def _kwargs(where: Placement) -> dict[str, Any]:
    return {"device": where.device, "mixed_precision": where.amp_dtype is not None}


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _environment() -> dict[str, Any]:

    environment: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        environment["gpu"] = torch.cuda.get_device_name(index)
        environment["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        environment["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(index).total_memory / 2**30, 1
        )
    return environment


class _Progress:
    def __init__(self, started: float) -> None:
        self.started = started

    def __call__(self, line: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {line}", flush=True)


def _write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{REPORT_NAME}.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    (out / f"{REPORT_NAME}.md").write_text(_markdown(report))


def _markdown(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    lines = [
        "# GPU check",
        "",
        f"Status: **{report['status']}**"
        + (f" ({report['mode']})" if "mode" in report else "")
        + (f", {report['duration_seconds']} s" if "duration_seconds" in report else ""),
        "",
        f"torch {env.get('torch')} (CUDA {env.get('torch_cuda') or 'none'}), transformers "
        f"{env.get('transformers')}, {env.get('gpu', 'no GPU')}, {env.get('cpu_count')} CPUs",
        "",
    ]
    if report["status"] == "skipped":
        return "\n".join([*lines, report["reason"], ""])
    tolerance = report["tolerance"]["max_abs_probability_difference"]
    lines += [
        "Agreement: the largest |P(positive) difference| to the CPU float32 prediction of the "
        f"same model on each test image must stay within {tolerance} (by GPU precision; float32 "
        "on CUDA uses TF32 convolutions).",
        "",
    ]
    for name, model in report["models"].items():
        if "error" in model:
            lines += [f"## {name}", "", f"**failed**: `{model['error']}`", "", "```"]
            lines += [model["traceback"].rstrip(), "```", ""]
            continue
        training = model["training"]
        lines += [
            f"## {name} ({model['parameters']:,} parameters, {model['image_size']} px)",
            "",
            f"fine_tune on {training['device']} ({training['precision']}): "
            f"{training['epochs']} epochs in {training['duration_seconds']} s, {training['images_per_second']} img/s "
            f"(epochs incl. validation), best epoch {training['best_epoch']}, val AUC "
            f"{training['val_auc']}, test AUC {model['test_auc']} "
            f"(CPU float32: {model['test_auc_cpu_fp32']})",
            "",
        ]
        if probe := training.get("linear_probe"):
            lines += [
                f"linear probe on {training['device']}: {probe['epochs']} epochs in "
                f"{probe['duration_seconds']} s including embedding every image once "
                f"({probe['images_per_second_incl_embedding']} img/s), val AUC {probe['val_auc']}",
                "",
            ]
        lines += [
            "| cell | train img/s (bare loop) | inference img/s (bare loop) | "
            "predict_probabilities img/s | max abs diff vs cpu_fp32 | agrees |",
            "|---|---|---|---|---|---|",
        ]
        for cell in model["throughput"]["train"]:
            train, infer = (
                model["throughput"]["train"][cell],
                model["throughput"]["inference"][cell],
            )
            agreement = model["agreement"].get(cell)
            lines.append(
                f"| {cell} | {_rate_text(train)} | {_rate_text(infer)} | "
                f"{model['predict_images_per_second'].get(cell, '')} | "
                + (
                    f"{agreement['max_abs_difference']:.2e} (<= {agreement['tolerance']}) | "
                    f"{'yes' if agreement['ok'] else '**no**'} |"
                    if agreement
                    else "reference | |"
                    if cell == "cpu_fp32"
                    else "| |"
                )
            )
        lines += ["", *_serving_markdown(model["serving"]), ""]
    return "\n".join(lines)


def _serving_markdown(serving: dict[str, Any]) -> list[str]:
    saliency = serving["saliency"]
    return [
        f"Serving (temperature and OOD detector fitted on each cell; calibrated scores of the "
        f"test slices and their contrast-inverted twins): temperature {serving['temperature']}, "
        f"OOD threshold {serving['ood_threshold']}; calibrated max |dp| vs cpu_fp32 "
        f"{serving['calibrated_max_abs_difference']:.2e} (<= {serving['tolerance']}); OOD flags "
        f"agree on {serving['ood_flag_agreement']:.1%} (>= {FLAG_AGREEMENT_FLOOR:.0%}); flagged "
        f"share of test slices {serving['flagged_share_test']}, of inverted ones "
        f"{serving['flagged_share_inverted']}; scoring img/s {serving['score_images_per_second']}"
        f" -> {'ok' if serving['ok'] else '**disagree**'}",
        "",
        f"Grad-CAM ({saliency['images']} images, float32): ms per image "
        f"{saliency['milliseconds_per_image']}; max |difference| to the CPU map "
        f"{saliency['max_abs_difference']:.2e} (mean {saliency['mean_abs_difference']:.2e})",
    ]


def _rate_text(cell: dict[str, Any] | str) -> str:
    if isinstance(cell, str):
        return cell
    return f"{cell['images_per_second']:,} (batch {cell['batch']})"


if __name__ == "__main__":
    sys.exit(main())
