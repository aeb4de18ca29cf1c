"""DICOM slices: display transforms, rejections with reasons, and no patient identifier anywhere."""

from __future__ import annotations

import io
import logging
import tracemalloc
import warnings

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from mri_assets.core import dicom
from mri_assets.core.dicom import looks_like_dicom, read_dicom
from mri_assets.core.images import ImageRejected

# Recognisable strings in every identifying attribute: none may come out of the reader.
IDENTIFIERS = {
    "PatientName": "Doe^Jane^SECRETNAME",
    "PatientID": "PIDSECRET7731",
    "PatientBirthDate": "19450102",
    "AccessionNumber": "ACCSECRET99812",
    "OtherPatientIDs": "OTHERPIDSECRET",
    "InstitutionName": "SECRET General Hospital",
    "ReferringPhysicianName": "Who^Doctor^SECRETDOC",
    "StudyID": "STUDYSECRET42",
}
SERIES_UID = "1.2.826.0.1.3680043.8.498.1234567890"


def build_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    voi_function: str | None = None,
    frames: int | None = None,
    preamble: bool = True,
    dataset_hook=None,
) -> bytes:
    """A synthetic MR slice with patient fields set, written as a Part 10 file (or bare)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("slice.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.SeriesDescription = "T2 AX"
    ds.SeriesInstanceUID = SERIES_UID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.55"
    ds.PixelSpacing = [0.5, 0.75]
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    bits = bits_stored or pixels.dtype.itemsize * 8
    ds.set_pixel_data(pixels, photometric, bits)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept or 0, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if frames is not None:
        ds.NumberOfFrames = frames
    if dataset_hook is not None:
        dataset_hook(ds)
    buffer = io.BytesIO()
    if preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:  # a bare dataset: no preamble, no file meta, implicit VR (as old PACS exports are)
        ds.file_meta, ds.preamble = FileMetaDataset(), None
        ds.save_as(buffer, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def ramp(shape: tuple[int, int], low: int, high: int, dtype: str) -> np.ndarray:
    return np.linspace(low, high, shape[0] * shape[1]).round().astype(dtype).reshape(shape)


def linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 written out independently, to 0..255."""
    unit = ((values - (centre - 0.5)) / (width - 1) + 0.5).clip(0, 1)
    return np.rint(unit * 255).astype(np.uint8)


def test_twelve_bit_slice_applies_rescale_then_window() -> None:
    stored = ramp((64, 64), 0, 4095, "uint16")
    data = build_dicom(stored, bits_stored=12, slope=2.0, intercept=-1000.0, window=(1000, 2001))

    result = read_dicom(data)

    expected = linear_window(stored * 2.0 - 1000.0, 1000, 2001)
    assert result.pixels.dtype == np.uint8 and result.pixels.shape == (64, 64)
    np.testing.assert_array_equal(result.pixels, expected)
    assert result.pixels.min() == 0 and result.pixels.max() == 255  # the window clips both ends


def test_monochrome1_is_inverted() -> None:
    stored = ramp((32, 32), 0, 4095, "uint16")
    m2 = read_dicom(build_dicom(stored, bits_stored=12, window=(2048, 4096))).pixels

    m1 = read_dicom(
        build_dicom(stored, bits_stored=12, window=(2048, 4096), photometric="MONOCHROME1")
    )

    np.testing.assert_array_equal(m1.pixels, 255 - m2)
    assert m1.fields.photometric_interpretation == "MONOCHROME1"


def test_eight_bit_without_window_stretches_the_used_range() -> None:
    stored = ramp((16, 16), 40, 140, "uint8")

    pixels = read_dicom(build_dicom(stored)).pixels

    expected = np.rint((stored.astype(float) - 40) / 100 * 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected)


def test_signed_sixteen_bit_with_sigmoid_window() -> None:
    stored = ramp((40, 40), -2000, 3000, "int16")

    pixels = read_dicom(build_dicom(stored, window=(500, 1000), voi_function="SIGMOID")).pixels

    expected = np.rint(255 / (1 + np.exp(-4 * (stored.astype(float) - 500) / 1000)))
    np.testing.assert_array_equal(pixels, expected.astype(np.uint8))
    assert np.all(np.diff(pixels.ravel().astype(int)) >= 0)  # monotonic in the stored value


def test_voi_lut_sequence_is_preferred_to_the_window() -> None:
    stored = ramp((16, 16), 0, 255, "uint8")

    def with_lut(ds: Dataset) -> None:
        item = Dataset()
        item.LUTDescriptor = [256, 0, 8]
        item.add_new(0x00283006, "US", list(range(255, -1, -1)))  # LUTData: an inverting LUT
        ds.VOILUTSequence = [item]

    pixels = read_dicom(build_dicom(stored, window=(10, 2), dataset_hook=with_lut)).pixels

    np.testing.assert_array_equal(pixels, 255 - stored)


def test_fields_are_the_non_identifying_ones() -> None:
    stored = ramp((8, 8), 0, 4095, "uint16")

    fields = read_dicom(build_dicom(stored, bits_stored=12)).fields

    assert fields.modality == "MR" and fields.series_description == "T2 AX"
    assert fields.pixel_spacing == (0.5, 0.75)
    assert fields.bits_stored == 12 and fields.photometric_interpretation == "MONOCHROME2"
    assert fields.series_uid_sha256 == dicom.hashlib.sha256(SERIES_UID.encode()).hexdigest()
    assert "Explicit VR Little Endian" in fields.transfer_syntax
    assert SERIES_UID not in repr(fields.to_dict())


def test_multi_frame_is_rejected_with_a_reason() -> None:
    frames = np.stack([ramp((8, 8), 0, 255, "uint8")] * 3)

    with pytest.raises(ImageRejected) as caught:
        read_dicom(build_dicom(frames, frames=3))

    assert caught.value.reason == "multi_frame" and "3 frames" in caught.value.detail


def compressed(transfer_syntax: str) -> bytes:
    def encapsulated(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = encapsulate([b"\xff\xd8 not really a codestream \xff\xd9"])
        ds["PixelData"].VR = "OB"

    return build_dicom(ramp((8, 8), 0, 255, "uint8"), dataset_hook=encapsulated)


def test_compression_without_a_decoder_is_rejected_naming_the_transfer_syntax() -> None:
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")

    with pytest.raises(ImageRejected) as caught:
        read_dicom(compressed(JPEGLSLossless))

    assert caught.value.reason == "unsupported_compression"
    assert "JPEG-LS Lossless" in caught.value.detail and JPEGLSLossless in caught.value.detail


def test_rle_compressed_slice_decodes_like_the_uncompressed_one() -> None:
    stored = ramp((32, 32), 0, 4095, "uint16")
    plain = build_dicom(stored, bits_stored=12, window=(2048, 4096))
    rle = build_dicom(
        stored,
        bits_stored=12,
        window=(2048, 4096),
        dataset_hook=lambda ds: ds.compress(RLELossless, encoding_plugin="pydicom"),
    )

    np.testing.assert_array_equal(read_dicom(rle).pixels, read_dicom(plain).pixels)
    assert "RLE Lossless" in read_dicom(rle).fields.transfer_syntax


def test_colour_and_oversized_and_corrupt_files_are_rejected() -> None:
    rgb = build_dicom(np.zeros((8, 8, 3), np.uint8), photometric="RGB")
    big = build_dicom(np.zeros((64, 64), np.uint8))
    short = build_dicom(np.zeros((64, 64), np.uint16))
    truncated = short[:-500]

    reasons = {}
    for name, data, kwargs in (
        ("rgb", rgb, {}),
        ("big", big, {"max_pixels": 1000}),
        ("truncated", truncated, {}),
    ):
        with pytest.raises(ImageRejected) as caught:
            read_dicom(data, **kwargs)
        reasons[name] = caught.value.reason

    assert reasons == {
        "rgb": "unsupported_pixel_format",
        "big": "too_large",
        "truncated": "truncated",
    }


def test_looks_like_dicom_by_preamble_or_key() -> None:
    stored = ramp((8, 8), 0, 255, "uint8")
    part10, bare = build_dicom(stored), build_dicom(stored, preamble=False)

    assert looks_like_dicom(part10) and looks_like_dicom(part10, "scans/no-extension")
    assert not looks_like_dicom(bare) and looks_like_dicom(bare, "scans/IM0001.DCM")
    assert not looks_like_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200, "scan.png")
    assert not looks_like_dicom(b"")
    # A bare dataset (no preamble, no file meta) found by its key is still read.
    np.testing.assert_array_equal(read_dicom(bare).pixels, read_dicom(part10).pixels)


def test_display_conversion_makes_no_float_copy_of_the_frame() -> None:
    stored = ramp((1024, 1024), 0, 4095, "uint16")
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = 1.5, -20
    ds.WindowCenter, ds.WindowWidth = 2000, 3000

    tracemalloc.start()
    try:
        pixels = dicom._display_uint8(stored, ds, "MONOCHROME2")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert pixels.dtype == np.uint8
    # A float64 copy alone would be 4x the frame; offsets + output are 1.5x.
    assert peak < 2 * stored.nbytes


def test_no_patient_identifier_reaches_output_exceptions_logs_or_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stored = ramp((16, 16), 0, 4095, "uint16")

    def bad_values(ds: Dataset) -> None:  # invalid values make pydicom warn, quoting them
        ds.PatientBirthDate = "not-a-date-SECRETBIRTH"
        ds.PatientSex = "SECRETSEX-INVALID"

    files = {
        "ok": build_dicom(stored, bits_stored=12, dataset_hook=bad_values),
        "bare": build_dicom(stored, bits_stored=12, preamble=False),
        "multi": build_dicom(np.stack([stored] * 2), frames=2),
        "compressed": compressed(JPEGLSLossless),
        "truncated": build_dicom(stored)[:-100],
        "colour": build_dicom(np.zeros((8, 8, 3), np.uint8), photometric="RGB"),
    }
    texts: list[str] = []
    caplog.clear()  # building the files above logged pydicom's own complaints
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        for data in files.values():
            try:
                result = read_dicom(data)
                texts.append(repr(result.fields))
                texts.append(repr(result.fields.to_dict()))
            except ImageRejected as error:
                texts.extend([str(error), repr(error), error.detail, repr(error.__cause__)])
    texts.extend(record.getMessage() for record in caplog.records)
    texts.extend(str(w.message) for w in caught_warnings)
    everything = "\n".join(texts)

    assert len(texts) > len(files)
    for secret in (*IDENTIFIERS.values(), "SECRETBIRTH", "SECRETSEX", "SECRET"):
        assert secret not in everything
    assert "Doe" not in everything and "Jane" not in everything
