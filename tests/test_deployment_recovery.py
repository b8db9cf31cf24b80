"""Real-process recovery on loopback: three registered hospitals (Fed-Heart-Disease partitions 0-2) behind a
TLS SuperLink with node authentication, secure aggregation on (the default), DP on, 2 rounds.

1. An uninterrupted run accounts exactly what Flower's Simulation Engine accounts (same seed and settings)
   and reaches a comparable model (each hospital draws its own secret noise, so the models differ).
2. The SuperLink SIGKILLed mid-run and restarted on its database: the coordinator relaunches with
   ``resume=true`` and the run finishes from its checkpoint without counting any privacy twice.
3. A SuperNode SIGKILLed mid-round: the run finishes with the other two and reports the dropout.

The three tests share one deployment (starting a SuperLink and three SuperNodes costs ~50 s of imports on
two cores), in this order: the first needs fresh privacy ledgers, each later one measures what its own run
spent against the ledger it found. Each still runs alone (``-k``). Every process is started in its own
process group, bound to 127.0.0.1, and stopped by PID; the polling bounds are hang guards only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client.privacy_ledger import epsilon_of
from fedcare.compat.flower import build_fab
from fedcare.deploy_pki import DeploymentFiles, init_deployment
from fedcare.fab_approval import approve_digest, fab_digest
from fedcare.node_settings import supernode_command
from fedcare.safe_environment import SAFE_ENVIRONMENT
from server.checkpoint import load_checkpoint
from tests.conftest import ROOT
from tests.support.deployment_processes import (
    BIN,
    HANG_GUARD_S,
    Processes,
    deployment_env,
    free_port,
    group_members,
    hospital_settings,
    kill_group,
    run_status,
    start_run,
    wait_for_port,
    wait_for_run,
)

pytestmark = pytest.mark.e2e
HOSPITALS = {"cleveland": "Cleveland", "hungary": "Hungary", "switzerland": "Switzerland"}  # folder -> own name
NAMES = set(HOSPITALS.values())
ROUNDS = 2
BUDGET = 4.0  # each node's lifetime epsilon: room for the three runs (1.0 each) on one set of ledgers


@dataclass
class Federation:
    """A TLS + node-auth SuperLink and three registered SuperNodes, started as a coordinator would."""

    tmp_path: Path
    files: DeploymentFiles
    processes: Processes
    port: int
    trace: Path  # $FEDCARE_TIMING_LOG: one JSON line per traced event
    ledgers: Path  # each node's own privacy-ledger folder lives under here
    link: tuple[subprocess.Popen, Path] | None = None
    nodes: dict[str, tuple[subprocess.Popen, Path]] = field(default_factory=dict)

    @classmethod
    def create(cls, tmp_path: Path) -> Federation:
        port = free_port()
        files = init_deployment(tmp_path / "deploy", list(HOSPITALS), superlink_address=f"127.0.0.1:{port}")
        trace = tmp_path / "trace.jsonl"
        processes = Processes(tmp_path, deployment_env(files, FEDCARE_TIMING_LOG=str(trace)))
        return cls(tmp_path, files, processes, port, trace, tmp_path / "node-ledgers")

    def start_superlink(self) -> None:
        self.link = self.processes.start("superlink", self.files.superlink_command(str(BIN / "flower-superlink")))
        wait_for_port(self.port, *self.link)

    def register(self) -> None:
        for h in self.files.hospitals:
            done = self.processes.flwr(*self.files.register_command(h)[1:], "--format", "json")
            assert done.returncode == 0 and json.loads(done.stdout)["success"], done.stdout + done.stderr

    def start_node(self, name: str) -> None:
        index = list(HOSPITALS).index(name)
        path = self.files.hospitals[index].settings
        path.write_text(path.read_text().replace("epsilon-budget = 1.0", f"epsilon-budget = {BUDGET}"))
        settings = hospital_settings(self.files, index, index, self.ledgers)
        approve_digest(settings.approved_fabs_store, fab_digest(build_fab(ROOT)[0]), source="test: the project's FAB")
        self.nodes[name] = self.processes.start(name, supernode_command(settings, str(BIN / "flower-supernode")))

    def ensure_up(self) -> None:
        """Start whatever is not running (a node an earlier test killed, or everything)."""
        if self.link is None or self.link[0].poll() is not None:
            self.start_superlink()
            if not self.nodes:
                self.register()
        for name in HOSPITALS:
            if name not in self.nodes or self.nodes[name][0].poll() is not None:
                self.start_node(name)

    def run(self, out: Path, extra: str = "") -> str:
        return start_run(
            self.processes.flwr,
            self.files.connection,
            f"num-rounds={ROUNDS} hospitals=3 min-hospitals=2 seed=0 output-dir='{out}' "
            f"ledger-dir='{self.tmp_path / 'run-ledgers'}' {extra}".strip(),
        )

    def wait(self, run_id: str, out: Path, nodes: list[str] | None = None) -> str:
        """The run's final status; `flwr ls` is asked once its results.json is written (or every 20 s)."""

        def written() -> bool:
            try:
                return json.loads((out / "results.json").read_text())["run_id"] == run_id
            except (OSError, ValueError, KeyError):
                return False

        watched = [self.nodes[n] for n in (HOSPITALS if nodes is None else nodes)]
        return wait_for_run(self.processes.flwr, self.files.connection, run_id, watched, poll_s=0.5, done=written)

    def server_log(self, run_id: str) -> str:
        """The ServerApp's log as the coordinator reads it (`flwr log RUN_ID --show`)."""
        shown = self.processes.flwr("log", run_id, self.files.connection, "--show")
        return shown.stdout + shown.stderr

    def logs(self) -> str:
        """The tail of every log, for assertion messages."""
        return "\n".join(f"--- {log.name}\n{log.read_text()[-2500:]}" for log in sorted(self.processes.logs.iterdir()))

    def events(self, event: str, since: float = 0.0, **match: object) -> list[dict]:
        """Traced events of one kind, at or after ``since``, whose fields equal ``match``."""
        found = []
        for line in self.trace.read_text().splitlines() if self.trace.exists() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being appended right now
                continue
            if (
                record.get("ev") == event
                and record["t"] >= since
                and all(str(record.get(k)) == str(v) for k, v in match.items())
            ):
                found.append(record)
        return found

    def ledger(self, name: str) -> dict:
        (path,) = (self.ledgers / name).glob("privacy-ledger-*.json")
        return json.loads(path.read_text())


def _ledger_or_empty(fed: Federation, name: str) -> dict:
    try:
        return fed.ledger(name)
    except ValueError:  # no ledger yet
        return {"history": [], "releases": [], "plans": {}}


def _uninterrupted_epsilon(before: dict, after: dict, plan_run_id: str) -> float:
    """What one uninterrupted run under plan ``plan_run_id`` spends on top of the ledger ``before``:
    its statistics release (if it paid for one) and ``rounds x steps_per_round`` DP-SGD steps at the plan's noise."""
    plan = after["plans"][plan_run_id]
    history = [tuple(e) for e in before["history"]]
    if plan["stats_noise_multiplier"] is not None:
        history.append((plan["stats_noise_multiplier"], 1.0, 1))
    history.append((plan["noise_multiplier"], plan["sample_rate"], plan["rounds"] * plan["steps_per_round"]))
    return epsilon_of(history, after["delta"])


def _wait_until(condition, what: str, fed: Federation, timeout: float = HANG_GUARD_S, poll_s: float = 0.005):
    """Poll ``condition()`` until it returns something truthy (returned); every process must stay up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        for proc, log in [fed.link, *fed.nodes.values()]:
            assert proc.poll() is None, f"{log.name} exited while waiting for {what}:\n{fed.logs()}"
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not within {timeout} s\n{fed.logs()}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation.create(tmp_path_factory.mktemp("federation"))
    try:
        yield fed
    finally:
        fed.processes.stop_all()
        leftovers = [pid for proc in fed.processes.procs for pid in group_members(proc.pid)]
        assert not leftovers, f"processes left behind: {leftovers}"


def _simulate(tmp_path: Path) -> dict:
    """The same run on Flower's Simulation Engine (3 hospitals = partitions 0..2, same seed), in its own group."""
    out = tmp_path / "simulation"
    code = (
        "from fedcare.run_config import RunSettings; from simulation.runner import run; "
        f"run(RunSettings(num_rounds={ROUNDS}, hospitals=3, min_hospitals=2, seed=0, output_dir={str(out)!r}), "
        f"ledger_dir={str(tmp_path / 'simulation-ledgers')!r}, epsilon_budget={BUDGET})"
    )
    processes = Processes(tmp_path, {**os.environ, **SAFE_ENVIRONMENT})
    proc, log = processes.start("simulation", [sys.executable, "-c", code])
    try:
        assert proc.wait(timeout=HANG_GUARD_S) == 0, log.read_text()[-3000:]
    finally:
        processes.stop_all()
    return json.loads((out / "results.json").read_text())


def test_three_hospital_deployment_accounts_as_the_simulation_engine_does(federation, tmp_path):
    fed = federation
    fed.ensure_up()
    assert not list(fed.ledgers.glob("*/privacy-ledger-*.json")), "needs fresh ledgers: run this test first"
    out = tmp_path / "out"
    run_id = fed.run(out)
    status = fed.wait(run_id, out)
    assert status == "finished:completed", f"{status}\n{fed.server_log(run_id)}\n{fed.logs()}"

    deployed = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in deployed["rounds"]] == [1, 2]
    assert all(set(r["trained"]) == NAMES and not r["failed"] for r in deployed["rounds"]), deployed["rounds"]
    simulated = _simulate(tmp_path)  # the nodes idle meanwhile (one poll every few seconds)
    assert [r["round"] for r in simulated["rounds"]] == [1, 2]
    assert set(deployed["final"]) == set(simulated["final"]) == NAMES | {"pooled"}
    # The noise is each hospital's own (OS entropy, not the seed): the two models differ, by the noise only.
    assert deployed["model_digest"] != simulated["model_digest"]
    # AUC across 25 runs of these settings spreads by 0.013, so two runs differ by 0.018: 0.1 is 5.5 of those.
    assert deployed["final"]["pooled"]["auc"] == pytest.approx(simulated["final"]["pooled"]["auc"], abs=0.1), (
        deployed["final"],
        simulated["final"],
    )
    for name in NAMES:  # the privacy accounting is exactly the same
        assert deployed["hospitals"][name]["epsilon"] == pytest.approx(
            simulated["hospitals"][name]["epsilon"], rel=1e-6
        ), name
        assert deployed["final"][name]["n"] == simulated["final"][name]["n"]


def test_superlink_killed_mid_run_resumes_from_the_checkpoint(federation, tmp_path):
    """SIGKILL the SuperLink and all it started (its process group, and its SuperExec's group holding the run's
    ServerApp) once round 1 is checkpointed; restart it on the same ``--database`` and relaunch with
    ``resume=true`` and the same output-dir, as a coordinator would after a host crash.

    The SuperNodes are not restarted: they survive a SuperLink restart. Flower 1.41's SuperNode retries with
    backoff (its log: "Connection attempt failed, retrying in ..." then "Connection successful after ...") and
    goes on under its registered key and node id, which the SuperLink's database kept. So the coordinator
    restarts only the SuperLink and relaunches the run; the crashed run is never marked completed.
    """
    fed = federation
    fed.ensure_up()
    before = {name: _ledger_or_empty(fed, name) for name in HOSPITALS}
    out = tmp_path / "out"
    started = time.time()
    first_run = fed.run(out)

    # Trigger: the ServerApp traces "server-round" (round 1 evaluated) just before it writes the round-1
    # checkpoint; at that moment freeze the SuperLink process alone (SIGSTOP). The ServerApp then still writes
    # the checkpoint (local files only) but blocks on its next call to the SuperLink, before round 2's train
    # messages can reach any node: no node can have trained (or spent privacy on) round 2 of this run.
    link, _ = fed.link
    _wait_until(lambda: fed.events("server-round", since=started, round=1), "round 1 of the first run", fed)
    os.kill(link.pid, signal.SIGSTOP)
    _wait_until(lambda: (out / "checkpoint" / "state.json").is_file(), "the round-1 checkpoint", fed, timeout=60)
    serverapps = {e["pid"] for e in fed.events("server-round", since=started)}
    killed = kill_group(link)  # the coordinator host "crashes": SuperLink, its SuperExec and the ServerApp
    assert serverapps <= set(killed), (serverapps, killed)
    assert load_checkpoint(out).completed_round == 1
    assert len(fed.events("server-push", since=started, type="train")) == 1  # round 1's only

    restarted = time.time()
    fed.start_superlink()  # same command: same --database, same port, same TLS files
    # No SuperNode is restarted: each retries until the new SuperLink answers (same node id), and the resumed
    # ServerApp waits for all three before its statistics round.
    assert run_status(fed.processes.flwr, fed.files.connection, first_run) != "finished:completed"

    resumed_run = fed.run(out, "resume=true")
    status = fed.wait(resumed_run, out)
    assert status == "finished:completed", f"{status}\n{fed.server_log(resumed_run)}\n{fed.logs()}"
    assert "resuming run" in fed.server_log(resumed_run), fed.server_log(resumed_run)

    results = json.loads((out / "results.json").read_text())
    assert results["run_id"] == resumed_run and not results["stopped_early"]
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(set(r["trained"]) == NAMES and not r["failed"] for r in results["rounds"]), results["rounds"]
    # The relaunched ServerApp ran round 2 only: the rounds it started come after the checkpointed one.
    assert [e["round"] for e in fed.events("server-round", since=restarted)] == [2]
    assert len(fed.events("server-push", since=restarted, type="train")) == 1

    assert all(proc.poll() is None for proc, _ in fed.nodes.values())  # the SuperNodes that started the run
    for folder, name in HOSPITALS.items():
        ledger = fed.ledger(folder)
        new = ledger["releases"][len(before[folder]["releases"]) :]
        trains = [(r["run_id"], r["round"]) for r in new if r["kind"] == "train"]
        # one release per round, round 1 by the crashed run and round 2 by the resumed one: nothing twice
        assert trains == [(first_run, 1), (resumed_run, 2)], (folder, trains)
        assert set(ledger["plans"]) - set(before[folder]["plans"]) == {first_run}  # the resumed run kept its plan
        spent = epsilon_of([tuple(e) for e in ledger["history"]], ledger["delta"])
        assert spent == pytest.approx(_uninterrupted_epsilon(before[folder], ledger, first_run), rel=1e-9), folder
        assert results["hospitals"][name]["epsilon"] == pytest.approx(spent, rel=1e-9), folder


def test_a_supernode_killed_mid_round_is_reported_and_the_run_finishes(federation, tmp_path):
    """SIGKILL one SuperNode's process group (node, warm executor, its running ClientApp) after it received its
    round-2 train message: the other two finish the round (secure-aggregation threshold 2 of 3, min-hospitals=2)."""
    fed = federation
    fed.ensure_up()
    victim, victim_name = "switzerland", HOSPITALS["switzerland"]
    before = _ledger_or_empty(fed, victim)
    node, log = fed.nodes[victim]
    offset = log.stat().st_size
    out = tmp_path / "out"
    run_id = fed.run(out)

    # Trigger: the victim's own log shows it fetched its second train message of this run (round 2). Its
    # ClientApp needs seconds (data, DP-SGD, masking) before it could reply, so the SIGKILL, milliseconds
    # later, lands mid-round: the node holds round 2's task and never answers.
    def received_round_2_train():
        return log.read_bytes()[offset:].count(b"Receiving: train message") >= 2

    _wait_until(received_round_2_train, "the victim's round-2 train message", fed)
    kill_group(node)
    status = fed.wait(run_id, out, nodes=[n for n in HOSPITALS if n != victim])
    assert status == "finished:completed", f"{status}\n{fed.server_log(run_id)}\n{fed.logs()}"

    results = json.loads((out / "results.json").read_text())
    first, second = results["rounds"]
    assert set(first["trained"]) == NAMES and not first["failed"], first
    assert set(second["trained"]) == NAMES - {victim_name}, second
    assert victim_name in second["failed"], second  # the dropout, by name, with Flower's reason
    assert "Node Unavailable" in second["failed"][victim_name], second["failed"]
    assert set(second["evaluation"]) == NAMES - {victim_name} | {"pooled"}
    assert results["final"]["pooled"]["n"] == sum(results["final"][n]["n"] for n in NAMES - {victim_name})
    assert f"failed: {victim_name}" in fed.server_log(run_id)  # ServerApp log: the round-2 progress line
    # the victim released nothing in round 2 (it died before its update left)
    new = _ledger_or_empty(fed, victim)["releases"][len(before["releases"]) :]
    assert [(r["run_id"], r["round"]) for r in new if r["kind"] == "train"] == [(run_id, 1)]


def test_a_supernode_killed_in_the_unmask_exchange_is_named_and_its_keys_are_removed(federation, tmp_path):
    """SIGKILL one SuperNode's group when its round-1 unmask message arrives: its update was already summed,
    the other two unmask round 1 (threshold 2 of 3) and finish round 2 without it. results.json names it as
    silent in round 1 and dropped in round 2; restarted, the node deletes that run's keys before it joins."""
    fed = federation
    fed.ensure_up()
    victim, victim_name = "hungary", HOSPITALS["hungary"]
    node, log = fed.nodes[victim]
    offset = log.stat().st_size
    out = tmp_path / "out"
    run_id = fed.run(out)
    _wait_until(lambda: b"query.secagg_unmask" in log.read_bytes()[offset:], "the victim's unmask message", fed)
    kill_group(node)
    keys = list((fed.ledgers / victim / "secagg").glob(f"node-*/secagg-run-{run_id}.json"))
    assert keys, "the killed node's keys for this run are on its disk"
    status = fed.wait(run_id, out, nodes=[n for n in HOSPITALS if n != victim])
    assert status == "finished:completed", f"{status}\n{fed.server_log(run_id)}\n{fed.logs()}"

    first, second = json.loads((out / "results.json").read_text())["rounds"]
    assert first["secagg"].get("silent") == [victim_name] and set(first["trained"]) == NAMES, first
    # round 2: Flower no longer samples the dead node; it held round-2 mask keys, so secure aggregation names it
    assert second["secagg"]["dropped"] == [victim_name] and second["secagg"]["path"] == "consistency", second
    assert set(second["trained"]) == NAMES - {victim_name}, second
    assert f"{victim_name} did not answer the unmask exchange" in fed.server_log(run_id)
    for folder in HOSPITALS:  # the others deleted their keys when the run ended
        if folder != victim:
            assert not list((fed.ledgers / folder / "secagg").glob(f"node-*/secagg-run-{run_id}.json")), folder
    fed.ensure_up()  # the hospital restarts its node: no key of the abandoned run survives that
    _wait_until(lambda: not any(path.exists() for path in keys), "the restarted node's key cleanup", fed, timeout=120)
