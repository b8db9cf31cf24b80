"""A real deployment on loopback: TLS SuperLink with node authentication, registered and unregistered
hospitals, an insecure node turned away, and a 2-round `flwr run` across two SuperNodes.

The nodes run what `fedcare node start` runs by default: Flower's SuperNode through
`fedcare.node_launcher` (warm ClientApp executor, prompt polling); the refusals below go through the
same launcher, so its Flower exit codes and log lines are what hospital IT sees.

Every process is started in its own process group, bound to 127.0.0.1, and killed by PID at the end.
The overall polling bounds are hang guards only, not performance assertions.
"""

import json
import sys

import pytest

from fedcare.compat.flower import build_fab
from fedcare.deploy_commands import diagnose
from fedcare.deploy_pki import init_deployment
from fedcare.fab_approval import approve_digest, fab_digest
from fedcare.node_settings import supernode_command
from tests.conftest import ROOT
from tests.support.deployment_processes import (
    BIN,
    HANG_GUARD_S,
    Processes,
    deployment_env,
    free_port,
    hospital_settings,
    start_run,
    wait_for_port,
    wait_for_run,
)

pytestmark = pytest.mark.e2e


def test_tls_node_auth_deployment_runs_two_rounds(tmp_path):
    port = free_port()
    files = init_deployment(
        tmp_path / "deploy", ["cleveland", "hungary", "intruder"], superlink_address=f"127.0.0.1:{port}"
    )
    processes = Processes(tmp_path, deployment_env(files))
    start, flwr = processes.start, processes.flwr

    try:
        link, link_log = start("superlink", files.superlink_command(str(BIN / "flower-superlink")))
        wait_for_port(port, link, link_log)
        for h in files.hospitals[:2]:
            done = flwr("supernode", "register", str(h.public_key), files.connection, "--format", "json")
            assert done.returncode == 0 and json.loads(done.stdout)["success"], done.stdout + done.stderr

        ledgers = tmp_path / "node-ledgers"
        # The unregistered hospital is refused: Flower logs exit code 305 (its process status is 1), and
        # `fedcare node start` (same supernode_command) says what to do, exiting 1.
        intruder = hospital_settings(files, 2, 2, ledgers)
        proc, log = start(
            "intruder",
            [
                sys.executable,
                "-c",
                "from fedcare.deploy_commands import node_app; node_app()",
                "start",
                "--config",
                str(intruder.path),
            ],
        )
        assert proc.wait(timeout=HANG_GUARD_S) == 1
        text = " ".join(log.read_text().split())
        assert "Exit Code: 305" in text and "Failed to activate SuperNode" in text, text[-2000:]
        assert "this node's public key is not registered with the SuperLink" in text, text[-2000:]
        assert "-m fedcare.node_launcher --warm-clientapp --poll-interval 0.5 --approved-fabs" in text  # our command

        # A registered node that does not trust the deployment's CA (no --root-certificates: system
        # roots) fails the TLS handshake; a plain-HTTP node (--insecure) gets no answer.
        cleveland = hospital_settings(files, 0, 0, ledgers)
        command = supernode_command(cleveland, str(BIN / "flower-supernode"))
        at = command.index("--root-certificates")
        no_root = command[:at] + command[at + 2 :]
        proc, log = start("no-root-certificates", no_root)
        assert proc.wait(timeout=HANG_GUARD_S) == 1
        text = log.read_text()
        assert "Exit Code: 305" in text and "CERTIFICATE_VERIFY_FAILED" in text, text[-2000:]
        assert "TLS failure" in diagnose(text.splitlines(), 1, cleveland)
        key_at = no_root.index("--auth-supernode-private-key")
        insecure = no_root[:key_at] + no_root[key_at + 2 :] + ["--insecure", "--max-retries", "1"]
        proc, log = start("insecure", insecure)
        assert proc.wait(timeout=HANG_GUARD_S) == 1
        text = log.read_text()
        # gRPC reports the refused plain-HTTP handshake either way, depending on timing
        assert "Exit Code: 305" in text and ("Server disconnected" in text or "Connection reset by peer" in text), text[
            -2000:
        ]

        # The two registered hospitals approve the FAB `flwr run .` ships, and join.
        digest = fab_digest(build_fab(ROOT)[0])
        nodes = []
        for index in range(2):
            toml = files.hospitals[index].settings  # these two hospitals accept a federation of two
            toml.write_text(toml.read_text().replace("min-hospitals = 3", "min-hospitals = 2"))
            settings = hospital_settings(files, index, index, ledgers)
            approve_digest(settings.approved_fabs_store, digest, source="test: the project's FAB")
            nodes.append(start(f"node-{index}", supernode_command(settings, str(BIN / "flower-supernode"))))

        out = tmp_path / "out"
        run_id = start_run(
            flwr,
            files.connection,
            f"num-rounds=2 hospitals=2 min-hospitals=2 output-dir='{out}' ledger-dir='{tmp_path / 'ledgers'}'",
        )
        status = wait_for_run(flwr, files.connection, run_id, nodes)
        node_logs = "\n".join(log.read_text()[-1500:] for _, log in nodes)
        assert status == "finished:completed", f"{status}\n{link_log.read_text()[-3000:]}\n{node_logs}"
        for _, log in nodes:  # every message ran in a process forked from the node's warm executor
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
        processes.stop_all()
