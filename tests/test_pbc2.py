"""PBC2 across simulated hospitals: cohort accounting, the generic loader path, reuse, and signal."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from client.datasets.ehr_events import load_event_sequences, normalise_sequences, per_patient_means
from client.datasets.ehr_schema import EhrSchema
from fedcare.errors import FedcareError
from simulation.pbc2 import load_pbcseq, write_pbc2_hospitals

SPLIT_SEED = 43


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("pbc2")
    write_pbc2_hospitals(path, n_hospitals=3, seed=0)
    return path


@pytest.fixture(scope="module")
def splits(root):
    folders = sorted(root.glob("hospital-*"))
    return [
        load_event_sequences(f / "events.csv", EhrSchema.from_file(f / "schema.toml"), seed=SPLIT_SEED) for f in folders
    ]


def test_every_patient_is_accounted_for_and_in_exactly_one_hospital(root):
    raw = load_pbcseq()
    assert raw["id"].nunique() == 312 and len(raw) == 1945
    manifest = json.loads((root / "manifest.json").read_text())
    futime = raw.groupby("id")["futime"].first()
    eligible = set(futime.index[futime > 2 * 365.25])
    assert manifest["patients"] == len(eligible) == 278
    assert manifest["patients"] + sum(manifest["excluded"].values()) == 312
    seen: list[int] = []
    sizes = []
    for entry in manifest["hospitals"]:
        frame = pd.read_csv(root / entry["name"] / "events.csv")
        assert "futime" not in frame and "status" not in frame  # no outcome timing leaks
        assert frame["day"].max() <= 2 * 365.25
        patients = frame.groupby("id")["outcome"].first()
        seen += patients.index.tolist()
        sizes.append(len(patients))
        rate = patients.isin(["died", "transplant"]).mean()
        assert 0.35 < rate < 0.65 and entry["patients"] == len(patients)
    assert sorted(seen) == sorted(eligible) and len(seen) == len(set(seen))
    assert sizes[0] > sizes[1] > sizes[2] >= 10


def test_hospitals_load_through_the_generic_event_loader(root, splits):
    schemas = {(f / "schema.toml").read_text() for f in root.glob("hospital-*")}
    assert len(schemas) == 1  # one federation schema
    for split in splits:
        assert split.x_train.shape[1:] == (5, len(split.feature_names) + 1)
        assert split.report.events_dropped == 0 and split.report.patients_reordered == 0
        assert set(split.feature_bounds) == set(split.feature_names)
        mask = split.x_train[..., -1] == 1
        assert (mask[:, -1]).all()  # last step is always real
        assert not np.isnan(split.x_train[..., -1]).any()
    rates = [s.y_train.mean() for s in splits]
    assert all(0.35 < r < 0.65 for r in rates)


def test_writing_is_reproducible_and_idempotent(tmp_path, root):
    again = write_pbc2_hospitals(tmp_path / "a", n_hospitals=3, seed=0)
    for folder in again:
        assert (folder / "events.csv").read_bytes() == (root / folder.name / "events.csv").read_bytes()
    stamp = (again[0] / "events.csv").stat().st_mtime_ns
    assert write_pbc2_hospitals(tmp_path / "a", n_hospitals=3, seed=0) == again
    assert (again[0] / "events.csv").stat().st_mtime_ns == stamp  # reused, not rewritten
    with (again[1] / "events.csv").open("a") as handle:
        handle.write("tampered\n")
    write_pbc2_hospitals(tmp_path / "a", n_hospitals=3, seed=0)
    assert (again[1] / "events.csv").read_bytes() == (root / "hospital-1" / "events.csv").read_bytes()
    two = write_pbc2_hospitals(tmp_path / "a", n_hospitals=2, seed=0)
    assert (
        sorted(p.name for p in (tmp_path / "a").glob("hospital-*"))
        == ["hospital-0", "hospital-1"]
        == [p.name for p in two]
    )
    other = write_pbc2_hospitals(tmp_path / "b", n_hospitals=3, seed=1)
    assert (other[0] / "events.csv").read_bytes() != (root / "hospital-0" / "events.csv").read_bytes()


def test_foreign_folders_and_too_many_hospitals_are_refused(tmp_path):
    (tmp_path / "hospital-0").mkdir()
    with pytest.raises(FedcareError, match="not written by the PBC2 generator"):
        write_pbc2_hospitals(tmp_path, n_hospitals=2)
    with pytest.raises(FedcareError, match="use fewer hospitals"):
        write_pbc2_hospitals(tmp_path / "x", n_hospitals=8)


def test_pooled_held_out_auc_beats_chance(splits):
    """Non-DP baselines on the pooled split; the federation's recipe for scaling (mean, range/4)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from shared_models.sequence_gru import SequenceGRU

    x_tr = np.concatenate([s.x_train for s in splits])
    y_tr = np.concatenate([s.y_train for s in splits])
    x_te = np.concatenate([s.x_test for s in splits])
    y_te = np.concatenate([s.y_test for s in splits])
    names, bounds = splits[0].feature_names, splits[0].feature_bounds
    mean = np.nanmean(per_patient_means(x_tr), axis=0)
    scale = [(bounds[n][1] - bounds[n][0]) / 4 for n in names]
    cols = list(range(len(names)))
    n_tr, n_te = normalise_sequences(x_tr, cols, mean, scale), normalise_sequences(x_te, cols, mean, scale)

    logistic = LogisticRegression(max_iter=2000).fit(per_patient_means(n_tr), y_tr)
    auc_logistic = roc_auc_score(y_te, logistic.predict_proba(per_patient_means(n_te))[:, 1])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        gru = SequenceGRU(len(names))
        optimizer = torch.optim.Adam(gru.parameters(), lr=0.01)
        xt, yt = torch.tensor(n_tr), torch.tensor(y_tr, dtype=torch.float32)
        for _ in range(30):
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(gru(xt), yt).backward()
            optimizer.step()
        with torch.no_grad():
            auc_gru = roc_auc_score(y_te, gru(torch.tensor(n_te)).numpy())
    finally:
        torch.set_num_threads(threads)
    print(f"PBC2 pooled held-out ({len(y_te)} patients): AUC logistic {auc_logistic:.3f}, GRU {auc_gru:.3f}")
    assert auc_logistic > 0.7 and auc_gru > 0.7
