"""A user-downloaded MedMNIST `.npz` as binary train/test ImageSets, resized to the policy's size.

MedMNIST cannot be downloaded at run time here, but a hospital or researcher may hold the file
(keys train_images/train_labels, val_*, test_images/test_labels; images uint8 (n, H, W) or
(n, H, W, 3); labels (n, 1)). Binary tasks (pneumoniamnist, breastmnist) are used as they are;
multi-class tasks need `positive_labels` (the classes that count as 1). Multi-label tasks
(chestmnist) are refused. The validation split is folded into train: fedcare makes its own splits.
Colour images become BT.601 luminance, like colour DICOM.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from client.datasets.dicom_folder import ImageSet
from client.datasets.dicom_reader import ImagePolicy
from fedcare.errors import FedcareError

_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_CHUNK = 2048  # images resized per call: bounds memory for 100k-image files


def load_medmnist_npz(
    path: Path, positive_labels: set[int] | None = None, policy: ImagePolicy = ImagePolicy()
) -> tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets from a MedMNIST file; train includes the val split."""
    path = Path(path)
    if not path.is_file():
        raise FedcareError(f"MedMNIST file not found: {path}", "download e.g. pneumoniamnist.npz from medmnist.com")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FedcareError(
            f"{path.name} is not a readable .npz file ({type(exc).__name__})", "download the MedMNIST .npz again"
        ) from None
    required = ["train_images", "train_labels", "test_images", "test_labels"]
    missing = [k for k in required if k not in arrays]
    if missing:
        found = ", ".join(sorted(arrays)) or "none"
        raise FedcareError(
            f"{path.name} lacks key(s): {', '.join(missing)}; keys found: {found}",
            "expected a MedMNIST file (train_images, train_labels, val_*, test_images, test_labels)",
        )
    parts = {
        "train": ["train"] + (["val"] if "val_images" in arrays and "val_labels" in arrays else []),
        "test": ["test"],
    }
    all_labels = np.concatenate([_labels(arrays[f"{p}_labels"], path.name, p) for p in ("train", "test")])
    classes = sorted(int(c) for c in np.unique(all_labels))
    positive = _positive(classes, positive_labels, path.name)
    sets = []
    for split, prefixes in parts.items():
        images = [_images(arrays[f"{p}_images"], path.name, p) for p in prefixes]
        labels = [_labels(arrays[f"{p}_labels"], path.name, p) for p in prefixes]
        for p, im, lab in zip(prefixes, images, labels):
            if len(im) != len(lab):
                raise FedcareError(f"{path.name}: {p}_images has {len(im)} images but {p}_labels has {len(lab)} labels")
        if len({im.shape[1:] for im in images}) > 1:
            raise FedcareError(f"{path.name}: image shapes differ between {' and '.join(prefixes)}")
        x_raw = np.concatenate(images)
        y_raw = np.concatenate(labels)
        y = np.isin(y_raw, list(positive)).astype(np.int64)
        x = _resize(x_raw, policy.size)
        names = [f"{split}/{i}" for i in range(len(y))]
        notes = [] if len(set(y.tolist())) > 1 else [f"only class {int(y[0]) if len(y) else '-'} in {split}"]
        sets.append(
            ImageSet(
                names=names,
                x=x,
                y=y,
                groups=np.arange(len(y), dtype=np.int64),
                files=names,
                sizes=Counter({tuple(x_raw.shape[1:3]): len(x_raw)}),
                notes=notes,
            )
        )
    return sets[0], sets[1]


def _labels(raw: np.ndarray, where: str, part: str) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim == 2 and raw.shape[1] > 1:
        raise FedcareError(
            f"{where}: {part}_labels has {raw.shape[1]} labels per image (a multi-label task)",
            "fedcare trains binary classifiers: use a single-label MedMNIST task",
        )
    flat = raw.reshape(len(raw))
    if not np.issubdtype(flat.dtype, np.integer) and (
        not np.issubdtype(flat.dtype, np.floating) or not np.all(np.equal(np.mod(flat, 1), 0))
    ):
        raise FedcareError(f"{where}: {part}_labels must hold integer class numbers")
    return flat.astype(np.int64)


def _positive(classes: list[int], positive_labels: set[int] | None, where: str) -> set[int]:
    if positive_labels is None:
        if set(classes) <= {0, 1}:
            return {1}
        raise FedcareError(
            f"{where} is a multi-class task (classes {', '.join(map(str, classes))})",
            "say which classes count as positive (positive_labels), e.g. {1, 2}",
        )
    positive = {int(c) for c in positive_labels}
    unknown = sorted(positive - set(classes))
    if unknown:
        raise FedcareError(
            f"{where}: positive label(s) {', '.join(map(str, unknown))} do not occur; classes: "
            f"{', '.join(map(str, classes))}"
        )
    if positive >= set(classes):
        raise FedcareError(f"{where}: every class is marked positive, leaving no negatives")
    return positive


def _images(raw: np.ndarray, where: str, part: str) -> np.ndarray:
    raw = np.asarray(raw)
    if (raw.ndim == 4 and raw.shape[-1] == 3) or raw.ndim == 3:
        return raw
    raise FedcareError(f"{where}: {part}_images has shape {raw.shape}; expected (n, H, W) or (n, H, W, 3)")


def _to_unit(chunk: np.ndarray) -> np.ndarray:
    """uint8 grey or RGB -> float32 grey in [0, 1]."""
    chunk = chunk.astype(np.float32)
    if chunk.ndim == 4:
        chunk = chunk @ _BT601
    return chunk / 255.0


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W[, 3]) uint8 -> (n, 1, size, size) float32; converted chunk by chunk to bound memory.

    MedMNIST images are square; a non-square file is zero-padded like DICOM."""
    import torch
    import torch.nn.functional as F

    n, h, w = x.shape[:3]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((n, 1, size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    for start in range(0, n, _CHUNK):
        t = torch.from_numpy(np.ascontiguousarray(_to_unit(x[start : start + _CHUNK])))[:, None]
        if (nh, nw) != (h, w):
            t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + _CHUNK, :, top : top + nh, left : left + nw] = t.numpy()
    return np.clip(out, 0.0, 1.0, out=out)
