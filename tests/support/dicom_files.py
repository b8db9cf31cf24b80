"""Small de-identified DICOM files and a hospital folder of them, written in tests (no real images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

SIZE = 32


def make_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", name: str = "img", **attrs) -> Dataset:
    """A minimal Secondary Capture image holding `pixels` (rows, cols), (frames, rows, cols) or RGB (rows, cols, 3)."""
    pixels = np.asarray(pixels)
    colour = photometric in ("RGB",)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[name])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.PatientName = ""  # Type 2: present, empty, as a de-identifier leaves it
    ds.PatientID = ""
    shape = pixels.shape[:-1] if colour else pixels.shape
    if len(shape) == 3:
        ds.NumberOfFrames = shape[0]
    ds.Rows, ds.Columns = shape[-2], shape[-1]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    if pixels.dtype == np.uint8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    else:
        signed = np.issubdtype(pixels.dtype, np.signedinteger)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
        pixels = pixels.astype("<i2" if signed else "<u2")
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> Path:
    """Save ``make_dataset(pixels, ...)`` as a DICOM file at ``path``."""
    ds = make_dataset(pixels, photometric, name=str(Path(path).name), **attrs)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def ramp(rows: int = SIZE, cols: int = SIZE, lo: int = 0, hi: int = 4000, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus seeded noise, as uint16."""
    rng = np.random.default_rng(seed)
    base = np.linspace(lo, hi, rows * cols).reshape(rows, cols)
    return np.clip(base + rng.normal(0, 20, size=base.shape), lo, hi).astype(np.uint16)


def hospital(root: Path, n: int = 6, labels: list[int] | None = None, csv: str | None = None) -> Path:
    """n small de-identified images with alternating labels and a labels.csv."""
    root.mkdir(parents=True, exist_ok=True)
    labels = labels if labels is not None else [i % 2 for i in range(n)]
    for i in range(n):
        write_dicom(root / f"img{i:02d}.dcm", ramp(24 + 8 * (i % 2), 24, seed=i))
    rows = "".join(f"img{i:02d}.dcm,{lab}\n" for i, lab in enumerate(labels))
    (root / "labels.csv").write_text(csv if csv is not None else "file,label\n" + rows)
    return root
