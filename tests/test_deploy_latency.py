"""Deployment latency fixes: the SuperNode poll clock, Flower 1.41 hooks, warm-executor preload, PromptGrid.

The real deployment (TLS, node auth, warm ClientApps, prompt polling) runs in test_deployment_e2e.py;
these check the pieces quickly. Anything that patches Flower runs in a subprocess, so this test
process keeps Flower's own timing.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from fedcare.compat import flower as flower_latency
from fedcare.compat.flower import _PromptClock
from server.federation_loop import PromptGrid
from tests.conftest import ROOT


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_prompt_clock_is_fast_only_while_a_run_is_active(monkeypatch):
    slept = []
    monkeypatch.setattr(flower_latency.time, "sleep", slept.append)
    clock = _PromptClock(0.5)
    clock.sleep(3)  # idle node: Flower's 3 s
    clock.message_stored()  # a message arrived: poll soon, then back off to 0.5 s
    for _ in range(6):
        clock.sleep(3)
    clock.sleep(0.5)  # waiting for the ClientApp's reply
    clock.sleep(1.25)  # anything else: unchanged
    clock.last_message -= flower_latency.ACTIVE_WINDOW_S + 1
    clock.sleep(3)  # no message for a while: Flower's 3 s again
    assert slept == pytest.approx(
        [3, 0.05, 0.075, 0.1125, 0.16875, 0.253125, 0.3796875, flower_latency.REPLY_POLL_S, 1.25, 3]
    )
    clock.message_stored()
    assert [clock.sleep(3) or slept[-1] for _ in range(12)][-1] == 0.5
    assert clock.monotonic() > 0  # every other attribute is the time module's


def test_flower_hooks_apply_to_the_pinned_flower_and_its_waits_are_still_there():
    out = _python("""
        import inspect
        from flwr.supernode import start_client_internal as loop
        from flwr.supercore.inflatable import inflatable_utils as iu
        from flwr.supernode.runtime import run_clientapp as runtime
        source = inspect.getsource(loop)
        assert "time.sleep(3)" in source and source.count("time.sleep(0.5)") == 2, "Flower's waits changed"
        assert iu.pull_objects.__kwdefaults__["initial_backoff"] == 1
        from fedcare.compat import flower as fl
        assert fl.patch_supernode_polling(0.2) and fl.shorten_object_pull_backoff() and fl.reuse_installed_fab()
        assert isinstance(loop.time, fl._PromptClock) and loop.time.poll_s == 0.2
        for f in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
            assert f.__kwdefaults__["initial_backoff"] == fl.PULL_INITIAL_BACKOFF_S
        assert runtime.install_from_fab.__name__ == "install_unless_installed"
        calls = []
        assert fl.on_message_stored(lambda: calls.append(1))
        print("ok")
    """)
    assert out.strip() == "ok"


def test_an_installed_fab_is_not_unzipped_again(tmp_path, monkeypatch):
    from flwr.supernode.runtime import run_clientapp as runtime

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    unzipped = []
    monkeypatch.setattr(
        runtime,
        "install_from_fab",
        lambda fab, install_dir=None, skip_prompt=False: unzipped.append(fab) or tmp_path / "fresh",
    )
    assert flower_latency.reuse_installed_fab()
    fab = b"a FAB's bytes"
    installed = tmp_path / "apps" / f"fedcare.fedcare.0.1.0.{hashlib.sha256(fab).hexdigest()[:8]}"
    assert runtime.install_from_fab(fab, skip_prompt=True) == tmp_path / "fresh"  # not installed yet
    installed.mkdir(parents=True)
    (installed / "pyproject.toml").write_text("[project]\n")
    assert runtime.install_from_fab(fab, skip_prompt=True) == installed  # reused, no unzip
    assert runtime.install_from_fab(b"another FAB", skip_prompt=True) == tmp_path / "fresh"
    assert unzipped == [fab, b"another FAB"]


def test_warm_executor_keeps_libraries_but_never_the_apps_own_modules():
    out = _python("""
        import sys
        import fedcare.warm_clientapp as w
        w.FLOWER_MODULES, w.APP_MODULES = ("flwr.app",), ("client.feature_stats", "client.no_such_module")
        w.LAZY_LIBRARY_MODULES = ()
        count, failed = w.preload()
        assert count > 0 and len(failed) == 1 and "client.no_such_module" in failed[0]
        left = [m for m in sys.modules if w._is_project_module(m)]
        assert not left, left
        assert "numpy" in sys.modules and "flwr.app" in sys.modules
        from flwr.supercore.inflatable import inflatable_utils as iu
        assert iu.pull_objects.__kwdefaults__["initial_backoff"] < 1
        print("ok")
    """)
    assert out.strip() == "ok"


def _msg(mid: str, kind: str = "train", reply_to: str = ""):
    return SimpleNamespace(
        metadata=SimpleNamespace(
            message_type=kind, group_id="1", reply_to_message_id=reply_to, src_node_id=7, message_id=mid
        )
    )


class _FakeGrid:
    """push/pull like Flower's Grid; each reply shows up on a later pull."""

    def __init__(self) -> None:
        self.pulls = 0
        self.pending: list = []

    def push_messages(self, messages):
        ids = [f"m{i}" for i, _ in enumerate(messages)]
        self.pending = [_msg(f"r{i}", reply_to=mid) for i, mid in enumerate(ids)]
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        return [self.pending.pop(0)] if self.pending and self.pulls % 2 == 0 else []

    def send_and_receive(self, messages, *, timeout=None):
        return ["flower's own loop"]

    def get_node_ids(self):
        return [7]


def test_prompt_grid_polls_until_every_reply_is_in(monkeypatch):
    monkeypatch.delenv("FEDCARE_FLOWER_POLLING", raising=False)
    fake = _FakeGrid()
    grid = PromptGrid.wrap(fake)
    assert isinstance(grid, PromptGrid) and PromptGrid.wrap(grid) is grid and grid.get_node_ids() == [7]
    replies = grid.send_and_receive([_msg("a"), _msg("b"), _msg("c")], timeout=30)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m1", "m2"] and fake.pulls == 6
    stand_in = SimpleNamespace(send_and_receive=lambda messages, timeout=None: [])
    assert PromptGrid.wrap(stand_in) is stand_in  # test doubles with only send_and_receive


def test_prompt_grid_gives_up_at_the_timeout_and_can_defer_to_flower(monkeypatch):
    monkeypatch.delenv("FEDCARE_FLOWER_POLLING", raising=False)
    fake = _FakeGrid()
    fake.pull_messages = lambda ids: []
    assert PromptGrid(fake).send_and_receive([_msg("a")], timeout=0.3) == []
    monkeypatch.setenv("FEDCARE_FLOWER_POLLING", "1")
    assert PromptGrid(_FakeGrid()).send_and_receive([_msg("a")], timeout=1) == ["flower's own loop"]


class _SlowGrid(_FakeGrid):
    """The one reply shows up on the sixth pull."""

    def pull_messages(self, ids):
        self.pulls += 1
        return [self.pending.pop(0)] if self.pulls == 6 else []


def test_prompt_grid_polls_the_simulation_engines_grid_every_10_ms(monkeypatch):
    """A pull of the in-memory grid reads a local table, so a simulation's exchange ends within 10 ms
    of its last reply; a deployment's grid backs off from 50 to 250 ms (each pull is a request)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    import server.federation_loop as loop

    class _InMemory(_SlowGrid, InMemoryGrid):
        def __init__(self) -> None:  # no SuperLink state: only push and pull are used
            _SlowGrid.__init__(self)

    monkeypatch.delenv("FEDCARE_FLOWER_POLLING", raising=False)
    waits: list[float] = []
    monkeypatch.setattr(loop.time, "sleep", waits.append)
    for grid, expected in ((_InMemory(), [0.01] * 5), (_SlowGrid(), [0.05, 0.075, 0.1125, 0.16875, 0.25])):
        waits.clear()
        assert len(PromptGrid(grid).send_and_receive([_msg("a")], timeout=30)) == 1
        assert waits == pytest.approx(expected)


@pytest.mark.parametrize(
    "args,address",
    [
        (["--superlink", "x:1", "--host", "127.0.0.1", "--port", "9105"], "127.0.0.1:9105"),
        (["--port", "9200"], "127.0.0.1:9200"),
        (["--host", "::1", "--port", "9201"], "[::1]:9201"),
    ],
)
def test_launcher_finds_the_runtime_api_address(args, address):
    from fedcare.node_launcher import _runtime_api_address

    assert _runtime_api_address(args) == address
