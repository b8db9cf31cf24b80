"""Scale support: synthetic-table hospitals for any N, worker/timeout sizing, the bench's memory sampler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from bench.bench_simulation_scale import TreeMemory
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
    last.check_trainable(30)                                  # the default batch fits every hospital
    stamp = (root / "hospital-3" / "table.csv").stat().st_mtime_ns
    assert prepare_dataset("synthetic-table", root, 12) == folders       # same settings: reused
    assert (root / "hospital-3" / "table.csv").stat().st_mtime_ns == stamp
    assert len(prepare_dataset("synthetic-table", root, 5)) == 5          # other N: rewritten, no leftovers
    assert sorted(p.name for p in root.glob("hospital-*")) == [f"hospital-{i}" for i in range(5)]
    (tmp_path / "real" / "hospital-0").mkdir(parents=True)
    with pytest.raises(FedcareError, match="not written by the synthetic-table generator"):
        prepare_dataset("synthetic-table", tmp_path / "real", 3)
    with pytest.raises(FedcareError, match=f"1 to {MAX_HOSPITALS} hospitals"):
        prepare_dataset("synthetic-table", tmp_path / "big", MAX_HOSPITALS + 1)


def test_actors_are_capped_by_cpus_and_hospitals_and_the_wait_scales_with_waves(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert parallel_workers(100) == 8
    assert parallel_workers(3) == 3                       # no idle actors beyond the hospitals
    assert parallel_workers(100, max_workers=2) == 2
    assert backend_config(3)["init_args"]["num_cpus"] == 3
    assert exchange_timeout(100, 8) == 13 * exchange_timeout(8, 8)


class _Titled:
    """A stand-in process with a Ray process title."""

    pid = -1

    def __init__(self, title: str) -> None:
        self.title = title

    def cmdline(self) -> list[str]:
        return [self.title] if self.title.startswith("ray::") else self.title.split()


def test_tree_memory_sums_the_tree_and_adopts_marked_strangers(tmp_path):
    sleeper = ("import subprocess, sys, time; "
               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
               "print(c.pid, flush=True); time.sleep(30)")
    marker = str(tmp_path / "ray-session")                  # as a Ray daemon's --session-dir would carry it
    parent = subprocess.Popen([sys.executable, "-c", sleeper], stdout=subprocess.PIPE, text=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", marker])
    child = None
    try:
        child = int(parent.stdout.readline())
        memory = TreeMemory(parent.pid, marker=marker)
        sample = memory.sample()
        assert set(memory.seen) == {parent.pid, child, stranger.pid}
        assert set(memory.adopted) == {stranger.pid}
        assert sample.processes == 3 and 0 < sample.pss <= sample.rss
        assert 0 < sample.by_role["driver"] < sample.pss      # the child and the stranger count too
        titles = {"ray::ClientAppActor.run   ": "ray workers", "ray::IDLE ": "ray workers",
                  "ray::DashboardAgent    ": "ray daemons", "/venv/raylet --python_worker_command=default_worker.py":
                  "ray daemons"}
        for title, role in titles.items():
            assert memory.role(_Titled(title)) == role, title
    finally:
        for proc in (parent, stranger):
            proc.kill()
            proc.wait()
        if child is not None:
            os.kill(child, signal.SIGKILL)
