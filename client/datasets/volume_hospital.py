"""A hospital's CT/MR series as model-ready 3D volumes with study labels (3D classification) or
lesion masks (3D segmentation).

Series are read by ``client.datasets.dicom_series`` (ordered along the normal, rescaled, refused
with reasons), then brought to one grid with MONAI's transforms, as NVIDIA FLARE and Fed-BioMed
sites do: ``Orientation`` (every volume in RAS, whatever the scanner's patient position),
``Spacing`` (resampled to the policy's voxel size, so a 5 mm and a 1.5 mm series meet in the same
grid), ``ScaleIntensityRange`` (a Hounsfield window to [0, 1]) and ``ResizeWithPadOrCrop`` (the
model's input size, centred). For classification, labels come from ``labels.csv`` keyed by
``StudyInstanceUID`` or ``SeriesInstanceUID``; for segmentation, each series' mask comes from the
DICOM SEG object that references it, brought to the same grid by the same transforms (nearest
neighbour, so a mask stays a mask). The train/test split is by study (one patient's series never on
both sides) with the fixed split seed, so the ledger's training set never moves.

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
from client.datasets.dicom_series import (
    SeriesFolder,
    SeriesRejected,
    SeriesVolume,
    assemble_series,
    group_series,
    read_mask,
)
from client.datasets.hospital_data import HospitalData
from fedcare.atomic_files import replace_file
from fedcare.dataset_registry import LEARNING_TASKS, model_input_kind
from fedcare.errors import FedcareError

VOLUME_PREPROCESSING_VERSION = 2  # bump whenever the processed volumes change (invalidates caches)
KEY_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID")
VOLUME_TASKS = LEARNING_TASKS  # a study label per series, or a lesion mask per series
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
    task: str = "classify",
) -> HospitalData:
    """The hospital's series as (n, 1, *size) volumes in [0, 1], split by study, with a 0/1 label
    per series (``classify``) or a (1, *size) 0/1 lesion mask per series (``segment``)."""
    if task not in VOLUME_TASKS:
        raise FedcareError(f"unknown volume task '{task}'", f"choose one of: {', '.join(VOLUME_TASKS)}")
    names = find_dicom_files(folder, exclude=[labels_csv])
    cache = _cache_path(folder, names, labels_csv, policy, cache_dir, task)
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            x, y, studies = stored["x"], stored["y"], stored["studies"]
            notes = [str(n) for n in stored["notes"]]
    else:
        found, notes = _read_series(folder, names, require_deidentified, on_unreadable)
        if task == "classify":
            x, y, studies = _labelled(found, labels_csv, policy, notes)
        else:
            x, y, studies = _masked(folder, found, policy, notes)
        if len(x) < 2:
            raise FedcareError(
                f"{folder} holds {len(x)} usable series",
                "a hospital needs at least 2 (one to train, one to test): "
                + ("label them in labels.csv" if task == "classify" else "give each series a DICOM SEG mask"),
            )
        if cache is not None:
            _save_cache(cache, x, y, studies, notes)
    return _split(folder.name, x, y, studies, notes, model_input_kind("volume", task))


def _read_series(
    folder: Path, names: list[str], require_deidentified: bool, on_unreadable: str
) -> tuple[SeriesFolder, list[str]]:
    """The folder's series, checked; bad ones refused (or skipped with a note under on-unreadable=skip)."""
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
    return found, notes


def _labelled(
    found: SeriesFolder, labels_csv: Path, policy: VolumePolicy, notes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classification: every series with a label in ``labels.csv`` (by series, else by study)."""
    labels = read_volume_labels(labels_csv)
    labelled = [(v, labels.get(v.series_uid, labels.get(v.study_uid))) for v in found.volumes]
    unlabelled = sum(1 for _, label in labelled if label is None)
    if unlabelled:
        notes.append(f"{unlabelled} series without a label in {labels_csv.name} (not used)")
    kept = [(v, label) for v, label in labelled if label is not None]
    images = [preprocess(v, policy)[0] for v, _ in kept]
    x = np.stack(images) if images else np.zeros((0, 1, *policy.size), np.float32)
    y = np.array([label for _, label in kept], dtype=np.int64)
    return x, y, np.array([v.study_uid for v, _ in kept])


def _masked(
    folder: Path, found: SeriesFolder, policy: VolumePolicy, notes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segmentation: every series a DICOM SEG object references, with that mask on the same grid.

    A series two SEG objects reference is refused (which one is the truth?); a series none
    references is not used, with a note."""
    by_series: dict[str, list[str]] = {}
    for seg_name, series_uid in found.segmentations.items():
        by_series.setdefault(series_uid, []).append(seg_name)
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    studies: list[str] = []
    for volume in found.volumes:
        segs = sorted(by_series.get(volume.series_uid, []))
        if len(segs) > 1:
            raise SeriesRejected(
                volume.where,
                f"{len(segs)} segmentations reference this series ({', '.join(segs[:3])})",
                "keep one DICOM SEG object per series",
            )
        if not segs:
            continue
        image, mask = preprocess(volume, policy, read_mask(folder, segs[0], volume))
        assert mask is not None  # preprocess was given a mask
        images.append(image)
        masks.append(mask)
        studies.append(volume.study_uid)
    unmasked = len(found.volumes) - len(images)
    if unmasked:
        notes.append(f"{unmasked} series without a segmentation (not used)")
    if not images:
        return np.zeros((0, 1, *policy.size), np.float32), np.zeros((0, 1, *policy.size), np.uint8), np.array([])
    return np.stack(images), np.stack(masks).astype(np.uint8), np.array(studies)


def preprocess(
    volume: SeriesVolume, policy: VolumePolicy, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """One series on the policy's grid with MONAI's dictionary transforms: (1, *size) float32 in
    [0, 1], and its mask (same slices as ``volume.voxels``) on the same grid as (1, *size) 0/1 uint8,
    resampled by nearest neighbour."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientationd, ResizeWithPadOrCropd, ScaleIntensityRanged, Spacingd

    g = volume.geometry
    # array axes (columns, rows, slices); DICOM's patient axes are LPS, MONAI's RAS: flip x and y
    lps = np.eye(4)
    lps[:3, 0] = g.direction[0] * g.spacing[2]  # along a row: the row direction, column spacing
    lps[:3, 1] = g.direction[1] * g.spacing[1]
    lps[:3, 2] = g.direction[2] * g.spacing[0]
    lps[:3, 3] = g.origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    def on_grid(array: np.ndarray) -> MetaTensor:
        voxels: np.ndarray = np.ascontiguousarray(array.transpose(2, 1, 0)[None], dtype=np.float32)
        return MetaTensor(torch.from_numpy(voxels), affine=torch.from_numpy(ras.copy()))

    keys = ["image"] if mask is None else ["image", "mask"]
    low, high = policy.window_hu
    transform = Compose(
        [
            Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys, pixdim=policy.spacing_mm, mode=["bilinear", "nearest"][: len(keys)]),
            ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
            ResizeWithPadOrCropd(keys, spatial_size=policy.size),
        ]
    )
    data = {"image": on_grid(volume.voxels)}
    if mask is not None:
        data["mask"] = on_grid(mask)
    out = transform(data)
    image = np.asarray(out["image"].numpy(), dtype=np.float32)
    return image, (np.asarray(out["mask"].numpy() > 0.5, dtype=np.uint8) if mask is not None else None)


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


def _split(name: str, x: np.ndarray, y: np.ndarray, studies: np.ndarray, notes: list[str], task: str) -> HospitalData:
    """Train/test by study (stratified by whether the study is positive, a label of 1 or a lesion in
    its mask, where both kinds have two studies)."""
    from sklearn.model_selection import train_test_split

    unique = np.unique(studies)
    positive = y.reshape(len(y), -1).max(axis=1).astype(np.int64)
    study_label = np.array([positive[studies == s].max() for s in unique])
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
        task=task,
        notes=notes,
    )


def _cache_path(
    folder: Path, names: list[str], labels_csv: Path, policy: VolumePolicy, cache_dir: Path | None, task: str
) -> Path | None:
    """Where the processed volumes are kept: keyed by every file's name, size and mtime, the labels
    file's, the policy and the task (None: no cache)."""
    if cache_dir is None:
        return None
    h = hashlib.sha256(f"{policy.key()}-{task}".encode())
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
