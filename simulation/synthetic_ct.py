"""Synthetic multi-hospital CT studies written as real DICOM series with DICOM SEG lesion masks.

No labelled 3D medical image set ships offline, so the 3D path trains on this. Every hospital is
its own CT scanner, as hospitals' scanners differ:

- slice spacing (1.5 to 5 mm) and pixel spacing (1.0 to 1.6 mm): the same body gives different
  matrix sizes, so a model must see volumes resampled to one spacing;
- patient orientation (head first, or feet first with the slice normal reversed);
- noise (10 to 22 HU) and intensity calibration (an offset of up to 25 HU), and how values are
  stored (RescaleIntercept -1024 with slope 1, or slope 0.5 with intercept -2048).

Each study is one series of a phantom abdomen: an ellipsoid body (fat, muscle), one organ, and in
a positive study a spherical lesion in the organ, darker or brighter than it. Its mask is written
as a DICOM SEG object (highdicom) referencing the series' slices, for every study (an empty
segment when there is no lesion), so the same studies serve classification (``labels.csv``: study
-> 0/1) and segmentation. Hospitals differ in size and prevalence (non-IID). Headers follow the
PS3.15 basic de-identification profile (``simulation.dicom_writing``).

Sizes and lesions are set so that DP-SGD at the preset epsilon can learn the task federated: with
36 to 64 studies a hospital and 5-9 mm lesions 50-90 HU from the organ, every model, federated or
local, stayed at chance under DP (docs/benchmarks.md).

Layout, per hospital::

    root/hospital-{i}/study-{k}/ct/<random>.dcm ...    one file per slice
    root/hospital-{i}/study-{k}/seg.dcm                the lesion mask (DICOM SEG)
    root/hospital-{i}/labels.csv                        StudyInstanceUID,label
    root/manifest.json                                  parameters + version; written last
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fedcare.atomic_files import SHARED, replace_file
from fedcare.errors import FedcareError
from simulation.dicom_writing import CTGeometry, WrittenSeries, write_ct_series
from simulation.folder_lock import locked_folder, publish_staged

GENERATOR_VERSION = 3
MANIFEST_NAME = "manifest.json"
_MARKER_NAME = ".fedcare-synthetic-ct"
FIELD_OF_VIEW_MM = (40.0, 64.0, 64.0)  # (along the body, rows, columns): the phantom's box
STUDIES_PER_HOSPITAL = (160, 128, 112, 96)  # non-IID sizes, cycled past four hospitals
PREVALENCE = (0.5, 0.4, 0.6, 0.45)  # chance of a lesion, per hospital (cycled)
LESION_RADIUS_MM = (6.0, 10.0)
LESION_CONTRAST_HU = (80.0, 140.0)  # |lesion - organ|, darker or brighter at random


@dataclasses.dataclass(frozen=True)
class CTScanner:
    """One hospital's scanner: its grid, orientation, noise, calibration and stored-value encoding."""

    name: str
    slice_mm: float
    pixel_mm: float
    feet_first: bool
    noise_hu: float
    offset_hu: float  # calibration error added to every value
    slope: float
    intercept: float

    def geometry(self) -> CTGeometry:
        row = (-1.0, 0.0, 0.0) if self.feet_first else (1.0, 0.0, 0.0)  # normal reversed when feet first
        z0 = FIELD_OF_VIEW_MM[0] if self.feet_first else 0.0
        return CTGeometry(
            spacing=(self.slice_mm, self.pixel_mm, self.pixel_mm),
            row_direction=row,
            column_direction=(0.0, 1.0, 0.0),
            origin=(FIELD_OF_VIEW_MM[2] / 2 if self.feet_first else -FIELD_OF_VIEW_MM[2] / 2, -32.0, z0),
            slope=self.slope,
            intercept=self.intercept,
        )

    def shape(self) -> tuple[int, int, int]:
        return (
            round(FIELD_OF_VIEW_MM[0] / self.slice_mm),
            round(FIELD_OF_VIEW_MM[1] / self.pixel_mm),
            round(FIELD_OF_VIEW_MM[2] / self.pixel_mm),
        )


SCANNERS = (
    CTScanner("scanner A", 2.5, 1.0, False, 10.0, 0.0, 1.0, -1024.0),
    CTScanner("scanner B", 5.0, 1.25, True, 16.0, 15.0, 0.5, -2048.0),
    CTScanner("scanner C", 1.5, 1.6, False, 22.0, -25.0, 1.0, -1024.0),
    CTScanner("scanner D", 3.0, 1.0, True, 14.0, 8.0, 1.0, -1024.0),
)


def scanner_for(index: int) -> CTScanner:
    return SCANNERS[index % len(SCANNERS)]


@dataclasses.dataclass(frozen=True)
class CTStudy:
    """One generated study as written: its UIDs, label and files (relative to its hospital folder)."""

    study_uid: str
    label: int
    series: list[str]
    seg: str


def phantom(scanner: CTScanner, rng: np.random.Generator, lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume, lesion mask) on the scanner's grid: body, organ, and a lesion when ``lesion``."""
    shape = scanner.shape()
    spacing = np.array([scanner.slice_mm, scanner.pixel_mm, scanner.pixel_mm])
    centres = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*centres, indexing="ij")
    half = np.array(FIELD_OF_VIEW_MM) / 2
    body = ((y - half[1]) / 28.0) ** 2 + ((x - half[2]) / 30.0) ** 2 <= 1.0
    organ_centre = half + rng.uniform(-4, 4, size=3) * np.array([0.5, 1, 1])
    organ = ((z - organ_centre[0]) / 16.0) ** 2 + ((y - organ_centre[1]) / 14.0) ** 2 + (
        (x - organ_centre[2]) / 16.0
    ) ** 2 <= 1.0
    hu = np.full(shape, -1000.0)
    hu[body] = -90.0  # fat
    hu[body & (((y - half[1]) / 22.0) ** 2 + ((x - half[2]) / 24.0) ** 2 <= 1.0)] = 45.0  # muscle/soft tissue
    hu[organ] = 90.0 + rng.normal(0.0, 5.0)  # an enhancing organ, brighter than the muscle around it
    mask = np.zeros(shape, dtype=bool)
    if lesion:
        radius = rng.uniform(*LESION_RADIUS_MM)
        centre = organ_centre + rng.uniform(-6.0, 6.0, size=3) * np.array([0.5, 1, 1])
        mask = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2) & organ
        hu[mask] += rng.choice([-1.0, 1.0]) * rng.uniform(*LESION_CONTRAST_HU)
    hu += rng.normal(0.0, scanner.noise_hu, size=shape) + scanner.offset_hu
    if scanner.feet_first:  # slices are written along the reversed normal: flip the grid to match
        hu, mask = hu[::-1], mask[::-1]
    return hu, mask


def write_ct_hospitals(root: Path, n_hospitals: int = 4, seed: int = 0) -> list[Path]:
    """Write (or reuse) ``root/hospital-<i>`` for ``n_hospitals`` CT hospitals; returns their folders."""
    if n_hospitals < 1:
        raise FedcareError(f"hospitals must be >= 1, got {n_hospitals}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    params = {"hospitals": n_hospitals, "seed": seed, "studies": list(STUDIES_PER_HOSPITAL)}
    with locked_folder(root):
        manifest_path = root / MANIFEST_NAME
        folders = [root / f"hospital-{i}" for i in range(n_hospitals)]
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = None
        if old == {"version": GENERATOR_VERSION, "params": params} and all(f.is_dir() for f in folders):
            return folders
        manifest_path.unlink(missing_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        try:
            for i in range(n_hospitals):
                _write_hospital(staging / f"hospital-{i}", i, seed)
            publish_staged(root, staging, [f.name for f in folders], _MARKER_NAME, "synthetic CT")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        replace_file(manifest_path, json.dumps({"version": GENERATOR_VERSION, "params": params}), mode=SHARED)
    return folders


def _write_hospital(folder: Path, index: int, seed: int) -> list[CTStudy]:
    """One hospital's studies, its labels.csv and its marker."""
    rng = np.random.default_rng([seed, index])
    scanner = scanner_for(index)
    count = STUDIES_PER_HOSPITAL[index % len(STUDIES_PER_HOSPITAL)]
    labels = rng.random(count) < PREVALENCE[index % len(PREVALENCE)]
    studies = [_write_study(folder, f"study-{k:03d}", scanner, rng, bool(lesion)) for k, lesion in enumerate(labels)]
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["StudyInstanceUID", "label"])
        writer.writerows((s.study_uid, s.label) for s in studies)
    (folder / _MARKER_NAME).write_text("written by fedcare simulation.synthetic_ct\n")
    return studies


def _write_study(folder: Path, name: str, scanner: CTScanner, rng: np.random.Generator, lesion: bool) -> CTStudy:
    hu, mask = phantom(scanner, rng, lesion)
    written = write_ct_series(folder / name / "ct", hu, scanner.geometry(), rng, model_name=f"synthetic {scanner.name}")
    seg = folder / name / "seg.dcm"
    write_seg(seg, written, mask)
    return CTStudy(
        written.study_uid,
        int(lesion),
        [str(p.relative_to(folder)) for p in written.files],
        str(seg.relative_to(folder)),
    )


def write_seg(path: Path, series: WrittenSeries, mask: np.ndarray) -> None:
    """The lesion mask (slices in the series' order) as a DICOM SEG object referencing every slice."""
    import highdicom as hd
    from pydicom import dcmread
    from pydicom.sr.codedict import codes

    sources = [dcmread(f) for f in series.files]
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fedcare",
        manufacturer_model_name="synthetic lesion masks",
        software_versions=str(GENERATOR_VERSION),
        device_serial_number="0",
        omit_empty_frames=False,
    )
    # de-identified as the series is (PS3.15 basic profile): no dates, times, serial numbers or
    # software versions, and no record of the equipment that wrote it
    for keyword in ("ContentDate", "ContentTime", "DeviceSerialNumber", "SoftwareVersions"):
        setattr(seg, keyword, "")
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContributingEquipmentSequence"):
        if keyword in seg:
            delattr(seg, keyword)
    seg.save_as(path)
