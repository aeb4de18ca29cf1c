"""Recipe tuning on the hard phantoms, at the core level (no Dagster): fast to iterate.

    python -m benchmarks.recipe_tuning DATA '{"config": {...}, "aug": {...}, "arch": {...}}'

DATA is a landing-zone tree written by ``mri-assets make-dataset DATA --variation hard`` (the
tuning used seed 0; benchmarks/generalisation.py checks the chosen recipe on seed 1). The spec
overrides TrainConfig fields (``config``), Augmentation fields (``aug``), the embedded
architecture (``arch``), and ``no_intensity: true`` trains with geometric augmentation only.
Prints one JSON line: held-out test ROC AUC, also averaged over flipped views (test-time flips:
``auc_tta2`` left-right, ``auc_tta4`` all four), training seconds and the load average. Not part
of ``make bench``: each run trains a model. Results: benchmarks/results/recipe_tuning.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def load_split(root: Path, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Decoded pixels and labels (0 glioma, 1 meningioma) of one split, as ingest decodes them."""
    from mri_assets.core.images import decode_image
    from mri_assets.core.labels import ClassSpec, resolve_label

    classes = ClassSpec()
    pixels, labels = [], []
    for path in sorted(p for p in (root / split).rglob("*") if p.is_file()):
        labels.append(
            classes.index(resolve_label(path.relative_to(root / split).as_posix(), classes))
        )
        pixels.append(decode_image(path.read_bytes()).pixels)
    return pixels, np.asarray(labels)


def main(argv: list[str]) -> None:
    import mri_assets.core.model as model_module
    import mri_assets.core.train as train_module
    from mri_assets.core.inference import predict_probabilities
    from mri_assets.core.labels import ClassSpec
    from mri_assets.core.metrics import roc_auc
    from mri_assets.core.recipe import Augmentation, TrainConfig

    root, spec = Path(argv[0]), json.loads(argv[1])
    if spec.get("arch"):
        model_module.EMBEDDED_ARCHITECTURE = {**model_module.EMBEDDED_ARCHITECTURE, **spec["arch"]}
    if spec.get("aug"):
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["aug"].items()}
        train_module.AUGMENTATION = replace(Augmentation(), **fields)
    if spec.get("no_intensity"):
        train_module._TrainingLoop._augmented = lambda self, x: train_module.augment_batch(
            x, self.generator
        )
    train_pixels, train_labels = load_split(root, "train")
    test_pixels, test_labels = load_split(root, "test")
    sha256s = [f"{i:064x}" for i in range(len(train_pixels))]
    by_sha = dict(zip(sha256s, train_pixels, strict=True))
    base_root = Path(os.environ.get("TUNING_BASE", "/tmp/recipe-tuning-base")) / str(os.getpid())
    base = model_module.load_base_model("embedded", ClassSpec(), base_root)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = train_module.fine_tune(
        base.model,
        base.preprocessing,
        sha256s,
        train_labels.tolist(),
        lambda shas: [by_sha[s] for s in shas],
        TrainConfig(**spec.get("config", {})),
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    seconds = time.perf_counter() - started
    views = [
        predict_probabilities(
            result.model,
            result.preprocessing,
            [np.ascontiguousarray(np.flip(x, axes)) for x in test_pixels] if axes else test_pixels,
        )[:, 1]
        for axes in ((), (1,), (0,), (0, 1))
    ]
    truth = test_labels == 1
    print(
        json.dumps(
            {
                "spec": spec,
                "auc": round(roc_auc(truth, views[0]), 4),
                "auc_tta2": round(roc_auc(truth, (views[0] + views[1]) / 2), 4),
                "auc_tta4": round(roc_auc(truth, np.mean(views, 0)), 4),
                "train_seconds": round(seconds, 1),
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.epochs),
                "load_average": round(load, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
