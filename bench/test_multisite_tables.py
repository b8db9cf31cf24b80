"""The real multi-site tables load as fedcare ehr-table hospitals, with honest schemas."""

from __future__ import annotations

import tomllib

import pandas as pd
import pytest

from bench.multisite_tables import ID, TABLES, patients, site_summary, write_hospitals
from client.datasets import DataSource, load_hospital


@pytest.mark.parametrize("name", list(TABLES))
def test_every_hospital_loads(name, tmp_path):
    spec = TABLES[name]
    sites = write_hospitals(name, tmp_path)
    assert sites == list(spec.sites)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"hospital-{i}" for i in range(len(sites)))
    for i in range(len(sites)):
        header = pd.read_csv(tmp_path / f"hospital-{i}" / "table.csv", nrows=0).columns.tolist()
        assert header == [ID, spec.label, *spec.features]  # no site column, an id column
        data = load_hospital("ehr-table", DataSource(data_root=str(tmp_path), partition_id=i))
        assert set(data.y_train.tolist()) == {0, 1}, f"{name} {sites[i]}: one class only in training"
        assert data.x_train.shape[1] == data.x_test.shape[1] == spec.n_features == len(data.feature_names)


@pytest.mark.parametrize("name", list(TABLES))
def test_ranges_are_declared_not_measured(name, tmp_path):
    spec = TABLES[name]
    write_hospitals(name, tmp_path)
    schema = tomllib.loads((tmp_path / "hospital-0" / "schema.toml").read_text())
    frame = patients(name)
    for col, numeric in schema["numeric"].items():
        values = pd.to_numeric(frame[col], errors="coerce").dropna()
        assert (float(values.min()), float(values.max())) != tuple(float(v) for v in numeric["range"]), (
            f"{name}.{col}: the declared range is the data's min/max"
        )
    assert frame[ID].is_unique  # one row per patient
    assert frame[spec.label].isin([0, 1]).all()


@pytest.mark.parametrize("name", list(TABLES))
def test_sites_are_big_enough(name):
    rows = site_summary(name)
    assert all(r["patients"] >= 60 for r in rows)
    assert sum(0 < r["positive_rate"] < 1 for r in rows) == len(rows)


def test_registry_has_heterogeneous_tables():
    assert len(TABLES) >= 5
    ratios = {}
    for name in TABLES:
        rates = [r["positive_rate"] for r in site_summary(name)]
        ratios[name] = max(rates) / min(rates)
    assert sum(r >= 2 for r in ratios.values()) >= 2, ratios


def test_each_split_holds_out_other_patients_with_the_same_class_counts(tmp_path):
    """The benchmark's seed k runs on split k: another stratified hold-out at every hospital."""
    held_out, counts = [], []
    for split in (0, 1):
        root = tmp_path / f"split-{split}"
        write_hospitals("aids2", root, split=split)
        data = load_hospital("ehr-table", DataSource(data_root=str(root), partition_id=0))
        counts.append((len(data.y_train), len(data.y_test), int(data.y_test.sum())))
        held_out.append(sorted(map(tuple, data.x_test.tolist())))
    assert counts[0] == counts[1]  # the same patients and class counts ...
    assert held_out[0] != held_out[1]  # ... another set of them held out
