"""DICOM slices: file bytes in, an 8-bit grayscale array and a few non-identifying fields out.

Privacy by construction: the file is parsed with pydicom's ``specific_tags``, so only the image
pixel module, the display transforms and the handful of fields in ``DicomFields`` are ever
decoded. Patient name, ID, birth date, accession number and every other attribute are skipped
unread, so they cannot leak into a table, an exception, a log or an alert. The series UID is
returned only as a sha256, and pydicom's own warnings (which may quote element values) are
silenced while a file is read.

The display pipeline follows DICOM PS3.3 C.11: stored value -> modality LUT (rescale slope and
intercept, or a Modality LUT Sequence) -> VOI LUT Sequence, else window centre/width, else the
image's own value range -> 0..255, inverted for MONOCHROME1. Stored values have at most 16 bits,
so the whole pipeline is computed once on the (at most 65,536) possible stored values and applied
to the frame as a uint8 lookup table: no float copy of a large frame is ever made.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mri_assets.core.images import DEFAULT_MAX_PIXELS, ImageRejected

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DICOM_SUFFIXES = (".dcm", ".dicom")
PREAMBLE_LENGTH = 128
MAGIC = b"DICM"

# Only these attributes are parsed (hex tags: pydicom's keyword lookup needs no dictionary here).
# Image pixel module and display transforms, then the fields that DicomFields reports.
_PIXEL_TAGS = (
    0x00280002,  # SamplesPerPixel
    0x00280004,  # PhotometricInterpretation
    0x00280006,  # PlanarConfiguration
    0x00280008,  # NumberOfFrames
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280100,  # BitsAllocated
    0x00280101,  # BitsStored
    0x00280102,  # HighBit
    0x00280103,  # PixelRepresentation
    0x00281050,  # WindowCenter
    0x00281051,  # WindowWidth
    0x00281052,  # RescaleIntercept
    0x00281053,  # RescaleSlope
    0x00281054,  # RescaleType
    0x00281056,  # VOILUTFunction
    0x00283000,  # ModalityLUTSequence
    0x00283010,  # VOILUTSequence
    0x7FE00010,  # PixelData
)
_FIELD_TAGS = (
    0x00080060,  # Modality
    0x0008103E,  # SeriesDescription
    0x00280030,  # PixelSpacing
    0x0020000E,  # SeriesInstanceUID (hashed, never returned as is)
)
READ_TAGS = _PIXEL_TAGS + _FIELD_TAGS


@dataclass(frozen=True)
class DicomFields:
    """What the ``images`` table may keep about a DICOM file: nothing that identifies a patient."""

    modality: str | None
    series_description: str | None
    pixel_spacing: tuple[float, float] | None  # (row, column) spacing in mm
    series_uid_sha256: str | None
    bits_stored: int
    photometric_interpretation: str
    transfer_syntax: str

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if self.pixel_spacing is not None:
            values["pixel_spacing"] = list(self.pixel_spacing)
        return values


@dataclass(frozen=True)
class DicomSlice:
    pixels: np.ndarray  # (rows, columns) uint8, 0 = black as displayed
    fields: DicomFields


def looks_like_dicom(data: bytes, key: str | None = None) -> bool:
    """True for a DICOM Part 10 file (``DICM`` after the 128-byte preamble) or a ``.dcm`` key.

    The key matters for bare datasets written without the preamble, which have no magic number.
    """
    if data[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] == MAGIC:
        return True
    return key is not None and key.lower().endswith(DICOM_SUFFIXES)


def read_dicom(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DicomSlice:
    """Decode one single-frame grayscale DICOM file to 8-bit display pixels and safe fields.

    Raises ImageRejected with reason ``not_dicom`` (unparseable), ``no_pixel_data``,
    ``multi_frame``, ``unsupported_compression`` (no decoder installed for the transfer
    syntax, which the detail names), ``unsupported_pixel_format`` (colour, or not 8/16-bit
    integer samples), ``too_large`` (more than ``max_pixels``, checked before decoding) or
    ``truncated`` (pixel data shorter than the header says or otherwise undecodable). No message quotes a value read from
    the file other than the technical fields above.
    """
    with _quiet_pydicom():
        dataset = _parse(data)
        transfer_syntax = dataset.file_meta.get("TransferSyntaxUID")
        syntax_name = _syntax_label(transfer_syntax)
        if "PixelData" not in dataset:
            raise ImageRejected("no_pixel_data", "the DICOM file holds no image (PixelData)")
        frames = _int(dataset.get("NumberOfFrames"), default=1)
        if frames > 1:
            raise ImageRejected(
                "multi_frame",
                f"{frames} frames in one file; only single-frame slices are read "
                "(export the series as one file per slice)",
            )
        photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
        samples = _int(dataset.get("SamplesPerPixel"), default=1)
        bits_allocated = _int(dataset.get("BitsAllocated"), default=0)
        if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
            raise ImageRejected(
                "unsupported_pixel_format",
                f"photometric interpretation {photometric or 'missing'} with {samples} samples "
                "per pixel; only grayscale (MONOCHROME1/2) slices are read",
            )
        if bits_allocated not in (8, 16):
            raise ImageRejected(
                "unsupported_pixel_format",
                f"{bits_allocated} bits allocated per sample; only 8 and 16 are read",
            )
        rows, columns = _int(dataset.get("Rows"), 0), _int(dataset.get("Columns"), 0)
        if rows * columns > max_pixels:
            raise ImageRejected(
                "too_large", f"{columns}x{rows} exceeds the {max_pixels:,}-pixel limit"
            )
        _require_decoder(transfer_syntax, syntax_name)
        stored = _stored_values(dataset, syntax_name)
        pixels = _display_uint8(stored, dataset, photometric)
        fields = DicomFields(
            modality=_text(dataset.get("Modality")),
            series_description=_text(dataset.get("SeriesDescription")),
            pixel_spacing=_spacing(dataset.get("PixelSpacing")),
            series_uid_sha256=_sha256(dataset.get("SeriesInstanceUID")),
            bits_stored=_int(dataset.get("BitsStored"), default=bits_allocated),
            photometric_interpretation=photometric,
            transfer_syntax=syntax_name,
        )
    return DicomSlice(pixels, fields)


def _parse(data: bytes) -> Dataset:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        # force=True also reads bare datasets without the preamble (found by their .dcm key).
        dataset = dcmread(io.BytesIO(data), force=True, specific_tags=list(READ_TAGS))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as error:
        # The type only: pydicom's message may quote bytes of the file.
        raise ImageRejected(
            "not_dicom", f"not a readable DICOM file ({type(error).__name__})"
        ) from None
    if "TransferSyntaxUID" not in dataset.file_meta:
        # A bare dataset is always uncompressed; pixel decoding still needs the syntax named,
        # so name the encoding pydicom detected while reading.
        implicit, little = dataset.original_encoding
        dataset.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
    return dataset


def _require_decoder(transfer_syntax: Any, syntax_name: str) -> None:
    """Reject a compressed transfer syntax that no installed pydicom plugin can decode."""
    from pydicom.pixels import get_decoder

    try:
        available = get_decoder(transfer_syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ImageRejected(
            "unsupported_compression",
            f"transfer syntax {syntax_name}: no decoder for it is installed (pydicom's plugins "
            "pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls or gdcm decode the common ones)",
        )


def _stored_values(dataset: Dataset, syntax_name: str) -> np.ndarray:
    try:
        array = dataset.pixel_array
    except Exception as error:  # pydicom raises many types for corrupt or short pixel data
        raise ImageRejected(
            "truncated", f"pixel data ({syntax_name}) could not be decoded ({type(error).__name__})"
        ) from None
    if array.ndim != 2 or array.size == 0 or array.dtype.kind not in "iu":
        raise ImageRejected(
            "unsupported_pixel_format",
            f"decoded to a {array.dtype} array of shape {array.shape}; expected one 2-D frame",
        )
    return array


def _display_uint8(stored: np.ndarray, dataset: Dataset, photometric: str) -> np.ndarray:
    """Stored values -> displayed 8-bit grey levels through one lookup table."""
    low, high = int(stored.min()), int(stored.max())
    if high - low >= 1 << 16:
        raise ImageRejected("unsupported_pixel_format", "stored values span more than 16 bits")
    # The lookup table covers only the values present: [low, high].
    lut = _display_lut(np.arange(low, high + 1, dtype=np.int64), dataset, photometric)
    # Index by (value - low) in the frame's own width, never a float or int64 copy: signed
    # samples are first mapped order-preserving onto unsigned ones (flip the sign bit).
    bits = 8 * stored.dtype.itemsize
    unsigned = np.dtype(f"u{stored.dtype.itemsize}")
    if stored.dtype.kind == "i":
        offsets = np.bitwise_xor(stored.view(unsigned), unsigned.type(1 << (bits - 1)))
        offsets -= unsigned.type(low + (1 << (bits - 1)))
    else:
        offsets = stored - unsigned.type(low)
    return lut[offsets]  # fancy indexing casts the indices in buffered chunks (np.take: whole)


def _display_lut(domain: np.ndarray, dataset: Dataset, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi

    modality = np.asarray(apply_modality_lut(domain, dataset), dtype=np.float64)
    if dataset.get("VOILUTSequence"):
        item = dataset.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        levels = np.asarray(apply_voi(modality.astype(np.int64), dataset), dtype=np.float64)
        unit = levels / float((1 << bits) - 1)
    else:
        window = _window(dataset)
        if window is not None:
            unit = _apply_window(modality, *window, _voi_function(dataset))
        else:
            # No display hint: stretch the range the image uses, as for 16-bit PNGs.
            span = float(modality.max() - modality.min())
            unit = (modality - modality.min()) / span if span > 0 else np.zeros_like(modality)
    unit = np.clip(unit, 0.0, 1.0)
    if photometric == "MONOCHROME1":  # MONOCHROME1: the lowest value is displayed white
        unit = 1.0 - unit
    return np.rint(unit * 255.0).astype(np.uint8)


def _window(dataset: Dataset) -> tuple[float, float] | None:
    centre, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if centre is None or width is None:
        return None
    # Several windows may be offered; the first is the default view.
    centre = float(centre[0] if _is_sequence(centre) else centre)
    width = float(width[0] if _is_sequence(width) else width)
    return (centre, width) if width > 0 else None


def _apply_window(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """Window centre/width to 0..1, per PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        return (values - centre) / width + 0.5
    if width < 1:
        return (values > centre - 0.5).astype(np.float64)
    return (values - (centre - 0.5)) / max(width - 1.0, 1e-9) + 0.5


def _voi_function(dataset: Dataset) -> str:
    return str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns and logs about invalid element values, quoting them: never let that out."""
    logger = logging.getLogger("pydicom")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate


def _syntax_label(uid: Any) -> str:
    name = getattr(uid, "name", "") or ""
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _spacing(value: Any) -> tuple[float, float] | None:
    try:
        row, column = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (row, column)


def _sha256(value: Any) -> str | None:
    text = _text(value)
    return hashlib.sha256(text.encode()).hexdigest() if text else None
