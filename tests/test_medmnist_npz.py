"""User-provided MedMNIST .npz -> binary train/test ImageSets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from client.datasets.dicom_reader import ImagePolicy
from client.datasets.medmnist_npz import load_medmnist_npz
from fedcare.errors import FedcareError


def write_npz(path: Path, classes: int = 2, rgb: bool = False, side: int = 28, **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for part, n in (("train", 30), ("val", 10), ("test", 12)):
        shape = (n, side, side, 3) if rgb else (n, side, side)
        arrays[f"{part}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{part}_labels"] = (np.arange(n) % classes).reshape(n, 1).astype(np.uint8)
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_binary_task_as_is_with_val_folded_into_train(tmp_path):
    train, test = load_medmnist_npz(write_npz(tmp_path / "pneumoniamnist.npz"), policy=ImagePolicy(size=32))
    assert train.x.shape == (40, 1, 32, 32) and test.x.shape == (12, 1, 32, 32)
    assert train.x.dtype == np.float32 and train.x.min() >= 0 and train.x.max() <= 1
    assert train.y.dtype == np.int64 and train.label_counts == {0: 20, 1: 20}
    assert train.sizes == {(28, 28): 40} and train.groups.tolist() == list(range(40))


def test_resize_matches_source_pixels_at_native_size(tmp_path):
    path = write_npz(tmp_path / "b.npz")
    train, _ = load_medmnist_npz(path, policy=ImagePolicy(size=28))
    raw = np.load(path)["train_images"][0] / 255.0
    np.testing.assert_allclose(train.x[0, 0], raw, atol=1e-6)


def test_rgb_images_become_luminance(tmp_path):
    train, _ = load_medmnist_npz(write_npz(tmp_path / "derma.npz", rgb=True), policy=ImagePolicy(size=16))
    assert train.x.shape == (40, 1, 16, 16)


def test_multiclass_needs_positive_labels(tmp_path):
    path = write_npz(tmp_path / "organamnist.npz", classes=4)
    with pytest.raises(FedcareError, match=r"multi-class task \(classes 0, 1, 2, 3\)") as exc:
        load_medmnist_npz(path)
    assert "positive_labels" in exc.value.hint
    train, _test = load_medmnist_npz(path, positive_labels={1, 2}, policy=ImagePolicy(size=16))
    assert train.y.tolist()[:8] == [0, 1, 1, 0, 0, 1, 1, 0]
    with pytest.raises(FedcareError, match="positive label\\(s\\) 9 do not occur"):
        load_medmnist_npz(path, positive_labels={9})
    with pytest.raises(FedcareError, match="every class is marked positive"):
        load_medmnist_npz(path, positive_labels={0, 1, 2, 3})


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FedcareError, match="MedMNIST file not found"):
        load_medmnist_npz(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(FedcareError, match=r"is not a readable .npz file"):
        load_medmnist_npz(junk)
    with pytest.raises(FedcareError, match="lacks key\\(s\\): test_labels; keys found:"):
        load_medmnist_npz(write_npz(tmp_path / "nolab.npz", test_labels=None))
    multilabel = np.zeros((30, 14), dtype=np.uint8)
    with pytest.raises(FedcareError, match="14 labels per image"):
        load_medmnist_npz(write_npz(tmp_path / "chest.npz", train_labels=multilabel))
    with pytest.raises(FedcareError, match="30 images but train_labels has 5"):
        load_medmnist_npz(write_npz(tmp_path / "short.npz", train_labels=np.zeros((5, 1), dtype=np.uint8)))


@pytest.mark.skipif(not os.environ.get("FEDCARE_MEDMNIST_NPZ"), reason="set FEDCARE_MEDMNIST_NPZ to a MedMNIST .npz")
def test_real_medmnist_file():
    path = Path(os.environ["FEDCARE_MEDMNIST_NPZ"])
    positive = {int(v) for v in os.environ.get("FEDCARE_MEDMNIST_POSITIVE", "").split(",") if v.strip()} or None
    train, test = load_medmnist_npz(path, positive_labels=positive, policy=ImagePolicy(size=64))
    assert len(train.y) > 0 and len(test.y) > 0
    assert train.x.shape[1:] == (1, 64, 64) and np.isfinite(train.x).all()
    assert set(np.unique(train.y)) <= {0, 1}
    print(f"\n{path.name}: train {train.label_counts}, test {test.label_counts}")
