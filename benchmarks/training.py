"""Benchmark 1: our linear probe against the seed's training loop, on a ResNet-50.

The seed re-opened every image file with PIL each epoch, resized it to 224x224, normalised it
with ImageNet statistics, ran the frozen backbone and trained a one-logit head (BCE, Adam,
batch 32). Ours decodes once at ingest (pixel cache), embeds each image once, then trains the
head on the embeddings. Both use the same randomly initialised ``ResNetConfig()`` (ResNet-50)
weights, the same train files and the same number of epochs; our time includes the first-time
embedding computation (an empty embedding cache) and the backbone fingerprint.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    Figure,
    Result,
    RssSampler,
    accepted_images,
    dataset_files,
    default_dataset,
    fresh_dir,
    ingest_split,
    log,
    main,
    median,
    quiet,
    timed,
    warm_page_cache,
)

# (images, epochs of the seed loop to run for real); beyond them its time is extrapolated.
SIZES = {"quick": (32, 10), "full": (128, 30)}
# On a machine slowed down by other work, the seed loop stops once it has run 10 epochs and
# would pass this many seconds; the report then says it extrapolated.
REFERENCE_BUDGET = {"quick": 120.0, "full": 420.0}
EPOCHS = (10, 30)
BATCH = 32
IMAGE_SIZE = 224
TARGET_SPEEDUP = 10.0


def pick_subset(root: Path, count: int) -> list[Path]:
    """A fixed, class-balanced subset: the first ``count / 2`` train files of each class."""
    from mri_assets.core.labels import ClassSpec, resolve_label

    classes = ClassSpec()
    by_class: dict[str, list[Path]] = {name: [] for name in classes.names}
    for path in dataset_files(root, "train"):
        label = resolve_label(path.relative_to(root / "train").as_posix(), classes)
        by_class[label].append(path)
    return sorted(p for files in by_class.values() for p in files[: count // 2])


def link_subset(root: Path, files: list[Path], landing: Path) -> list[Path]:
    """Hard-link the subset into its own landing zone, so ingest sees exactly those files."""
    linked = []
    for path in files:
        target = landing / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        linked.append(target)
    return linked


def resnet50():
    """``ResNetConfig()`` defaults (ResNet-50) with seeded random weights: nothing downloaded."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        num_labels=2,
        id2label={0: "glioma", 1: "meningioma"},
        label2id={"glioma": 0, "meningioma": 1},
    )
    return ResNetForImageClassification(config).eval()


# --------------------------------------------------------------------------- the seed's loop


def seed_batch(paths: list[Path]):
    """What the seed did per batch: open each file, resize to 224, normalise (ImageNet)."""
    import torch
    from PIL import Image

    from mri_assets.core.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        arrays.append((np.asarray(resized, dtype=np.float32) / 255.0 - mean) / std)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def seed_loop(
    model, paths: list[Path], labels: list[int], epochs: int, budget: float = float("inf")
) -> list[float]:
    """The seed's training loop; returns the cumulative seconds at the end of each epoch.

    Stops early (after at least 10 epochs) when the next epoch would end past ``budget`` s.

    The backbone's weights are frozen and it runs in eval mode, so no autograd graph is built
    through it: the cheapest faithful reading of "frozen backbone", i.e. a generous reference.
    """
    import torch

    backbone = model.resnet.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    head = torch.nn.Linear(model.config.hidden_sizes[-1], 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    targets = torch.tensor(labels, dtype=torch.float32)
    rng = np.random.default_rng(0)
    cumulative, started = [], time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(len(paths))
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            features = backbone(pixel_values=seed_batch([paths[i] for i in batch])).pooler_output
            loss = loss_fn(head(features.flatten(1)).squeeze(1), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        cumulative.append(time.perf_counter() - started)
        last = cumulative[-1] - (cumulative[-2] if len(cumulative) > 1 else 0.0)
        if len(cumulative) >= min(EPOCHS) and cumulative[-1] + last > budget:
            break
    return cumulative


# --------------------------------------------------------------------------- ours


def linear_probe(
    model, sha256s: list[str], labels: list[int], pixels, epochs: int, cache_dir: Path
):
    """``fine_tune(strategy="linear_probe")`` from the pixel cache, with an empty embedding cache.

    Early stopping is pushed past the last epoch so both sides run exactly ``epochs`` epochs.
    """
    from mri_assets.core.embedding_cache import EmbeddingCache
    from mri_assets.core.preprocessing import Preprocessing
    from mri_assets.core.recipe import TrainConfig
    from mri_assets.core.train import fine_tune

    config = TrainConfig(
        strategy="linear_probe",
        image_size=IMAGE_SIZE,
        epochs=epochs,
        batch_size=BATCH,
        early_stopping_patience=epochs + 1,
    )
    fresh_dir(cache_dir)
    return fine_tune(
        model,
        Preprocessing(IMAGE_SIZE),
        sha256s,
        labels,
        pixels.get_many,
        config,
        embedding_cache=EmbeddingCache(cache_dir),
        log=quiet,
    )


def run(quick: bool, scratch: Path) -> Result:
    """Seed loop vs linear probe at 10 and 30 epochs, on a fixed subset of the train files."""
    from mri_assets.core.pixel_cache import PixelCache

    mode = "quick" if quick else "full"
    count, ref_epochs = SIZES[mode]
    work = fresh_dir(scratch / "work-training")
    root = default_dataset(scratch)
    files = link_subset(root, pick_subset(root, count), work / "landing")
    warm_page_cache(files)
    ingest_seconds, batch = timed(lambda: ingest_split(work / "landing", work / "home", "train"))
    sha256s, labels = accepted_images(batch)
    # accepted_images sorts by landing key, as `files` is sorted: the same order on both sides.
    assert len(sha256s) == len(files), "every subset file must be accepted"
    pristine = resnet50()
    pixels = PixelCache(work / "home" / "pixels")
    warm_up(pristine, files, sha256s, labels, pixels, work)
    result = Result("training", "Training: linear probe vs the seed's loop (ResNet-50, 224 px)")
    ours: dict[int, tuple[float, float]] = {}
    with RssSampler() as sampler:
        for epochs in EPOCHS[:1]:
            ours[epochs] = _ours(pristine, sha256s, labels, pixels, epochs, work, sampler)
        with sampler.window() as ref_peak:
            log(f"seed loop: {ref_epochs} epochs over {len(files)} files")
            cumulative = seed_loop(
                copy.deepcopy(pristine), files, labels, ref_epochs, REFERENCE_BUDGET[mode]
            )
        for epochs in EPOCHS[1:]:
            ours[epochs] = _ours(pristine, sha256s, labels, pixels, epochs, work, sampler)
    per_epoch = np.diff([0.0, *cumulative])
    for epochs in EPOCHS:
        reference, extrapolated = _reference_at(cumulative, per_epoch, epochs)
        seconds, peak = ours[epochs]
        ratio = reference / seconds
        result.figures.append(
            Figure(
                f"linear_probe_{epochs}_epochs",
                f"linear_probe, {epochs} epochs, {len(files)} images (incl. embedding fill)",
                seconds,
                reference,
                "s",
                ratio,
                "speed-up: seed loop time / our time",
                target=f">= {TARGET_SPEEDUP:g}x" if epochs == 10 else "",
                met=ratio >= TARGET_SPEEDUP if epochs == 10 else None,
                peak_rss_mb={"ours": peak, "reference": ref_peak.mb},
                note="reference extrapolated from measured epochs" if extrapolated else "",
                reason=_why_slow(seconds, per_epoch, epochs),
            )
        )
    result.params = {
        "images": len(files),
        "image_size": IMAGE_SIZE,
        "batch_size": BATCH,
        "reference_epochs_run": len(cumulative),
        "reference_epoch_seconds": per_epoch.tolist(),
        "ingest_seconds": ingest_seconds,
    }
    result.notes = _notes(files, per_epoch, len(cumulative), ingest_seconds, ours)
    shutil.rmtree(work, ignore_errors=True)  # pixel and embedding caches
    return result


def warm_up(model, paths: list[Path], sha256s, labels, pixels, work: Path) -> None:
    """Both sides once on four images, untimed, so neither pays for first-call set-up (oneDNN
    kernels, lazy imports, first allocations) inside its timing."""
    picks = [labels.index(0), labels.index(0) + 1, labels.index(1), labels.index(1) + 1]
    seed_loop(copy.deepcopy(model), [paths[i] for i in picks], [labels[i] for i in picks], 1)
    linear_probe(
        copy.deepcopy(model),
        [sha256s[i] for i in picks],
        [labels[i] for i in picks],
        pixels,
        1,
        work / "warm-up-embeddings",
    )


def _ours(pristine, sha256s, labels, pixels, epochs, work, sampler) -> tuple[float, float]:
    """(seconds, peak RSS) of one linear-probe run on a fresh copy of the base model."""
    model = copy.deepcopy(pristine)
    log(f"linear_probe: {epochs} epochs over {len(sha256s)} images")
    with sampler.window() as peak:
        seconds, _ = timed(
            lambda: linear_probe(model, sha256s, labels, pixels, epochs, work / "embeddings")
        )
    return seconds, peak.mb


def _reference_at(
    cumulative: list[float], per_epoch: np.ndarray, epochs: int
) -> tuple[float, bool]:
    """Seed-loop seconds for ``epochs`` epochs: measured if run that far, else extrapolated
    from the median measured epoch (the seed's epochs all do the same work)."""
    if epochs <= len(cumulative):
        return cumulative[epochs - 1], False
    return cumulative[-1] + median(list(per_epoch)) * (epochs - len(cumulative)), True


def _notes(files, per_epoch, ref_epochs, ingest_seconds, ours) -> list[str]:
    spread = (per_epoch.max() - per_epoch.min()) / np.median(per_epoch)
    notes = [
        f"Fixed subset: the first {len(files) // 2} train files of each class of the default "
        f"data set ({len(files)} images); ResNet-50 at 224 px on CPU is too slow for all 507.",
        f"Seed loop ran {ref_epochs} epochs for real, batch {BATCH}; per-epoch seconds: median "
        f"{np.median(per_epoch):.1f}, min {per_epoch.min():.1f}, max {per_epoch.max():.1f} "
        f"(spread {spread:.0%}).",
        "Our time includes the backbone fingerprint and the first-time embedding computation "
        "(empty embedding cache), i.e. a full backbone pass over every image; with a warm cache "
        "an epoch costs milliseconds.",
        f"Not included in our time: ingest of these files (decode once into the pixel cache), "
        f"measured at {ingest_seconds:.1f}s; including it, the 10-epoch speed-up would be "
        f"{_with_ingest(per_epoch, ours, ingest_seconds):.1f}x.",
        "Differences the seed loop does not share: our head has two logits (softmax CE, AdamW, "
        "one-cycle) and 15% of the images are held out for validation; both cost milliseconds.",
    ]
    if ref_epochs < max(EPOCHS):
        notes.append(
            f"The seed loop ran {ref_epochs} epochs (quick mode, or the machine was too slow for "
            f"the time budget); its {max(EPOCHS)}-epoch time is extrapolated linearly from the "
            "median measured epoch (every epoch does the same work; see the spread above)."
        )
    return notes


def _why_slow(seconds: float, per_epoch: np.ndarray, epochs: int) -> str:
    """Why the speed-up is what it is: our whole run, counted in seed-loop epochs."""
    cost = seconds / float(np.median(per_epoch))
    return (
        f"Our whole run costs {cost:.2f} seed-loop epochs (one backbone pass per image, like one "
        f"seed epoch), so the speed-up at {epochs} epochs cannot exceed {epochs}/{cost:.2f}: "
        "the one embedding pass (batches of 32, channels_last) is the floor of our time."
    )


def _with_ingest(per_epoch, ours, ingest_seconds) -> float:
    reference = float(np.sum(per_epoch[:10]))
    return reference / (ours[10][0] + ingest_seconds)


if __name__ == "__main__":
    raise SystemExit(main(run))
