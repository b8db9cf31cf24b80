"""Generated CT hospitals: real DICOM series with DICOM SEG masks that the series reader turns back
into the volume and mask they were written from, on every scanner's geometry."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from client.datasets.dicom_folder import find_dicom_files
from client.datasets.dicom_series import read_mask, read_series_folder
from simulation import synthetic_ct
from simulation.dicom_writing import write_ct_series
from simulation.synthetic_ct import SCANNERS, phantom, write_seg


@pytest.mark.parametrize("scanner", SCANNERS, ids=lambda s: s.name)
def test_a_study_reads_back_as_its_volume_and_lesion_mask(tmp_path, scanner):
    rng = np.random.default_rng(3)
    hu, mask = phantom(scanner, rng, lesion=True)
    assert mask.any() and hu.shape == scanner.shape()
    written = write_ct_series(tmp_path / "study" / "ct", hu, scanner.geometry(), rng)
    write_seg(tmp_path / "study" / "seg.dcm", written, mask)
    folder = read_series_folder(tmp_path, find_dicom_files(tmp_path))
    assert not folder.refused and not folder.unreadable and not folder.identifying
    (volume,) = folder.volumes
    assert volume.geometry.spacing == pytest.approx((scanner.slice_mm, scanner.pixel_mm, scanner.pixel_mm))
    expected = np.round((hu - scanner.intercept) / scanner.slope) * scanner.slope + scanner.intercept
    # the reader orders along the normal: a feet-first series comes back in the order it was written
    np.testing.assert_allclose(volume.voxels, expected, atol=1e-3)
    assert folder.segmentations == {"study/seg.dcm": volume.series_uid}
    np.testing.assert_array_equal(read_mask(tmp_path, "study/seg.dcm", volume), mask)


def test_an_empty_mask_is_written_and_read_for_a_study_without_a_lesion(tmp_path):
    rng = np.random.default_rng(4)
    hu, mask = phantom(SCANNERS[0], rng, lesion=False)
    written = write_ct_series(tmp_path / "s" / "ct", hu, SCANNERS[0].geometry(), rng)
    write_seg(tmp_path / "s" / "seg.dcm", written, mask)
    folder = read_series_folder(tmp_path, find_dicom_files(tmp_path))
    assert not read_mask(tmp_path, "s/seg.dcm", folder.volumes[0]).any()


def test_a_mask_of_another_series_is_refused_naming_the_file(tmp_path):
    rng = np.random.default_rng(5)
    scanner = SCANNERS[0]
    hu, mask = phantom(scanner, rng, lesion=True)
    first = write_ct_series(tmp_path / "a" / "ct", hu, scanner.geometry(), rng)
    write_ct_series(tmp_path / "b" / "ct", hu, scanner.geometry(), rng)
    write_seg(tmp_path / "a" / "seg.dcm", first, mask)
    folder = read_series_folder(tmp_path, find_dicom_files(tmp_path))
    other = next(v for v in folder.volumes if v.series_uid != first.series_uid)
    with pytest.raises(Exception, match=r"a/seg.dcm: segmentation does not fit series in b/ct/"):
        read_mask(tmp_path, "a/seg.dcm", other)


def test_hospitals_differ_in_scanner_size_and_prevalence_and_are_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_ct, "STUDIES_PER_HOSPITAL", (6, 4))
    folders = synthetic_ct.write_ct_hospitals(tmp_path, 2, seed=1)
    shapes = []
    for folder in folders:
        with (folder / "labels.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        found = read_series_folder(folder, find_dicom_files(folder))
        assert sorted(v.study_uid for v in found.volumes) == sorted(r["StudyInstanceUID"] for r in rows)
        assert len(found.segmentations) == len(rows) and not found.identifying and not found.refused
        shapes.append({v.voxels.shape for v in found.volumes})
    assert [len(s) for s in shapes] == [1, 1] and shapes[0] != shapes[1]  # one grid per scanner
    stamp = (folders[0] / "labels.csv").stat().st_mtime_ns
    assert synthetic_ct.write_ct_hospitals(tmp_path, 2, seed=1) == folders
    assert (folders[0] / "labels.csv").stat().st_mtime_ns == stamp  # reused, not rewritten
    (Path(tmp_path) / "hospital-0" / synthetic_ct._MARKER_NAME).unlink()
    with pytest.raises(Exception, match="not written by the synthetic CT generator"):
        synthetic_ct.write_ct_hospitals(tmp_path, 2, seed=2)


def test_prepare_then_check_a_ct_hospital_from_the_command_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedcare.cli import app

    monkeypatch.setattr(synthetic_ct, "STUDIES_PER_HOSPITAL", (3,))
    prepared = CliRunner().invoke(app, ["data", "prepare", "synthetic-ct", str(tmp_path), "--hospitals", "1"])
    assert prepared.exit_code == 0, prepared.output
    checked = CliRunner().invoke(app, ["data", "check", str(tmp_path / "hospital-0"), "--series"])
    assert checked.exit_code == 0, checked.output
    assert "series as volumes" in checked.output and "ok: every series can train as a volume" in checked.output
    assert re.search(r"with a segmentation \(task segment\)\s*│\s*3\b", checked.output)  # each study has its SEG
