"""One DICOM file -> model pixels: the real-export cases, and every bundled pydicom file loads or is rejected."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from client.datasets.dicom_reader import DicomRejected, ImagePolicy, read_dicom, read_dicom_bytes
from fedcare.errors import FedcareError
from tests.support.dicom_files import SIZE, make_dataset, ramp, write_dicom


def read_one(path: Path, size: int = SIZE, **kw) -> np.ndarray:
    out = read_dicom(path, ImagePolicy(size=size, **kw))
    assert len(out) == 1
    return out[0]


# --- policy -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"size": 3}, "image size must be an integer from 8 to 1024"),
        ({"size": 64.0}, "image size must be an integer"),
        ({"multiframe": "all"}, "unknown multiframe policy 'all'"),
        ({"colour": "rgb"}, "unknown colour policy 'rgb'"),
    ],
)
def test_policy_rejects_bad_values(kwargs, message):
    with pytest.raises(FedcareError, match=message):
        ImagePolicy(**kwargs)


def test_policy_key_names_every_field():
    keys = {
        ImagePolicy().key(),
        ImagePolicy(size=128).key(),
        ImagePolicy(multiframe="every").key(),
        ImagePolicy(colour="reject").key(),
    }
    assert len(keys) == 4


# --- the grayscale pipeline ------------------------------------------------------------------------------


def test_output_is_float32_unit_range(tmp_path):
    img = read_one(write_dicom(tmp_path / "a.dcm", ramp()))
    assert img.shape == (SIZE, SIZE) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0 and img.max() > 0.9


def test_monochrome1_inverted_equals_monochrome2_of_the_same_image(tmp_path):
    pixels = ramp(hi=4095)
    m2 = read_one(write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2"))
    m1 = read_one(write_dicom(tmp_path / "m1.dcm", (4095 - pixels).astype(np.uint16), "MONOCHROME1"))
    np.testing.assert_allclose(m1, m2, atol=1e-6)
    same_values = read_one(write_dicom(tmp_path / "m1same.dcm", pixels, "MONOCHROME1"))
    np.testing.assert_allclose(same_values, 1.0 - m2, atol=1e-6)  # bright = dense: MONOCHROME1 is flipped


def test_monochrome1_with_window_matches_monochrome2(tmp_path):
    pixels = ramp(hi=4095)
    m2 = read_one(write_dicom(tmp_path / "m2.dcm", pixels, WindowCenter=2000, WindowWidth=1000))
    m1 = read_one(
        write_dicom(
            tmp_path / "m1.dcm",
            (4095 - pixels).astype(np.uint16),
            "MONOCHROME1",
            WindowCenter=4095 - 2000,
            WindowWidth=1000,
        )
    )
    np.testing.assert_allclose(m1, m2, atol=2e-3)  # LINEAR windows are offset by half a unit


def test_rescale_slope_intercept_is_applied_before_the_window(tmp_path):
    stored = ramp(hi=2000)
    window = {"WindowCenter": 40, "WindowWidth": 400}
    rescaled = read_one(write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024, **window))
    hu = (stored.astype(np.int32) - 1024).astype(np.int16)
    direct = read_one(write_dicom(tmp_path / "hu.dcm", hu, RescaleSlope=1, RescaleIntercept=0, **window))
    np.testing.assert_allclose(rescaled, direct, atol=1e-6)
    ignored = read_one(write_dicom(tmp_path / "raw.dcm", stored, **window))
    assert np.abs(ignored - rescaled).max() > 0.5  # without the intercept the window lands elsewhere
    doubled = read_one(
        write_dicom(
            tmp_path / "slope.dcm", (stored // 2).astype(np.uint16), RescaleSlope=2, RescaleIntercept=-1024, **window
        )
    )
    np.testing.assert_allclose(doubled, rescaled, atol=0.02)


def test_window_maps_center_and_width_and_uses_the_first_of_several(tmp_path):
    pixels = np.tile(np.arange(SIZE, dtype=np.uint16) * 100, (SIZE, 1))  # columns 0..3100
    img = read_one(write_dicom(tmp_path / "w.dcm", pixels, WindowCenter=1550, WindowWidth=1001))
    assert np.all(img[:, :10] == 0.0) and np.all(img[:, 22:] == 1.0)  # below / above the window
    np.testing.assert_allclose(img[0, 15], (1500 - 1549.5) / 1000 + 0.5, atol=1e-5)
    several = read_one(write_dicom(tmp_path / "w2.dcm", pixels, WindowCenter=[1550, 300], WindowWidth=[1001, 50]))
    np.testing.assert_array_equal(several, img)
    stretched = read_one(write_dicom(tmp_path / "none.dcm", pixels))
    assert not np.array_equal(stretched, img)


def test_voi_lut_sequence_is_used(tmp_path):
    pixels = np.tile(np.arange(SIZE, dtype=np.uint16) * 100, (SIZE, 1))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    step = np.array([0] * 1600 + [4095] * (4096 - 1600), dtype="<u2")  # a step at 1600
    item.add_new("LUTData", "OW", step.tobytes())
    img = read_one(write_dicom(tmp_path / "lut.dcm", pixels, VOILUTSequence=[item]))
    assert set(np.unique(img)) == {0.0, 1.0}
    assert np.all(img[:, :16] == 0.0) and np.all(img[:, 16:] == 1.0)


def test_signed_pixels_are_read_as_signed(tmp_path):
    signed = (ramp(hi=2000).astype(np.int32) - 1000).astype(np.int16)  # -1000 .. 1000
    unsigned = (signed.astype(np.int32) + 1000).astype(np.uint16)
    a = read_one(write_dicom(tmp_path / "s.dcm", signed))
    b = read_one(write_dicom(tmp_path / "u.dcm", unsigned))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_non_square_image_keeps_its_aspect_by_padding(tmp_path):
    wide = np.full((16, 64), 3000, dtype=np.uint16)
    wide[:, ::2] = 1000  # not blank
    img = read_one(write_dicom(tmp_path / "wide.dcm", wide), size=32)
    assert img.shape == (32, 32)
    assert np.all(img[:12] == 0) and np.all(img[20:] == 0)  # 16x64 -> 8x32, centred
    assert img[12:20].min() > 0.3
    square_mm = read_one(write_dicom(tmp_path / "mm.dcm", wide, PixelSpacing=[4.0, 1.0]), size=32)
    assert square_mm[0].mean() > 0.3 and square_mm[-1].mean() > 0.3  # 16*4 mm == 64*1 mm: fills the frame


def test_differing_sizes_all_become_size_by_size(tmp_path):
    for rows, cols in [(8, 8), (100, 37), (512, 512)]:
        img = read_one(write_dicom(tmp_path / f"{rows}x{cols}.dcm", ramp(rows, cols)), size=48)
        assert img.shape == (48, 48)


def test_multiframe_policies(tmp_path):
    frames = np.stack([ramp(seed=k) for k in range(3)])
    frames[1] = frames[1][::-1]
    path = write_dicom(tmp_path / "mf.dcm", frames)
    first = read_dicom(path, ImagePolicy(size=SIZE, multiframe="first"))
    every = read_dicom(path, ImagePolicy(size=SIZE, multiframe="every"))
    assert len(first) == 1 and len(every) == 3
    np.testing.assert_array_equal(first[0], every[0])
    assert not np.allclose(every[0], every[1])
    with pytest.raises(DicomRejected, match="multi-frame image \\(3 frames\\)") as exc:
        read_dicom(path, ImagePolicy(multiframe="reject"))
    assert exc.value.code == "multiframe"


def test_rgb_becomes_luminance_or_is_rejected(tmp_path):
    gray = (ramp(hi=255)).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    as_rgb = read_one(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))
    as_gray = read_one(write_dicom(tmp_path / "gray.dcm", gray))
    np.testing.assert_allclose(as_rgb, as_gray, atol=1e-5)
    with pytest.raises(DicomRejected, match="colour image") as exc:
        read_dicom(tmp_path / "rgb.dcm", ImagePolicy(colour="reject"))
    assert exc.value.code == "colour"


@pytest.mark.parametrize(
    "twin",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_compressed_file_decodes_like_its_uncompressed_twin(twin):
    reference = read_dicom(get_testdata_file("MR_small.dcm"), ImagePolicy())[0]
    other = read_dicom(get_testdata_file(twin), ImagePolicy())[0]
    np.testing.assert_allclose(other, reference, atol=1e-6)


def test_bare_dataset_without_preamble_is_read(tmp_path):
    import io

    ds = make_dataset(ramp())
    del ds.file_meta  # some archives store datasets without the Part 10 header
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)
    assert buffer.getvalue()[128:132] != b"DICM"
    reference = read_one(write_dicom(tmp_path / "ref.dcm", ramp()))
    np.testing.assert_array_equal(read_dicom_bytes(buffer.getvalue(), ImagePolicy(size=SIZE), "bare")[0], reference)


def test_bytes_and_path_give_the_same_pixels(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", ramp())
    np.testing.assert_array_equal(
        read_dicom(path, ImagePolicy())[0], read_dicom_bytes(path.read_bytes(), ImagePolicy(), "a.dcm")[0]
    )


# --- rejections ------------------------------------------------------------------------------------------


def _rejected(path, policy=ImagePolicy()) -> DicomRejected:
    with pytest.raises(DicomRejected) as exc:
        read_dicom(path, policy)
    assert str(path) in str(exc.value)
    return exc.value


def test_rejects_non_dicom_file(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient Doe^Jane, see attached\n" * 20)
    exc = _rejected(path)
    assert exc.code == "not-dicom" and "not a DICOM file" in exc.reason and "Doe" not in str(exc)


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_rejects_truncated_file(tmp_path, keep):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * keep)])
    exc = _rejected(path)
    assert exc.code == "truncated" and "truncated" in exc.reason


def test_rejects_dicom_without_pixel_data_and_never_quotes_values(tmp_path):
    ds = make_dataset(ramp(), PatientName="Doe^Jane")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    exc = _rejected(tmp_path / "nopix.dcm")
    assert exc.code == "no-pixel-data" and "Pixel Data" in exc.reason and "Doe" not in str(exc)


def test_rejects_zero_size_image(tmp_path):
    ds = make_dataset(ramp(), Rows=0)
    ds.save_as(tmp_path / "zero.dcm", enforce_file_format=True)
    assert _rejected(tmp_path / "zero.dcm").code == "zero-size"


def test_rejects_blank_image(tmp_path):
    exc = _rejected(write_dicom(tmp_path / "blank.dcm", np.full((SIZE, SIZE), 7, dtype=np.uint16)))
    assert exc.code == "blank"


def test_rejects_huge_image_before_decoding(tmp_path):
    ds = make_dataset(ramp(), Rows=40000, Columns=40000)
    ds.save_as(tmp_path / "huge.dcm", enforce_file_format=True)
    exc = _rejected(tmp_path / "huge.dcm")
    assert exc.code == "too-large"


def test_rejects_nan_pixels(tmp_path):
    ds = make_dataset(ramp())
    del ds.PixelData
    del ds.PixelRepresentation
    values = np.ones((SIZE, SIZE), dtype="<f4")
    values[3, 3] = np.nan
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.FloatPixelData = values.tobytes()
    ds.save_as(tmp_path / "nan.dcm", enforce_file_format=True)
    exc = _rejected(tmp_path / "nan.dcm")
    assert exc.code == "nan" and "NaN" in exc.reason


def test_rejects_non_image_sop_classes():
    for name, kind in [
        ("rtstruct.dcm", "RT Structure Set Storage"),
        ("test-SR.dcm", "Comprehensive SR Storage"),
        ("rtdose.dcm", "RT Dose Storage"),
        ("waveform_ecg.dcm", "Waveform"),
    ]:
        exc = _rejected(get_testdata_file(name))
        assert exc.code == "non-image" and kind in exc.reason


def test_rejects_unsupported_transfer_syntax_naming_it(tmp_path):
    ds = make_dataset(ramp())
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    exc = _rejected(tmp_path / "video.dcm")
    assert exc.code == "unsupported-transfer-syntax" and "MPEG2" in exc.reason
    assert "re-export" in exc.hint


def test_missing_decoder_plugin_says_what_to_install(monkeypatch):
    import pydicom.pixels.decoders.base as base

    class Missing:
        is_available = False
        missing_dependencies: ClassVar[list[str]] = ["pylibjpeg - requires pylibjpeg-openjpeg"]

    monkeypatch.setattr(base, "get_decoder", lambda uid: Missing())
    exc = _rejected(get_testdata_file("MR_small_jp2klossless.dcm"))
    assert exc.code == "unsupported-transfer-syntax" and "JPEG 2000" in exc.reason
    assert "pylibjpeg-openjpeg" in exc.hint


def test_rejects_undecodable_compressed_data():
    exc = _rejected(get_testdata_file("JPEG-lossy.dcm"))
    assert exc.code == "undecodable" and "JPEG Extended" in exc.reason and "gdcm" in exc.hint


def test_rejects_missing_file_and_directory(tmp_path):
    assert _rejected(tmp_path / "absent.dcm").code == "not-a-file"
    assert _rejected(tmp_path).code == "not-a-file"


# --- the bundled pydicom corpus ---------------------------------------------------------------------------


@pytest.mark.parametrize("multiframe", ["first", "every"])
def test_every_bundled_pydicom_file_loads_or_is_rejected_with_a_reason(multiframe):
    files = get_testdata_files()
    policy = ImagePolicy(size=32, multiframe=multiframe)
    outcome: Counter = Counter()
    for path in files:
        try:
            images = read_dicom(path, policy)
        except DicomRejected as exc:
            assert exc.reason and exc.path == path
            outcome[f"rejected: {exc.code}"] += 1
            continue
        assert images and all(i.shape == (32, 32) and i.dtype == np.float32 for i in images)
        assert all(np.isfinite(i).all() and i.min() >= 0 and i.max() <= 1 for i in images)
        outcome["loaded"] += 1
    print(f"\npydicom bundled test data ({len(files)} paths, multiframe={multiframe}): {dict(outcome.most_common())}")
    assert sum(outcome.values()) == len(files)
    assert outcome["loaded"] >= 75
    assert "rejected: corrupt" not in outcome or outcome["rejected: corrupt"] <= 3
    for name in (
        "CT_small.dcm",
        "MR_small.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg.dcm",
        "examples_palette.dcm",
        "image_dfl.dcm",
        "MR_small_bigendian.dcm",
    ):
        read_dicom(get_testdata_file(name), policy)


def test_zero_byte_file_is_reported_as_empty(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    exc = _rejected(path)
    assert (exc.code, exc.reason) == ("empty", "empty file (0 bytes)") and "export" in exc.hint
    with pytest.raises(DicomRejected, match="empty file"):
        read_dicom_bytes(b"", ImagePolicy(size=SIZE), "empty.dcm")


def test_missing_file_causes_are_named(tmp_path):
    loop = tmp_path / "loop[1].dcm"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling.dcm"
    dangling.symlink_to(tmp_path / "gone.dcm")
    assert _rejected(loop).reason == "is a symbolic link loop"
    assert str(_rejected(loop)).startswith(str(loop))  # the path as given, brackets and all
    assert _rejected(dangling).reason == "is a symbolic link to a missing file"
    assert _rejected(tmp_path / "absent.dcm").reason == "does not exist"
    assert _rejected(tmp_path).reason == "is a directory, not a file"


def test_os_error_causes_are_words_not_tracebacks():
    import errno

    from client.datasets.dicom_reader import os_error_cause

    assert os_error_cause(PermissionError(errno.EACCES, "Permission denied")) == "cannot be read: permission denied"
    assert os_error_cause(OSError(errno.EIO, "Input/output error")) == "cannot be read: Input/output error"
