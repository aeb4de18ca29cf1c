"""Decoding and validation of landed image files: bytes in, normalised RGB pixels or a reason out."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# 50 MP: far above any MRI slice (a 1024x1024 scan is 1 MP), far below what exhausts memory.
DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


class ImageRejected(ValueError):
    """A landed file that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    sha256: str
    pixels: np.ndarray  # (height, width, 3) uint8 RGB
    source_mode: str
    source_format: str

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Normalise any PIL mode (L, RGB, RGBA, P, CMYK, I;16, I, F, LA, ...) to uint8 RGB."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float scans: stretch the used range to 0..255 rather than clip it.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        gray = scaled.round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Composite on black: MRI background is black, so transparency must not turn white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, sha256: str | None = None
) -> DecodedImage:
    """Fully decode and validate one file's bytes (``sha256``: their hash, if already known).

    Raises ImageRejected with reason ``empty_file``, ``not_an_image``, ``too_large`` or
    ``truncated`` (anything that fails to decode completely).
    """
    if not data:
        raise ImageRejected("empty_file", "the file has zero bytes")
    digest = sha256 or content_hash(data)
    try:
        with warnings.catch_warnings():
            # PIL warns before it raises; a bomb must be an error, never a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format or "unknown"
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    "too_large", f"{width}x{height} exceeds the {max_pixels:,}-pixel limit"
                )
            image.load()
            pixels = to_rgb_uint8(image)
    except ImageRejected:
        raise
    except UnidentifiedImageError as error:
        raise ImageRejected("not_an_image", "no image format recognised") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected("too_large", str(error)) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageRejected("truncated", f"decoding failed: {error}") from error
    if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageRejected("not_an_image", f"decoded to an empty array {pixels.shape}")
    return DecodedImage(digest, pixels, image.mode, fmt)
