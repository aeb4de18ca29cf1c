"""A corpus of awkward files, shared by the core and Dagster ingestion tests."""

import io

import numpy as np
from PIL import Image

from mri_assets_tests.conftest import jpeg_bytes, png_bytes


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sixteen_bit_png() -> bytes:
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    return encode(Image.fromarray(ramp))  # uint16 arrays become mode I;16


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (24, 24), (0, 0, 0, 128)), "JPEG")


# key within the split folder -> bytes, and the reason it must be rejected (None: accepted)
BAD_FILES: dict[str, tuple[bytes, str | None]] = {
    "glioma/empty.png": (b"", "empty_file"),
    "glioma/truncated.jpg": (jpeg_bytes(1, 64)[:300], "truncated"),
    "meningioma/notes.jpg": (b"this is a text file pretending to be a JPEG\n" * 4, "not_an_image"),
    "pituitary/scan.png": (png_bytes(2), "unknown_label"),
    ".DS_Store": (b"\x00\x00\x00\x01Bud1" + b"\x00" * 64, "hidden_file"),
    "glioma/rgba.png": (png_bytes(3, mode="RGBA"), None),
    "glioma/palette.png": (png_bytes(4, mode="P"), None),
    "meningioma/cmyk.jpg": (cmyk_jpeg(), None),
    "meningioma/deep.png": (sixteen_bit_png(), None),
    "meningioma/ok.png": (png_bytes(5), None),
}
