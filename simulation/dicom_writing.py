"""Writing generated DICOM: the de-identified header every generated object carries, and CT series.

Generated hospitals must look like a real export after de-identification (PS3.15 basic profile):
type-2 identifying attributes present but empty, a de-identification record, no names, IDs, dates,
institutions or private tags; UIDs are fresh random ones. A CT series is written as one file per
slice with the geometry a scanner writes (ImagePositionPatient per slice, one
ImageOrientationPatient, PixelSpacing) and stored values behind a RescaleSlope/RescaleIntercept,
so the reader has to do what it does for a hospital's own series.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# type-2 identifying attributes a de-identified object keeps, empty (PS3.15 basic profile: Z)
EMPTIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def deidentified_header(ds: Dataset, sop_class: str, modality: str, model_name: str) -> None:
    """The identity-free attributes of a generated object: SOP class, equipment, the
    de-identification record; names, IDs, dates, times, institutions and private tags never written."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.Manufacturer = "fedcare"
    ds.ManufacturerModelName = model_name
    for keyword in EMPTIED:
        setattr(ds, keyword, "")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "fedcare synthetic"
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = DicomSequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    ds.BurnedInAnnotation = "NO"


@dataclasses.dataclass(frozen=True)
class CTGeometry:
    """Where a series' voxels lie: spacing (between slices, rows, columns) in mm, the row and column
    directions (unit, perpendicular), the first slice's position, and how values are stored."""

    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8)
    row_direction: tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_direction: tuple[float, float, float] = (0.0, 1.0, 0.0)
    origin: tuple[float, float, float] = (-100.0, -100.0, 0.0)
    slope: float = 1.0
    intercept: float = -1024.0

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.array(self.row_direction), np.array(self.column_direction))


@dataclasses.dataclass(frozen=True)
class WrittenSeries:
    study_uid: str
    series_uid: str
    files: list[Path]  # in slice order along the normal (the names are not)


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    geometry: CTGeometry,
    rng: np.random.Generator,
    study_uid: str | None = None,
    model_name: str = "synthetic CT",
) -> WrittenSeries:
    """Write ``hu`` (slices, rows, columns, Hounsfield units) as a CT series of one file per slice.

    File names are random (a series is never ordered by name) and InstanceNumber runs backwards
    half the time, so only the positions order it."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), generate_uid(), generate_uid()
    stored = np.round((hu - geometry.intercept) / geometry.slope)
    stored = np.clip(stored, -32768, 32767).astype(np.int16)
    backwards = bool(rng.integers(2))
    files = []
    for k in range(hu.shape[0]):
        ds = _ct_slice(geometry, hu.shape[1:], model_name)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.InstanceNumber = hu.shape[0] - k if backwards else k + 1
        position = np.array(geometry.origin) + k * geometry.spacing[0] * geometry.normal
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceLocation = round(float(position @ geometry.normal), 4)
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{rng.integers(1 << 40):011x}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return WrittenSeries(study_uid, series_uid, files)


def _ct_slice(geometry: CTGeometry, shape: tuple[int, ...], model_name: str) -> Dataset:
    """One de-identified CT slice's header with fresh instance UIDs (no pixels, no position yet)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    deidentified_header(ds, CTImageStorage, "CT", model_name)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    instance = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = instance
    ds.SOPInstanceUID = instance
    ds.SeriesNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.KVP = ""
    ds.AcquisitionNumber = ""
    ds.ImageOrientationPatient = [*geometry.row_direction, *geometry.column_direction]
    ds.SliceThickness = geometry.spacing[0]
    ds.PixelSpacing = [geometry.spacing[1], geometry.spacing[2]]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = geometry.slope, geometry.intercept, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    return ds
