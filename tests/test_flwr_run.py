"""The same ServerApp/ClientApp under `flwr run .`: a real SuperLink (simulation runtime) on loopback."""

import json
import os
import subprocess

import pytest

from fedcare.safe_environment import SAFE_ENVIRONMENT
from tests.conftest import ROOT
from tests.support.deployment_processes import BIN, free_port, stop, wait_for_port

pytestmark = pytest.mark.e2e


def test_flwr_run_with_run_config_overrides(tmp_path):
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedcare-local"\n\n[superlink.fedcare-local]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, **SAFE_ENVIRONMENT, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
    log = tmp_path / "superlink.log"
    link = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--simulation",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(tmp_path / "state.db"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=open(log, "w"),  # noqa: SIM115 - the SuperLink writes its log while it runs
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, link, log)
        out = tmp_path / "out"
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                ".",
                "fedcare-local",
                "--stream",
                "--federation-config",
                "num-supernodes=4 client-resources-num-cpus=1",
                "--run-config",
                f"num-rounds=2 strategy='fedprox' output-dir='{out}' ledger-dir='{tmp_path / 'ledgers'}'",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
        )
        assert "[fedcare] round  2/2" in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]
        # `flwr run --stream` exits 0 even on failure: read the real status.
        listing = subprocess.run(
            [str(BIN / "flwr"), "ls", "fedcare-local", "--format", "json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        runs = json.loads(listing.stdout)["runs"]
        assert runs and all(r["status"].lower().startswith("finished:completed") for r in runs), runs
        results = json.loads((out / "results.json").read_text())
        assert results["settings"]["strategy"] == "fedprox" and len(results["rounds"]) == 2
        assert all(0.9 < h["epsilon"] <= 1.0 + 1e-9 for h in results["hospitals"].values())
    finally:
        stop(link)
