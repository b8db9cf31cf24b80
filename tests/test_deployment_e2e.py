"""A real deployment on loopback: TLS SuperLink with node authentication, registered and unregistered
hospitals, an insecure node turned away, and a 2-round `flwr run` across two SuperNodes.

The nodes run what `fedcare node start` runs by default: Flower's SuperNode through
`fedcare.node_launcher` (warm ClientApp executor, prompt polling); the refusals below go through the
same launcher, so its Flower exit codes and log lines are what hospital IT sees.

Every process is started in its own process group, bound to 127.0.0.1, and killed by PID at the end.
The overall polling bounds are hang guards only, not performance assertions.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcare.deploy_commands import diagnose
from fedcare.deploy_pki import init_deployment
from fedcare.node_settings import load_node_settings, supernode_command
from simulation.environment import SAFE_ENVIRONMENT
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
HANG_GUARD_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"flower-superlink exited early:\n{log.read_text()[-3000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"SuperLink did not listen on 127.0.0.1:{port}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:  # the leader exited; make sure no child of its group is left behind
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _hospital_settings(files, index: int, partition: int, ledgers: Path):
    """The init-written hospital.toml, with a free local port and a ledger folder in tmp."""
    path = files.hospitals[index].settings
    text = re.sub(r"clientappio-port = \d+", f"clientappio-port = {_free_port()}", path.read_text())
    text = re.sub(r"partition-id = \d+", f"partition-id = {partition}", text)
    text = text.replace('ledger-dir = "ledgers"', f'ledger-dir = "{ledgers / files.hospitals[index].name}"')
    path.write_text(text)
    return load_node_settings(path)


def test_tls_node_auth_deployment_runs_two_rounds(tmp_path):
    port = _free_port()
    files = init_deployment(tmp_path / "deploy", ["cleveland", "hungary", "intruder"],
                            superlink_address=f"127.0.0.1:{port}")
    env = {**os.environ, **SAFE_ENVIRONMENT, "FLWR_HOME": str(files.flwr_home),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}   # flower-superexec must be on PATH
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, command: list[str]) -> tuple[subprocess.Popen, Path]:
        log = logs / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(command, cwd=ROOT if command[0] == sys.executable else tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        procs.append(proc)
        return proc, log

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    try:
        link, link_log = start("superlink", files.superlink_command(str(BIN / "flower-superlink")))
        _wait_for_port(port, link, link_log)
        for h in files.hospitals[:2]:
            done = flwr("supernode", "register", str(h.public_key), files.connection, "--format", "json")
            assert done.returncode == 0 and json.loads(done.stdout)["success"], done.stdout + done.stderr

        ledgers = tmp_path / "node-ledgers"
        # The unregistered hospital is refused: Flower logs exit code 305 (its process status is 1), and
        # `fedcare node start` (same supernode_command) says what to do, exiting 1.
        intruder = _hospital_settings(files, 2, 2, ledgers)
        proc, log = start("intruder", [sys.executable, "-c", "from fedcare.deploy_commands import node_app; node_app()",
                                       "start", "--config", str(intruder.path)])
        assert proc.wait(timeout=HANG_GUARD_S) == 1
        text = " ".join(log.read_text().split())
        assert "Exit Code: 305" in text and "Failed to activate SuperNode" in text, text[-2000:]
        assert "this node's public key is not registered with the SuperLink" in text, text[-2000:]
        assert "-m fedcare.node_launcher --warm-clientapp --poll-interval 0.5 -- --superlink" in text  # our command

        # A registered node that does not trust the deployment's CA (no --root-certificates: system
        # roots) fails the TLS handshake; a plain-HTTP node (--insecure) gets no answer.
        cleveland = _hospital_settings(files, 0, 0, ledgers)
        command = supernode_command(cleveland, str(BIN / "flower-supernode"))
        at = command.index("--root-certificates")
        no_root = command[:at] + command[at + 2:]
        proc, log = start("no-root-certificates", no_root)
        assert proc.wait(timeout=HANG_GUARD_S) == 1
        text = log.read_text()
        assert "Exit Code: 305" in text and "CERTIFICATE_VERIFY_FAILED" in text, text[-2000:]
        assert "TLS failure" in diagnose(text.splitlines(), 1, cleveland)
        key_at = no_root.index("--auth-supernode-private-key")
        insecure = no_root[:key_at] + no_root[key_at + 2:] + ["--insecure", "--max-retries", "1"]
        proc, log = start("insecure", insecure)
        assert proc.wait(timeout=HANG_GUARD_S) == 1
        text = log.read_text()
        assert "Exit Code: 305" in text and "Server disconnected" in text, text[-2000:]

        # The two registered hospitals join.
        nodes = []
        for index in range(2):
            settings = _hospital_settings(files, index, index, ledgers)
            nodes.append(start(f"node-{index}", supernode_command(settings, str(BIN / "flower-supernode"))))

        out = tmp_path / "out"
        run = flwr("run", ".", files.connection, "--run-config",
                   f"num-rounds=2 hospitals=2 min-hospitals=2 output-dir='{out}' "
                   f"ledger-dir='{tmp_path / 'ledgers'}'")
        assert run.returncode == 0, run.stdout + run.stderr
        run_id = re.search(r"started run (\d+)", run.stdout + run.stderr).group(1)

        status, deadline = "", time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            listing = flwr("ls", files.connection, "--run-id", run_id, "--format", "json")
            runs = json.loads(listing.stdout).get("runs", []) if listing.returncode == 0 else []
            status = runs[0]["status"].lower() if runs else ""
            if status.startswith("finished"):
                break
            for proc, log in nodes:
                assert proc.poll() is None, f"a SuperNode died:\n{log.read_text()[-3000:]}"
            time.sleep(5)
        node_logs = "\n".join(log.read_text()[-1500:] for _, log in nodes)
        assert status == "finished:completed", f"{status}\n{link_log.read_text()[-3000:]}\n{node_logs}"
        for _, log in nodes:   # every message ran in a process forked from the node's warm executor
            text = log.read_text()
            assert "fedcare warm ClientApp executor: preloaded" in text and "Sent successfully" in text, text[-3000:]

        results = json.loads((out / "results.json").read_text())
        assert len(results["rounds"]) == 2
        assert set(results["hospitals"]) == {"Cleveland", "Hungary"}
        assert all(0 < h["epsilon"] <= 1.0 + 1e-9 for h in results["hospitals"].values()), results["hospitals"]
        # node-config ledger-dir won over the run config's; the refused hospital released nothing
        assert {p.parent.name for p in ledgers.glob("*/privacy-ledger-*.json")} == {"cleveland", "hungary"}
        assert not (tmp_path / "ledgers").exists()
        assert all(set(r["train_seconds"]) == {"Cleveland", "Hungary"} for r in results["rounds"]), results["rounds"]
        seconds = [r["seconds"] for r in results["rounds"]]
        print(f"\ndeployment round wall times (s): {', '.join(f'{s:.1f}' for s in seconds)}")
    finally:
        for proc in reversed(procs):
            _stop(proc)
