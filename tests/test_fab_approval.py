"""A hospital's node runs only FABs it approved, and only FABs that carry code.

The attack: the coordinator (who runs the SuperLink) ships a FAB of its own. Without approval, every
SuperNode installs it and imports its ClientApp, so its code runs with the node's data and skips every
check the real ClientApp makes. The real-process test ships such a FAB (its ClientApp module writes a
marker file the moment it is imported) to two SuperNodes started through `fedcare.node_launcher`, one
with the warm executor and one with the cold executor (one fresh interpreter per task): both refuse it
before it is installed or imported, the coordinator's ServerApp gets an Error reply naming its digest and
the approving command, and after `fedcare node approve` (a .fab file at one hospital, the digest at the
other) the same FAB runs.

Unit tests below cover the approval store, the code-only rule, the node's check (the FAB's identity, the
claimed digest), the Flower hook ordering and the version gate.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from fedcare.errors import FedcareError
from fedcare.fab_approval import (
    STORE_NAME,
    FabPolicy,
    FabRefused,
    approve_digest,
    fab_digest,
    inspect_fab,
    normalize_digest,
    read_approvals,
)
from tests.conftest import ROOT
from tests.support.hospital_state import write_consortium

# ---------------------------------------------------------------------------------------------------------------
# A tiny app: its ClientApp writes a marker file when imported (the proof that FAB code ran on a node).

CLIENT_APP = '''
"""Writes $FEDCARE_TEST_MARKER the moment it is imported: proof that this FAB's code ran on the node."""
import os
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

Path(os.environ["FEDCARE_TEST_MARKER"]).write_text("imported")
app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"answer": MetricRecord({"imported": 1})}), reply_to=msg)
'''

SERVER_APP = '''
"""Sends one query to every node and writes each reply (or its Error reason) to run-config `out`."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    expected = int(context.run_config["nodes"])
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        time.sleep(0.2)
    messages = [Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query")
                for n in nodes]
    replies = grid.send_and_receive(messages, timeout=600)
    found = [{"node": r.metadata.src_node_id, "error": r.error.reason if r.has_error() else None,
              "imported": None if r.has_error() else r.content["answer"]["imported"]} for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps(found))
'''

PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "markerapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "fedcaretest"
fab-include = ["markerapp/**/*.py"]

[tool.flwr.app.components]
serverapp = "markerapp.server_app:app"
clientapp = "markerapp.client_app:app"

[tool.flwr.app.config]
out = ""
nodes = 2
"""


def write_marker_app(folder: Path) -> Path:
    """The app's source tree (what a coordinator would `flwr run`)."""
    (folder / "markerapp").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "markerapp" / "__init__.py").write_text("")
    (folder / "markerapp" / "client_app.py").write_text(CLIENT_APP)
    (folder / "markerapp" / "server_app.py").write_text(SERVER_APP)
    return folder


def _fedcare(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The `fedcare` CLI in a fresh process (what a hospital or coordinator types)."""
    return subprocess.run(
        [sys.executable, "-c", "from fedcare.cli import main; main()", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _launcher_command(settings, store: Path, warm: bool) -> list[str]:
    """`python -m fedcare.node_launcher` with approvals, around the Flower arguments `fedcare node start` uses."""
    from fedcare.node_settings import supernode_command
    from tests.support.deployment_processes import BIN

    command = supernode_command(settings, str(BIN / "flower-supernode"))
    flower = command[command.index("--") + 1 :]
    ours = ["--warm-clientapp"] if warm else []
    return [
        sys.executable,
        "-m",
        "fedcare.node_launcher",
        *ours,
        "--poll-interval",
        "0.5",
        "--approved-fabs",
        str(store),
        "--settings",
        str(settings.path),
        "--",
        *flower,
    ]


@pytest.mark.e2e
def test_a_coordinators_fab_runs_only_after_the_hospital_approves_it(tmp_path):
    from fedcare.deploy_pki import init_deployment
    from fedcare.node_settings import load_node_settings
    from tests.support.deployment_processes import (
        BIN,
        Processes,
        deployment_env,
        free_port,
        hospital_settings,
        wait_for_port,
        wait_for_run,
    )

    port = free_port()
    files = init_deployment(
        tmp_path / "deploy", ["warm-hospital", "cold-hospital"], superlink_address=f"127.0.0.1:{port}"
    )
    coordinator = Processes(tmp_path, deployment_env(files))
    app = write_marker_app(tmp_path / "markerapp")
    node_procs: list[Processes] = []
    try:
        link, link_log = coordinator.start("superlink", files.superlink_command(str(BIN / "flower-superlink")))
        wait_for_port(port, link, link_log)
        for h in files.hospitals:
            done = coordinator.flwr("supernode", "register", str(h.public_key), files.connection, "--format", "json")
            assert done.returncode == 0 and json.loads(done.stdout)["success"], done.stdout + done.stderr

        nodes, hospitals = [], []
        for index, warm in ((0, True), (1, False)):
            settings = hospital_settings(files, index, index, tmp_path / "node-ledgers")
            if not warm:
                text = settings.path.read_text()
                settings.path.write_text(re.sub(r"warm-clientapp = true", "warm-clientapp = false", text))
                settings = load_node_settings(settings.path)
            name = files.hospitals[index].name
            store = Path(str(settings.node_config["ledger-dir"])) / STORE_NAME
            home, marker = tmp_path / f"flwr-home-{name}", tmp_path / f"marker-{name}"
            # Each node has its own FLWR_HOME (the SuperLink's ServerApp installs the FAB in the coordinator's).
            processes = Processes(
                tmp_path, {**coordinator.env, "FLWR_HOME": str(home), "FEDCARE_TEST_MARKER": str(marker)}
            )
            node_procs.append(processes)
            nodes.append(processes.start(f"node-{name}", _launcher_command(settings, store, warm)))
            hospitals.append((settings, store, home, marker))

        # The coordinator's digest for the app tree, as hospitals would be told it.
        built = _fedcare("deploy", "fab", str(app), "--out", str(tmp_path / "markerapp.fab"))
        assert built.returncode == 0, built.stdout + built.stderr
        digest = re.search(r"sha256:([0-9a-f]{64})", built.stdout).group(1)
        assert "markerapp/client_app.py" in built.stdout
        assert hashlib.sha256((tmp_path / "markerapp.fab").read_bytes()).hexdigest() == digest

        def run(tag: str) -> list[dict]:
            out = tmp_path / f"replies-{tag}.json"
            started = coordinator.flwr("run", str(app), files.connection, "--run-config", f"out='{out}' nodes=2")
            assert started.returncode == 0, started.stdout + started.stderr
            run_id = re.search(r"started run (\d+)", started.stdout + started.stderr).group(1)
            status = wait_for_run(coordinator.flwr, files.connection, run_id, nodes, poll_s=1, done=out.exists)
            logs = "\n".join(log.read_text()[-2000:] for _, log in nodes)
            assert status == "finished:completed", f"{status}\n{link_log.read_text()[-3000:]}\n{logs}"
            return json.loads(out.read_text())

        # 1. Not approved: both nodes refuse before installing or importing anything.
        replies = run("unapproved")
        assert len(replies) == 2, replies
        for reply in replies:
            assert reply["error"] is not None, replies
            assert f"sha256:{digest}" in reply["error"], reply  # the SuperLink shipped exactly this digest
            assert "fedcare node approve --config" in reply["error"], reply
        for (_settings, _store, home, marker), (_, log) in zip(hospitals, nodes):
            assert not marker.exists(), "the unapproved FAB's ClientApp was imported"
            assert not list((home / "apps").glob(f"*.{digest[:8]}")), "the unapproved FAB was installed"
            text = log.read_text()
            assert f"refused FAB sha256:{digest}" in text, text[-3000:]

        # 2. The hospitals approve it: one from the .fab file, one by its digest.
        (warm_settings, warm_store, *_), (cold_settings, cold_store, *_) = hospitals
        approved = _fedcare("node", "approve", "--config", str(warm_settings.path), str(tmp_path / "markerapp.fab"))
        assert approved.returncode == 0, approved.stdout + approved.stderr
        assert digest in approved.stdout and "markerapp/client_app.py" in approved.stdout
        approved = _fedcare("node", "approve", "--config", str(cold_settings.path), f"sha256:{digest}")
        assert approved.returncode == 0, approved.stdout + approved.stderr
        listed = _fedcare("node", "approved", "--config", str(cold_settings.path))
        assert listed.returncode == 0 and digest in listed.stdout, listed.stdout + listed.stderr
        for store in (warm_store, cold_store):
            assert stat.S_IMODE(store.stat().st_mode) == 0o600

        # 3. The same FAB now runs on both nodes (no restart: the store is read for every task).
        replies = run("approved")
        assert [r["error"] for r in replies] == [None, None] and [r["imported"] for r in replies] == [1, 1], replies
        for _settings, _store, home, marker in hospitals:
            assert marker.read_text() == "imported"
            assert len(list((home / "apps").glob(f"*.{digest[:8]}"))) == 1
    finally:
        for processes in node_procs:
            processes.stop_all()
        coordinator.stop_all()


# ---------------------------------------------------------------------------------------------------------------
# Unit tests: FABs built in memory with Flower's own zip layout.


def make_fab(files: dict[str, bytes], content: dict[str, bytes] | None = None) -> bytes:
    """A FAB as Flower writes it: the files, then .info/CONTENT listing path,sha256,bits (``content`` overrides)."""
    listed = files if content is None else content
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as fab:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 10, 1, 0, 0, 0))
            fab.writestr(info, data)
        manifest = "\n".join(f"{n},{hashlib.sha256(d).hexdigest()},{len(d) * 8}" for n, d in listed.items())
        fab.writestr(zipfile.ZipInfo(".info/CONTENT", date_time=(2024, 10, 1, 0, 0, 0)), manifest)
    return buffer.getvalue()


APP_PYPROJECT = textwrap.dedent("""
    [project]
    name = "demo"
    version = "2.0.0"

    [tool.flwr.app]
    publisher = "hospitalnet"

    [tool.flwr.app.components]
    serverapp = "demo.server:app"
    clientapp = "demo.client:app"
""").encode()
CODE = {"pyproject.toml": APP_PYPROJECT, "demo/__init__.py": b"", "demo/client.py": b"app = None\n"}


def test_digests_are_normalised_and_bad_ones_refused():
    d = "AB" * 32
    assert normalize_digest(d) == normalize_digest(f"sha256:{d}") == normalize_digest(f" sha256:{d} ") == d.lower()
    for bad in ("ab" * 31, "zz" * 32, "md5:" + "ab" * 32, ""):
        with pytest.raises(FedcareError, match="not a SHA-256 digest"):
            normalize_digest(bad)


def test_a_code_only_fab_is_listed_with_its_identity():
    fab = make_fab(CODE)
    found = inspect_fab(fab)
    assert found.digest == hashlib.sha256(fab).hexdigest() == fab_digest(fab)
    assert found.files == ["demo/__init__.py", "demo/client.py", "pyproject.toml"]
    assert (found.app_id, found.version) == ("hospitalnet/demo", "2.0.0")


@pytest.mark.parametrize(
    "extra",
    [
        "data/patients.csv",
        "model.pt",
        "cohort.json",
        "notes.md",
        "conf.yaml",
        "demo/__pycache__/client.cpython-311.pyc",
        "deploy/node.key",
        "nested/pyproject.toml",
        ".env",
        "demo/",
        "LICENSE",
    ],
)
def test_a_fab_with_anything_but_code_is_refused_even_when_approved(extra, tmp_path):
    files = {**CODE, extra: b"" if extra.endswith("/") else b"patient 17, 1953-02-01\n"}
    fab = make_fab(files)
    policy = FabPolicy(store=None, digests=frozenset({fab_digest(fab)}))
    with pytest.raises(FabRefused, match="not code") as refused:
        policy.check(fab)
    assert fab_digest(fab) in str(refused.value) and "1953-02-01" not in str(refused.value)  # names, never contents


@pytest.mark.parametrize("name", ["../escape.py", "/abs.py", "demo\\win.py", "demo//twice.py", "./demo/x.py"])
def test_a_fab_with_an_unsafe_path_is_refused(name):
    with pytest.raises(FabRefused):
        inspect_fab(make_fab({**CODE, name: b"x = 1\n"}))


def test_a_fab_whose_manifest_does_not_match_its_files_is_refused():
    unlisted = make_fab({**CODE, "demo/extra.py": b"x = 1\n"}, content=CODE)  # a file CONTENT omits
    tampered = make_fab(CODE, content={**CODE, "demo/client.py": b"app = 'other'\n"})  # a wrong hash
    for fab in (unlisted, tampered, b"not a zip at all"):
        with pytest.raises(FabRefused):
            inspect_fab(fab)
    duplicate = io.BytesIO(make_fab(CODE))
    with zipfile.ZipFile(duplicate, "a") as z, pytest.warns(UserWarning, match="Duplicate"):
        z.writestr("demo/client.py", b"app = 'shadow'\n")
    with pytest.raises(FabRefused, match="twice"):
        inspect_fab(duplicate.getvalue())


def test_the_node_check_approves_by_store_or_argument_and_names_the_command(tmp_path):
    fab = make_fab(CODE)
    digest = fab_digest(fab)
    store = tmp_path / "state" / STORE_NAME
    policy = FabPolicy(store=store, digests=frozenset(), settings=Path("/etc/fedcare/hospital.toml"))
    with pytest.raises(FabRefused) as refused:
        policy.check(fab)
    message = str(refused.value)
    assert f"has not approved FAB sha256:{digest}" in message
    assert f"fedcare node approve --config /etc/fedcare/hospital.toml {digest}" in message
    approve_digest(store, digest, source="test")  # takes effect at once: the store is read every check
    assert policy.check(fab, claimed_digest=digest, app_id="hospitalnet/demo", app_version="2.0.0").digest == digest
    assert FabPolicy(store=None, digests=frozenset({digest})).check(fab).digest == digest
    with pytest.raises(FabRefused, match="no approved FABs"):
        FabPolicy(store=None, digests=frozenset()).check(fab)


def test_the_node_check_refuses_a_run_that_names_another_app_or_digest(tmp_path):
    fab = make_fab(CODE)
    policy = FabPolicy(store=None, digests=frozenset({fab_digest(fab)}))
    with pytest.raises(FabRefused, match="says it is"):
        policy.check(fab, app_id="hospitalnet/other", app_version="2.0.0")
    with pytest.raises(FabRefused, match="says it is"):
        policy.check(fab, app_id="hospitalnet/demo", app_version="9.9.9")
    with pytest.raises(FabRefused, match="digest"):
        policy.check(fab, claimed_digest="00" * 32)


def test_the_store_is_private_atomic_and_keeps_who_and_when(tmp_path):
    store = tmp_path / "ledgers" / STORE_NAME
    assert read_approvals(store) == []
    first = approve_digest(store, "sha256:" + "ab" * 32, source="markerapp.fab", files=["a.py"], app="x/y 1.0")
    again = approve_digest(store, "ab" * 32, source="digest")
    assert again == first  # approving twice keeps the first record
    approve_digest(store, "cd" * 32, source="digest")
    records = read_approvals(store)
    assert [r.digest for r in records] == ["ab" * 32, "cd" * 32]
    assert records[0].files == ["a.py"] and records[0].approved_by and records[0].approved_at.endswith("Z")
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert not [p for p in store.parent.iterdir() if p.name not in (STORE_NAME, f"{STORE_NAME}.lock")]
    os.chmod(store, 0o666)
    with pytest.raises(FedcareError, match="writable by other users"):
        read_approvals(store)
    os.chmod(store, 0o600)
    store.write_text("{not json")
    with pytest.raises(FedcareError, match="not a fedcare approval store"):
        read_approvals(store)
    with pytest.raises(FabRefused):  # a broken store refuses every FAB, it never approves one
        FabPolicy(store=store, digests=frozenset()).check(make_fab(CODE))


def _python(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_check_runs_before_install_and_before_the_install_shortcut_in_either_order(tmp_path):
    """Flower's run_clientapp: pull_task_input -> install_from_fab -> import. The guard refuses at install,
    ahead of fedcare's shortcut that reuses an installed copy, whichever of the two was hooked first."""
    (tmp_path / "fab.bin").write_bytes(make_fab(CODE))
    for order in (("guard", "reuse"), ("reuse", "guard")):
        out = _python(_guard_script(tmp_path / "fab.bin", order), FLWR_HOME=str(tmp_path / "home"))
        assert out.split()[-4:] == ["refused", "True", "unpaired", "True"], out


def _guard_script(fab_path: Path, order: tuple[str, str]) -> str:
    return f"""
import hashlib
from pathlib import Path
from types import SimpleNamespace
from flwr.supernode.runtime import run_clientapp as runtime
from fedcare.compat import flower as fl
from fedcare.fab_approval import FabPolicy, FabRefused
fab = Path({str(fab_path)!r}).read_bytes()
installed = []
runtime.install_from_fab = lambda f, install_dir=None, skip_prompt=False: installed.append(f) or Path('/x')
task = (SimpleNamespace(), SimpleNamespace(), SimpleNamespace(fab_id="hospitalnet/demo", fab_version="2.0.0"),
        SimpleNamespace(content=fab, hash_str=hashlib.sha256(fab).hexdigest()))
runtime.pull_task_input = lambda client: task
policy = FabPolicy(store=Path({str(fab_path.with_name("store.json"))!r}), digests=frozenset())
for step in {order!r}:
    assert fl.guard_fab_install(policy.check) if step == "guard" else fl.reuse_installed_fab()
runtime.pull_task_input(None)
try:
    runtime.install_from_fab(fab, skip_prompt=True)
except FabRefused as exc:
    print("refused", "has not approved" in str(exc))
assert installed == []
policy = FabPolicy(store=None, digests=frozenset({{task[3].hash_str}}))
fl.guard_fab_install(policy.check)
runtime.pull_task_input(None)
assert runtime.install_from_fab(fab, skip_prompt=True) == Path('/x') and installed == [fab]
try:
    runtime.install_from_fab(fab, skip_prompt=True)      # no task input was pulled for this install
except RuntimeError as exc:
    print("unpaired", "task" in str(exc))
"""


def test_on_another_flower_version_the_guard_is_refused_and_the_executor_runs_nothing():
    out = _python("""
        import flwr.supercore.version as v
        v.package_version = "1.42.0"
        from fedcare.compat import flower as fl
        from fedcare.fab_approval import FabPolicy
        assert not fl.guard_fab_install(FabPolicy(store=None, digests=frozenset()).check)
        assert not fl.fab_guard_supported()
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_the_launcher_does_not_start_without_a_usable_check(tmp_path):
    """A node whose FAB check cannot work does not start (it never falls back to running any FAB)."""
    store = tmp_path / STORE_NAME
    approve_digest(store, "ab" * 32, source="test")
    os.chmod(store, 0o666)
    out = _python(f"""
        import sys
        from fedcare import node_launcher
        def attempt(args, version="1.41.0"):
            import flwr.supercore.version as v
            v.package_version = version
            try:
                node_launcher.main([*args, "--", "--insecure", "--superlink", "127.0.0.1:1"])
            except SystemExit as exc:
                return exc.code
        print(attempt(["--approve", "ab" * 32], version="1.42.0"))
        print(attempt(["--approved-fabs", {str(store)!r}]))
        print(attempt(["--approve", "not-a-digest"]))
        print(attempt(["--allow-any-fab", "--approve", "ab" * 32]))
    """)
    lines = out.strip().splitlines()
    assert "runs no ClientApp rather than unchecked code" in lines[0] and "flwr==1.41.0" in lines[0]
    assert lines[1:] == ["2", "2", "2"]  # argparse errors: shared-writable store, bad digest, contradiction


@pytest.fixture
def hospital_toml(tmp_path) -> Path:
    from fedcare.deploy_pki import make_node_key

    make_node_key(tmp_path / "node.key")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    consortium = write_consortium(tmp_path, "Hungary")
    path = tmp_path / "hospital.toml"
    path.write_text(
        consortium
        + textwrap.dedent("""\
        [superlink]
        address = "127.0.0.1:9092"
        root-certificates = "ca.crt"
        [node]
        private-key = "node.key"
        [data]
        dataset = "fed-heart-disease"
        dataset-id = "heart-2026"
        partition-id = 1
        [privacy]
        ledger-dir = "state"
        epsilon-budget = 1.0
    """)
    )
    return path


def test_approve_and_approved_commands(hospital_toml, tmp_path):
    from typer.testing import CliRunner

    from fedcare.deploy_commands import node_app

    runner = CliRunner()
    store = tmp_path / "state" / STORE_NAME
    data_fab = tmp_path / "data.fab"
    data_fab.write_bytes(make_fab({**CODE, "cohort.csv": b"1,2,3\n"}))
    done = runner.invoke(node_app, ["approve", "--config", str(hospital_toml), str(data_fab)])
    assert done.exit_code == 1 and "not code" in done.output and not store.exists(), done.output

    code_fab = tmp_path / "app.fab"
    code_fab.write_bytes(make_fab(CODE))
    done = runner.invoke(node_app, ["approve", "--config", str(hospital_toml), str(code_fab)])
    digest = fab_digest(code_fab.read_bytes())
    assert done.exit_code == 0 and f"sha256:{digest}" in done.output and "demo/client.py" in done.output, done.output
    done = runner.invoke(node_app, ["approve", "--config", str(hospital_toml), "cd" * 32])
    assert done.exit_code == 0 and "not inspected" in done.output, done.output
    done = runner.invoke(node_app, ["approve", "--config", str(hospital_toml), "no-such.fab"])
    assert done.exit_code == 2 and "neither a .fab file nor a SHA-256 digest" in done.output, done.output

    done = runner.invoke(node_app, ["approved", "--config", str(hospital_toml)])
    assert done.exit_code == 0 and digest in done.output and "cd" * 32 in done.output, done.output
    assert "hospitalnet/demo 2.0.0" in done.output
    assert [r.digest for r in read_approvals(store)] == [digest, "cd" * 32]


def test_a_fab_that_does_not_unpack_is_refused():
    fab = bytearray(make_fab(CODE))
    name = b"demo/client.py"
    data_at = bytes(fab).index(name) + len(name)  # the first local header's name; its data follows
    fab[data_at + 2] ^= 0xFF  # corrupt the deflated bytes (inflate or CRC fails)
    with pytest.raises(FabRefused, match=r"cannot be unpacked|not list exactly"):
        inspect_fab(bytes(fab))
