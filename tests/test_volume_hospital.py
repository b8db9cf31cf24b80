"""A hospital's CT series as 3D classification data: labels by study, MONAI's transforms to one
grid whatever the scanner, a split by study, a cache, and every refusal with its reason."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from client.datasets import DataSource, load_hospital
from client.datasets.volume_hospital import VolumePolicy, preprocess, read_volume_labels
from fedcare.errors import FedcareError
from shared_models.registry import build_model, resolve_model
from simulation import synthetic_ct


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    studies = synthetic_ct.STUDIES_PER_HOSPITAL
    synthetic_ct.STUDIES_PER_HOSPITAL = (8, 6)
    try:
        synthetic_ct.write_ct_hospitals(root, 2, seed=3)
    finally:
        synthetic_ct.STUDIES_PER_HOSPITAL = studies
    return root


def _source(root, i, tmp_path, **kw):
    return DataSource(partition_id=i, data_root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


def test_every_scanner_lands_on_one_grid_split_by_study(ct_root, tmp_path):
    shapes, fingerprints = set(), []
    for i in (0, 1):  # 2.5 mm head first and 5 mm feet first: one grid after MONAI's transforms
        h = load_hospital("synthetic-ct", _source(ct_root, i, tmp_path))
        assert h.task == "volume" and h.x_train.dtype == np.float32
        assert h.x_train.min() >= 0.0 and h.x_train.max() <= 1.0
        shapes.add(h.input_shape)
        assert len(h.y_train) + len(h.y_test) == (8, 6)[i] and set(h.y_test) <= {0, 1}
        fingerprints.append(h.fingerprint())
    assert shapes == {(1, *VolumePolicy().size)}
    again = load_hospital("synthetic-ct", _source(ct_root, 0, tmp_path))  # from the cache
    assert again.fingerprint() == fingerprints[0]
    assert list((tmp_path / "cache" / "volumes").glob("*.npz"))
    assert resolve_model("auto", "volume") == "cnn3d"
    model = build_model("cnn3d", again.input_shape)
    import torch

    assert model(torch.from_numpy(again.x_test[:2])).shape == (2,)


def test_a_feet_first_series_is_reoriented_not_mirrored():
    """One patient with a marker on their left, near the head, scanned head first and feet first
    (rows and slices both reversed): after Orientation and Spacing the marker is in one place."""
    from client.datasets.dicom_series import SeriesGeometry, SeriesVolume, SliceHeader

    n, rows, cols, step, px = 12, 20, 20, 2.5, 2.0
    head = np.full((n, rows, cols), -1000.0, dtype=np.float32)
    head[8:11, 4:8, 13:17] = 1000.0  # slices near the head (z up), columns towards the patient's left (x up)

    def volume(hu, row_direction, origin):
        normal = np.cross(row_direction, (0.0, 1.0, 0.0))
        slices = tuple(
            SliceHeader(
                "f",
                None,
                (*row_direction, 0.0, 1.0, 0.0),
                tuple(np.add(origin, k * step * normal)),
                (px, px),
                (rows, cols),
            )
            for k in range(n)
        )
        geometry = SeriesGeometry(slices, (step, px, px), np.stack([row_direction, (0.0, 1.0, 0.0), normal]), origin)
        return preprocess(SeriesVolume("s", "", "", hu, geometry), VolumePolicy(size=(24, 24, 16)))[0]

    a = volume(head, (1.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    feet = np.ascontiguousarray(head[::-1, :, ::-1])  # the scanner's first slice is at the feet, rows run right
    b = volume(feet, (-1.0, 0.0, 0.0), ((cols - 1) * px, 0.0, (n - 1) * step))
    assert a.max() == 1.0 and np.argwhere(a > 0.5).mean(0) == pytest.approx(np.argwhere(b > 0.5).mean(0), abs=0.5)
    mirrored = np.argwhere(a[:, ::-1] > 0.5).mean(0)
    assert mirrored != pytest.approx(np.argwhere(b > 0.5).mean(0), abs=0.5)


def test_labels_by_series_or_study_and_bad_labels_named_by_line(tmp_path):
    good = tmp_path / "a.csv"
    good.write_text("SeriesInstanceUID,label\n1.2.3,1\n1.2.4,0\n")
    assert read_volume_labels(good) == {"1.2.3": 1, "1.2.4": 0}
    for text, message in [
        ("uid,label\n1.2.3,1\n", "needs a label column and one of StudyInstanceUID, SeriesInstanceUID"),
        ("StudyInstanceUID,label\n1.2.3,yes\n", "line 2: the label is not 0 or 1"),
        ("StudyInstanceUID,label\n1.2.3,1\n1.2.3,0\n", "line 3: a missing or repeated StudyInstanceUID"),
    ]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(FedcareError, match=message) as caught:
            read_volume_labels(bad)
        assert "1.2.3" not in str(caught.value)


def test_a_broken_series_stops_the_load_unless_skipping_is_allowed(ct_root, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(ct_root / "hospital-1", copy / "hospital-1")
    broken = sorted((copy / "hospital-1" / "study-002" / "ct").glob("*.dcm"))
    from pydicom import dcmread

    order = sorted(broken, key=lambda p: float(dcmread(p).ImagePositionPatient[2]))
    order[3].unlink()  # a missing slice
    with pytest.raises(FedcareError, match=r"1 series or file\(s\) in .* cannot be used: series in study-002/ct/"):
        load_hospital("synthetic-ct", _source(copy, 1, tmp_path))
    h = load_hospital("synthetic-ct", _source(copy, 1, tmp_path, on_unreadable="skip"))
    assert len(h.y_train) + len(h.y_test) == 5 and any("skipped" in n for n in h.notes)


def test_identifying_attributes_in_a_slice_or_a_seg_stop_the_load(ct_root, tmp_path):
    from pydicom import dcmread

    copy = tmp_path / "data"
    shutil.copytree(ct_root / "hospital-1", copy / "hospital-1")
    seg = copy / "hospital-1" / "study-001" / "seg.dcm"
    ds = dcmread(seg)
    ds.PatientName = "Doe^Jane"
    ds.save_as(seg)
    with pytest.raises(FedcareError, match=r"study-001/seg.dcm \(PatientName\)") as caught:
        load_hospital("synthetic-ct", _source(copy, 1, tmp_path))
    assert "Doe" not in str(caught.value)
    with (copy / "hospital-1" / "labels.csv").open() as handle:
        assert len(list(csv.reader(handle))) == 7


def test_a_hospitals_own_series_folder_loads_as_dicom_series(ct_root, tmp_path):
    from client.node_config import NodeConfig

    source = NodeConfig.read(
        {"data-path": str(ct_root / "hospital-0"), "cache-dir": str(tmp_path)}, {}, {}
    ).data_source()
    own = load_hospital("dicom-series", source)
    generated = load_hospital("synthetic-ct", _source(ct_root, 0, tmp_path))
    assert own.fingerprint() == generated.fingerprint() and own.name == "hospital-0"
