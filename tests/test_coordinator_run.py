"""`fedcare run DEPLOY_DIR`: the coordinator's one command that launches (or resumes) a deployed run.

Unit tests check what is decided before anything is submitted (the deployment folder, the run
config, resume) and what is read afterwards (the final table, the failure reason). The real-process
tests start fedcare's SuperLink and two hospital SuperNodes on 127.0.0.1 (as
tests/test_deployment_e2e.py does) and run the command itself: a run the hospitals' policy refuses
exits 1 with their reason; a 1-round run streams its progress lines, prints the final table and
writes its results to the absolute output directory given, whatever the SuperLink's working directory.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.coordinator_commands import CoordinatorDeployment, _follow, _why_not_completed
from fedcare.coordinator_run_config import RUN_CONFIG_FILE, coordinator_run_config, parse_pairs, write_run_config
from fedcare.errors import FedcareError
from fedcare.flower_cli import FlowerCli, RunStatus
from fedcare.results_table import build_table, server_rows
from tests.conftest import ROOT


def _deployment(tmp_path, hospitals=("Cleveland", "Hungary")):
    """The parts of a `fedcare deploy init` folder `fedcare run` reads (no keys needed before submitting)."""
    folder = tmp_path / "deploy"
    (folder / "flwr-home").mkdir(parents=True)
    (folder / "flwr-home" / "config.toml").write_text(
        '[superlink]\ndefault = "fedcare"\n\n[superlink.fedcare]\naddress = "127.0.0.1:1"\n'
    )
    for name in hospitals:
        (folder / name).mkdir()
        (folder / name / "node.pub").write_text("ecdsa-sha2-nistp384 AAAA\n")
    return folder


def _invoke(*args):
    return CliRunner().invoke(app, ["run", *map(str, args)])


def test_deployment_folder_gives_connection_and_hospital_count(tmp_path):
    deployment = CoordinatorDeployment.load(_deployment(tmp_path, ("A", "B", "C")))
    assert (deployment.connection, deployment.hospitals) == ("fedcare", 3)
    assert deployment.flwr_home == (tmp_path / "deploy" / "flwr-home").resolve()


def test_not_a_deployment_folder_is_a_usage_error(tmp_path):
    result = _invoke(tmp_path, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2
    assert "is not a deployment folder" in result.output and "fedcare deploy init" in result.output


def test_a_deployment_without_hospital_folders_needs_the_hospital_count(tmp_path):
    result = _invoke(_deployment(tmp_path, ()), "--output-dir", tmp_path / "out", "--app", ROOT)
    assert result.exit_code == 2 and "holds no hospital folder" in result.output and "--hospitals N" in result.output


def test_unknown_run_config_key_is_refused_before_anything_is_submitted(tmp_path):
    result = _invoke(
        _deployment(tmp_path),
        "--output-dir",
        tmp_path / "out",
        "--app",
        ROOT,
        "--run-config",
        "strategy='fedadam' no-such-key=1",
    )
    assert result.exit_code == 2
    assert "unknown run-config key 'no-such-key'" in result.output
    assert not (tmp_path / "out").exists()


def test_resume_needs_a_checkpoint_and_a_new_run_never_overwrites_one(tmp_path):
    deploy, out = _deployment(tmp_path), tmp_path / "out"
    result = _invoke(deploy, "--output-dir", out, "--app", ROOT, "--resume")
    assert result.exit_code == 2 and "no checkpoint to resume" in result.output
    (out / "checkpoint").mkdir(parents=True)
    result = _invoke(deploy, "--output-dir", out, "--app", ROOT)
    assert result.exit_code == 2 and "holds the checkpoint of an earlier run" in result.output


def test_run_config_output_dir_absolute_options_over_pairs_and_resume_keeps_the_saved_config(tmp_path):
    out = tmp_path / "out"
    pairs = parse_pairs(["strategy='fedadam' num-rounds=7", "target-epsilon=0.5"])
    first = coordinator_run_config(out, 2, False, pairs, {"num-rounds": 3, "min-hospitals": None})
    assert first == {
        "strategy": "fedadam",
        "num-rounds": 3,
        "target-epsilon": 0.5,
        "hospitals": 2,
        "output-dir": str(out),
        "resume": False,
    }
    write_run_config(out, first)
    resumed = coordinator_run_config(out, 5, True, {}, {"num-rounds": None})
    assert resumed == first | {"resume": True}  # the saved settings, not the deployment's 5 hospitals
    with pytest.raises(FedcareError, match="not a TOML value"):
        parse_pairs(["strategy=fedadam"])


def test_server_rows_show_what_the_server_knows_without_local_columns():
    metrics = {"n": 104, "accuracy": 0.7, "recall": 0.6, "specificity": 0.8, "f1": 0.65, "auc": 0.75}
    results = {
        "hospitals": {
            "Hungary": {"epsilon": 0.9, "released_count": 180.0, "refusal": None},
            "Cleveland": {"epsilon": 1.0, "released_count": 210.0, "refusal": None},
        },
        "final": {"Cleveland": metrics, "pooled": metrics | {"n": 104}},
    }
    rows, pooled = server_rows(results)
    assert [(r["name"], r["train_n"], r["test_n"]) for r in rows] == [("Cleveland", 210, 104), ("Hungary", 180, "-")]
    assert (pooled["train_n"], pooled["epsilon"]) == (390, 1.0)
    table = build_table(rows, pooled, dp=True, local_columns=False)
    headers = [c.header for c in table.columns]
    assert "fed\nAUC" in headers and not any(h.startswith("local") for h in headers)


def test_hospital_names_in_the_table_are_text_never_markup():
    from rich.console import Console

    rows, pooled = server_rows({"hospitals": {"St [Mary]'s [/]": {"epsilon": 0.5}}, "final": {}})
    console = Console(width=200, record=True)
    console.print(build_table(rows, pooled, dp=True, local_columns=False))
    assert "St [Mary]'s [/]" in console.export_text()


def test_failure_reason_is_the_serverapps_own_else_flowers_status():
    lines = [
        "INFO :      [fedcare] statistics: A refuses: requires DP",
        "INFO :      [fedcare] run failed: no hospital can take part: A refuses: requires DP",
    ]
    assert (
        _why_not_completed(RunStatus("finished:failed"), lines)
        == "failed: no hospital can take part: A refuses: requires DP"
    )
    assert "finished:failed" in _why_not_completed(RunStatus("finished:failed", "ServerApp exited"), [])
    assert "stopped" in _why_not_completed(RunStatus("finished:stopped"), lines)


def test_an_unreachable_superlink_is_flowers_reason_and_where_the_connection_is(tmp_path):
    fake_flwr = tmp_path / "flwr"  # answers as Flower 1.41's `flwr run --format json` does with no SuperLink
    reply = {
        "success": False,
        "error-message": "Using SuperLink: fedcare (127.0.0.1:1)\n\nConnection to the SuperLink is unavailable.",
    }
    fake_flwr.write_text(f"#!{sys.executable}\nprint({json.dumps(json.dumps(reply))})\nraise SystemExit(1)\n")
    fake_flwr.chmod(0o755)
    cli = FlowerCli(tmp_path / "flwr-home", "fedcare", executable=str(fake_flwr))
    with pytest.raises(FedcareError) as raised:
        cli.start_run(tmp_path, tmp_path / "run-config.toml")
    assert raised.value.problem == "`flwr run` failed: Connection to the SuperLink is unavailable."
    assert (
        "is the SuperLink running" in raised.value.hint
        and str(tmp_path / "flwr-home" / "config.toml") in raised.value.hint
    )


class _BreakingLogStream:
    """A `flwr` whose first log stream breaks after two lines while the run is still running."""

    def __init__(self):
        self.log = [
            "INFO :      [fedcare] statistics round: 2 of 2 hospitals",
            "INFO :      some Flower line",
            "INFO :      [fedcare] round  1/1 | hospitals 2/2",
        ]
        self.streams = 0

    def follow_log(self, run_id, on_line):
        self.streams += 1
        for line in self.log[:2] if self.streams == 1 else self.log:  # Flower replays from the start
            on_line(line)

    def wait_finished(self, run_id):
        return RunStatus("running" if self.streams == 1 else "finished:completed")


def test_a_broken_log_stream_is_followed_again_without_repeating_lines(capsys):
    from rich.console import Console

    flwr, lines = _BreakingLogStream(), []
    status = _follow(flwr, 7, lines, Console(width=160), verbose=False)
    assert status.completed and flwr.streams == 2 and lines == flwr.log
    assert capsys.readouterr().out.splitlines() == ["statistics round: 2 of 2 hospitals", "round  1/1 | hospitals 2/2"]


class _FakeFlower:
    """Stands in for `flwr` (fedcare.flower_cli.FlowerCli): the run ends with ``status`` after ``log``, and
    the ServerApp has written ``results`` (or nothing) to the output directory."""

    status, log, results = "finished:completed", [], None

    def __init__(self, flwr_home, connection):
        pass

    def start_run(self, app, run_config):
        if self.results is not None:
            out = Path(run_config).parent
            (out / "results.json").write_text(json.dumps({"run_id": "5", **self.results}))
        return 5

    def follow_log(self, run_id, on_line):
        for line in self.log:
            on_line(line)

    def wait_finished(self, run_id):
        return RunStatus(self.status)


def _one_round_results(stopped_early=None, refusal=None):
    metrics = {"n": 16, "accuracy": 0.5, "recall": 0.5, "specificity": 0.5, "f1": 0.5, "auc": 0.5}
    return {
        "settings": {"dp": True},
        "stopped_early": stopped_early,
        "rounds": [{"round": 1}],
        "hospitals": {
            "A": {"epsilon": 0.4, "released_count": 30.0, "refusal": None},
            "B": {"epsilon": 0.2, "released_count": 30.0, "refusal": refusal},
        },
        "final": {"A": metrics, "pooled": metrics},
    }


def test_a_run_that_stopped_early_prints_the_table_and_each_refusal_then_exits_1(tmp_path, monkeypatch):
    monkeypatch.setattr("fedcare.flower_cli.FlowerCli", _FakeFlower)
    monkeypatch.setattr(
        _FakeFlower,
        "results",
        _one_round_results(
            "stopped after round 1: only 1 hospital(s) can still train (min-hospitals=2)",
            "B refuses: the round would exceed its budget",
        ),
    )
    result = _invoke(_deployment(tmp_path), "--output-dir", tmp_path / "out", "--app", ROOT)
    assert result.exit_code == 1, result.output
    assert "fedcare: federated model, per hospital test split" in result.output
    assert "B: B refuses: the round would exceed its budget" in result.output
    assert "run 5 stopped early: stopped after round 1: only 1 hospital(s) can still train" in result.output


def test_a_failed_run_exits_1_with_the_serverapps_reason_after_its_report(tmp_path, monkeypatch):
    monkeypatch.setattr("fedcare.flower_cli.FlowerCli", _FakeFlower)
    monkeypatch.setattr(_FakeFlower, "status", "finished:failed")
    monkeypatch.setattr(
        _FakeFlower,
        "log",
        [
            "INFO :      [fedcare] round  1/2 | hospitals 2/2 | 3.0s",
            "INFO :      [fedcare] run failed: the run is incomplete: stopped",
        ],
    )
    monkeypatch.setattr(_FakeFlower, "results", _one_round_results("stopped"))
    result = _invoke(_deployment(tmp_path), "--output-dir", tmp_path / "out", "--app", ROOT)
    assert result.exit_code == 1, result.output
    assert "round  1/2 | hospitals 2/2 | 3.0s" in result.output and "pooled" in result.output
    assert "run 5 failed: the run is incomplete: stopped" in " ".join(result.output.split())


def test_a_completed_run_prints_progress_and_the_table_and_exits_0(tmp_path, monkeypatch):
    monkeypatch.setattr("fedcare.flower_cli.FlowerCli", _FakeFlower)
    monkeypatch.setattr(_FakeFlower, "log", ["INFO :      [fedcare] round  1/1 | hospitals 2/2 | 3.0s"])
    monkeypatch.setattr(_FakeFlower, "results", _one_round_results())
    result = _invoke(_deployment(tmp_path), "--output-dir", tmp_path / "out", "--app", ROOT, "--rounds", "1")
    assert result.exit_code == 0, result.output
    assert "round  1/1 | hospitals 2/2 | 3.0s" in result.output and "│ pooled" in result.output
    saved = (tmp_path / "out" / RUN_CONFIG_FILE).read_text()
    assert f'output-dir = "{tmp_path / "out"}"' in saved and "num-rounds = 1" in saved and "hospitals = 2" in saved


# ---- real processes -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A TLS SuperLink with node authentication and two registered hospital nodes, all on 127.0.0.1."""
    from fedcare.compat.flower import build_fab
    from fedcare.deploy_pki import init_deployment
    from fedcare.fab_approval import approve_digest, fab_digest
    from fedcare.node_settings import supernode_command
    from tests.support.deployment_processes import (
        BIN,
        Processes,
        deployment_env,
        free_port,
        hospital_settings,
        wait_for_port,
    )

    tmp_path = tmp_path_factory.mktemp("coordinator-run")
    app_dir = _app_snapshot(tmp_path / "app")
    port = free_port()
    files = init_deployment(tmp_path / "deploy", ["cleveland", "hungary"], superlink_address=f"127.0.0.1:{port}")
    processes = Processes(tmp_path, deployment_env(files))
    try:
        link, link_log = processes.start("superlink", files.superlink_command(sys.executable))
        wait_for_port(port, link, link_log)
        digest = fab_digest(build_fab(app_dir)[0])
        for index, hospital in enumerate(files.hospitals):
            done = processes.flwr(
                "supernode", "register", str(hospital.public_key), files.connection, "--format", "json"
            )
            assert done.returncode == 0 and json.loads(done.stdout)["success"], done.stdout + done.stderr
            toml = hospital.settings  # these two hospitals join a federation of two
            toml.write_text(toml.read_text().replace("min-hospitals = 3", "min-hospitals = 2"))
            settings = hospital_settings(files, index, index, tmp_path / "node-ledgers")
            approve_digest(settings.approved_fabs_store, digest, source="test: the project's app")
            processes.start(f"node-{index}", supernode_command(settings, str(BIN / "flower-supernode")))
        yield files, app_dir, processes
    finally:
        processes.stop_all()


def _app_snapshot(folder):
    """The project's app as `flwr run .` ships it, unpacked into ``folder``: the same FAB (digest) whatever is
    edited in the working tree while the test runs."""
    from fedcare.compat.flower import build_fab

    with zipfile.ZipFile(io.BytesIO(build_fab(ROOT)[0])) as fab:
        fab.extractall(folder)
    return folder


def _fedcare_run(deployment, cwd, *args):
    """`fedcare run` as the coordinator types it in ``cwd``, submitting the app the hospitals approved; its own
    FLWR_HOME points elsewhere (the command uses the deployment's)."""
    from tests.support.deployment_processes import BIN, HANG_GUARD_S

    files, app_dir, processes = deployment
    env = processes.env | {"FLWR_HOME": str(cwd / "not-the-deployments-flwr-home")}
    return subprocess.run(
        [str(BIN / "fedcare"), "run", str(files.out_dir), "--app", str(app_dir), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
    )


@pytest.mark.e2e
def test_a_run_the_hospitals_refuse_exits_1_with_their_reason(deployment, tmp_path):
    done = _fedcare_run(
        deployment,
        tmp_path,
        "--rounds",
        "1",
        "--output-dir",
        tmp_path / "out",
        "--run-config",
        "secure-aggregation=false",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    error = " ".join(done.stderr.split())
    assert "failed: no hospital can take part" in error, done.stdout + done.stderr
    for name in ("Cleveland", "Hungary"):  # each hospital's own reason, as its policy gave it
        assert f"{name} refuses: requires secure aggregation, the run has secure-aggregation=false" in error
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.e2e
def test_a_run_streams_progress_prints_the_table_and_writes_results_where_asked(deployment, tmp_path):
    # relative to where the coordinator types the command, not to the SuperLink's folder (the project's)
    done = _fedcare_run(deployment, tmp_path, "--rounds", "1", "--output-dir", "results")
    out = tmp_path / "results"
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(ln.startswith("statistics round: 2 of 2 hospitals") for ln in lines), done.stdout
    assert any(ln.startswith("round  1/1 | hospitals 2/2 | pooled acc") for ln in lines), done.stdout
    assert "fedcare: federated model, per hospital test split" in done.stdout
    table = [ln for ln in lines if ln.startswith("│")]
    assert [ln.split("│")[1].strip() for ln in table] == ["Cleveland", "Hungary", "pooled"], done.stdout
    results = json.loads((out / "results.json").read_text())
    assert f"started run {results['run_id']} " in done.stdout
    assert len(results["rounds"]) == 1 and set(results["final"]) == {"Cleveland", "Hungary", "pooled"}
    assert (out / "final_model.npz").is_file() and (out / "checkpoint").is_dir()
    assert results["settings"]["output-dir"] == str(out)
    assert (out / RUN_CONFIG_FILE).is_file()
