import io

import numpy as np
import pytest
from PIL import Image

from mri_assets.core.images import ImageRejected, decode_image
from mri_assets.core.pixel_cache import PixelCache
from mri_assets_tests.bad_files import BAD_FILES, encode


@pytest.mark.parametrize(
    "key",
    sorted(
        k for k, (_, r) in BAD_FILES.items() if r in {"empty_file", "truncated", "not_an_image"}
    ),
)
def test_bad_bytes_are_rejected_with_their_reason(key):
    data, reason = BAD_FILES[key]
    with pytest.raises(ImageRejected) as caught:
        decode_image(data)
    assert caught.value.reason == reason


@pytest.mark.parametrize("key", sorted(k for k, (_, r) in BAD_FILES.items() if r is None))
def test_every_mode_is_normalised_to_rgb_uint8(key):
    decoded = decode_image(BAD_FILES[key][0])
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.ndim == 3 and decoded.pixels.shape[2] == 3
    assert len(decoded.sha256) == 64


def test_sixteen_bit_keeps_its_dynamic_range():
    decoded = decode_image(BAD_FILES["meningioma/deep.png"][0])
    assert decoded.source_mode.startswith("I")
    # Clipping to 8 bits would saturate most of this ramp at 255.
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255
    assert len(np.unique(decoded.pixels)) > 200


def test_transparent_background_becomes_black_not_white():
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    decoded = decode_image(encode(rgba))
    assert decoded.pixels.max() == 0


def test_decompression_bomb_is_rejected_as_too_large():
    big = encode(Image.new("L", (3000, 3000)))
    with pytest.raises(ImageRejected) as caught:
        decode_image(big, max_pixels=1_000_000)
    assert caught.value.reason == "too_large"


def test_truncated_png_is_rejected():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    with pytest.raises(ImageRejected) as caught:
        decode_image(buffer.getvalue()[:-200])
    assert caught.value.reason == "truncated"


def test_pixel_cache_round_trip_and_missing_key(tmp_path):
    cache = PixelCache(tmp_path)
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    cache.put("ab" * 32, pixels)
    assert cache.has("ab" * 32)
    np.testing.assert_array_equal(cache.get("ab" * 32), pixels)
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(KeyError, match="upload again"):
        cache.get("cd" * 32)
