"""Synthetic DICOM hospitals: valid files, declared scanner properties, de-identified headers,
labels that match, reproducible pixels, reuse on a second call, and a learnable finding."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from fedcare.errors import FedcareError
from shared_models.imaging_cnn import SmallCNN
from simulation.synthetic_imaging import MANIFEST_NAME, HospitalFolder, read_labels, scanner_for, write_hospitals

COUNTS = [6, 5, 4, 7]

# PS3.15 basic-profile attributes that identify patients, staff, places or times.
IDENTIFYING = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientAddress",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientTelephoneNumbers",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "AccessionNumber",
    "StudyID",
    "DeviceSerialNumber",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "InstanceCreationDate",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "AcquisitionDateTime",
]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> list[HospitalFolder]:
    return write_hospitals(tmp_path_factory.mktemp("synthetic") / "set", 4, COUNTS, seed=3)


def _files(hospital: HospitalFolder) -> list[Path]:
    return sorted((hospital.folder / "images").glob("*.dcm"))


def test_layout_and_returned_description(small_set: list[HospitalFolder]) -> None:
    assert [h.name for h in small_set] == [f"hospital-{i}" for i in range(4)]
    for hospital, count in zip(small_set, COUNTS, strict=True):
        assert hospital.labels_csv == hospital.folder / "labels.csv"
        assert len(_files(hospital)) == hospital.n_images == count
        assert hospital.scanner.describe().startswith(hospital.scanner.name)
    assert len({h.scanner.name for h in small_set}) == 4  # every hospital its own scanner


def test_scanners_cover_the_variations_a_loader_must_handle(small_set: list[HospitalFolder]) -> None:
    scanners = [h.scanner for h in small_set]
    assert {s.photometric for s in scanners} == {"MONOCHROME1", "MONOCHROME2"}
    assert {s.signed for s in scanners} == {True, False}
    assert any(s.rows != s.columns for s in scanners)
    assert len({(s.rows, s.columns) for s in scanners}) == 4
    assert len({s.pixel_spacing_mm for s in scanners}) == 4
    assert len({(s.rescale_slope, s.rescale_intercept) for s in scanners}) == 4
    assert len({s.noise for s in scanners}) >= 3
    assert any(s.modality == "CT" and s.rescale_type == "HU" for s in scanners)


def test_files_are_valid_dicom_with_the_declared_scanner_properties(small_set: list[HospitalFolder]) -> None:
    for hospital in small_set:
        scanner = hospital.scanner
        for path in _files(hospital):
            ds = pydicom.dcmread(path)  # raises without the 128-byte preamble + DICM prefix
            assert ds.preamble is not None
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
            assert ds.SOPClassUID == (CTImageStorage if scanner.modality == "CT" else SecondaryCaptureImageStorage)
            assert ds.Modality == scanner.modality
            assert ds.PhotometricInterpretation == scanner.photometric
            assert (ds.Rows, ds.Columns) == (scanner.rows, scanner.columns)
            assert [float(v) for v in ds.PixelSpacing] == [scanner.pixel_spacing_mm] * 2
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, scanner.bits_stored, scanner.bits_stored - 1)
            assert ds.PixelRepresentation == (1 if scanner.signed else 0)
            assert float(ds.RescaleSlope) == scanner.rescale_slope
            assert float(ds.RescaleIntercept) == scanner.rescale_intercept
            assert float(ds.WindowWidth) > 0
            pixels = ds.pixel_array
            assert pixels.shape == (scanner.rows, scanner.columns)
            assert pixels.dtype == (np.int16 if scanner.signed else np.uint16)
            assert pixels.std() > 0
            if scanner.signed:
                assert pixels.min() < 0  # CT air stored directly in HU
            else:
                assert pixels.max() < 2**scanner.bits_stored


def test_headers_are_deidentified(small_set: list[HospitalFolder]) -> None:
    for hospital in small_set:
        for path in _files(hospital):
            ds = pydicom.dcmread(path)
            for keyword in IDENTIFYING:
                assert keyword not in ds or ds[keyword].is_empty, f"{path.name}: {keyword} = {ds[keyword].value!r}"
            elements = list(ds.iterall()) + list(ds.file_meta)
            assert not any(elem.tag.is_private for elem in elements)
            assert not [e.keyword for e in elements if e.VR in ("DA", "DT", "TM") and not e.is_empty]
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.DeidentificationMethod == "fedcare synthetic"
            assert ds.BurnedInAnnotation == "NO"
            assert "SourceApplicationEntityTitle" not in ds.file_meta


def test_labels_csv_matches_the_files(small_set: list[HospitalFolder]) -> None:
    for hospital in small_set:
        with hospital.labels_csv.open(newline="") as handle:
            reader = csv.DictReader(handle)
            assert reader.fieldnames == ["file", "label"]
            rows = list(reader)
        assert [r["file"] for r in rows] == [p.relative_to(hospital.folder).as_posix() for p in _files(hospital)]
        assert {r["label"] for r in rows} <= {"0", "1"}
        assert sum(int(r["label"]) for r in rows) == hospital.n_positive
        assert 0 < hospital.n_positive < hospital.n_images  # both classes at every hospital
        assert [p for p, _ in read_labels(hospital)] == _files(hospital)


def _pixels(hospitals: list[HospitalFolder]) -> list[bytes]:
    return [pydicom.dcmread(p).PixelData for h in hospitals for p in _files(h)]


def test_same_seed_gives_identical_pixels(tmp_path: Path, small_set: list[HospitalFolder]) -> None:
    again = write_hospitals(tmp_path / "again", 4, COUNTS, seed=3)
    assert _pixels(again) == _pixels(small_set)
    assert [h.n_positive for h in again] == [h.n_positive for h in small_set]
    # A hospital's images do not depend on how many other hospitals there are.
    first_only = write_hospitals(tmp_path / "one", 1, COUNTS[:1], seed=3)
    assert _pixels(first_only) == _pixels(small_set[:1])
    other_seed = write_hospitals(tmp_path / "other", 1, COUNTS[:1], seed=4)
    assert _pixels(other_seed) != _pixels(small_set[:1])


def test_a_second_call_reuses_the_set(tmp_path: Path) -> None:
    root = tmp_path / "set"
    first = write_hospitals(root, 2, 3, seed=1)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    second = write_hospitals(root, 2, 3, seed=1)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["params"] == {"n_hospitals": 2, "images_per_hospital": [3, 3], "seed": 1}


def test_changed_parameters_or_an_incomplete_set_are_rewritten(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_hospitals(root, 3, 2, seed=0)
    fewer = write_hospitals(root, 2, [2, 4], seed=0)
    assert sorted(p.name for p in root.glob("hospital-*")) == ["hospital-0", "hospital-1"]
    assert [h.n_images for h in fewer] == [2, 4]
    assert not list(root.glob(".staging-*"))
    # A lost file makes the set incomplete: the next call writes it again.
    lost = _files(fewer[1])[0]
    lost.unlink()
    write_hospitals(root, 2, [2, 4], seed=0)
    assert lost.is_file()


def test_refuses_to_overwrite_folders_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "hospital-0").mkdir()
    (tmp_path / "hospital-0" / "real.dcm").write_bytes(b"not ours")
    with pytest.raises(FedcareError, match="not written by the synthetic generator"):
        write_hospitals(tmp_path, 1, 2, seed=0)
    assert (tmp_path / "hospital-0" / "real.dcm").read_bytes() == b"not ours"


@pytest.mark.parametrize("bad", [[3, 3], [3, 0, 3], 0])
def test_rejects_bad_counts(tmp_path: Path, bad: int | list[int]) -> None:
    with pytest.raises(FedcareError):
        write_hospitals(tmp_path, 3, bad, seed=0)


# ----------------------------------------------------------------------------- decoding


def _decode(path: Path, size: int = 64) -> np.ndarray:
    """Minimal display pipeline: modality LUT -> window -> MONOCHROME1 inversion -> pad -> resize."""
    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    low = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
    image = np.clip((values - low) / float(ds.WindowWidth), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        image = 1.0 - image
    rows, cols = image.shape
    side = max(rows, cols)
    square = np.zeros((side, side), np.float32)
    square[(side - rows) // 2 : (side - rows) // 2 + rows, (side - cols) // 2 : (side - cols) // 2 + cols] = image
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(square)[None, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0, 0].numpy()


def test_scanners_agree_after_display_decoding(small_set: list[HospitalFolder]) -> None:
    """Window tags and MONOCHROME1 inversion are consistent: air dark, body mid-grey everywhere."""
    for hospital in small_set:
        for path in _files(hospital)[:3]:
            image = _decode(path)
            assert image[:4, :4].mean() < 0.05, hospital.scanner.name  # air in the corner
            body = image[image > 0.15]
            assert body.size > 0.3 * image.size, hospital.scanner.name
            assert 0.4 < np.median(body) < 0.65, hospital.scanner.name  # soft tissue mid-grey


def test_the_finding_is_learnable_by_the_small_cnn(tmp_path: Path) -> None:
    """Seeded, non-DP, centralised: SmallCNN clearly beats chance on held-out images."""
    hospitals = write_hospitals(tmp_path / "learn", 4, 100, seed=0)
    pairs = [(path, label) for h in hospitals for path, label in read_labels(h)]
    images = torch.from_numpy(np.stack([_decode(path) for path, _ in pairs]))[:, None]
    labels = torch.tensor([label for _, label in pairs], dtype=torch.float32)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    n_train = int(0.75 * len(pairs))
    train, test = order[:n_train], order[n_train:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic kernels, and fair to the shared CPU
    try:
        torch.manual_seed(0)
        model = SmallCNN(image_size=64)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        shuffle = torch.Generator().manual_seed(0)
        for _ in range(12):
            model.train()
            epoch = train[torch.randperm(n_train, generator=shuffle)]
            for start in range(0, n_train, 32):
                batch = epoch[start : start + 32]
                optimizer.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images[batch]), labels[batch])
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            predicted = (model(images[test]) > 0).float()
    finally:
        torch.set_num_threads(threads)
    accuracy = (predicted == labels[test]).float().mean().item()
    majority = max(labels[test].mean().item(), 1 - labels[test].mean().item())
    print(f"held-out accuracy {accuracy:.3f} (majority class {majority:.3f})")
    assert accuracy >= 0.75, f"held-out accuracy {accuracy:.3f} (majority class {majority:.3f})"


def test_more_hospitals_than_profiles_get_distinct_scanners() -> None:
    fifth, first = scanner_for(4), scanner_for(0)
    assert fifth.name != first.name and fifth.photometric == first.photometric
    assert (fifth.noise, fifth.pixel_spacing_mm) != (first.noise, first.pixel_spacing_mm)
