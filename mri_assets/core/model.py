"""Model factory: the base classifier named by MRI_BASE_MODEL, the tensors it eats, and model
folders written and read with save_pretrained / from_pretrained.

This module imports torch and transformers: the Dagster definitions import it only inside the
asset bodies that need a model; what they need at load time is in core/preprocessing.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
)
from transformers.utils import logging as hf_logging

from mri_assets.core.labels import ClassSpec
from mri_assets.core.preprocessing import (
    PREPROCESSOR_CONFIG,
    Preprocessing,
    preprocessing_from_config,
    read_preprocessing,
)
from mri_assets.core.safe_weights import refuse_pickle_only

EMBEDDED = "embedded"

# The embedded model: a small ResNet trained from scratch, sized so that a full fine-tune on a
# few hundred images takes well under three minutes on two CPU cores. 96 px, tuned on the hard
# phantoms (benchmarks/generalisation.py): it generalised better than 128 or 160 px within the
# same training time, since more epochs fit in it.
EMBEDDED_SEED = 0
EMBEDDED_IMAGE_SIZE = 96
EMBEDDED_ARCHITECTURE: dict[str, Any] = {
    "num_channels": 3,
    "embedding_size": 32,
    "hidden_sizes": [32, 64, 128, 256],
    "depths": [1, 1, 1, 1],
    "layer_type": "basic",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
}

# The shape of microsoft/resnet-50 (the checkpoint the original pipeline fine-tunes), for tests
# and the GPU check, which build it with random weights instead of downloading it.
RESNET50_ARCHITECTURE: dict[str, Any] = {
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "depths": [3, 4, 6, 3],
    "layer_type": "bottleneck",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
}


@dataclass
class BaseModel:
    """A classifier ready to fine-tune, with its preprocessing and where it came from."""

    model: PreTrainedModel
    preprocessing: Preprocessing
    spec: str  # what MRI_BASE_MODEL said
    source: str  # the folder or hub id the weights were read from
    # True when the two-class head was made here (zero weights: every image scores 0.5), False
    # when the checkpoint's own two-class head was kept (e.g. a model fine-tuned earlier).
    fresh_head: bool = True

    @property
    def pretrained(self) -> bool:
        """True for a checkpoint (hub id or folder), False for the embedded model, whose
        weights are random: the training recipe differs (recipe.recommended_config)."""
        return self.spec.strip() not in ("", EMBEDDED)


def label_maps(classes: ClassSpec) -> tuple[dict[int, str], dict[str, int]]:
    """``id2label`` and ``label2id`` in ClassSpec order (logit index = position in names)."""
    id2label = dict(enumerate(classes.names))
    return id2label, {name: index for index, name in id2label.items()}


def load_base_model(spec: str, classes: ClassSpec, base_root: str | Path) -> BaseModel:
    """The base classifier named by ``spec`` (MRI_BASE_MODEL), with a fresh two-class head.

    ``spec`` is ``"embedded"`` (a small ResNet created once under ``base_root`` and read from
    disk ever after), a local folder written by ``save_pretrained``, or a hub id. Mean, std and
    size come from the model's ``preprocessor_config.json`` (a local folder without one gets
    ImageNet statistics at 224 px). Only safetensors weights are read; a folder holding only
    pickle weights raises UnsafeWeightsError. Remote code is never run. A hub id is read through
    the hub cache, so ``HF_HUB_OFFLINE=1`` works once the model was downloaded; a missing one
    raises OSError naming MRI_BASE_MODEL. A newly initialised head starts at zero.
    """
    spec = (spec or EMBEDDED).strip()
    if spec == EMBEDDED:
        folder = ensure_embedded_base(base_root)
        model, _ = _from_pretrained(folder, classes)
        # The embedded model's head is zero by construction (nothing was trained yet).
        return BaseModel(model, read_preprocessing(folder), spec, str(folder), fresh_head=True)
    folder = Path(spec)
    if folder.is_dir():
        refuse_pickle_only(folder)
        if not (folder / PREPROCESSOR_CONFIG).exists():
            # save_pretrained of a bare model writes no processor: assume ImageNet at 224 px.
            model, fresh = _from_pretrained(folder, classes)
            return BaseModel(model, Preprocessing(224), spec, spec, fresh_head=fresh)
    model, fresh = _from_pretrained(spec, classes)
    return BaseModel(model, _hub_preprocessing(spec), spec, spec, fresh_head=fresh)


def embedded_folder(base_root: str | Path) -> Path:
    """Folder of the embedded base model; its name changes whenever its architecture does."""
    recipe = json.dumps(
        {
            "architecture": EMBEDDED_ARCHITECTURE,
            "seed": EMBEDDED_SEED,
            "size": EMBEDDED_IMAGE_SIZE,
            "head": "zeros",
        },
        sort_keys=True,
    )
    return Path(base_root) / f"embedded-resnet-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def ensure_embedded_base(base_root: str | Path) -> Path:
    """Create the embedded base model on disk if it is not there yet; return its folder.

    Created in a temporary sibling folder and renamed into place, so a reader never sees half a
    model and two processes racing both end up with the same (seeded) weights.
    """
    folder = embedded_folder(base_root)
    if (folder / "model.safetensors").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-embedded-", dir=folder.parent))
    try:
        save_model(_new_embedded_model(), Preprocessing(EMBEDDED_IMAGE_SIZE), staging)
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "model.safetensors").exists():
                raise  # not a lost race: a real failure
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def random_resnet(
    architecture: dict[str, Any], num_labels: int = 2, seed: int = 0
) -> PreTrainedModel:
    """A ResNetForImageClassification of the given architecture with seeded random weights
    (e.g. RESNET50_ARCHITECTURE: a ResNet-50-shaped model without any download)."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNetForImageClassification(ResNetConfig(**architecture, num_labels=num_labels))


def _new_embedded_model() -> PreTrainedModel:

    config = ResNetConfig(**EMBEDDED_ARCHITECTURE, num_labels=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EMBEDDED_SEED)
        model = ResNetForImageClassification(config)
    zero_head(model)
    return model


def zero_head(model: PreTrainedModel) -> None:
    """Zero the classifier head: an untrained model then says 0.5 for every image (AUC 0.5)
    instead of an arbitrary random ranking, and training still starts (the gradient on the head's
    weights is not zero)."""

    with torch.no_grad():
        for parameter in head_linear(model).parameters():
            parameter.zero_()


def head_linear(model: PreTrainedModel) -> torch.nn.Linear:
    """The one Linear layer of ``model.classifier`` (ResNet: Flatten + Linear, ConvNeXt: Linear)."""

    head = getattr(model, "classifier", None)
    linears = (
        [m for m in head.modules() if isinstance(m, torch.nn.Linear)] if head is not None else []
    )
    if len(linears) != 1:
        raise ValueError(
            f"{type(model).__name__} has no classifier head made of a single Linear layer; "
            "only such heads (ResNet, ConvNeXt, ...) are supported"
        )
    return linears[0]


def _from_pretrained(source: str | Path, classes: ClassSpec) -> tuple[PreTrainedModel, bool]:
    """The checkpoint as a two-class classifier, and whether its head was made here (fresh)."""

    id2label, label2id = label_maps(classes)
    # A mismatched head (e.g. 1000 ImageNet classes) is re-initialised, then zeroed below.
    # float32 explicitly: transformers 5 loads a checkpoint in its stored dtype by default.
    dtype = {_dtype_keyword(): torch.float32}
    try:
        with quiet_transformers():
            model, loading = AutoModelForImageClassification.from_pretrained(
                str(source),
                num_labels=len(classes.names),
                id2label=id2label,
                label2id=label2id,
                ignore_mismatched_sizes=True,
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
                **dtype,
            )
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        raise OSError(
            f"MRI_BASE_MODEL={source}: no such save_pretrained folder, and the hub model could "
            + (
                "not be found in the local hub cache (HF_HUB_OFFLINE is set: download it once "
                "with network access, or point MRI_BASE_MODEL at a save_pretrained folder)"
                if offline
                else "not be loaded (check the id, network access and HF_TOKEN for gated models)"
            )
            + f"; only safetensors weights are read. Cause: {error}"
        ) from error
    fresh = _head_was_reinitialised(model, loading)
    if fresh:
        # e.g. a 1000-class ImageNet head replaced by a random two-class one. A head that is not a
        # single Linear layer keeps transformers' own init: still trainable, not a 0.5 baseline.
        with suppress(ValueError):
            zero_head(model)
    return model.eval(), fresh


def _dtype_keyword() -> str:
    """``dtype`` since transformers 4.56, ``torch_dtype`` before (a config attribute there)."""
    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def _head_was_reinitialised(model: PreTrainedModel, loading: dict[str, Any]) -> bool:
    """True when the checkpoint did not supply the head's weights (missing, or of another shape,
    e.g. 1000 classes). The head is ``classifier`` in most image models; for one named otherwise,
    any weight the checkpoint did not supply counts (the head is what such checkpoints lack)."""
    fresh = set(loading.get("missing_keys") or ())
    fresh |= {
        item[0] if isinstance(item, tuple) else item
        for item in loading.get("mismatched_keys") or ()
    }
    if getattr(model, "classifier", None) is None:
        return bool(fresh)
    head = {f"classifier.{name}" for name, _ in model.classifier.named_parameters()}
    return bool(head & fresh)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-file progress bars (noise in Dagster logs), then restore them."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _hub_preprocessing(spec: str) -> Preprocessing:
    """Mean, std and size from the model's own image processor (hub id or local folder)."""
    processor = AutoImageProcessor.from_pretrained(spec, trust_remote_code=False)
    return preprocessing_from_config(
        {
            "size": dict(processor.size) if processor.size is not None else {},
            "image_mean": getattr(processor, "image_mean", None),
            "image_std": getattr(processor, "image_std", None),
        }
    )


def save_preprocessing(preprocessing: Preprocessing, folder: str | Path) -> None:
    """Write ``preprocessor_config.json`` that AutoImageProcessor.from_pretrained can read."""
    # transformers 5: the PIL-backed class (the plain name wants torchvision there);
    # transformers 4: the plain class is the PIL-backed one.
    processor_class = (
        getattr(transformers, "ConvNextImageProcessorPil", None)
        or transformers.ConvNextImageProcessor
    )
    processor = processor_class(
        size={"shortest_edge": preprocessing.image_size},
        crop_pct=1.0,  # no crop: resize only, as preprocess_pixels does
        image_mean=list(preprocessing.mean),
        image_std=list(preprocessing.std),
    )
    processor.save_pretrained(str(folder))


def save_model(model: PreTrainedModel, preprocessing: Preprocessing, folder: str | Path) -> None:
    """Write ``model`` (safetensors weights, config.json) and ``preprocessor_config.json`` into
    ``folder``, as load_saved_model and from_pretrained read them."""
    with quiet_transformers():
        model.save_pretrained(folder)
    save_preprocessing(preprocessing, folder)


def load_saved_model(folder: str | Path) -> tuple[PreTrainedModel, Preprocessing]:
    """The model (eval mode, float32) and preprocessing of a folder written by save_model.

    Reads safetensors only and never runs remote code; refusing a folder that holds pickle
    files is the caller's decision (the model store refuses any).
    """
    with quiet_transformers():
        model = AutoModelForImageClassification.from_pretrained(
            str(folder), use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        )
    return model.eval(), read_preprocessing(folder)


def preprocess_pixels(
    pixels: list[np.ndarray],
    preprocessing: Preprocessing,
    chunk: int = 64,
    *,
    pin_memory: bool = False,
) -> torch.Tensor:
    """Cached (H, W, 3) uint8 RGB arrays -> normalised float32 batch (N, 3, S, S).

    Images of one shape are resized together (bilinear, antialiased) in chunks of ``chunk``, so a
    list of mixed sizes costs one interpolate call per shape and chunk, never one per image.
    The resize runs on the uint8 pixels (torch's vectorised uint8 path is faster than float32;
    a resized value differs from the float one by at most one grey level), then normalises.
    ``pin_memory`` writes the result into page-locked memory, for asynchronous copies to a GPU.
    """

    size = preprocessing.image_size
    out = torch.empty((len(pixels), 3, size, size), dtype=torch.float32, pin_memory=pin_memory)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    for indices in _indices_by_shape(pixels):
        for start in range(0, len(indices), chunk):
            part = indices[start : start + chunk]
            stacked = torch.from_numpy(np.stack([_as_rgb(pixels[i]) for i in part]))
            batch = stacked.permute(0, 3, 1, 2)  # uint8, channels_last in memory
            if batch.shape[-2:] != (size, size):
                batch = F.interpolate(
                    batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False
                )
            out[torch.as_tensor(part)] = (batch.float() - mean) / std
    return out


def _indices_by_shape(pixels: list[np.ndarray]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, array in enumerate(pixels):
        groups.setdefault(tuple(array.shape[:2]), []).append(index)
    return list(groups.values())


def _as_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:  # tolerate grayscale arrays, though the pixel cache stores RGB
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) RGB pixels, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.uint8)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, shapes, bytes): same weights, same id."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
