"""Decoding and validation of landed image files: bytes in, normalised RGB pixels or a reason out.

Only the formats a scanner export or a data set ships are read (``ACCEPTED_FORMATS``): PIL knows
dozens more, some of which hand the bytes to outside programs (EPS goes to Ghostscript). Memory is
bounded by the decoded output, not by the source: a 16-bit scan is stretched to 8 bits in row
chunks, never as a float64 copy of the whole image.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# 50 MP: far above any MRI slice (a 1024x1024 scan is 1 MP), far below what exhausts memory.
DEFAULT_MAX_PIXELS = 50_000_000
ACCEPTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP")  # and DICOM, read by core/dicom.py
# Peak bytes per pixel while one image decodes: the source in PIL (up to 4 for RGBA or 32-bit
# gray), its array view (as many again) and the RGB output (3). Used to bound concurrent decodes.
DECODE_BYTES_PER_PIXEL = 11
# Rows converted at a time: big enough for numpy to run at full speed, small enough that the
# float32 temporaries stay a few MB whatever the image size.
_CHUNK_ROWS = 256
# The difference hash compares neighbours on a 17x16 thumbnail: 256 bits. At 64 bits (9x8) every
# generated phantom slice looked like every other; at 256, distinct phantom slices of the default
# data set differ in at least 29 bits while a re-encoded, brightened copy differs in about 12.
PERCEPTUAL_HASH_SIZE = (17, 16)
# Perceptual hashes this close (of 256 bits) are the same slice re-encoded or re-windowed.
NEAR_DUPLICATE_BITS = 16


class ImageRejected(ValueError):
    """A landed file that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    sha256: str  # of the file's bytes: identifies the file
    pixels: np.ndarray  # (height, width, 3) uint8 RGB
    source_mode: str
    source_format: str
    pixel_sha256: str  # of the decoded pixels: identifies the content, whatever the encoding
    perceptual_hash: str  # 256-bit difference hash, 64 hex digits: near-identical slices agree
    dicom: dict | None = None  # DICOM files: the non-identifying fields of core/dicom.DicomFields

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_hashes(pixels: np.ndarray, gray_plane: np.ndarray | None = None) -> tuple[str, str]:
    """(pixel hash, perceptual hash) of normalised (H, W, 3) uint8 pixels.

    The pixel hash is a sha256 of the pixels and their shape: equal for the same image saved as
    PNG or BMP, or with other compression settings. A gray image (three equal channels, as every
    grayscale scan becomes) is hashed as its one channel, a third of the bytes; ``gray_plane``:
    that channel, when the caller has it. The perceptual hash is a difference hash
    (dHash, the sign of each horizontal step of a 17x16 thumbnail, 256 bits as 64 hex digits): it survives re-encoding,
    resizing and small intensity changes, so slices a few bits apart are the same slice."""
    gray = gray_plane is not None
    if not gray:
        flat = pixels.reshape(-1, 3)
        gray = bool((flat[:, 0] == flat[:, 1]).all() and (flat[:, 0] == flat[:, 2]).all())
        gray_plane = np.ascontiguousarray(pixels[:, :, 0]) if gray else None
    if gray:
        plane = np.ascontiguousarray(gray_plane)
        thumbnail = Image.fromarray(plane)
    else:
        plane = np.ascontiguousarray(pixels)
        thumbnail = Image.fromarray(plane).convert("L")
    digest = hashlib.sha256(f"{'gray' if gray else 'rgb'}{pixels.shape[:2]}".encode())
    digest.update(memoryview(plane).cast("B"))
    # reducing_gap: PIL first shrinks by an integer factor, then box-filters: half the time.
    small = thumbnail.resize(PERCEPTUAL_HASH_SIZE, Image.Resampling.BOX, reducing_gap=2.0)
    thumb = np.asarray(small, dtype=np.int16)
    bits = (thumb[:, 1:] > thumb[:, :-1]).flatten()
    return digest.hexdigest(), np.packbits(bits).tobytes().hex()


def near_duplicate_pairs(
    train: list[tuple[str, str]], test: list[tuple[str, str]], max_bits: int = NEAR_DUPLICATE_BITS
) -> list[tuple[str, str, int]]:
    """(train key, test key, differing bits) of every (key, perceptual hash) pair across the two
    lists within ``max_bits``, closest first."""
    if not train or not test:
        return []
    train_bits = np.array([np.frombuffer(bytes.fromhex(h), np.uint8) for _, h in train])
    found = []
    for test_key, test_hash in test:
        differing = train_bits ^ np.frombuffer(bytes.fromhex(test_hash), np.uint8)
        distances = np.unpackbits(differing, axis=1).sum(axis=1)
        for index in np.flatnonzero(distances <= max_bits):
            found.append((train[index][0], test_key, int(distances[index])))
    return sorted(found, key=lambda pair: (pair[2], pair[0], pair[1]))


class MemoryBudget:
    """Bounds the bytes held by decodes in flight across threads.

    A decode reserves its estimated peak before it loads pixels and waits while the others hold
    too much; a single image larger than the whole budget still runs, alone."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._in_use = 0
        self._ready = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self._ready:
            self._ready.wait_for(
                lambda: self._in_use == 0 or self._in_use + nbytes <= self.limit_bytes
            )
            self._in_use += nbytes
        try:
            yield
        finally:
            with self._ready:
                self._in_use -= nbytes
                self._ready.notify_all()


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Normalise any PIL mode (L, RGB, RGBA, P, CMYK, I;16, I, F, LA, ...) to uint8 RGB.
    (decode_image takes 8-bit gray scans through gray_to_rgb, which is faster.)"""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # 16-bit and float scans: stretch the used range to 0..255 rather than clip it.
        return _stretch_to_rgb(np.asarray(image))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Composite on black: MRI background is black, so transparency must not turn white.
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        return _composite_on_black(np.asarray(rgba))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) with three equal channels; cheaper than PIL's convert("RGB")
    followed by a copy into numpy."""
    return np.stack([gray, gray, gray], axis=-1)  # faster than a broadcast assignment


def _stretch_to_rgb(array: np.ndarray) -> np.ndarray:
    """Linear stretch of a one-channel array's used range to uint8, written straight into the
    RGB output a chunk of rows at a time."""
    low, high = float(array.min()), float(array.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.empty((*array.shape[:2], 3), dtype=np.uint8)
    for start in range(0, array.shape[0], _CHUNK_ROWS):
        chunk = array[start : start + _CHUNK_ROWS].astype(np.float32)
        chunk -= low
        chunk *= scale
        out[start : start + _CHUNK_ROWS] = np.rint(chunk).astype(np.uint8)[:, :, None]
    return out


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """RGB premultiplied by alpha (alpha compositing over opaque black), a chunk at a time."""
    out = np.empty((*rgba.shape[:2], 3), dtype=np.uint8)
    for start in range(0, rgba.shape[0], _CHUNK_ROWS):
        chunk = rgba[start : start + _CHUNK_ROWS].astype(np.uint16)
        rgb = chunk[:, :, :3] * chunk[:, :, 3:4] + 127
        out[start : start + _CHUNK_ROWS] = (rgb // 255).astype(np.uint8)
    return out


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    sha256: str | None = None,
    memory: MemoryBudget | None = None,
    key: str | None = None,
) -> DecodedImage:
    """Fully decode and validate one file's bytes (``sha256``: their hash, if already known;
    ``key``: the file's name, which marks a DICOM file written without its preamble).

    Raises ImageRejected with reason ``empty_file``, ``not_an_image``, ``unsupported_format``,
    ``multi_frame``, ``too_large`` or ``truncated`` (anything that fails to decode completely),
    or one of core/dicom.py's reasons for a DICOM file. ``memory``: a budget shared by
    concurrent decodes; this one holds its estimated peak in it. Errors that are not about the
    bytes (MemoryError, ...) propagate: they are not rejections.
    """
    if not data:
        raise ImageRejected("empty_file", "the file has zero bytes")
    digest = sha256 or content_hash(data)
    from mri_assets.core import dicom  # here, not at the top: dicom.py imports this module

    if dicom.looks_like_dicom(data, key):
        return _decode_dicom(data, digest, max_pixels, memory)
    try:
        with warnings.catch_warnings():
            # PIL warns before it raises; a bomb must be an error, never a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open_accepted(data)
            fmt = image.format or "unknown"
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    "too_large", f"{width}x{height} exceeds the {max_pixels:,}-pixel limit"
                )
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise ImageRejected(
                    "multi_frame",
                    f"a {fmt} file of {frames} frames; land each slice as its own file",
                )
            with memory.reserve(width * height * DECODE_BYTES_PER_PIXEL) if memory else _nothing():
                image.load()
                mode = image.mode
                # An 8-bit gray scan's own array is its hash plane: no strided copy of a channel.
                gray_plane = np.asarray(image) if mode == "L" else None
                pixels = to_rgb_uint8(image) if gray_plane is None else gray_to_rgb(gray_plane)
                image.close()  # the source pixels are not needed once converted
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected("too_large", str(error)) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageRejected("truncated", f"decoding failed: {error}") from error
    if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageRejected("not_an_image", f"decoded to an empty array {pixels.shape}")
    return DecodedImage(digest, pixels, mode, fmt, *content_hashes(pixels, gray_plane))


def _decode_dicom(
    data: bytes, digest: str, max_pixels: int, memory: MemoryBudget | None
) -> DecodedImage:
    from mri_assets.core.dicom import read_dicom

    # The frame size is known only once the header is parsed; reserve for the largest allowed
    # share of the budget instead: DICOM slices are small, and this keeps big ones apart.
    with memory.reserve(memory.limit_bytes // 4) if memory else _nothing():
        slice_ = read_dicom(data, max_pixels=max_pixels)
    pixels = gray_to_rgb(slice_.pixels)
    fields = slice_.fields
    return DecodedImage(
        digest,
        pixels,
        f"DICOM {fields.photometric_interpretation} {fields.bits_stored}-bit",
        "DICOM",
        *content_hashes(pixels, slice_.pixels),
        dicom=fields.to_dict(),
    )


def _open_accepted(data: bytes) -> Image.Image:
    """``Image.open`` restricted to ACCEPTED_FORMATS; anything else gets a specific reason."""
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        pass
    try:
        # Header only, to name what it is; nothing here loads or runs the other format's decoder.
        other = Image.open(io.BytesIO(data)).format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        other = None
    if other:
        raise ImageRejected(
            "unsupported_format",
            f"{other} is not an accepted format ({', '.join(ACCEPTED_FORMATS)})",
        )
    raise ImageRejected("not_an_image", "no image format recognised")


@contextmanager
def _nothing() -> Iterator[None]:
    yield
