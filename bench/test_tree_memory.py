"""The scale bench's memory sampler (``TreeMemory``): it sums a process tree and adopts marked strangers.

A test of benchmark tooling, so it lives beside the bench: tests/ never imports bench/. pytest
collects it (``testpaths`` names bench/ too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from bench.bench_simulation_scale import TreeMemory


class _Titled:
    """A stand-in process with a Ray process title."""

    pid = -1

    def __init__(self, title: str) -> None:
        self.title = title

    def cmdline(self) -> list[str]:
        return [self.title] if self.title.startswith("ray::") else self.title.split()


def test_tree_memory_sums_the_tree_and_adopts_marked_strangers(tmp_path):
    sleeper = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
        "print(c.pid, flush=True); time.sleep(30)"
    )
    marker = str(tmp_path / "ray-session")  # as a Ray daemon's --session-dir would carry it
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
        assert 0 < sample.by_role["driver"] < sample.pss  # the child and the stranger count too
        titles = {
            "ray::ClientAppActor.run   ": "ray workers",
            "ray::IDLE ": "ray workers",
            "ray::DashboardAgent    ": "ray daemons",
            "/venv/raylet --python_worker_command=default_worker.py": "ray daemons",
        }
        for title, role in titles.items():
            assert memory.role(_Titled(title)) == role, title
    finally:
        for proc in (parent, stranger):
            proc.kill()
            proc.wait()
        if child is not None:
            os.kill(child, signal.SIGKILL)
