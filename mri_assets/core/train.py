"""Fine-tuning: seeded, deterministic on CPU, best epoch picked on a stratified validation slice.

Two strategies:

- ``full``: every weight trains, on randomly flipped, rotated, scaled, shifted images with
  random contrast, gain and shading (``Augmentation``).
- ``linear_probe``: the backbone is frozen; each image's pooled backbone embedding is computed
  once (and cached on disk by backbone weights, preprocessing and sha256), then only the
  classifier head trains on those embeddings, so an epoch never runs the backbone.

For a pretrained backbone, ``full`` can start with ``probe_epochs`` of linear probing and train the
backbone at ``backbone_lr_factor`` times the head's learning rate (``recommended_config``): a
random head's large early gradients otherwise distort the pretrained features (LP-FT, Kumar et
al. 2022, https://arxiv.org/abs/2202.10054).

Training runs on ``device`` (core/devices.py). On the CPU (the default) nothing differs from the
code before devices existed: same operations in the same order, so results stay bit-identical
for a given seed and thread count. On CUDA it trains in mixed precision with channels_last
weights, and torch's deterministic-algorithm mode is left off (it would force slow kernels), so
GPU runs are repeatable only to rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from mri_assets.core.allocator import keep_freed_memory_for_reuse
from mri_assets.core.catalog import dataset_version
from mri_assets.core.devices import Placement, fast_cuda_kernels, model_on, placement
from mri_assets.core.embedding_cache import EmbeddingCache
from mri_assets.core.inference import channels_last, embed
from mri_assets.core.metrics import roc_auc
from mri_assets.core.model import head_linear, preprocess_pixels, weights_fingerprint
from mri_assets.core.preprocessing import Preprocessing
from mri_assets.core.recipe import Augmentation, EpochMetrics, TrainConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# A GPU keeps the whole preprocessed training set resident when it takes at most this share of
# the free memory; otherwise batches stream from pinned host memory.
RESIDENT_SHARE = 0.4
WARMUP_SHARE = 0.2  # of all steps, spent raising the learning rate (one-cycle schedule)
PixelsLookup = Callable[[list[str]], list[np.ndarray]]


@dataclass
class TrainResult:
    """The trained model (best epoch's weights) and how it got there."""

    model: PreTrainedModel
    preprocessing: Preprocessing
    config: TrainConfig
    epochs: list[EpochMetrics]
    best_epoch: int
    duration_seconds: float
    n_train: int
    n_validation: int
    stopped_early: bool = False
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"  # fp32, or the mixed-precision autocast dtype (bf16, fp16)
    # Positions in the sha256s given to fine_tune: what calibration fits on (core/serving.py).
    train_indices: tuple[int, ...] = ()
    validation_indices: tuple[int, ...] = ()

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no weights) for the training record."""
        return {
            "config": self.config.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "epochs": [asdict(e) for e in self.epochs],
            "best_epoch": self.best_epoch,
            "duration_seconds": round(self.duration_seconds, 3),
            "n_train": self.n_train,
            "n_validation": self.n_validation,
            "stopped_early": self.stopped_early,
            "notes": self.notes,
            "device": self.device,
            "precision": self.precision,
        }


def fine_tune(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    sha256s: Sequence[str],
    labels: Sequence[int],
    pixels_lookup: PixelsLookup,
    config: TrainConfig | None = None,
    embedding_cache: EmbeddingCache | None = None,
    log: Callable[[str], None] = print,
    *,
    device: str | torch.device | None = None,
    mixed_precision: bool | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on the images ``sha256s`` with class indices ``labels``.

    ``pixels_lookup`` maps a list of sha256s to their (H, W, 3) uint8 arrays (e.g.
    ``PixelCache.get_many``); it is called once up front, never inside the epoch loop. A seeded,
    stratified ``validation_fraction`` of the images picks the best epoch (lowest validation
    loss, early stop after ``early_stopping_patience`` epochs without improvement); those
    weights are restored before returning. Each epoch's metrics go to ``log`` as it ends.

    ``device`` (see core/devices.py; None: the CPU) is where the network runs, in mixed
    precision on CUDA unless ``mixed_precision`` is False. The model is handed back on the
    device it came on.
    """

    config = config or TrainConfig()
    targets = _validated_labels(sha256s, labels)
    where = placement(device, mixed_precision)
    keep_freed_memory_for_reuse()
    preprocessing = preprocessing.with_size(config.image_size)
    started = time.perf_counter()
    train_idx, val_idx = stratified_split(targets, config.validation_fraction, config.seed)
    log(
        f"fine-tuning ({config.strategy}) on {len(train_idx)} images, validating on {len(val_idx)}, "
        f"{preprocessing.image_size}px, lr {config.lr:g}, up to {config.epochs} epochs"
        + ("" if where.reference else f", on {where.device} ({where.precision})")
    )
    notes: list[str] = []
    with (
        torch.random.fork_rng(devices=[]),
        _deterministic() if where.is_cpu else nullcontext(),
        _threads(config.num_threads),
        fast_cuda_kernels(where),
    ):
        torch.manual_seed(config.seed)
        job = _Job(
            model=model,
            preprocessing=preprocessing,
            sha256s=sha256s,
            targets=targets,
            pixels_lookup=pixels_lookup,
            config=config,
            split=(train_idx, val_idx),
            embedding_cache=embedding_cache,
            log=log,
            where=where,
        )
        if config.strategy == "full":
            epochs, best_epoch, stopped_early = _train_full(job, notes)
        else:
            epochs, best_epoch, stopped_early = _train_linear_probe(job)
    model.eval()
    duration = time.perf_counter() - started
    log(f"best epoch {best_epoch} of {len(epochs)}; training took {duration:.1f}s")
    if not len(val_idx):
        notes.append("no validation slice: the last epoch is kept")
    return TrainResult(
        model=model,
        preprocessing=preprocessing,
        config=config,
        epochs=epochs,
        best_epoch=best_epoch,
        duration_seconds=duration,
        n_train=len(train_idx),
        n_validation=len(val_idx),
        stopped_early=stopped_early,
        notes=notes,
        device=str(where.device),
        precision=where.precision,
        train_indices=tuple(int(i) for i in train_idx),
        validation_indices=tuple(int(i) for i in val_idx),
    )


@dataclass(frozen=True)
class _Job:
    """What one strategy trains on: the model, the data, the (train, validation) split, how."""

    model: PreTrainedModel
    preprocessing: Preprocessing
    sha256s: Sequence[str]
    targets: np.ndarray
    pixels_lookup: PixelsLookup
    config: TrainConfig
    split: tuple[np.ndarray, np.ndarray]
    embedding_cache: EmbeddingCache | None
    log: Callable[[str], None]
    where: Placement


def _train_full(job: _Job, notes: list[str]) -> tuple[list[EpochMetrics], int, bool]:
    """Every weight trains; images are preprocessed to tensors once, augmented per batch."""

    model, preprocessing, sha256s, config = job.model, job.preprocessing, job.sha256s, job.config
    log, where = job.log, job.where
    started = time.perf_counter()
    pixels = job.pixels_lookup(list(sha256s))
    probe_history: list[EpochMetrics] = []
    probe_best, probe_loss = 0, None
    if config.probe_epochs:
        # Warm start: fit the head on frozen features first, from the pixels already in hand.
        by_sha = dict(zip(sha256s, pixels, strict=True))
        probe_config = replace(
            config,
            strategy="linear_probe",
            epochs=config.probe_epochs,
            learning_rate=None,
            probe_epochs=0,
            backbone_lr_factor=1.0,
        )
        log(f"linear-probe warm start: {config.probe_epochs} epochs on frozen features")
        probe_history, probe_best, _ = _train_linear_probe(
            replace(job, pixels_lookup=lambda shas: [by_sha[s] for s in shas], config=probe_config)
        )
        probe_loss = probe_history[probe_best - 1].val_loss
        notes.append(
            f"epochs 1-{len(probe_history)}: linear-probe warm start (head only); "
            f"from epoch {len(probe_history) + 1}: the whole network"
        )
    inputs = preprocess_pixels(pixels, preprocessing, pin_memory=where.is_cuda)
    del pixels
    if where.is_cuda:
        inputs = _resident_or_pinned(inputs, where, log)
    else:
        # channels_last: a ResNet's convolutions train faster on CPU in that layout.
        # (MPS shares memory with the CPU: the whole set simply lives on the device.)
        inputs = where.to_device(inputs.contiguous(memory_format=torch.channels_last))
    log(f"{len(sha256s)} images preprocessed in {time.perf_counter() - started:.1f}s")

    def forward(x: torch.Tensor) -> torch.Tensor:  # augmentation returns contiguous batches
        return model(pixel_values=x.contiguous(memory_format=torch.channels_last)).logits

    loop = _TrainingLoop(
        model, forward, config, augment=config.augment, where=where, preprocessing=preprocessing
    )
    if config.backbone_lr_factor != 1.0:
        head = {id(p) for p in model.classifier.parameters()}
        loop.parameter_groups = [
            ([p for p in model.parameters() if id(p) not in head], config.backbone_lr_factor),
            ([p for p in model.parameters() if id(p) in head], 1.0),
        ]
    with model_on(model, where), channels_last(model):
        # After a warm start, the probed model is the one to beat: if no full epoch validates
        # better (a backbone whose batch-norm statistics do not fit the data can get worse
        # before it gets better), the warm start's weights are kept.
        history, best_epoch, stopped_early = loop.run(
            inputs, torch.from_numpy(job.targets), *job.split, log, best_loss=probe_loss
        )
    if not probe_history:
        return history, best_epoch, stopped_early
    # One epoch list for the whole run: the probe's epochs first, then the full ones.
    offset = len(probe_history)
    history = probe_history + [replace(e, epoch=e.epoch + offset) for e in history]
    return history, best_epoch + offset if best_epoch else probe_best, stopped_early


def _resident_or_pinned(
    inputs: torch.Tensor, where: Placement, log: Callable[[str], None]
) -> torch.Tensor:
    """The preprocessed set on the GPU when it fits comfortably (one copy, no per-batch
    transfers), else left in pinned host memory to stream batch by batch."""

    free, _ = torch.cuda.mem_get_info(where.device)
    if inputs.numel() * inputs.element_size() <= RESIDENT_SHARE * free:
        return where.to_device(inputs)
    log("training set larger than the GPU's spare memory: streaming batches from pinned memory")
    return inputs


def _train_linear_probe(job: _Job) -> tuple[list[EpochMetrics], int, bool]:
    """Backbone frozen; a linear head trains on standardised embeddings, then is folded back.

    Raw pooled features of an untrained or foreign backbone can have any scale; standardising
    them (train-slice mean/std) makes one learning rate work for all, and folding the scaling into
    the head's weights leaves the model's architecture unchanged. Only the embeddings are
    computed on ``where``: the head trains on the CPU, where a linear layer over cached features
    costs next to nothing.
    """

    model, split = job.model, job.split
    features = torch.from_numpy(
        cached_embeddings(
            model,
            job.preprocessing,
            job.sha256s,
            job.pixels_lookup,
            job.embedding_cache,
            job.log,
            where=job.where,
        )
    )
    train_features = features[torch.from_numpy(split[0])]
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head = head_linear(model)
    probe = torch.nn.Linear(head.in_features, head.out_features)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    loop = _TrainingLoop(probe, probe, job.config, augment=False)
    result = loop.run((features - mean) / std, torch.from_numpy(job.targets), *split, job.log)
    with torch.no_grad():  # W((x - mean) / std) + b == (W / std) x + (b - W (mean / std))
        weight, bias = probe.weight / std, probe.bias - probe.weight @ (mean / std)
        head.weight.copy_(weight.to(head.weight.device))
        head.bias.copy_(bias.to(head.bias.device))
    return result


def stratified_split(
    targets: np.ndarray, validation_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) index arrays holding ``validation_fraction`` of each class.

    Every class with at least two images gives at least one to validation (when the fraction is
    above zero), so validation AUC is defined whenever training has both classes twice.
    """
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        take = int(round(validation_fraction * members.size)) if validation_fraction > 0 else 0
        if validation_fraction > 0 and members.size >= 2:
            take = min(max(take, 1), members.size - 1)
        val.extend(members[:take].tolist())
    val_idx = np.sort(np.asarray(val, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(targets.size), val_idx)
    return train_idx, val_idx


def cached_embeddings(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    sha256s: Sequence[str],
    pixels_lookup: PixelsLookup,
    cache: EmbeddingCache | None,
    log: Callable[[str], None] = print,
    batch_size: int = 32,
    chunk_size: int = 512,
    *,
    where: Placement | None = None,
) -> np.ndarray:
    """Pooled backbone embeddings (N, D) of ``sha256s``; the backbone runs once per uncached image.

    Batches of 32: on CPU a ResNet-50 at 224 px runs faster per image than in batches of 64,
    whose activations no longer fit the caches (benchmarks/training.py). Pixels are looked
    up ``chunk_size`` images at a time, which bounds memory and the number of ``embed`` calls
    (each converts the weights to channels_last and back). ``where`` (default: the CPU in
    float32) is where the backbone runs; its precision is part of the cache key.
    """

    where = where or placement("cpu")
    unique = list(dict.fromkeys(sha256s))
    key = (
        EmbeddingCache.key(weights_fingerprint(model.base_model), preprocessing, where.precision)
        if cache
        else ""
    )
    missing = [sha for sha in unique if not (cache and cache.has(key, sha))]
    computed: dict[str, np.ndarray] = {}
    for start in range(0, len(missing), chunk_size):
        chunk = missing[start : start + chunk_size]
        vectors = embed(
            model,
            preprocessing,
            pixels_lookup(chunk),
            batch_size,
            device=where.device,
            mixed_precision=where.amp_dtype is not None,
        )
        for sha, vector in zip(chunk, vectors, strict=True):
            computed[sha] = vector
            if cache:
                cache.put(key, sha, vector)
    log(f"embeddings: {len(missing)} computed, {len(unique) - len(missing)} from cache")
    return np.stack([computed[sha] if sha in computed else cache.get(key, sha) for sha in sha256s])


def training_record(
    result: TrainResult,
    sha256s: Sequence[str],
    labels: Sequence[int],
    class_names: Sequence[str],
    base_model: str | dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The JSON training record of a run: data snapshot, base model, config, per-epoch metrics.

    ``labels`` are class indices into ``class_names``. The data snapshot's ``sha256`` is the
    train set's ``catalog.dataset_version`` (over sha256s and label names), so a record names
    the same set version as the ``train_images`` asset. ``extra`` (e.g. ``positive_class``,
    ``train_set_version``) is merged in as given; ModelStore.save_version adds the version id,
    creation time and code version.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    names = tuple(class_names[label] for label in labels)
    return {
        "base_model": base_model,
        "classes": list(class_names),
        "data_snapshot": {
            "sha256": dataset_version(tuple(sha256s), names),
            "n_images": len(sha256s),
            "n_per_class": dict(zip(class_names, counts.tolist(), strict=True)),
        },
        **result.summary(),
        **extra,
    }


def _validated_labels(sha256s: Sequence[str], labels: Sequence[int]) -> np.ndarray:
    targets = np.asarray(labels, dtype=np.int64)
    if len(sha256s) != targets.size:
        raise ValueError(f"{len(sha256s)} images but {targets.size} labels")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("labels must be class indices 0 or 1")
    if np.unique(targets).size < 2:
        raise ValueError("the training set must hold images of both classes")
    return targets


@contextmanager
def _deterministic() -> Iterator[None]:
    """Torch's deterministic algorithms for the block, then the caller's setting again."""

    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Use ``count`` torch threads for the block (None: leave as is), then restore."""

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _TrainingLoop:
    """Mini-batch AdamW with a one-cycle schedule over ``trainable``'s parameters.

    ``parameter_groups`` (set after construction) splits the parameters into groups, each with
    a factor on the learning rate; None trains them all at the configured rate.
    """

    def __init__(
        self,
        trainable: torch.nn.Module,
        forward: Callable[[torch.Tensor], torch.Tensor],
        config: TrainConfig,
        augment: bool,
        where: Placement | None = None,
        preprocessing: Preprocessing | None = None,
    ) -> None:

        self.trainable, self.forward, self.config, self.augment = (
            trainable,
            forward,
            config,
            augment,
        )
        self.where = where or placement("cpu")
        # Lets augmentation undo the normalisation for its contrast changes (images only).
        self.preprocessing = preprocessing
        self.parameter_groups: list[tuple[list[torch.nn.Parameter], float]] | None = None
        self.generator = torch.Generator().manual_seed(config.seed)
        for parameter in trainable.parameters():
            parameter.requires_grad_(True)

    def _optimizer(
        self, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:

        config = self.config
        if self.parameter_groups is None:
            optimizer = torch.optim.AdamW(
                [p for p in self.trainable.parameters() if p.requires_grad],
                lr=config.lr,
                weight_decay=config.weight_decay,
            )
            max_lr: float | list[float] = config.lr
        else:
            groups = [
                {"params": [p for p in params if p.requires_grad], "lr": config.lr * factor}
                for params, factor in self.parameter_groups
            ]
            optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
            max_lr = [group["lr"] for group in groups]
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=WARMUP_SHARE
        )
        return optimizer, schedule

    def run(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        log: Callable[[str], None],
        best_loss: float | None = None,
    ) -> tuple[list[EpochMetrics], int, bool]:
        """Train, keep the best validated epoch's weights; its number (1-based) comes back.

        ``best_loss``: the validation loss of the weights as they are now, to be beaten by an
        epoch; when none does, those weights are restored and the best epoch is 0.
        """

        config = self.config
        steps_per_epoch = max(1, -(-len(train_idx) // config.batch_size))
        optimizer, schedule = self._optimizer(config.epochs * steps_per_epoch)
        # Validation loss swings wildly while the learning rate climbs; patience starts after.
        warmup_epochs = math.ceil(WARMUP_SHARE * config.epochs)
        if not self.where.reference:
            targets = self.where.to_device(targets)
        train_rows = torch.from_numpy(train_idx).to(inputs.device)
        val_rows = torch.from_numpy(val_idx).to(inputs.device)
        train_x, val_x = inputs[train_rows], inputs[val_rows]
        train_y = targets[torch.from_numpy(train_idx).to(targets.device)]
        val_y = targets[torch.from_numpy(val_idx).to(targets.device)]
        train_epoch = self._train_epoch if self.where.reference else self._train_epoch_on_device
        history: list[EpochMetrics] = []
        best_epoch, best_state, stale = 0, None, 0
        if best_loss is None:
            best_loss = float("inf")
        else:
            best_state = {k: v.detach().clone() for k, v in self.trainable.state_dict().items()}
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            train_loss = train_epoch(train_x, train_y, optimizer, schedule)
            val_loss, val_auc, val_acc = self._validate(val_x, val_y)
            metrics = EpochMetrics(
                epoch, train_loss, val_loss, val_auc, val_acc, time.perf_counter() - started
            )
            history.append(metrics)
            log(_describe(metrics, config.epochs))
            if val_loss is None or val_loss < best_loss - 1e-6:
                best_loss = val_loss if val_loss is not None else best_loss
                best_epoch, stale = epoch, 0
                best_state = {k: v.detach().clone() for k, v in self.trainable.state_dict().items()}
            elif epoch > warmup_epochs:
                stale += 1
                if stale >= config.early_stopping_patience:
                    log(f"early stop: no validation-loss improvement for {stale} epochs")
                    break
        if best_state is not None:
            self.trainable.load_state_dict(best_state)
        return history, best_epoch, len(history) < config.epochs

    def _train_epoch(
        self,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
    ) -> float:
        """One epoch on the CPU, in float32 (the reference path: keep it bit-identical)."""

        self.trainable.train()
        order = torch.randperm(train_x.shape[0], generator=self.generator)
        total, seen = 0.0, 0
        for start in range(0, order.numel(), self.config.batch_size):
            batch = order[start : start + self.config.batch_size]
            if batch.numel() < 2:
                schedule.step()  # batch norm cannot train on one image; keep the schedule aligned
                continue
            x = self._augmented(train_x[batch]) if self.augment else train_x[batch]
            loss = F.cross_entropy(self.forward(x), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach().item() * batch.numel()
            seen += batch.numel()
        return total / max(seen, 1)

    def _train_epoch_on_device(
        self,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
    ) -> float:
        """One epoch on a GPU or MPS, or in mixed precision on the CPU: the same batches and
        augmentation draws as the reference path (the CPU generator draws them), autocast, and
        no host sync until the epoch ends (the running loss stays on the device)."""

        where = self.where
        scaler = where.grad_scaler()
        self.trainable.train()
        order = torch.randperm(train_x.shape[0], generator=self.generator)
        # float64 keeps the running sum exact enough; MPS has no float64.
        total_dtype = torch.float32 if where.device.type == "mps" else torch.float64
        total = torch.zeros((), dtype=total_dtype, device=where.device)
        seen = 0
        for start in range(0, order.numel(), self.config.batch_size):
            batch = order[start : start + self.config.batch_size]
            if batch.numel() < 2:
                schedule.step()
                continue
            x = train_x[batch.to(train_x.device)]
            x = where.to_device(where.pin(x))  # no-op when the set is resident on the device
            if self.augment:
                x = self._augmented(x)
            with where.autocast():
                logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), train_y[batch.to(train_y.device)])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            total += loss.detach().to(total_dtype) * batch.numel()
            seen += batch.numel()
        return float(total) / max(seen, 1)

    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        return augment_batch(x, self.generator, self.preprocessing)

    def _validate(
        self, val_x: torch.Tensor, val_y: torch.Tensor
    ) -> tuple[float | None, float | None, float | None]:

        if val_x.shape[0] == 0:
            return None, None, None
        where = self.where
        self.trainable.eval()
        with torch.inference_mode():
            if where.reference:
                logits = torch.cat(
                    [self.forward(val_x[i : i + 128]) for i in range(0, val_x.shape[0], 128)]
                )
            else:
                parts = []
                for i in range(0, val_x.shape[0], 128):
                    with where.autocast():
                        part = self.forward(where.to_device(where.pin(val_x[i : i + 128])))
                    parts.append(part.float())
                logits = torch.cat(parts).cpu()
                val_y = val_y.cpu()
        loss = float(F.cross_entropy(logits, val_y))
        accuracy = float((logits.argmax(dim=1) == val_y).float().mean())
        truth = val_y.numpy() == 1
        auc = (
            roc_auc(truth, torch.softmax(logits, 1)[:, 1].numpy())
            if 0 < truth.sum() < truth.size
            else None
        )
        return loss, auc, accuracy


# augment_batch's default (benchmarks/recipe_tuning.py swaps it to try other ranges).
AUGMENTATION = Augmentation()


def augment_batch(
    batch: torch.Tensor,
    generator: torch.Generator,
    preprocessing: Preprocessing | None = None,
    augmentation: Augmentation | None = None,
) -> torch.Tensor:
    """Random flips, rotation, scale and shift per image; with ``preprocessing`` (to undo the
    normalisation) also a random contrast gamma, gain and shading ramp. Seeded by ``generator``.

    Out-of-image pixels repeat the border, which in a scan is background, not a grey fill. The
    draws come from the CPU ``generator`` whatever device ``batch`` is on, so a GPU run sees the
    same augmentations as a CPU run with the same seed.
    """

    a = augmentation or AUGMENTATION
    n = batch.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    def flips(probability: float) -> torch.Tensor:
        return torch.where(torch.rand(n, generator=generator) < probability, -1.0, 1.0)

    hflip, vflip = flips(a.hflip), flips(a.vflip)
    angle = uniform(-a.max_rotation, a.max_rotation) * math.pi / 180.0
    scale = uniform(*a.scale)
    shift_x, shift_y = uniform(-a.max_shift, a.max_shift), uniform(-a.max_shift, a.max_shift)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * hflip, -sin * vflip, shift_x], 1),
            torch.stack([sin * hflip, cos * vflip, shift_y], 1),
        ],
        1,
    ).to(batch.device, batch.dtype)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    moved = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if preprocessing is None:
        return moved
    gamma = torch.exp(uniform(math.log(a.gamma[0]), math.log(a.gamma[1])))
    gain = uniform(*a.gain)
    ramp = torch.randn((n, 2), generator=generator) * a.bias
    shape = (n, 1, 1, 1)
    mean = torch.tensor(preprocessing.mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    # A log-gain plane a*x + b*y over the image's -1..1 coordinates: coil shading.
    axis = torch.linspace(-1.0, 1.0, batch.shape[-1], dtype=batch.dtype, device=batch.device)
    ramp = ramp.to(batch.device, batch.dtype)
    shading = torch.exp(
        ramp[:, 0].view(n, 1, 1, 1) * axis.view(1, 1, 1, -1)
        + ramp[:, 1].view(n, 1, 1, 1) * axis.view(1, 1, -1, 1)
    )
    intensity = (moved * std + mean).clamp_(0.0, 1.0)
    intensity = intensity.pow(gamma.to(batch.device, batch.dtype).view(shape))
    intensity = intensity * (gain.to(batch.device, batch.dtype).view(shape) * shading)
    return ((intensity.clamp_(0.0, 1.0) - mean) / std).contiguous()


def _describe(metrics: EpochMetrics, total_epochs: int) -> str:
    text = f"epoch {metrics.epoch}/{total_epochs}: train loss {metrics.train_loss:.4f}"
    if metrics.val_loss is not None:
        text += f", val loss {metrics.val_loss:.4f}, val accuracy {metrics.val_accuracy:.3f}"
        text += (
            f", val AUC {metrics.val_auc:.3f}" if metrics.val_auc is not None else ", val AUC n/a"
        )
    return f"{text} ({metrics.seconds:.1f}s)"
