"""A hospital's CT/MR series as model-ready 3D volumes with study labels (3D classification).

Series are read by ``client.datasets.dicom_series`` (ordered along the normal, rescaled, refused
with reasons), then brought to one grid with MONAI's transforms, as NVIDIA FLARE and Fed-BioMed
sites do: ``Orientation`` (every volume in RAS, whatever the scanner's patient position),
``Spacing`` (resampled to the policy's voxel size, so a 5 mm and a 1.5 mm series meet in the same
grid), ``ScaleIntensityRange`` (a Hounsfield window to [0, 1]) and ``ResizeWithPadOrCrop`` (the
model's input size, centred). Labels come from ``labels.csv`` keyed by ``StudyInstanceUID`` or
``SeriesInstanceUID``; the train/test split is by study (one patient's series never on both sides)
with the fixed split seed, so the ledger's training set never moves.

The processed volumes are cached on local disk (``cache-dir``), keyed by the folder's file names,
sizes and modification times and the policy, so later rounds do not decode and resample again.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from client.datasets.dicom_folder import find_dicom_files, phi_error
from client.datasets.dicom_series import SeriesVolume, assemble_series, group_series
from client.datasets.hospital_data import HospitalData
from fedcare.atomic_files import replace_file
from fedcare.errors import FedcareError

VOLUME_PREPROCESSING_VERSION = 1  # bump whenever the processed volumes change (invalidates caches)
KEY_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID")
TEST_FRACTION = 0.3
SPLIT_SEED = 43


@dataclasses.dataclass(frozen=True)
class VolumePolicy:
    """How every volume of a run is brought to the model's input; part of the cache key."""

    size: tuple[int, int, int] = (32, 32, 20)  # voxels (R-L, A-P, S-I) after resampling
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    window_hu: tuple[float, float] = (-160.0, 240.0)  # soft-tissue window -> [0, 1]

    def key(self) -> str:
        return f"v{VOLUME_PREPROCESSING_VERSION}-{self.size}-{self.spacing_mm}-{self.window_hu}"


def load_volume_hospital(
    folder: Path,
    labels_csv: Path,
    policy: VolumePolicy,
    cache_dir: Path | None,
    require_deidentified: bool = True,
    on_unreadable: str = "error",
) -> HospitalData:
    """The hospital's labelled series as (n, 1, *size) volumes in [0, 1], split by study."""
    names = find_dicom_files(folder, exclude=[labels_csv])
    cache = _cache_path(folder, names, labels_csv, policy, cache_dir)
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            x, y, studies = stored["x"], stored["y"], stored["studies"]
            notes = [str(n) for n in stored["notes"]]
    else:
        x, y, studies, notes = _read_and_process(folder, names, labels_csv, policy, require_deidentified, on_unreadable)
        if cache is not None:
            _save_cache(cache, x, y, studies, notes)
    return _split(folder.name, x, y, studies, notes)


def _read_and_process(
    folder: Path,
    names: list[str],
    labels_csv: Path,
    policy: VolumePolicy,
    require_deidentified: bool,
    on_unreadable: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    grouped = group_series(folder, names)
    if grouped.identifying and require_deidentified:  # refused before any pixel is decoded
        raise phi_error(grouped.identifying)
    found = assemble_series(folder, grouped)
    problems = [f"{where}: {reason}" for where, reason in found.refused]
    problems += [f"{name}: {reason}" for name, reason in found.unreadable.items()]
    notes = []
    if problems and on_unreadable == "error":
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise FedcareError(
            f"{len(problems)} series or file(s) in {folder} cannot be used: {shown}",
            "fix or remove them, or set on-unreadable=skip to train without them "
            "(`fedcare data check FOLDER --series` lists every one)",
        )
    if problems:
        notes.append(f"{len(problems)} series or file(s) skipped (on-unreadable=skip)")
    labels = read_volume_labels(labels_csv)
    labelled = [(v, labels.get(v.series_uid, labels.get(v.study_uid))) for v in found.volumes]
    unlabelled = sum(1 for _, label in labelled if label is None)
    if unlabelled:
        notes.append(f"{unlabelled} series without a label in {labels_csv.name} (not used)")
    kept = [(v, label) for v, label in labelled if label is not None]
    if len(kept) < 2:
        raise FedcareError(
            f"{folder} holds {len(kept)} labelled series",
            "a hospital needs at least 2 labelled series (one to train, one to test)",
        )
    x = np.stack([preprocess(v, policy) for v, _ in kept])
    y = np.array([label for _, label in kept], dtype=np.int64)
    studies = np.array([v.study_uid for v, _ in kept])
    return x, y, studies, notes


def preprocess(volume: SeriesVolume, policy: VolumePolicy) -> np.ndarray:
    """One series on the policy's grid with MONAI's transforms: (1, *size) float32 in [0, 1]."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientation, ResizeWithPadOrCrop, ScaleIntensityRange, Spacing

    g = volume.geometry
    # array axes (columns, rows, slices); DICOM's patient axes are LPS, MONAI's RAS: flip x and y
    affine = np.eye(4)
    affine[:3, 0] = g.direction[0] * g.spacing[2]  # along a row: the row direction, column spacing
    affine[:3, 1] = g.direction[1] * g.spacing[1]
    affine[:3, 2] = g.direction[2] * g.spacing[0]
    affine[:3, 3] = g.origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    voxels = torch.from_numpy(np.ascontiguousarray(volume.voxels.transpose(2, 1, 0)[None]))
    image = MetaTensor(voxels, affine=torch.from_numpy(affine))
    low, high = policy.window_hu
    transform = Compose(
        [
            Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacing(pixdim=policy.spacing_mm, mode="bilinear"),
            ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
            ResizeWithPadOrCrop(spatial_size=policy.size),
        ]
    )
    out = transform(image)
    return np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.float32)


def read_volume_labels(path: Path) -> dict[str, int]:
    """``labels.csv``: a ``StudyInstanceUID`` or ``SeriesInstanceUID`` column and a 0/1 ``label``
    column; refused naming the line, never the identifier."""
    if not path.is_file():
        raise FedcareError(f"no labels file {path}", "put labels.csv (StudyInstanceUID,label) beside the series")
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header = [h.strip() for h in rows[0]] if rows else []
    key = next((k for k in KEY_COLUMNS if k in header), None)
    if key is None or "label" not in header:
        raise FedcareError(
            f"{path} needs a label column and one of {', '.join(KEY_COLUMNS)}",
            "write the header StudyInstanceUID,label (or SeriesInstanceUID,label)",
        )
    k, lab = header.index(key), header.index("label")
    labels: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        value = row[lab].strip() if lab < len(row) else ""
        if value not in ("0", "1"):
            raise FedcareError(f"{path} line {line}: the label is not 0 or 1", "labels are 0 (negative) or 1")
        uid = row[k].strip() if k < len(row) else ""
        if not uid or uid in labels:
            raise FedcareError(f"{path} line {line}: a missing or repeated {key}", f"give each {key} one row")
        labels[uid] = int(value)
    return labels


def _split(name: str, x: np.ndarray, y: np.ndarray, studies: np.ndarray, notes: list[str]) -> HospitalData:
    """Train/test by study (stratified by the study's label where both classes have two studies)."""
    from sklearn.model_selection import train_test_split

    unique = np.unique(studies)
    study_label = np.array([y[studies == s].max() for s in unique])
    stratify = study_label if np.bincount(study_label, minlength=2).min() >= 2 else None
    train_studies, _ = train_test_split(unique, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=stratify)
    train = np.isin(studies, train_studies)
    return HospitalData(
        name=name,
        feature_names=[],
        numeric_features=[],
        feature_bounds={},
        x_train=x[train],
        y_train=y[train],
        x_test=x[~train],
        y_test=y[~train],
        task="volume",
        notes=notes,
    )


def _cache_path(
    folder: Path, names: list[str], labels_csv: Path, policy: VolumePolicy, cache_dir: Path | None
) -> Path | None:
    """Where the processed volumes are kept: keyed by every file's name, size and mtime, the labels
    file's, and the policy (None: no cache)."""
    if cache_dir is None:
        return None
    h = hashlib.sha256(policy.key().encode())
    for path in [*(folder / n for n in names), labels_csv]:
        try:
            st = os.stat(path)
        except OSError:
            continue
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return Path(cache_dir) / "volumes" / f"{h.hexdigest()[:32]}.npz"


def _save_cache(path: Path, x: np.ndarray, y: np.ndarray, studies: np.ndarray, notes: list[str]) -> None:
    import io

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y, studies=studies, notes=np.array(notes, dtype=str))
    replace_file(path, buffer.getvalue())
