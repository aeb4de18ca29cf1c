"""Benchmark 2: overhead of our full fine-tune against a bare PyTorch loop.

Same model (the embedded small ResNet, same starting weights), same images, batch size and
number of optimizer steps. Our augmentation and validation are turned off, so what is left is
our loop's own cost: preprocessing the cached pixels into tensors (the bare loop is handed
pre-decoded, pre-resized tensors), the one-cycle schedule, deterministic mode and keeping the
best epoch's weights.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from benchmarks.common import (
    Figure,
    Result,
    RssSampler,
    accepted_images,
    balanced,
    default_dataset,
    fresh_dir,
    ingest_split,
    log,
    main,
    median,
    paired_ratio,
    quiet,
    rotated,
    spread,
    timed,
)

# (train images, epochs, rounds); the default data set has 507 train images, 248 of the
# smaller class, so at most 496 balanced ones.
SIZES = {"quick": (256, 2, 5), "full": (496, 5, 5)}
BATCH = 32
TARGET_OVERHEAD = 0.10
BUDGET = 120.0  # seconds of rounds before stopping at the minimum of three


def bare_loop(model, inputs, targets, epochs: int, lr: float, weight_decay: float) -> None:
    """The plainest PyTorch loop over pre-decoded tensors: shuffle, forward, CE, step."""
    import torch
    import torch.nn.functional as F

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, order.numel(), BATCH):
            batch = order[start : start + BATCH]
            if batch.numel() < 2:  # our loop skips one-image batches too (batch norm)
                continue
            loss = F.cross_entropy(model(pixel_values=inputs[batch]).logits, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def warm_up(base, sha256s, labels, by_sha, inputs, targets) -> None:
    """Both sides once on a few images, untimed: first-call set-up (kernels, lazy imports)."""
    from mri_assets.core.recipe import TrainConfig
    from mri_assets.core.train import fine_tune

    config = TrainConfig(
        strategy="full", epochs=1, batch_size=8, augment=False, validation_fraction=0.0
    )
    fine_tune(
        copy.deepcopy(base.model),
        base.preprocessing,
        sha256s,
        labels,
        lambda s: [by_sha[x] for x in s],
        config,
        log=quiet,
    )
    bare_loop(copy.deepcopy(base.model), inputs, targets, 1, config.lr, config.weight_decay)


def run(quick: bool, scratch: Path) -> Result:
    """Interleaved rounds of our ``fine_tune(strategy="full")`` and the bare loop."""
    import torch

    from mri_assets.core.labels import ClassSpec
    from mri_assets.core.model import load_base_model, preprocess_pixels
    from mri_assets.core.pixel_cache import PixelCache
    from mri_assets.core.recipe import TrainConfig
    from mri_assets.core.train import fine_tune

    count, epochs, rounds = SIZES["quick" if quick else "full"]
    work = fresh_dir(scratch / "work-full-finetune")
    batch = ingest_split(default_dataset(scratch), work / "home", "train")
    sha256s, labels = balanced(*accepted_images(batch), count)
    count = len(sha256s)
    base = load_base_model("embedded", ClassSpec(), work / "base")
    arrays = PixelCache(work / "home" / "pixels").get_many(sha256s)
    by_sha = dict(zip(sha256s, arrays, strict=True))
    prep_seconds, inputs = timed(lambda: preprocess_pixels(arrays, base.preprocessing))
    targets = torch.tensor(labels)
    config = TrainConfig(
        strategy="full", epochs=epochs, batch_size=BATCH, augment=False, validation_fraction=0.0
    )
    peaks = {"ours": 0.0, "reference": 0.0}

    def measure(side: str, fn) -> float:
        model = copy.deepcopy(base.model)  # same starting weights every time, copied untimed
        with sampler.window() as peak:
            seconds, _ = timed(lambda: fn(model))
        peaks[side] = max(peaks[side], peak.mb)
        log(f"{side}: {seconds:.2f}s")
        return seconds

    def ours() -> float:
        return measure(
            "ours",
            lambda m: fine_tune(
                m,
                base.preprocessing,
                sha256s,
                labels,
                lambda s: [by_sha[x] for x in s],
                config,
                log=quiet,
            ),
        )

    def reference() -> float:
        return measure(
            "reference",
            lambda m: bare_loop(m, inputs, targets, epochs, config.lr, config.weight_decay),
        )

    with RssSampler() as sampler:
        warm_up(base, sha256s[:16], labels[:16], by_sha, inputs[:16], targets[:16])
        times = rotated(rounds, {"ours": ours, "reference": reference}, budget=BUDGET)
        mine, theirs = times["ours"], times["reference"]
    shutil.rmtree(work, ignore_errors=True)
    return _result(mine, theirs, peaks, prep_seconds, count, epochs, len(mine))


def _result(mine, theirs, peaks, prep_seconds, count, epochs, rounds) -> Result:
    ours_s, bare_s = median(mine), median(theirs)
    ratio = paired_ratio(mine, theirs)
    overhead = ratio - 1
    steps = epochs * sum(1 for s in range(0, count, BATCH) if count - s >= 2)
    result = Result("full_finetune", "Full fine-tune: our loop vs a bare PyTorch loop")
    result.figures.append(
        Figure(
            "full_finetune_overhead",
            f"full fine-tune, {count} images, {steps} steps of {BATCH} (embedded ResNet, 128 px)",
            ours_s,
            bare_s,
            "s",
            ratio,
            "our time / bare loop time",
            target=f"<= {1 + TARGET_OVERHEAD:.2f} (overhead within {TARGET_OVERHEAD:.0%})",
            met=overhead <= TARGET_OVERHEAD,
            peak_rss_mb=peaks,
            note=f"overhead {overhead:+.1%}",
            reason=f"Preprocessing the cached pixels into tensors (resize to 128 px, normalise) "
            f"costs {prep_seconds / bare_s:.0%} of the bare loop's time, a fixed cost that more "
            f"epochs dilute; the rest ({(ours_s - prep_seconds) / bare_s - 1:+.0%}) is "
            "deterministic mode, the one-cycle schedule and the best-epoch state copies.",
        )
    )
    result.params = {
        "images": count,
        "epochs": epochs,
        "steps": steps,
        "rounds": len(mine),
        "ours_seconds": mine,
        "reference_seconds": theirs,
        "preprocess_seconds": prep_seconds,
    }
    result.notes = [
        f"{rounds} interleaved rounds; the ratio is the median of the per-round ratios, the "
        f"times are medians; spread ours {spread(mine):.0%}, bare {spread(theirs):.0%}.",
        "Ours: fine_tune(strategy='full', augment=False, validation_fraction=0.0) from in-memory "
        "decoded pixels; its time includes resizing and normalising them into tensors "
        f"({prep_seconds:.2f}s when measured alone), which the bare loop is handed ready-made. "
        f"Excluding that, the overhead is {(ours_s - prep_seconds) / bare_s - 1:+.1%}.",
        "Bare loop: AdamW with the same learning rate and weight decay, no schedule, no "
        "deterministic mode, no best-epoch bookkeeping, in PyTorch's default memory layout. "
        "Ours trains in channels_last (mri_assets/core/train.py), which is why it can come out "
        "faster than the bare loop.",
    ]
    return result


if __name__ == "__main__":
    raise SystemExit(main(run))
