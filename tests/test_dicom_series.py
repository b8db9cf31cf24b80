"""DICOM series read as 3D volumes: ordered by position along the slice normal, spacing measured,
rescale applied; every series that cannot be one regular volume is refused with its reason and
without a header value."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from client.datasets.dicom_series import read_series_folder
from simulation.dicom_writing import CTGeometry, write_ct_series

SHAPE = (8, 12, 10)  # slices, rows, columns


def _volume(seed: int = 0) -> np.ndarray:
    """A volume whose every slice is different (so order mistakes show), in HU."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-1000, 1000, size=SHAPE).astype(np.float64)
    return base + 100.0 * np.arange(SHAPE[0])[:, None, None]


def _names(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.dcm"))


def _write(root: Path, geometry: CTGeometry = CTGeometry(), seed: int = 0, folder: str = "study/ct"):
    hu = _volume(seed)
    written = write_ct_series(root / folder, hu, geometry, np.random.default_rng(seed))
    return hu, written


@pytest.mark.parametrize(
    "geometry",
    [
        CTGeometry(),  # axial, slices along +z
        CTGeometry(row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 0.0, -1.0)),  # coronal
        CTGeometry(  # oblique, rescale slope 0.5, slices along the normal's negative direction
            row_direction=(0.0, 0.8, 0.6),
            column_direction=(0.0, 0.6, -0.8),
            spacing=(1.25, 0.5, 0.7),
            slope=0.5,
            intercept=-2048.0,
        ),
    ],
    ids=["axial", "coronal", "oblique"],
)
def test_slices_are_ordered_by_position_not_name_and_rescaled_to_hounsfield_units(tmp_path, geometry):
    hu, written = _write(tmp_path, geometry)
    folder = read_series_folder(tmp_path, _names(tmp_path))
    assert not folder.refused and not folder.unreadable and not folder.identifying
    (volume,) = folder.volumes
    assert volume.voxels.shape == SHAPE
    np.testing.assert_allclose(
        volume.voxels, np.round((hu - geometry.intercept) / geometry.slope) * geometry.slope + geometry.intercept
    )
    assert volume.geometry.spacing == pytest.approx(geometry.spacing, rel=1e-4)
    assert (volume.study_uid, volume.series_uid) == (written.study_uid, written.series_uid)
    assert volume.where == "series in study/ct/ (8 files)"


def test_an_enhanced_multiframe_object_is_one_series_per_frame_geometry(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    hu, written = _write(tmp_path)
    first = dcmread(written.files[0])
    frames = []
    stored = []
    for path in written.files:
        ds = dcmread(path)
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = ds.ImagePositionPatient
        item.PlanePositionSequence = Sequence([position])
        frames.append(item)
        stored.append(ds.pixel_array)
    order = np.random.default_rng(1).permutation(len(frames))  # frames stored out of order
    shared = Dataset()
    orientation, measures, rescale = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    measures.PixelSpacing = first.PixelSpacing
    rescale.RescaleSlope, rescale.RescaleIntercept = first.RescaleSlope, first.RescaleIntercept
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    first.SharedFunctionalGroupsSequence = Sequence([shared])
    first.PerFrameFunctionalGroupsSequence = Sequence([frames[i] for i in order])
    first.NumberOfFrames = len(frames)
    first.PixelData = np.stack([stored[i] for i in order]).astype(np.int16).tobytes()
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(first, keyword)
    for path in written.files:
        path.unlink()
    first.save_as(tmp_path / "study" / "ct" / "enhanced.dcm", enforce_file_format=True)
    (volume,) = read_series_folder(tmp_path, _names(tmp_path)).volumes
    np.testing.assert_allclose(volume.voxels, np.round(hu + 1024) - 1024)


def _refusal(root: Path) -> str:
    folder = read_series_folder(root, _names(root))
    assert not folder.volumes, "the bad series was assembled"
    ((where, reason),) = folder.refused
    return f"{where}: {reason}"


def test_a_missing_slice_is_refused_naming_where(tmp_path):
    _, written = _write(tmp_path)
    written.files[3].unlink()
    assert _refusal(tmp_path) == (
        "series in study/ct/ (7 files): missing slices: about 1 slice(s) absent between slices 3 and 4 along the normal"
    )


def test_a_duplicate_position_is_refused(tmp_path):
    _, written = _write(tmp_path)
    ds = dcmread(written.files[2])
    ds.ImagePositionPatient = dcmread(written.files[5]).ImagePositionPatient
    ds.save_as(written.files[2])
    assert "two slices at one position" in _refusal(tmp_path)


def test_mixed_orientations_are_refused(tmp_path):
    _, written = _write(tmp_path)
    ds = dcmread(written.files[4])
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # a coronal localiser in the axial series
    ds.save_as(written.files[4])
    assert "slices with different orientations" in _refusal(tmp_path)


def test_uneven_spacing_is_refused(tmp_path):
    _, written = _write(tmp_path)
    ds = dcmread(written.files[4])
    position = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [position[0], position[1], position[2] + 0.6]  # 2.5 mm steps become 3.1 / 1.9
    ds.save_as(written.files[4])
    assert "uneven slice spacing (2 step(s)" in _refusal(tmp_path)


def test_a_slice_without_geometry_is_refused_naming_the_keyword(tmp_path):
    _, written = _write(tmp_path)
    ds = dcmread(written.files[1])
    del ds.ImagePositionPatient
    ds.save_as(written.files[1])
    reason = _refusal(tmp_path)
    assert "ImagePositionPatient is missing or malformed" in reason
    assert str(written.files[1].relative_to(tmp_path)) in reason


def test_too_few_slices_and_other_files_are_reported_not_guessed(tmp_path):
    _, written = _write(tmp_path)
    for path in written.files[2:]:
        path.unlink()
    (tmp_path / "study" / "notes.dcm").write_bytes(b"not dicom at all" * 20)
    folder = read_series_folder(tmp_path, _names(tmp_path))
    assert not folder.volumes
    assert [reason for _, reason in folder.refused] == ["2 slice(s): a volume needs at least 3"]
    assert folder.unreadable == {
        os.path.join("study", "notes.dcm"): folder.unreadable[os.path.join("study", "notes.dcm")]
    }


def test_two_series_in_one_folder_are_two_volumes_and_no_header_value_is_printed(tmp_path):
    _write(tmp_path, seed=0)
    _, second = _write(tmp_path, CTGeometry(origin=(7.25, -3.5, 99.125)), seed=1)
    bad = dcmread(second.files[0])
    bad.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    bad.save_as(second.files[0])
    folder = read_series_folder(tmp_path, _names(tmp_path))
    assert len(folder.volumes) == 1 and len(folder.refused) == 1
    text = " ".join(f"{w} {r}" for w, r in folder.refused)
    for value in (second.study_uid, second.series_uid, "7.25", "99.125", "2.5"):
        assert value not in text


def test_identifying_attributes_are_found_on_every_slice(tmp_path):
    _, written = _write(tmp_path)
    ds = dcmread(written.files[6])
    ds.PatientName = "Doe^Jane"
    ds.save_as(written.files[6])
    folder = read_series_folder(tmp_path, _names(tmp_path))
    assert list(folder.identifying) == [str(written.files[6].relative_to(tmp_path))]
    assert "PatientName" in folder.identifying[str(written.files[6].relative_to(tmp_path))]
    assert "Doe" not in repr(folder.identifying)


def test_pydicoms_real_test_series_load_or_are_refused_with_a_reason():
    """Real exports (pydicom's bundled DICOMDIR test tree: CT, MR and CR studies): the complete CT
    series loads; every other series and file is refused with its reason, none silently dropped."""
    import pydicom.data

    root = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    folder = read_series_folder(root, names)
    assert [(v.where, v.voxels.shape) for v in folder.volumes] == [("series in 98892001/CT5N/ (5 files)", (5, 16, 16))]
    reasons = dict(folder.refused)
    assert "missing slices" in reasons["series in 77654033/CT2/ (4 files)"]
    assert "different orientations" in reasons["series in 98892003/MR700/ (7 files)"]
    assert "ImageOrientationPatient is missing" in reasons["series in 77654033/CR1/ (1 file)"]  # a radiograph
    assert "DICOMDIR media index" in folder.unreadable["DICOMDIR"]
    grouped = sum(int(w.split("(")[-1].split(" ")[0]) for w, _ in folder.refused) + 5
    assert grouped + len(folder.unreadable) == len(names)  # every file accounted for


def test_data_check_series_reports_volumes_and_refusals_without_header_values(tmp_path):
    from typer.testing import CliRunner

    from fedcare.cli import app

    _write(tmp_path, seed=0, folder="a/ct")
    _, bad = _write(tmp_path, seed=1, folder="b/[red]ct")
    bad.files[4].unlink()
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path), "--series"])
    assert result.exit_code == 1, result.output
    assert "series in a/ct/ (8 files)" in result.output and "8 x 12 x 10" in result.output
    assert "series in b/[red]ct/ (7 files)" in result.output  # the folder name as written, never markup
    assert "missing slices" in result.output
    assert bad.series_uid not in result.output and bad.study_uid not in result.output
    bad.files[0].unlink()
    for path in bad.files[1:4] + bad.files[5:]:
        path.unlink()
    ok = CliRunner().invoke(app, ["data", "check", str(tmp_path), "--series", "--json"])
    assert ok.exit_code == 0, ok.output
