"""Scale support: synthetic-table hospitals for any N, worker/timeout sizing.

The bench's memory sampler has its test beside it: bench/test_tree_memory.py.
"""

from __future__ import annotations

import pytest

from client.datasets import DataSource, load_hospital
from fedcare.errors import FedcareError
from simulation.generated_data import prepare_dataset
from simulation.runner import backend_config, exchange_timeout, parallel_workers
from simulation.synthetic_table import MAX_HOSPITALS


def test_synthetic_table_writes_n_loadable_hospitals_reuses_them_and_refuses_foreign_folders(tmp_path):
    root = tmp_path / "sites"
    folders = prepare_dataset("synthetic-table", root, 12)
    assert [f.name for f in folders] == [f"hospital-{i}" for i in range(12)]
    last = load_hospital("ehr-table", DataSource(partition_id=11, data_root=str(root)))
    assert (len(last.y_train), len(last.y_test)) == (70, 30)
    last.check_trainable(30)  # the default batch fits every hospital
    stamp = (root / "hospital-3" / "table.csv").stat().st_mtime_ns
    assert prepare_dataset("synthetic-table", root, 12) == folders  # same settings: reused
    assert (root / "hospital-3" / "table.csv").stat().st_mtime_ns == stamp
    assert len(prepare_dataset("synthetic-table", root, 5)) == 5  # other N: rewritten, no leftovers
    assert sorted(p.name for p in root.glob("hospital-*")) == [f"hospital-{i}" for i in range(5)]
    (tmp_path / "real" / "hospital-0").mkdir(parents=True)
    with pytest.raises(FedcareError, match="not written by the synthetic-table generator"):
        prepare_dataset("synthetic-table", tmp_path / "real", 3)
    with pytest.raises(FedcareError, match=f"1 to {MAX_HOSPITALS} hospitals"):
        prepare_dataset("synthetic-table", tmp_path / "big", MAX_HOSPITALS + 1)


def test_actors_are_capped_by_cpus_and_hospitals_and_the_wait_scales_with_waves(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert parallel_workers(100) == 8
    assert parallel_workers(3) == 3  # no idle actors beyond the hospitals
    assert parallel_workers(100, max_workers=2) == 2
    assert backend_config(3)["init_args"]["num_cpus"] == 3
    assert exchange_timeout(100, 8) == 13 * exchange_timeout(8, 8)
