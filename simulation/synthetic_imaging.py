"""Synthetic multi-hospital imaging data written as real, de-identified DICOM files.

There is no labelled medical image set that ships offline, so the imaging path trains on
this: every hospital is its own "scanner" (resolution, pixel spacing, intensity scale,
noise, rescale slope/intercept, MONOCHROME1 vs MONOCHROME2, signed vs unsigned storage)
and the finding to learn is a small bright round lesion on a textured body with
look-alike distractors (vessels, calcifications, faint masses). Hospitals differ in size
and prevalence (non-IID). The files exercise the same DICOM decoding a real deployment
needs, and the headers follow the DICOM PS3.15 basic de-identification profile.

Layout, per hospital::

    root/hospital-{i}/images/img-0001.dcm ...
    root/hospital-{i}/labels.csv            # file,label   (file relative to the hospital folder)
    root/manifest.json                       # parameters + version; written last

A second call with the same parameters reuses the files on disk.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from fedcare.atomic_files import SHARED, replace_file
from fedcare.errors import FedcareError
from simulation.dicom_writing import deidentified_header
from simulation.folder_lock import locked_folder, publish_staged

GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"
_MARKER_NAME = ".fedcare-synthetic"  # in every hospital folder we wrote: safe to replace
DEFAULT_IMAGES_PER_HOSPITAL = (200, 150, 120, 90)  # non-IID sizes, cycled past four hospitals
_PREVALENCE = (0.50, 0.40, 0.58, 0.45)  # chance of a lesion, per hospital (cycled)


@dataclass(frozen=True)
class Scanner:
    """How one hospital's scanner turns tissue density into stored DICOM pixel values.

    modality value = offset + gain * density (+ noise * |gain|); stored = (value - intercept) / slope.
    A negative gain with MONOCHROME1 stores dense tissue as low values (displayed white).
    """

    name: str
    modality: str  # "CT" (CT Image Storage) or "CR"/"MR" (Secondary Capture)
    rows: int
    columns: int
    pixel_spacing_mm: float
    photometric: str  # MONOCHROME1 | MONOCHROME2
    signed: bool  # PixelRepresentation 1 (int16) vs 0 (uint16)
    bits_stored: int
    rescale_slope: float
    rescale_intercept: float
    rescale_type: str  # "HU" for CT, "US" (unspecified) otherwise
    gain: float
    offset: float
    noise: float  # Gaussian noise, in density units (tissue density is ~0.75)
    blur_px: float  # scanner point-spread function, Gaussian sigma in pixels
    window_center: float
    window_width: float

    def describe(self) -> str:
        """One line for logs and reports."""
        sign = "signed" if self.signed else "unsigned"
        return (
            f"{self.name}: {self.modality} {self.rows}x{self.columns} @ {self.pixel_spacing_mm:.2f} mm, "
            f"{self.photometric}, {sign} {self.bits_stored}-bit, slope {self.rescale_slope:g} "
            f"intercept {self.rescale_intercept:g} ({self.rescale_type}), noise {self.noise:g}, "
            f"window {self.window_center:g}/{self.window_width:g}"
        )


@dataclass(frozen=True)
class HospitalFolder:
    """One synthetic hospital on disk."""

    name: str
    folder: Path
    labels_csv: Path
    scanner: Scanner
    n_images: int
    n_positive: int
    prevalence: float  # the planned lesion probability (n_positive / n_images is the realised one)


def write_hospitals(
    root: Path,
    n_hospitals: int = 4,
    images_per_hospital: int | Sequence[int] | None = None,
    seed: int = 0,
) -> list[HospitalFolder]:
    """Write (or reuse) ``n_hospitals`` synthetic DICOM hospitals under ``root``.

    ``images_per_hospital``: one count for all, one count per hospital, or None for the
    default non-IID sizes. Hospital i's images depend only on (seed, i, its count), so
    adding hospitals does not change the existing ones. If ``root`` already holds a complete
    set written with the same parameters and generator version, it is reused untouched.
    """
    root = Path(root)
    counts = _counts(n_hospitals, images_per_hospital)
    params = {"n_hospitals": n_hospitals, "images_per_hospital": counts, "seed": int(seed)}
    root.mkdir(parents=True, exist_ok=True)
    with locked_folder(root):
        reused = _reuse(root, params)
        if reused is not None:
            return reused
        return _write_all(root, params, counts, int(seed))


def scanner_for(index: int) -> Scanner:
    """The scanner of hospital ``index`` (four distinct profiles, then variations of them)."""
    base = _BASE_SCANNERS[index % len(_BASE_SCANNERS)]
    if index < len(_BASE_SCANNERS):
        return base
    # Later hospitals reuse a profile with a different noise level and field of view.
    cycle = index // len(_BASE_SCANNERS)
    return _replace(
        base,
        name=f"{base.name}-v{cycle}",
        noise=round(base.noise * (1.0 + 0.25 * (cycle % 3)), 4),
        pixel_spacing_mm=round(base.pixel_spacing_mm * (1.0 + 0.05 * ((cycle % 4) - 1.5)), 4),
    )


def prevalence_for(index: int) -> float:
    """Planned lesion probability of hospital ``index``."""
    return _PREVALENCE[index % len(_PREVALENCE)]


def read_labels(hospital: HospitalFolder) -> list[tuple[Path, int]]:
    """(absolute file path, label) for every image of a hospital, in file order."""
    with hospital.labels_csv.open(newline="") as handle:
        return [(hospital.folder / row["file"], int(row["label"])) for row in csv.DictReader(handle)]


# --------------------------------------------------------------------------- scanners


def _scanner(
    name: str,
    modality: str,
    rows: int,
    columns: int,
    fov_mm: float,
    photometric: str,
    signed: bool,
    bits_stored: int,
    slope: float,
    intercept: float,
    gain: float,
    offset: float,
    noise: float,
    blur_px: float,
) -> Scanner:
    # Window over densities 0.35..1.15: the body (~0.75) sits mid-grey, lesions and other
    # dense structures stay below white, air is clipped to black.
    low, high = offset + gain * 0.35, offset + gain * 1.15
    return Scanner(
        name=name,
        modality=modality,
        rows=rows,
        columns=columns,
        pixel_spacing_mm=round(fov_mm / max(rows, columns), 4),
        photometric=photometric,
        signed=signed,
        bits_stored=bits_stored,
        rescale_slope=slope,
        rescale_intercept=intercept,
        rescale_type="HU" if modality == "CT" else "US",
        gain=gain,
        offset=offset,
        noise=noise,
        blur_px=blur_px,
        window_center=round((low + high) / 2, 1),
        window_width=round(abs(high - low), 1),
    )


_BASE_SCANNERS = (
    # CT in Hounsfield units, stored unsigned 12-bit with the usual -1024 intercept.
    _scanner(
        "scanner-A",
        "CT",
        64,
        64,
        350.0,
        "MONOCHROME2",
        False,
        12,
        1.0,
        -1024.0,
        gain=1250.0,
        offset=-1000.0,
        noise=0.03,
        blur_px=0.5,
    ),
    # CT stored signed 16-bit directly in HU (intercept 0), finer resolution, noisier.
    _scanner(
        "scanner-B",
        "CT",
        96,
        96,
        330.0,
        "MONOCHROME2",
        True,
        16,
        1.0,
        0.0,
        gain=1250.0,
        offset=-1000.0,
        noise=0.05,
        blur_px=0.8,
    ),
    # Radiograph-like, MONOCHROME1: dense tissue stored as LOW values; slope 0.9.
    _scanner(
        "scanner-C",
        "CR",
        128,
        128,
        360.0,
        "MONOCHROME1",
        False,
        12,
        0.9,
        0.0,
        gain=-2000.0,
        offset=3400.0,
        noise=0.04,
        blur_px=1.0,
    ),
    # Non-square MR-like arbitrary units, coarse quantisation (slope 2.5, intercept -100).
    _scanner(
        "scanner-D",
        "MR",
        80,
        100,
        340.0,
        "MONOCHROME2",
        False,
        16,
        2.5,
        -100.0,
        gain=900.0,
        offset=40.0,
        noise=0.06,
        blur_px=0.7,
    ),
)


def _replace(scanner: Scanner, **changes: object) -> Scanner:
    fields = asdict(scanner)
    fields.update(changes)
    return Scanner(**fields)


# --------------------------------------------------------------------------- images


def _smooth_field(rng: np.random.Generator, rows: int, cols: int, sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (FFT filter, periodic)."""
    white = rng.standard_normal((rows, cols))
    field = _blur(white, sigma_px)
    return field / (field.std() + 1e-12)


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0:
        return image
    fy = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.rfftfreq(image.shape[1])[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(image) * kernel, s=image.shape)


class _Grid:
    """Pixel-centre coordinates in mm, for drawing soft shapes onto one image."""

    def __init__(self, rows: int, cols: int, spacing: float) -> None:
        self.y = (np.arange(rows) + 0.5 - rows / 2) * spacing
        self.x = (np.arange(cols) + 0.5 - cols / 2) * spacing
        self.spacing = spacing

    def ellipse(
        self, cx: float, cy: float, a: float, b: float, theta: float, *, edge_mm: float
    ) -> tuple[tuple[slice, slice], np.ndarray]:
        """A soft elliptical mask in [0, 1] on the bounding box where it is not ~0."""
        reach = max(a, b) + 10.0 * edge_mm
        box = (self._span(self.y, cy, reach), self._span(self.x, cx, reach))
        yy, xx = self.y[box[0], None], self.x[None, box[1]]
        c, s = np.cos(theta), np.sin(theta)
        u = ((xx - cx) * c + (yy - cy) * s) / a
        v = (-(xx - cx) * s + (yy - cy) * c) / b
        distance = (np.sqrt(u * u + v * v) - 1.0) * min(a, b)  # ~ mm outside the boundary
        return box, 1.0 / (1.0 + np.exp(np.clip(distance / edge_mm, -30.0, 30.0)))

    def add(self, image: np.ndarray, amplitude: float, *shape: float, edge_mm: float) -> None:
        """image += amplitude * ellipse(*shape), touching only the ellipse's box."""
        box, mask = self.ellipse(*shape, edge_mm=edge_mm)
        image[box] += amplitude * mask

    def full(self, *shape: float, edge_mm: float) -> np.ndarray:
        mask = np.zeros((len(self.y), len(self.x)))
        self.add(mask, 1.0, *shape, edge_mm=edge_mm)
        return mask

    def _span(self, axis: np.ndarray, centre: float, reach: float) -> slice:
        start = int(np.searchsorted(axis, centre - reach))
        return slice(start, max(start, int(np.searchsorted(axis, centre + reach))))


def _add_structures(
    rng: np.random.Generator, grid: _Grid, tissue: np.ndarray, inside: Callable[[float], tuple[float, float]]
) -> None:
    """Organs and lesion look-alikes, added into ``tissue`` at points ``inside`` gives."""
    # Darker organs (fat / air-filled structures), present in every image.
    for _ in range(rng.integers(1, 3)):
        cx, cy = inside(0.6)
        a = rng.uniform(18.0, 40.0)
        grid.add(
            tissue, -rng.uniform(0.08, 0.2), cx, cy, a, a * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi), edge_mm=4.0
        )
    # Look-alikes in both classes: thin bright vessels, tiny bright calcifications (as bright
    # as lesions, but a few mm), faint large masses. What tells a lesion apart is size + shape.
    for _ in range(rng.integers(1, 4)):
        cx, cy = inside(0.8)
        grid.add(
            tissue,
            rng.uniform(0.08, 0.25),
            cx,
            cy,
            rng.uniform(15.0, 35.0),
            rng.uniform(1.5, 3.0),
            rng.uniform(0, np.pi),
            edge_mm=1.0,
        )
    for _ in range(rng.integers(0, 3)):
        cx, cy = inside(0.85)
        r = rng.uniform(1.5, 2.5)
        grid.add(tissue, rng.uniform(0.2, 0.4), cx, cy, r, r, 0.0, edge_mm=0.7)
    for _ in range(rng.integers(0, 3)):
        cx, cy = inside(0.7)
        r = rng.uniform(20.0, 40.0)
        grid.add(tissue, rng.uniform(0.04, 0.1), cx, cy, r, r * rng.uniform(0.7, 1.0), 0.0, edge_mm=8.0)


def _density(rng: np.random.Generator, scanner: Scanner, lesion: bool) -> np.ndarray:
    """Tissue density (air 0, soft tissue ~0.75, dense findings up to ~1.2) on the scanner grid."""
    rows, cols, spacing = scanner.rows, scanner.columns, scanner.pixel_spacing_mm
    grid = _Grid(rows, cols, spacing)
    half_h, half_w = rows * spacing / 2, cols * spacing / 2

    # Body outline: a jittered, slightly rotated ellipse with a brighter skin rim.
    bx, by = rng.uniform(-0.05, 0.05) * half_w, rng.uniform(-0.05, 0.05) * half_h
    ba, bb = rng.uniform(0.72, 0.86) * half_w, rng.uniform(0.68, 0.84) * half_h
    btheta = rng.uniform(-0.25, 0.25)
    body = grid.full(bx, by, ba, bb, btheta, edge_mm=1.5)
    inner = grid.full(bx, by, ba - 6.0, bb - 6.0, btheta, edge_mm=1.5)

    tissue = 0.75 + 0.07 * _smooth_field(rng, rows, cols, 30.0 / spacing)
    tissue += 0.03 * _smooth_field(rng, rows, cols, 5.0 / spacing)
    tissue += 0.12 * (body - inner)  # skin / fat rim

    def inside(margin: float) -> tuple[float, float]:
        """A point well inside the body ellipse (margin = fraction of its radius)."""
        radius, angle = margin * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        u, v = radius * np.cos(angle) * ba, radius * np.sin(angle) * bb
        c, s = np.cos(btheta), np.sin(btheta)
        return bx + u * c - v * s, by + u * s + v * c

    _add_structures(rng, grid, tissue, inside)

    if lesion:  # a round-to-oval bright mass, 24-44 mm across, of varying contrast
        cx, cy = inside(0.75)
        r = rng.uniform(12.0, 22.0)
        grid.add(
            tissue, rng.uniform(0.14, 0.45), cx, cy, r, r / rng.uniform(1.0, 1.4), rng.uniform(0, np.pi), edge_mm=1.5
        )

    density = body * tissue
    return np.clip(_blur(density, scanner.blur_px), 0.0, None)


def _stored_pixels(rng: np.random.Generator, scanner: Scanner, density: np.ndarray) -> np.ndarray:
    """Scanner intensity + noise + rescale + quantisation into the stored integer type."""
    noisy = density + scanner.noise * rng.standard_normal(density.shape)
    value = scanner.offset + scanner.gain * noisy
    stored = np.rint((value - scanner.rescale_intercept) / scanner.rescale_slope)
    if scanner.signed:
        low, high, dtype = -(2 ** (scanner.bits_stored - 1)), 2 ** (scanner.bits_stored - 1) - 1, "<i2"
    else:
        low, high, dtype = 0, 2**scanner.bits_stored - 1, "<u2"
    return np.clip(stored, low, high).astype(dtype)


# --------------------------------------------------------------------------- DICOM


def _dicom_template(scanner: Scanner) -> Dataset:
    """A de-identified (PS3.15 basic profile) single-frame DICOM header for one scanner.

    Each image gets fresh UIDs and its pixels from ``_fill``; building the header once per
    hospital keeps writing fast.
    """
    is_ct = scanner.modality == "CT"
    sop_class = CTImageStorage if is_ct else SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    _set_deidentified_header(ds, scanner, is_ct, sop_class)
    _set_image_pixel_module(ds, scanner)
    return ds


def _set_deidentified_header(ds: Dataset, scanner: Scanner, is_ct: bool, sop_class: str) -> None:
    """The identity-free attributes: SOP class, equipment, de-identification record, CT/SC geometry."""
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"] if is_ct else ["DERIVED", "SECONDARY"]
    deidentified_header(ds, sop_class, scanner.modality, f"synthetic {scanner.name}")
    if not is_ct:
        ds.ConversionType = "SYN"  # Secondary Capture of a synthetic image
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if is_ct:
        ds.PositionReferenceIndicator = ""
        ds.KVP = ""
        ds.AcquisitionNumber = ""
        ds.ImagePositionPatient = [0.0, 0.0, 0.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = 5.0
    else:
        ds.PatientOrientation = ""


def _set_image_pixel_module(ds: Dataset, scanner: Scanner) -> None:
    """Pixel layout, bit depth, rescale and window of the scanner's stored images."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = scanner.photometric
    ds.Rows, ds.Columns = scanner.rows, scanner.columns
    ds.PixelSpacing = [scanner.pixel_spacing_mm, scanner.pixel_spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = scanner.bits_stored
    ds.HighBit = scanner.bits_stored - 1
    ds.PixelRepresentation = 1 if scanner.signed else 0
    ds.RescaleSlope = scanner.rescale_slope
    ds.RescaleIntercept = scanner.rescale_intercept
    ds.RescaleType = scanner.rescale_type
    ds.WindowCenter = scanner.window_center
    ds.WindowWidth = scanner.window_width


def _fill(ds: Dataset, pixels: np.ndarray) -> Dataset:
    """Give the template a new instance: fresh (random, non-identifying) UIDs and ``pixels``.

    Every image is its own study and series: the synthetic patients are unrelated.
    """
    sop_instance = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if ds.Modality == "CT":
        ds.FrameOfReferenceUID = generate_uid()
    ds.PixelData = pixels.tobytes()
    return ds


# --------------------------------------------------------------------------- files


def _counts(n_hospitals: int, images_per_hospital: int | Sequence[int] | None) -> list[int]:
    if isinstance(n_hospitals, bool) or not isinstance(n_hospitals, int) or n_hospitals < 1:
        raise FedcareError(f"n_hospitals must be a positive integer, got {n_hospitals!r}")
    if images_per_hospital is None:
        counts = [DEFAULT_IMAGES_PER_HOSPITAL[i % len(DEFAULT_IMAGES_PER_HOSPITAL)] for i in range(n_hospitals)]
    elif isinstance(images_per_hospital, int):
        counts = [images_per_hospital] * n_hospitals
    else:
        counts = [int(n) for n in images_per_hospital]
        if len(counts) != n_hospitals:
            raise FedcareError(
                f"images_per_hospital lists {len(counts)} counts for {n_hospitals} hospitals",
                "give one count per hospital, or a single count for all",
            )
    if any(n < 1 for n in counts):
        raise FedcareError(f"every hospital needs at least one image, got {counts}")
    return counts


def _labels(rng: np.random.Generator, n: int, prevalence: float) -> np.ndarray:
    """Bernoulli labels, with at least one image of each class when n >= 2."""
    labels = (rng.uniform(size=n) < prevalence).astype(int)
    if n >= 2 and labels.min() == labels.max():
        labels[0] = 1 - labels[0]
    return labels


def _write_hospital(folder: Path, index: int, n_images: int, seed: int) -> tuple[Scanner, int]:
    """Write one hospital's images and labels.csv into ``folder``; return (scanner, positives)."""
    scanner, prevalence = scanner_for(index), prevalence_for(index)
    rng = np.random.default_rng([seed, index, n_images])
    labels = _labels(rng, n_images, prevalence)
    images = folder / "images"
    images.mkdir(parents=True)
    template, rows = _dicom_template(scanner), []
    for number, label in enumerate(labels, start=1):
        name = f"images/img-{number:04d}.dcm"
        pixels = _stored_pixels(rng, scanner, _density(rng, scanner, bool(label)))
        _fill(template, pixels).save_as(folder / name, enforce_file_format=True)
        rows.append((name, int(label)))
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label"])
        writer.writerows(rows)
    (folder / _MARKER_NAME).write_text("written by fedcare simulation.synthetic_imaging\n")
    return scanner, int(labels.sum())


def _write_all(root: Path, params: dict, counts: list[int], seed: int) -> list[HospitalFolder]:
    manifest_path = root / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)  # the old set, if any, is no longer complete
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        entries: list[dict[str, Any]] = []
        for index, n_images in enumerate(counts):
            scanner, positives = _write_hospital(staging / f"hospital-{index}", index, n_images, seed)
            entries.append(
                {
                    "name": f"hospital-{index}",
                    "n_images": n_images,
                    "n_positive": positives,
                    "prevalence": prevalence_for(index),
                    "scanner": asdict(scanner),
                }
            )
        publish_staged(root, staging, [entry["name"] for entry in entries], _MARKER_NAME, "synthetic")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = {
        "generator": "fedcare.synthetic_imaging",
        "version": GENERATOR_VERSION,
        "params": params,
        "hospitals": entries,
    }
    replace_file(manifest_path, json.dumps(manifest, indent=2), mode=SHARED)
    return [_hospital(root, entry) for entry in entries]


def _reuse(root: Path, params: dict) -> list[HospitalFolder] | None:
    """The hospitals already on disk if they are complete and match ``params``; else None."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("params") != params:
        return None
    try:
        hospitals = [_hospital(root, entry) for entry in manifest["hospitals"]]
        for hospital in hospitals:
            files = read_labels(hospital)
            if len(files) != hospital.n_images or not all(path.is_file() for path, _ in files):
                return None
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return hospitals


def _hospital(root: Path, entry: dict) -> HospitalFolder:
    folder = root / entry["name"]
    return HospitalFolder(
        name=entry["name"],
        folder=folder,
        labels_csv=folder / "labels.csv",
        scanner=Scanner(**entry["scanner"]),
        n_images=int(entry["n_images"]),
        n_positive=int(entry["n_positive"]),
        prevalence=float(entry["prevalence"]),
    )
