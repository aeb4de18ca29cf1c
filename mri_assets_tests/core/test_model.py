"""The model factory: embedded base created once, local folders, pickle refusal, preprocessing."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import ResNetConfig, ResNetForImageClassification

from mri_assets.core import model as model_module
from mri_assets.core.inference import predict_probabilities
from mri_assets.core.labels import ClassSpec
from mri_assets.core.model import (
    EMBEDDED_IMAGE_SIZE,
    RESNET50_ARCHITECTURE,
    load_base_model,
    preprocess_pixels,
    save_preprocessing,
    weights_fingerprint,
)
from mri_assets.core.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    read_preprocessing,
)
from mri_assets.core.recipe import recommended_config
from mri_assets.core.safe_weights import UnsafeWeightsError, refuse_pickle_only
from mri_assets.core.train import fine_tune

CLASSES = ClassSpec()


def tiny_resnet(num_labels: int) -> ResNetForImageClassification:
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=num_labels,
    )
    torch.manual_seed(1)
    return ResNetForImageClassification(config)


def save_folder(model: ResNetForImageClassification, folder: Path, size: int = 48) -> Path:
    model.save_pretrained(folder)
    save_preprocessing(Preprocessing(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), folder)
    return folder


def test_embedded_is_created_once_then_read_back_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_base_model("embedded", CLASSES, tmp_path)
    folder = Path(first.source)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    created_at = (folder / "model.safetensors").stat().st_mtime_ns

    def must_not_create() -> None:
        raise AssertionError("the embedded model was created a second time")

    monkeypatch.setattr(model_module, "_new_embedded_model", must_not_create)
    second = load_base_model("embedded", CLASSES, tmp_path)

    assert weights_fingerprint(second.model) == weights_fingerprint(first.model)
    assert (folder / "model.safetensors").stat().st_mtime_ns == created_at
    assert second.preprocessing == Preprocessing(EMBEDDED_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD)


def test_embedded_weights_are_seeded_not_random(tmp_path: Path) -> None:
    one = load_base_model("embedded", CLASSES, tmp_path / "a")
    two = load_base_model("embedded", CLASSES, tmp_path / "b")

    assert weights_fingerprint(one.model) == weights_fingerprint(two.model)


def test_untrained_embedded_model_says_one_half_for_everything(tmp_path: Path) -> None:
    base = load_base_model("embedded", CLASSES, tmp_path)
    batch = torch.randn(4, 3, 32, 32)

    with torch.inference_mode():
        probs = torch.softmax(base.model(pixel_values=batch).logits, dim=-1)

    assert torch.allclose(probs, torch.full_like(probs, 0.5))


def test_labels_follow_the_class_spec_order(tmp_path: Path) -> None:
    classes = ClassSpec(("meningioma", "glioma"), "glioma")

    base = load_base_model("embedded", classes, tmp_path)

    assert base.model.config.id2label == {0: "meningioma", 1: "glioma"}
    assert base.model.config.label2id == {"meningioma": 0, "glioma": 1}


def test_local_folder_keeps_its_backbone_and_gets_a_fresh_two_class_head(tmp_path: Path) -> None:
    saved = tiny_resnet(num_labels=5)
    folder = save_folder(saved, tmp_path / "five-class")

    base = load_base_model(str(folder), CLASSES, tmp_path / "base")

    assert base.model.config.num_labels == 2
    assert weights_fingerprint(base.model.resnet) == weights_fingerprint(saved.resnet)
    assert torch.count_nonzero(base.model.classifier[1].weight) == 0  # replaced head starts at zero
    assert base.preprocessing == Preprocessing(48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert base.source == str(folder)
    assert base.fresh_head and base.pretrained


def test_local_folder_without_processor_config_gets_imagenet_defaults(tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    tiny_resnet(num_labels=2).save_pretrained(folder)

    base = load_base_model(str(folder), CLASSES, tmp_path / "base")

    assert base.preprocessing == Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD)


def test_local_two_class_folder_keeps_its_trained_head(tmp_path: Path) -> None:
    saved = tiny_resnet(num_labels=2)
    folder = save_folder(saved, tmp_path / "two-class")

    base = load_base_model(str(folder), CLASSES, tmp_path / "base")

    assert weights_fingerprint(base.model) == weights_fingerprint(saved)
    assert not base.fresh_head  # the baseline then measures this head, not chance


def test_a_hub_id_is_read_from_the_hub_cache_with_hf_hub_offline(tmp_path: Path) -> None:
    """A hub id loads with no network once it is in the hub cache (laid out as huggingface_hub
    writes it: refs/main names the snapshot), with a fresh head and the cached processor."""
    repo = tmp_path / "hf" / "hub" / "models--example-org--tiny-resnet"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_folder(tiny_resnet(num_labels=1000), repo / "snapshots" / commit, size=40)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "from mri_assets.core.labels import ClassSpec\n"
        "from mri_assets.core.model import load_base_model\n"
        "base = load_base_model('example-org/tiny-resnet', ClassSpec(), 'base')\n"
        "head = base.model.classifier[1].weight\n"
        "print(base.model.config.num_labels, base.fresh_head, base.preprocessing.image_size,\n"
        "      int(head.abs().sum() == 0), base.pretrained)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.stdout.split() == ["2", "True", "40", "1", "True"], done.stderr


class _Tripwire:
    """Unpickling this creates a file, so a test can tell whether anything was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_pickle_only_folder_is_refused_without_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "pickled"
    tiny_resnet(num_labels=2).config.save_pretrained(folder)
    marker = tmp_path / "unpickled.txt"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))

    def no_torch_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)

    with pytest.raises(UnsafeWeightsError, match=r"pytorch_model\.bin.*only safetensors"):
        load_base_model(str(folder), CLASSES, tmp_path / "base")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["weights.pt", "model.pth", "last.ckpt", "model.pkl"])
def test_every_pickle_suffix_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"not even read")

    with pytest.raises(UnsafeWeightsError, match=name.replace(".", r"\.")):
        refuse_pickle_only(tmp_path)


def test_preprocessing_round_trips_through_preprocessor_config(tmp_path: Path) -> None:
    wanted = Preprocessing(96, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))

    save_preprocessing(wanted, tmp_path)

    assert read_preprocessing(tmp_path) == wanted
    assert model_module._hub_preprocessing(str(tmp_path)) == wanted  # AutoImageProcessor agrees


def test_preprocess_pixels_handles_mixed_sizes_in_order() -> None:
    preprocessing = Preprocessing(16, IMAGENET_MEAN, IMAGENET_STD)
    constants = [10, 128, 250]
    pixels = [
        np.full((20, 30, 3), constants[0], np.uint8),
        np.full((64, 64, 3), constants[1], np.uint8),
        np.full((20, 30, 3), constants[2], np.uint8),
    ]

    batch = preprocess_pixels(pixels, preprocessing)

    assert batch.shape == (3, 3, 16, 16) and batch.dtype == torch.float32
    for image, value in zip(batch, constants, strict=True):
        expected = (value / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=1e-4)


def test_preprocess_pixels_matches_antialiased_bilinear_resize() -> None:
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(2)]
    preprocessing = Preprocessing(24, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    batch = preprocess_pixels(pixels, preprocessing)

    raw = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float()
    resized = F.interpolate(
        raw, size=(24, 24), mode="bilinear", antialias=True, align_corners=False
    )
    # The resize runs on uint8 pixels: each value may be one grey level off the float resize.
    assert torch.allclose(batch, resized / 255.0, atol=1 / 255 + 1e-5)


def test_preprocess_pixels_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        preprocess_pixels([np.zeros((8, 8, 4), np.uint8)], Preprocessing(8))


def test_weights_fingerprint_sees_a_single_changed_weight() -> None:
    model = tiny_resnet(num_labels=2)
    before = weights_fingerprint(model)

    with torch.no_grad():
        model.classifier[1].bias[0] += 1e-3

    assert weights_fingerprint(model) != before


@pytest.fixture(scope="module")
def resnet50_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-50-shaped ImageNet-style checkpoint (1000 classes, random weights) on disk."""
    folder = tmp_path_factory.mktemp("resnet-50-random")
    model_module.random_resnet(RESNET50_ARCHITECTURE, num_labels=1000).save_pretrained(folder)
    save_preprocessing(Preprocessing(224), folder)
    return folder


def test_resnet50_shaped_checkpoint_loads_trains_an_epoch_and_predicts(
    resnet50_checkpoint: Path, tmp_path: Path
) -> None:
    base = load_base_model(str(resnet50_checkpoint), CLASSES, tmp_path / "base")
    assert base.pretrained and base.model.config.num_labels == 2
    assert base.model.config.id2label == {0: "glioma", 1: "meningioma"}
    assert torch.count_nonzero(base.model.classifier[1].weight) == 0  # 1000-class head replaced
    assert base.model.classifier[1].weight.shape == (2, 2048)
    assert next(base.model.parameters()).dtype == torch.float32
    assert not any(resnet50_checkpoint.glob("*.bin"))  # it was read from safetensors
    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(24)]
    pixels = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in labels]
    for image, label in zip(pixels, labels, strict=True):
        image[4 + 20 * label : 16 + 20 * label, 4:16] = 255  # something to learn
    sha256s = [f"{i:064d}" for i in range(24)]
    by_sha = dict(zip(sha256s, pixels, strict=True))

    result = fine_tune(
        base.model,
        base.preprocessing,
        sha256s,
        labels,
        lambda shas: [by_sha[s] for s in shas],
        recommended_config(True, epochs=1, probe_epochs=1, image_size=32, batch_size=8),
        log=lambda _: None,
    )
    probs = predict_probabilities(result.model, result.preprocessing, pixels)

    assert len(result.epochs) == 2 and result.preprocessing.image_size == 32  # probe + full
    assert probs.shape == (24, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(probs, 0.5)  # the zeroed head trained
    assert all(p.is_contiguous() for p in result.model.parameters())


def test_from_pretrained_gets_the_dtype_keyword_its_transformers_knows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The module object core/model.py reads: transformers 5 can put another lazy module object
    # under sys.modules["transformers"] after that import, so `import transformers` here may not be it.
    transformers = model_module.transformers

    monkeypatch.setattr(transformers, "__version__", "4.46.3")
    assert model_module._dtype_keyword() == "torch_dtype"
    monkeypatch.setattr(transformers, "__version__", "4.56.0")
    assert model_module._dtype_keyword() == "dtype"
    monkeypatch.setattr(transformers, "__version__", "5.0.0.dev0")
    assert model_module._dtype_keyword() == "dtype"


def test_preprocessing_is_saved_without_the_transformers_5_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    older = types.ModuleType("transformers")  # transformers 4: no ConvNextImageProcessorPil
    older.ConvNextImageProcessor = (
        getattr(transformers, "ConvNextImageProcessorPil", None)
        or transformers.ConvNextImageProcessor
    )
    monkeypatch.setattr(model_module, "transformers", older)
    wanted = Preprocessing(64, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))

    save_preprocessing(wanted, tmp_path)

    assert read_preprocessing(tmp_path) == wanted


def test_uncached_hub_model_offline_names_the_setting(tmp_path: Path) -> None:
    # A subprocess: huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when first imported.
    script = (
        "from mri_assets.core.labels import ClassSpec\n"
        "from mri_assets.core.model import load_base_model\n"
        "try:\n"
        "    load_base_model('example-org/not-cached-resnet', ClassSpec(), 'base')\n"
        "except OSError as error:\n"
        "    print('OSError:', error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert "OSError: MRI_BASE_MODEL=example-org/not-cached-resnet" in done.stdout, done.stderr
    assert "HF_HUB_OFFLINE is set" in done.stdout
