"""Synthetic MRI generator: landing-zone layout, determinism, and that slices look like the spec."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from mri_assets.core.images import decode_image
from mri_assets.core.labels import ClassSpec, resolve_label
from mri_assets.core.phantoms import (
    CLASSES,
    VARIATIONS,
    DatasetSummary,
    encode_slice,
    generate_slice,
    image_rng,
    plan_dataset,
    render_phantom,
    split_counts,
    variation_named,
    write_dataset,
)

SMALL = {"n_glioma": 6, "n_meningioma": 5, "size": 128, "progress": False}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation by a 3x3 square, ``pixels`` times (numpy only)."""
    grown = mask.copy()
    for _ in range(pixels):
        padded = np.pad(grown, 1)
        grown = np.zeros_like(grown)
        for dy in range(3):
            for dx in range(3):
                grown |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return grown


# --------------------------------------------------------------------------- planning


def test_split_floors_the_test_share() -> None:
    assert split_counts(346, 0.25) == (260, 86)
    assert split_counts(329, 0.25) == (247, 82)
    assert split_counts(6, 0.25) == (5, 1)
    assert split_counts(3, 0.25) == (3, 0)
    with pytest.raises(ValueError):
        split_counts(5, 1.5)
    with pytest.raises(ValueError):
        split_counts(-1, 0.25)


def test_default_plan_follows_the_seed_data_set() -> None:
    planned = plan_dataset()
    counts = Counter((item.split, item.label) for item in planned)
    assert counts == {
        ("train", "glioma"): 260,
        ("train", "meningioma"): 247,
        ("test", "glioma"): 86,
        ("test", "meningioma"): 82,
    }
    assert len({item.path for item in planned}) == 675


def test_every_planned_key_resolves_to_its_label() -> None:
    classes = ClassSpec()
    for item in plan_dataset():
        assert item.path == f"{item.split}/{item.key}"
        assert resolve_label(item.key, classes) == item.label, item.path


def test_each_class_uses_both_label_conventions() -> None:
    for label in CLASSES:
        keys = [item.key for item in plan_dataset() if item.label == label]
        in_class_folder = [k for k in keys if "/" in k]
        named_by_file = [k for k in keys if "/" not in k]
        assert in_class_folder and named_by_file
        # Files in a class folder carry no class word of their own: the folder must decide.
        assert all(resolve_label(k.split("/")[-1], ClassSpec()) is None for k in in_class_folder)


def test_formats_are_half_png_and_both_jpeg_spellings() -> None:
    planned = plan_dataset()
    suffixes = Counter(Path(item.path).suffix for item in planned)
    assert set(suffixes) == {".png", ".jpg", ".jpeg"}
    assert 0.45 < suffixes[".png"] / len(planned) < 0.55
    for label in CLASSES:
        assert {Path(i.path).suffix for i in planned if i.label == label} == {
            ".png",
            ".jpg",
            ".jpeg",
        }


# --------------------------------------------------------------------------- writing


def test_write_dataset_writes_exactly_the_plan(tmp_path: Path) -> None:
    summary = write_dataset(tmp_path / "out", seed=3, **SMALL)
    planned = plan_dataset(6, 5)
    assert summary == DatasetSummary(
        tmp_path / "out",
        {"train": {"glioma": 5, "meningioma": 4}, "test": {"glioma": 1, "meningioma": 1}},
        11,
    )
    # Nothing but the images: no manifest or index files in the landing tree.
    assert set(_files(tmp_path / "out")) == {item.path for item in planned}


def test_files_decode_in_the_format_their_suffix_names(tmp_path: Path) -> None:
    write_dataset(tmp_path, seed=0, **SMALL)
    formats = set()
    for item in plan_dataset(6, 5):
        with Image.open(tmp_path / item.path) as image:
            image.load()
            assert image.size == (128, 128)
            assert image.format == ("JPEG" if item.is_jpeg else "PNG")
            formats.add(image.format)
    assert formats == {"PNG", "JPEG"}


def test_default_size_is_256(tmp_path: Path) -> None:
    write_dataset(tmp_path, n_glioma=1, n_meningioma=1, test_fraction=0.0, progress=False)
    for path in tmp_path.rglob("*.*"):
        with Image.open(path) as image:
            assert image.size == (256, 256)
            assert np.asarray(image.convert("L")).max() > 100


def test_same_seed_is_byte_identical_and_another_seed_is_not(tmp_path: Path) -> None:
    first = _files(Path(write_dataset(tmp_path / "a", seed=7, **SMALL).root))
    again = _files(Path(write_dataset(tmp_path / "b", seed=7, **SMALL).root))
    other = _files(Path(write_dataset(tmp_path / "c", seed=8, **SMALL).root))
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[key] != other[key] for key in first)


def test_an_image_depends_on_its_key_not_on_what_else_is_generated(tmp_path: Path) -> None:
    small = _files(Path(write_dataset(tmp_path / "small", seed=1, **SMALL).root))
    larger = {**SMALL, "n_glioma": 9}
    large = _files(Path(write_dataset(tmp_path / "large", seed=1, **larger).root))
    shared = small.keys() & large.keys()
    assert len(shared) == len(small)
    assert all(small[key] == large[key] for key in shared)


def test_progress_false_is_silent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path, n_glioma=1, n_meningioma=1, size=64, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# --------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("label", CLASSES)
def test_slice_has_dark_background_and_a_bright_head(label: str) -> None:
    pixels = generate_slice(np.random.default_rng(0), label, size=128)
    assert pixels.dtype == np.uint8 and pixels.shape == (128, 128)
    corners = np.concatenate(
        [pixels[:10, :10], pixels[:10, -10:], pixels[-10:, :10], pixels[-10:, -10:]]
    )
    assert corners.mean() < 25  # air: Rician noise floor only
    assert pixels[44:84, 44:84].mean() > 60  # brain fills the centre
    head = (pixels > 40).mean()
    assert 0.35 < head < 0.8
    assert pixels.max() > 180  # CSF is the brightest tissue on T2


def test_unknown_label_is_rejected() -> None:
    with pytest.raises(ValueError):
        generate_slice(np.random.default_rng(0), "pituitary")


def test_generate_slice_is_reproducible_from_its_rng() -> None:
    a = generate_slice(np.random.default_rng(5), "glioma", 64)
    b = generate_slice(np.random.default_rng(5), "glioma", 64)
    c = generate_slice(np.random.default_rng(6), "glioma", 64)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_render_phantom_image_is_what_generate_slice_returns() -> None:
    phantom = render_phantom(np.random.default_rng(2), "meningioma", 64)
    assert np.array_equal(phantom.image, generate_slice(np.random.default_rng(2), "meningioma", 64))


def _phantoms(label: str, count: int = 16, size: int = 128):
    items = [item for item in plan_dataset(count, count, 0.0) if item.label == label]
    return [render_phantom(image_rng(11, item), label, size) for item in items]


def test_gliomas_keep_brain_between_them_and_the_skull() -> None:
    for phantom in _phantoms("glioma"):
        core = phantom.lesion > 0.5
        assert core.sum() > 20
        assert not (_grow(core, 3) & ~phantom.intracranial).any()


def test_meningiomas_rest_on_the_inner_skull_table() -> None:
    for phantom in _phantoms("meningioma"):
        core = phantom.lesion > 0.5
        assert core.sum() > 20
        assert (_grow(core, 1) & ~phantom.intracranial).any()


def test_overall_brightness_does_not_give_the_class_away() -> None:
    means = {label: [p.image.mean() for p in _phantoms(label, 40, 64)] for label in CLASSES}
    scores = means["glioma"] + means["meningioma"]
    truth = [0] * len(means["glioma"]) + [1] * len(means["meningioma"])
    assert 0.3 < roc_auc_score(truth, scores) < 0.7


# --------------------------------------------------------------------------- hard variation

HARD = VARIATIONS["hard"]


def _hard_phantoms(label: str, count: int = 16, size: int = 128):
    items = [item for item in plan_dataset(count, count, 0.0, HARD) if item.label == label]
    return [render_phantom(image_rng(11, item, HARD), label, size, HARD) for item in items]


def test_hard_files_come_in_every_encoding_and_decode_to_the_same_gray_slice(
    tmp_path: Path,
) -> None:
    write_dataset(tmp_path, seed=0, variation="hard", **{**SMALL, "n_glioma": 8})
    modes = Counter()
    for item in plan_dataset(8, 5, variation=HARD):
        data = (tmp_path / item.path).read_bytes()
        with Image.open(tmp_path / item.path) as image:
            modes[(image.format, image.mode)] += 1
        decoded = decode_image(data).pixels
        assert decoded.shape == (128, 128, 3)
        # Every encoding stores a gray slice: the channels agree up to JPEG chroma rounding.
        assert np.abs(decoded.astype(int) - decoded[..., :1]).max() <= 3
    assert set(modes) == {
        ("PNG", "L"),
        ("JPEG", "L"),
        ("PNG", "RGBA"),
        ("JPEG", "RGB"),
        ("PNG", "P"),
    }


def test_an_rgba_slice_has_a_transparent_background_that_decodes_black() -> None:
    pixels = generate_slice(np.random.default_rng(0), "glioma", 64, HARD)
    data = encode_slice(pixels, "png-rgba")
    with Image.open(io.BytesIO(data)) as image:
        alpha = np.asarray(image)[..., 3]
    assert set(np.unique(alpha)) == {0, 255}
    decoded = decode_image(data).pixels[..., 0]
    assert (decoded[alpha == 0] == 0).all()
    assert np.array_equal(decoded[alpha == 255], pixels[alpha == 255])


def test_unknown_encoding_and_variation_are_refused() -> None:
    with pytest.raises(ValueError, match="encoding must be one of"):
        encode_slice(np.zeros((4, 4), np.uint8), "gif")
    with pytest.raises(ValueError, match="variation must be one of"):
        variation_named("harder")


def test_hard_slices_vary_more_in_pose_and_contrast_than_default_ones() -> None:
    from mri_assets.core.phantoms import DEFAULT, _random_head

    def tilts(variation) -> np.ndarray:
        rng = np.random.default_rng(0)
        return np.degrees([abs(_random_head(rng, variation).angle) for _ in range(400)])

    assert 15 < tilts(HARD).max() <= 20 and tilts(DEFAULT).max() <= 10
    brightness = {
        name: np.array([p.image[p.intracranial].mean() for p in phantoms])
        for name, phantoms in (
            ("default", _phantoms("glioma", 24) + _phantoms("meningioma", 24)),
            ("hard", _hard_phantoms("glioma", 24) + _hard_phantoms("meningioma", 24)),
        )
    }
    # Gamma, gain and stronger bias spread the brain's brightness between slices.
    assert brightness["hard"].std() > 1.5 * brightness["default"].std()


def test_hard_slices_are_flipped_with_their_masks() -> None:
    # Flips move the lesion with the image: the core is brighter than the brain around it.
    flipped_sides = set()
    for phantom in _hard_phantoms("meningioma", 12):
        core = phantom.lesion > 0.5
        assert core.sum() > 10
        assert (_grow(core, 1) & ~phantom.intracranial).any()  # still on the inner table
        ys, xs = np.nonzero(phantom.intracranial)
        flipped_sides.add(bool(np.nonzero(core)[0].mean() > ys.mean()))
    assert flipped_sides == {True, False}


def test_hard_gliomas_stay_inside_the_brain() -> None:
    for phantom in _hard_phantoms("glioma"):
        core = phantom.lesion > 0.5
        assert core.sum() > 10
        assert not (core & ~phantom.intracranial).any()


def test_hard_brightness_does_not_give_the_class_away_either() -> None:
    means = {label: [p.image.mean() for p in _hard_phantoms(label, 40, 64)] for label in CLASSES}
    scores = means["glioma"] + means["meningioma"]
    truth = [0] * len(means["glioma"]) + [1] * len(means["meningioma"])
    assert 0.3 < roc_auc_score(truth, scores) < 0.7
