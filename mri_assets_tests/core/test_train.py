"""Fine-tuning on a toy task: learns, is deterministic, probes linearly, keeps the best epoch."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mri_assets.core.catalog import dataset_version
from mri_assets.core.embedding_cache import EmbeddingCache
from mri_assets.core.inference import predict_probabilities
from mri_assets.core.labels import ClassSpec
from mri_assets.core.metrics import classification_metrics
from mri_assets.core.model import BaseModel, load_base_model, weights_fingerprint
from mri_assets.core.recipe import TrainConfig, recommended_config
from mri_assets.core.train import fine_tune, stratified_split, training_record

CLASSES = ClassSpec()
SIZE = 32  # tiny images keep the suite fast; the embedded ResNet takes any size


def toy_images(n: int, seed: int) -> tuple[list[str], list[int], list[np.ndarray]]:
    """Dark noise with a bright square: top-left quadrant for class 0, bottom-right for class 1."""
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n)]
    images = rng.integers(0, 60, (n, SIZE, SIZE, 3)).astype(np.uint8)
    half = SIZE // 2
    for image, label in zip(images, labels, strict=True):
        row, col = rng.integers(2, half - 8, 2) + half * label
        image[row : row + 8, col : col + 8] = 220
    return [f"{seed:02d}{i:062d}" for i in range(n)], labels, list(images)


class Lookup:
    """A pixels_lookup that counts how often each sha256 was asked for."""

    def __init__(self, sha256s: list[str], pixels: list[np.ndarray]) -> None:
        self.pixels = dict(zip(sha256s, pixels, strict=True))
        self.requests: list[str] = []

    def __call__(self, sha256s: list[str]) -> list[np.ndarray]:
        self.requests.extend(sha256s)
        return [self.pixels[sha] for sha in sha256s]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    return load_base_model("embedded", CLASSES, tmp_path_factory.mktemp("store") / "base")


@pytest.fixture(scope="module")
def train_set() -> tuple[list[str], list[int], list[np.ndarray]]:
    return toy_images(80, seed=0)


@pytest.fixture(scope="module")
def test_set() -> tuple[list[str], list[int], list[np.ndarray]]:
    return toy_images(60, seed=1)


def run(
    base: BaseModel,
    data: tuple[list[str], list[int], list[np.ndarray]],
    config: TrainConfig,
    cache: EmbeddingCache | None = None,
    log: Callable[[str], None] = lambda line: None,
    lookup: Lookup | None = None,
):
    sha256s, labels, pixels = data
    return fine_tune(
        copy.deepcopy(base.model),
        base.preprocessing,
        sha256s,
        labels,
        lookup or Lookup(sha256s, pixels),
        config,
        embedding_cache=cache,
        log=log,
    )


def held_out_auc(result, data: tuple[list[str], list[int], list[np.ndarray]]) -> float:
    _, labels, pixels = data
    probs = predict_probabilities(result.model, result.preprocessing, pixels)
    return classification_metrics(labels, probs[:, 1], 1, CLASSES.names)["roc_auc"]


def test_full_fine_tune_learns_the_toy_task_and_logs_each_epoch(base, train_set, test_set) -> None:
    lines: list[str] = []

    result = run(base, train_set, TrainConfig(epochs=5, image_size=SIZE), log=lines.append)

    assert held_out_auc(result, test_set) > 0.95
    assert result.preprocessing.image_size == SIZE
    assert len(result.epochs) == 5
    assert [line.split(":")[0] for line in lines if line.startswith("epoch")] == [
        f"epoch {i}/5" for i in range(1, 6)
    ]
    assert all(e.val_auc is not None and e.val_loss is not None for e in result.epochs)
    assert result.n_train + result.n_validation == len(train_set[0])
    # Trained in channels_last, handed back in the usual layout (what save_pretrained expects).
    assert all(p.is_contiguous() for p in result.model.parameters())


def test_same_seed_same_model_other_seed_other_model(base, train_set) -> None:
    config = TrainConfig(epochs=2, image_size=SIZE, seed=7)

    first, second = run(base, train_set, config), run(base, train_set, config)
    other = run(base, train_set, TrainConfig(epochs=2, image_size=SIZE, seed=8))

    assert first.epochs[-1].train_loss == second.epochs[-1].train_loss
    assert [e.val_loss for e in first.epochs] == [e.val_loss for e in second.epochs]
    assert weights_fingerprint(first.model) == weights_fingerprint(second.model)
    assert weights_fingerprint(other.model) != weights_fingerprint(first.model)


def test_pixels_are_fetched_once_up_front(base, train_set) -> None:
    lookup = Lookup(train_set[0], train_set[2])

    run(base, train_set, TrainConfig(epochs=2, image_size=SIZE), lookup=lookup)

    assert sorted(lookup.requests) == sorted(train_set[0])


def test_linear_probe_runs_the_backbone_once_per_image_and_trains_only_the_head(
    base, train_set, test_set, tmp_path: Path
) -> None:
    model = copy.deepcopy(base.model)
    backbone_before = weights_fingerprint(model.resnet)
    head_before = weights_fingerprint(model.classifier)
    images_through_backbone: list[int] = []
    model.resnet.register_forward_hook(
        lambda _module, _args, output: images_through_backbone.append(output.pooler_output.shape[0])
    )
    sha256s, labels, pixels = train_set
    lookup = Lookup(sha256s, pixels)
    cache = EmbeddingCache(tmp_path / "embeddings")
    config = TrainConfig(strategy="linear_probe", epochs=6, image_size=SIZE)

    result = fine_tune(
        model, base.preprocessing, sha256s, labels, lookup, config, cache, log=lambda _: None
    )

    assert sum(images_through_backbone) == len(sha256s)  # not once per epoch
    assert sorted(lookup.requests) == sorted(sha256s)
    assert len(list((tmp_path / "embeddings").rglob("*.npy"))) == len(sha256s)
    assert weights_fingerprint(model.resnet) == backbone_before
    assert weights_fingerprint(model.classifier) != head_before
    assert held_out_auc(result, test_set) > 0.9


def test_linear_probe_reuses_cached_embeddings(base, train_set, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "embeddings")
    config = TrainConfig(strategy="linear_probe", epochs=3, image_size=SIZE)
    first = run(base, train_set, config, cache)
    lookup = Lookup(train_set[0], train_set[2])

    second = run(base, train_set, config, cache, lookup=lookup)

    assert lookup.requests == []  # every embedding came from disk
    assert weights_fingerprint(second.model) == weights_fingerprint(first.model)


def test_embedding_cache_key_changes_with_backbone_and_size(base) -> None:
    fingerprint = weights_fingerprint(base.model.resnet)

    keys = {
        EmbeddingCache.key(fingerprint, base.preprocessing),
        EmbeddingCache.key(fingerprint, base.preprocessing.with_size(64)),
        EmbeddingCache.key("0" * 64, base.preprocessing),
    }

    assert len(keys) == 3


def test_validation_picks_the_best_epoch_and_restores_its_weights(base) -> None:
    # Random labels: nothing generalises, so validation loss wanders and the best epoch is
    # (deterministically) not the last one.
    sha256s, _, pixels = toy_images(80, seed=2)
    labels = np.random.default_rng(0).permutation([0, 1] * 40).tolist()
    config = TrainConfig(
        strategy="linear_probe",
        epochs=12,
        learning_rate=0.05,
        image_size=SIZE,
        early_stopping_patience=12,
    )

    result = run(base, (sha256s, labels, pixels), config)

    val_losses = [e.val_loss for e in result.epochs]
    assert result.best_epoch == int(np.argmin(val_losses)) + 1
    assert result.best_epoch < len(result.epochs)
    _, val_idx = stratified_split(np.asarray(labels), config.validation_fraction, config.seed)
    probs = predict_probabilities(result.model, result.preprocessing, [pixels[i] for i in val_idx])
    restored_loss = F.nll_loss(torch.log(torch.from_numpy(probs)), torch.tensor(labels)[val_idx])
    assert float(restored_loss) == pytest.approx(min(val_losses), abs=1e-4)
    assert float(restored_loss) != pytest.approx(val_losses[-1], abs=1e-4)


def test_early_stopping_waits_patience_epochs(base) -> None:
    sha256s, _, pixels = toy_images(80, seed=2)
    labels = np.random.default_rng(0).permutation([0, 1] * 40).tolist()
    config = TrainConfig(
        strategy="linear_probe",
        epochs=40,
        learning_rate=0.05,
        image_size=SIZE,
        early_stopping_patience=2,
    )

    result = run(base, (sha256s, labels, pixels), config)

    assert result.stopped_early
    # Patience counts only after the one-cycle warm-up (ceil(0.2 * 40) = 8 epochs).
    assert len(result.epochs) == max(result.best_epoch, 8) + 2


def test_stratified_split_is_seeded_disjoint_and_keeps_class_shares() -> None:
    targets = np.array([0] * 60 + [1] * 40)

    train, val = stratified_split(targets, 0.15, seed=3)

    assert np.array_equal(train, stratified_split(targets, 0.15, seed=3)[0])
    assert not np.array_equal(val, stratified_split(targets, 0.15, seed=4)[1])
    assert set(train).isdisjoint(val) and len(train) + len(val) == 100
    assert np.bincount(targets[val]).tolist() == [9, 6]


def test_tiny_classes_still_get_a_validation_image() -> None:
    _, val = stratified_split(np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1]), 0.15, seed=0)

    assert sorted(np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])[val].tolist()) == [0, 1]


def test_single_class_training_set_is_refused(base) -> None:
    sha256s, _, pixels = toy_images(6, seed=0)

    with pytest.raises(ValueError, match="both classes"):
        run(base, (sha256s, [1] * 6, pixels), TrainConfig(epochs=1, image_size=SIZE))


def test_config_rejects_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="lora")


def test_training_record_and_snapshot_hash(base, train_set) -> None:
    sha256s, labels, _ = train_set
    result = run(base, train_set, TrainConfig(strategy="linear_probe", epochs=1, image_size=SIZE))

    record = training_record(
        result, sha256s, labels, CLASSES.names, "embedded", positive_class="meningioma"
    )

    names = tuple(CLASSES.names[y] for y in labels)
    swapped = tuple(CLASSES.names[1 - y] for y in labels)
    # The snapshot is the train set's dataset_version: order-free, and it changes with a label.
    assert record["data_snapshot"]["sha256"] == dataset_version(tuple(sha256s[::-1]), names[::-1])
    assert record["data_snapshot"]["sha256"] != dataset_version(tuple(sha256s), swapped)
    assert record["data_snapshot"]["n_per_class"] == {"glioma": 40, "meningioma": 40}
    assert record["config"]["strategy"] == "linear_probe"
    assert record["config"]["learning_rate"] == 0.01
    assert len(record["epochs"]) == 1 and record["positive_class"] == "meningioma"


def test_cpu_device_is_exactly_the_default_path(base, train_set, monkeypatch) -> None:
    # The CPU path must not change with devices: the default, an explicit "cpu" and "auto" on a
    # machine without an accelerator give the same weights and losses, bit for bit.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("mri_assets.core.devices._mps_available", lambda: False)
    sha256s, labels, pixels = train_set
    results = []
    for strategy in ("full", "linear_probe"):
        config = TrainConfig(strategy=strategy, epochs=2, image_size=SIZE, num_threads=1)
        for device in ({}, {"device": "cpu"}, {"device": "auto"}):
            result = fine_tune(
                copy.deepcopy(base.model),
                base.preprocessing,
                sha256s,
                labels,
                Lookup(sha256s, pixels),
                config,
                log=lambda _: None,
                **device,
            )
            probs = predict_probabilities(result.model, result.preprocessing, pixels, **device)
            results.append((strategy, result, probs))
    for strategy in ("full", "linear_probe"):
        runs = [(r, p) for s, r, p in results if s == strategy]
        reference, reference_probs = runs[0]
        assert reference.summary()["device"] == "cpu"
        assert reference.summary()["precision"] == "fp32"
        for result, probs in runs[1:]:
            assert weights_fingerprint(result.model) == weights_fingerprint(reference.model)
            assert [e.train_loss for e in result.epochs] == [e.train_loss for e in reference.epochs]
            assert [e.val_loss for e in result.epochs] == [e.val_loss for e in reference.epochs]
            assert np.array_equal(probs, reference_probs)


def test_unavailable_device_fails_before_any_training(base, train_set) -> None:
    lookup = Lookup(train_set[0], train_set[2])

    with pytest.raises(ValueError, match="MRI_DEVICE"):
        fine_tune(
            copy.deepcopy(base.model),
            base.preprocessing,
            train_set[0],
            train_set[1],
            lookup,
            TrainConfig(epochs=1, image_size=SIZE),
            log=lambda _: None,
            device="tpu",
        )
    assert lookup.requests == []


def test_warm_start_probes_the_head_then_trains_the_backbone_more_slowly(
    base, train_set, test_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    optimizers: list[list[tuple[float, int]]] = []  # per AdamW: (lr, parameter count) per group

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs) -> None:
            super().__init__(params, **kwargs)
            optimizers.append([(g["lr"], len(g["params"])) for g in self.param_groups])

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    lines: list[str] = []
    cache = EmbeddingCache(tmp_path / "embeddings")
    lookup = Lookup(train_set[0], train_set[2])
    config = TrainConfig(epochs=3, image_size=SIZE, probe_epochs=3, backbone_lr_factor=0.05)

    result = run(base, train_set, config, cache, log=lines.append, lookup=lookup)

    head_size = len(list(base.model.classifier.parameters()))
    backbone_size = len(list(base.model.parameters())) - head_size
    probe, full = optimizers
    assert probe == [(0.01, 2)]  # the probe: a Linear layer at the linear_probe default rate
    assert full == [(pytest.approx(0.05 * config.lr), backbone_size), (config.lr, head_size)]
    assert any(line.startswith("linear-probe warm start") for line in lines)
    assert any("epochs 1-3: linear-probe warm start" in note for note in result.notes)
    assert [e.epoch for e in result.epochs] == [1, 2, 3, 4, 5, 6]  # probe, then full
    val_losses = [e.val_loss for e in result.epochs]
    assert result.best_epoch == int(np.argmin(val_losses)) + 1  # chosen over both phases
    assert sorted(lookup.requests) == sorted(train_set[0])  # still one lookup per image
    assert len(list((tmp_path / "embeddings").rglob("*.npy"))) == len(train_set[0])
    # At least what the probe alone reaches on this random backbone (see the linear_probe test).
    assert held_out_auc(result, test_set) > 0.9


def test_a_warm_start_no_full_epoch_beats_is_kept(base, train_set, test_set) -> None:
    # An absurd learning rate wrecks every full epoch: the probed weights must come back.
    sha256s, labels, pixels = train_set
    config = TrainConfig(epochs=2, image_size=SIZE, probe_epochs=3, learning_rate=50.0)

    result = run(base, train_set, config)

    assert result.best_epoch <= 3 and len(result.epochs) == 5
    _, val_idx = stratified_split(np.asarray(labels), config.validation_fraction, config.seed)
    probs = predict_probabilities(result.model, result.preprocessing, [pixels[i] for i in val_idx])
    restored = F.nll_loss(torch.log(torch.from_numpy(probs)), torch.tensor(labels)[val_idx])
    assert float(restored) == pytest.approx(result.epochs[result.best_epoch - 1].val_loss, abs=1e-4)
    assert held_out_auc(result, test_set) > 0.9


def test_recommended_config_fits_the_base() -> None:
    assert recommended_config(pretrained=False) == TrainConfig()
    pretrained = recommended_config(pretrained=True)
    assert pretrained.strategy == "full" and pretrained.probe_epochs > 0
    assert pretrained.backbone_lr_factor < 1 and pretrained.lr < TrainConfig().lr
    assert recommended_config(pretrained=True, epochs=1, seed=3).epochs == 1
    assert TrainConfig().probe_epochs == 0 and TrainConfig().backbone_lr_factor == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"strategy": "linear_probe", "probe_epochs": 2},
        {"probe_epochs": -1},
        {"backbone_lr_factor": 0.0},
        {"backbone_lr_factor": 1.5},
    ],
)
def test_config_rejects_bad_warm_start_settings(kwargs) -> None:
    with pytest.raises(ValueError, match="probe_epochs|backbone_lr_factor"):
        TrainConfig(**kwargs)


def test_embedding_cache_key_keeps_float32_and_separates_mixed_precision(base) -> None:
    fingerprint = weights_fingerprint(base.model.resnet)

    fp32 = EmbeddingCache.key(fingerprint, base.preprocessing)

    assert EmbeddingCache.key(fingerprint, base.preprocessing, "fp32") == fp32
    assert EmbeddingCache.key(fingerprint, base.preprocessing, "bf16") == f"{fp32}-bf16"


def test_mixed_precision_path_trains_and_predicts(base, train_set, test_set) -> None:
    # bfloat16 autocast on the CPU runs the accelerator code path (autocast, device-side loss
    # sums, float32 logits) on this GPU-less machine; it must learn as well and say what it was.
    config = TrainConfig(epochs=5, image_size=SIZE, num_threads=1)
    reference = run(base, train_set, config)
    sha256s, labels, pixels = train_set

    mixed = fine_tune(
        copy.deepcopy(base.model),
        base.preprocessing,
        sha256s,
        labels,
        Lookup(sha256s, pixels),
        config,
        log=lambda _: None,
        device="cpu",
        mixed_precision=True,
    )
    probs = predict_probabilities(
        mixed.model, mixed.preprocessing, test_set[2], device="cpu", mixed_precision=True
    )
    float32_probs = predict_probabilities(mixed.model, mixed.preprocessing, test_set[2])

    assert mixed.summary()["precision"] == "bf16" and mixed.summary()["device"] == "cpu"
    assert probs.dtype == np.float32 and probs.shape == (60, 2)
    assert weights_fingerprint(mixed.model) != weights_fingerprint(reference.model)
    assert held_out_auc(mixed, test_set) > 0.95
    assert np.abs(probs - float32_probs).max() < 0.05  # bfloat16 rounding, not another answer
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in mixed.model.parameters())


# --------------------------------------------------------------------------- augmentation


def _augmentation_batch() -> torch.Tensor:
    from mri_assets.core.model import preprocess_pixels
    from mri_assets.core.preprocessing import Preprocessing

    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(64)]
    for image in pixels:
        image[:6, :6] = 255  # a bright top-left corner, to see where flips take it
    return preprocess_pixels(pixels, Preprocessing(24))


def test_augmentation_is_seeded_and_flips_both_ways() -> None:
    from mri_assets.core.preprocessing import Preprocessing
    from mri_assets.core.recipe import Augmentation
    from mri_assets.core.train import augment_batch

    batch = _augmentation_batch()
    only_flips = Augmentation(max_rotation=0.0, scale=(1.0, 1.0), max_shift=0.0)
    first = augment_batch(batch, torch.Generator().manual_seed(3), None, only_flips)
    again = augment_batch(batch, torch.Generator().manual_seed(3), None, only_flips)
    other = augment_batch(batch, torch.Generator().manual_seed(4), None, only_flips)
    assert torch.equal(first, again) and not torch.equal(first, other)
    corners = {
        (
            bool(image[0, :6, :6].mean() > image[0, :6, -6:].mean()),
            bool(image[0, :6, :6].mean() > image[0, -6:, :6].mean()),
        )
        for image in first
    }
    assert len(corners) == 4  # unflipped, left-right, front-back and both, in 64 draws
    # With the normalisation known, contrast, gain and shading change too, within 0..1.
    preprocessing = Preprocessing(24)
    varied = augment_batch(batch, torch.Generator().manual_seed(3), preprocessing, only_flips)
    assert not torch.allclose(varied, first)
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    restored = varied * std + mean
    assert restored.min() >= -1e-5 and restored.max() <= 1 + 1e-5
