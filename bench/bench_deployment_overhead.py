"""Deployment round overhead: a real TLS + node-auth deployment on loopback, per-round time breakdown.

For each mode, starts a SuperLink (TLS, --enable-supernode-auth, 127.0.0.1), registers N hospital
node keys, starts N nodes with `fedcare node start` (Fed-Heart-Disease partitions, DP on), and runs
`flwr run` with secure aggregation on and the tiny default model for R rounds.

Modes:
  flower   Flower 1.41's defaults: `flower-supernode` with subprocess isolation (a cold
           `flwr-clientapp` per message, Flower's superexec polling every 1 s), the SuperNode's
           3 s message poll, and the ServerApp Grid's 3 s reply poll.
  fedcare  what `fedcare node start` runs by default: warm ClientApp executor (one forked process
           per message), 0.2 s message polls while a run is active, and the coordinator's 50-250 ms
           reply polls.

Per round: wall time (the coordinator's round time: the train exchange, in which each node first
evaluates the model it receives, i.e. the previous round's, then the unmask exchange), the slowest
node's local training time (`train-seconds` in its train reply), overhead = wall - slowest training,
and where the round's time went along its critical path (for every exchange, the node whose reply
came last), from a wall-clock trace every process appends to (`FEDCARE_TIMING_LOG`, see
fedcare/timing.py) and from the SuperNodes' own log lines, time-stamped as they arrive:

  pickup      the ServerApp starts pushing the message -> the SuperNode logs "Receiving" (the
              SuperNode's message poll)
  download    "Receiving" -> "Received successfully" (the node pulls the message's objects from
              the SuperLink, one request per object, waiting for objects still being uploaded)
  start       -> the ClientApp handler starts (executor poll, process start, interpreter + Flower +
              app imports, task input from the node, FAB install, app load)
  handler     handler time other than training (data load, secure-aggregation crypto, evaluation,
              privacy ledger, audit log)
  training    local DP training on the critical-path node
  return      handler done -> the SuperNode logs "Sending" (reply pushed to the node, the node's
              reply poll)
  upload      "Sending" -> "Sent successfully" (the node pushes the reply's objects to the SuperLink)
  reply-poll  -> the ServerApp has the reply (its Grid poll, pulling the reply's objects)
  server      coordinator work between exchanges (secure-aggregation sum and unmask, FedAvg,
              checkpoint, audit log, building messages)

    .venv/bin/python bench/bench_deployment_overhead.py --nodes 3 --rounds 3 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.markdown_report import replace_section
from fedcare.compat.flower import build_fab
from fedcare.deploy_pki import init_deployment
from fedcare.fab_approval import approve_digest, fab_digest
from fedcare.node_settings import load_node_settings
from fedcare.safe_environment import SAFE_ENVIRONMENT

BIN = Path(sys.executable).parent
HOSPITALS = ["cleveland", "hungary", "switzerland", "va-long-beach"]
HEADING = "### Deployment: round overhead with a real SuperLink and SuperNodes"
STAGES = ("pickup", "download", "start", "handler", "training", "return", "upload", "reply-poll", "server")
EXCHANGES = ("train", "query.secagg_unmask")
FINAL_EXCHANGE = "evaluate"  # once per run, after the last round: the final model's evaluation
MODE_NODE_SETTINGS = {"flower": ("false", "3"), "fedcare": ("true", None)}  # None: `deploy init`'s default
_RECEIVING = re.compile(r"Receiving: (\S+) message")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NodeProcess:
    name: str
    proc: subprocess.Popen
    log: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    node_id: int | None = None
    preloaded: bool = False
    ready: threading.Event = field(default_factory=threading.Event)

    def events(self, pattern: str) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.lines if pattern in line]


def _read_lines(node: NodeProcess, warm: bool) -> None:
    """Time-stamp every line the node prints, as it arrives (wall clock, like the trace)."""
    assert node.proc.stdout is not None
    with open(node.log, "w") as out:
        for raw in node.proc.stdout:
            now = time.time()
            line = raw.rstrip("\n")
            out.write(f"{now:.3f} {line}\n")
            out.flush()
            node.lines.append((now, line))
            if m := re.search(r"SuperNode ID: (\d+)", line):
                node.node_id = int(m.group(1))
            if "warm ClientApp executor: preloaded" in line:
                node.preloaded = True
            if node.node_id is not None and (node.preloaded or not warm):
                node.ready.set()  # connected (and, warm, its executor has imported torch & co.)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process group we started (its Flower children included)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _tree_cpu_seconds(pids: list[int], children: bool = True) -> float:
    """CPU seconds used so far by these processes and all their descendants (reaped ones included)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            if not children:
                t = root.cpu_times()
                total += t.user + t.system
                continue
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in tree:
            try:
                t = p.cpu_times()  # + reaped children: the short-lived ClientApp processes
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
    return total


def run_mode(
    mode: str,
    app_dir: Path,
    n_nodes: int,
    rounds: int,
    work: Path,
    timeout: float,
    poll: str | None = None,
    superlink_state: str = "database",
) -> dict:
    """One deployment run in ``mode``; returns its results, trace and node logs (parsed)."""
    work.mkdir(parents=True)
    port = _free_port()
    names = HOSPITALS[:n_nodes]
    files = init_deployment(
        work / "deploy", names, superlink_address=f"127.0.0.1:{port}", superlink_state=superlink_state
    )
    trace = work / "trace.jsonl"
    env = {
        **os.environ,
        **SAFE_ENVIRONMENT,
        "FLWR_HOME": str(files.flwr_home),
        "FEDCARE_TIMING_LOG": str(trace),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    if mode == "flower":
        env["FEDCARE_FLOWER_POLLING"] = "1"
    else:
        env.pop("FEDCARE_FLOWER_POLLING", None)
    warm, default_poll = MODE_NODE_SETTINGS[mode]
    poll = default_poll or poll
    procs: list[subprocess.Popen] = []
    nodes: list[NodeProcess] = []
    out_dir = work / "out"

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )

    try:
        link_log = open(work / "superlink.log", "w")  # noqa: SIM115 - the SuperLink writes to it while it runs
        link = subprocess.Popen(
            files.superlink_command(str(BIN / "flower-superlink")),
            cwd=work,
            env=env,
            stdout=link_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(link)
        deadline = time.monotonic() + 120
        while True:
            if link.poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {(work / 'superlink.log').read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("the SuperLink did not listen")
            time.sleep(0.3)
        for h in files.hospitals:
            done = flwr("supernode", "register", str(h.public_key), files.connection, "--format", "json")
            if done.returncode != 0:
                raise RuntimeError(f"register {h.name}: {done.stdout}{done.stderr}")

        digest = fab_digest(build_fab(app_dir)[0])
        for _index, h in enumerate(files.hospitals):
            text = h.settings.read_text()
            text = re.sub(r"clientappio-port = \d+", f"clientappio-port = {_free_port()}", text)
            text = re.sub(r"warm-clientapp = \w+", f"warm-clientapp = {warm}", text)
            if poll is not None:
                text = re.sub(r"poll-interval = [\d.]+", f"poll-interval = {poll}", text)
            text = text.replace('ledger-dir = "ledgers"', f'ledger-dir = "{work / "node-ledgers" / h.name}"')
            h.settings.write_text(text)
            # The hospital approves the FAB `flwr run` will ship (what `fedcare node approve` records).
            store = load_node_settings(h.settings, check_port=False).approved_fabs_store
            approve_digest(store, digest, source="bench: the project's FAB")
            proc = subprocess.Popen(
                [str(BIN / "fedcare"), "node", "start", "--config", str(h.settings)],
                cwd=work,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            procs.append(proc)
            node = NodeProcess(h.name, proc, work / f"node-{h.name}.log")
            nodes.append(node)
            threading.Thread(target=_read_lines, args=(node, warm == "true"), daemon=True).start()
        node_start = time.monotonic()
        for node in nodes:
            while not node.ready.wait(1.0):
                if node.proc.poll() is not None:
                    raise RuntimeError(f"node {node.name} exited:\n{node.log.read_text()[-3000:]}")
                if time.monotonic() - node_start > 300:
                    raise TimeoutError(f"node {node.name} not ready after 300 s")
        nodes_ready_s = time.monotonic() - node_start

        # Polling cost while idle (no run yet): CPU the SuperLink and the nodes burn doing nothing.
        pids = [p.pid for p in procs]
        cpu0, t_idle = _tree_cpu_seconds(pids), time.monotonic()
        time.sleep(10)
        idle_cpu = (_tree_cpu_seconds(pids) - cpu0) / (time.monotonic() - t_idle)

        launched = time.time()
        run = flwr(
            "run",
            str(app_dir),
            files.connection,
            "--run-config",
            f"num-rounds={rounds} hospitals={n_nodes} min-hospitals={n_nodes} "
            f"output-dir='{out_dir}' ledger-dir='{work / 'ledgers'}'",
        )
        if run.returncode != 0:
            raise RuntimeError(f"flwr run failed: {run.stdout}{run.stderr}")
        run_id = re.search(r"started run (\d+)", run.stdout + run.stderr).group(1)
        deadline = time.monotonic() + timeout
        cpu_run0 = _tree_cpu_seconds(pids)
        t_run0 = time.monotonic()

        # CPU seconds of the SuperLink process, of its children (superexec + ServerApp) and of all nodes,
        # at every round's end
        def cpu_sample() -> tuple[float, float, float]:
            link_only = _tree_cpu_seconds([link.pid], children=False)
            return link_only, _tree_cpu_seconds([link.pid]) - link_only, _tree_cpu_seconds(pids[1:])

        round_cpu = [cpu_sample()]
        seen_rounds = 0
        loads = []
        while not (out_dir / "results.json").exists():
            loads.append(os.getloadavg()[0])
            ended = trace.read_text().count('"server-round"') if trace.exists() else 0
            if ended > seen_rounds:
                seen_rounds = ended
                round_cpu.append(cpu_sample())
            for node in nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"node {node.name} died:\n{node.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not finish in {timeout:.0f} s")
            time.sleep(0.2)
        finished = time.time()
        run_cpu = (_tree_cpu_seconds(pids) - cpu_run0) / (time.monotonic() - t_run0)
        status = ""
        for _ in range(30):
            listing = flwr("ls", files.connection, "--run-id", run_id, "--format", "json")
            runs = json.loads(listing.stdout).get("runs", []) if listing.returncode == 0 else []
            status = runs[0]["status"].lower() if runs else ""
            if status.startswith("finished"):
                break
            time.sleep(2)
        if status != "finished:completed":
            raise RuntimeError(f"run {run_id} ended {status!r}")
        # Polling cost after the run: the ServerApp is gone, the nodes are still in their active window.
        cpu1, t_after = _tree_cpu_seconds(pids), time.monotonic()
        time.sleep(10)
        after_cpu = (_tree_cpu_seconds(pids) - cpu1) / (time.monotonic() - t_after)
        results = json.loads((out_dir / "results.json").read_text())
    finally:
        for proc in reversed(procs):
            _stop(proc)
    events = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()] if trace.exists() else []
    return {
        "mode": mode,
        "results": results,
        "events": events,
        "launched": launched,
        "finished": finished,
        "nodes": {n.node_id: n.lines for n in nodes},
        "nodes_ready_s": nodes_ready_s,
        "idle_cpu": idle_cpu,
        "run_cpu": run_cpu,
        "after_run_cpu": after_cpu,
        "load": statistics.median(loads) if loads else float("nan"),
        "round_cpu": [tuple(y - x for x, y in zip(a, b)) for a, b in itertools.pairwise(round_cpu)],
    }


def _first(items, predicate):
    return next((x for x in items if predicate(x)), None)


def analyse(run: dict) -> dict:
    """Per round: wall, slowest training, overhead and the critical-path breakdown (seconds)."""
    events = sorted(run["events"], key=lambda e: e["t"])
    pushes = [e for e in events if e["ev"] == "server-push"]
    replies = [e for e in events if e["ev"] == "server-reply"]
    apps = [e for e in events if e["ev"] == "clientapp"]
    ends = {int(e["round"]): e for e in events if e["ev"] == "server-round"}
    rounds = []
    for record in run["results"]["rounds"]:
        rnd = record["round"]
        end = ends[rnd]["t"]
        start = end - record["seconds"]
        stages = dict.fromkeys(STAGES, 0.0)
        last = start
        exchanges = {}
        for kind in EXCHANGES:
            push = _first(pushes, lambda e: e["type"] == kind and start - 0.5 <= e["t"] <= end)
            if push is None:
                continue
            stages["server"] += max(0.0, push["t"] - last)
            got = [e for e in replies if e["type"] == kind and push["t"] <= e["t"] <= end + 0.5][: push["n"]]
            if not got:
                continue
            final = max(got, key=lambda e: e["t"])
            node = final["node"]
            lines = run["nodes"].get(node, [])
            recv = _first(
                lines,
                lambda x: (
                    x[0] >= push["t"] - 0.05 and _RECEIVING.search(x[1]) and _RECEIVING.search(x[1]).group(1) == kind
                ),
            )
            stored = _first(lines, lambda x: recv is not None and x[0] >= recv[0] and "Received successfully" in x[1])
            app = _first(apps, lambda e: e["node"] == node and e["type"] == kind and e["handler_start"] >= push["t"])
            sending = _first(lines, lambda x: app is not None and x[0] >= app["t"] - 0.05 and "Sending:" in x[1])
            sent = _first(lines, lambda x: sending is not None and x[0] >= sending[0] and "Sent successfully" in x[1])
            exchanges[kind] = final["t"] - push["t"]
            if recv and stored and app and sending and sent:
                train = float(app.get("train_s") or 0.0)
                stages["pickup"] += recv[0] - push["t"]
                stages["download"] += stored[0] - recv[0]
                stages["start"] += app["handler_start"] - stored[0]
                stages["handler"] += app["t"] - app["handler_start"] - train
                stages["training"] += train
                stages["return"] += sending[0] - app["t"]
                stages["upload"] += sent[0] - sending[0]
                stages["reply-poll"] += final["t"] - sent[0]
            else:  # a stage we could not see: count the whole exchange as unattributed
                stages.setdefault("unattributed", 0.0)
                stages["unattributed"] += final["t"] - push["t"]
            last = final["t"]
        stages["server"] += max(0.0, end - last)
        slowest = max(record.get("train_seconds", {}).values(), default=float("nan"))
        rounds.append(
            {
                "round": rnd,
                "wall": record["seconds"],
                "slowest_train": slowest,
                "overhead": record["seconds"] - slowest,
                "stages": stages,
                "exchanges": exchanges,
            }
        )
    first_round_start = min((ends[r["round"]]["t"] - r["wall"] for r in rounds), default=run["finished"])
    last_end = max((e["t"] for e in ends.values()), default=run["finished"])
    final_push = _first(pushes, lambda e: e["type"] == FINAL_EXCHANGE and e["t"] >= last_end - 0.5)
    final_replies = [
        e["t"] for e in replies if final_push and e["type"] == FINAL_EXCHANGE and e["t"] >= final_push["t"]
    ]
    final_eval_s = max(final_replies) - final_push["t"] if final_replies else float("nan")
    cpu = run.get("round_cpu", [])
    return {
        "mode": run["mode"],
        "load": run["load"],
        "rounds": rounds,
        "startup_s": first_round_start - run["launched"],
        "final_eval_s": final_eval_s,
        "superlink_cpu_per_round": statistics.median([c[0] for c in cpu]) if cpu else float("nan"),
        "serverapp_cpu_per_round": statistics.median([c[1] for c in cpu]) if cpu else float("nan"),
        "nodes_cpu_per_round": statistics.median([c[2] for c in cpu]) if cpu else float("nan"),
        "nodes_ready_s": run["nodes_ready_s"],
        "idle_cpu": run["idle_cpu"],
        "run_cpu": run["run_cpu"],
        "after_run_cpu": run["after_run_cpu"],
    }


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.1f}"  # NaN -> "-"


def table(analyses: list[dict]) -> list[str]:
    stage_names = list(STAGES) + (
        ["unattributed"] if any("unattributed" in r["stages"] for a in analyses for r in a["rounds"]) else []
    )
    head = ["mode", "round", "wall s", "slowest train s", "overhead s", *[f"{s} s" for s in stage_names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in analyses:
        for r in a["rounds"]:
            lines.append(
                "| "
                + " | ".join(
                    [
                        a["mode"],
                        str(r["round"]),
                        _fmt(r["wall"]),
                        _fmt(r["slowest_train"]),
                        _fmt(r["overhead"]),
                        *[_fmt(r["stages"].get(s, 0.0)) for s in stage_names],
                    ]
                )
                + " |"
            )
        med = {k: statistics.median(r[k] for r in a["rounds"]) for k in ("wall", "slowest_train", "overhead")}
        med_stages = [statistics.median(r["stages"].get(s, 0.0) for r in a["rounds"]) for s in stage_names]
        lines.append(
            "| "
            + " | ".join(
                [
                    f"**{a['mode']}**",
                    "median",
                    f"**{_fmt(med['wall'])}**",
                    _fmt(med["slowest_train"]),
                    f"**{_fmt(med['overhead'])}**",
                    *[_fmt(x) for x in med_stages],
                ]
            )
            + " |"
        )
    return lines


def exchange_table(analyses: list[dict]) -> list[str]:
    lines = [
        "| mode | machine load (1-min avg, median) | run start-up s (launch -> round 1) | nodes ready s | "
        + " | ".join(f"{k} exchange s (median)" for k in EXCHANGES)
        + " | final evaluate exchange s (once per run)"
        " | CPU s per round: SuperLink / ServerApp / all nodes | CPU cores busy: idle / during run / after run |",
        "|" + "---|" * (7 + len(EXCHANGES)),
    ]
    for a in analyses:
        ex = [statistics.median([r["exchanges"].get(k, float("nan")) for r in a["rounds"]]) for k in EXCHANGES]
        lines.append(
            f"| {a['mode']} | {a['load']:.1f} | {a['startup_s']:.1f} | {a['nodes_ready_s']:.1f} | "
            + " | ".join(_fmt(x) for x in ex)
            + f" | {_fmt(a.get('final_eval_s', float('nan')))}"
            + f" | {_fmt(a['superlink_cpu_per_round'])} / {_fmt(a['serverapp_cpu_per_round'])} / "
            f"{_fmt(a['nodes_cpu_per_round'])}"
            f" | {a['idle_cpu']:.2f} / {a['run_cpu']:.2f} / {a['after_run_cpu']:.2f} |"
        )
    return lines


def where_it_goes(analyses: list[dict]) -> list[str]:
    """A few sentences on the last mode's overhead, from its medians."""
    a = analyses[-1]
    med = {s: statistics.median(r["stages"].get(s, 0.0) for r in a["rounds"]) for s in STAGES}
    overhead = statistics.median(r["overhead"] for r in a["rounds"])
    transfer = med["download"] + med["upload"] + med["reply-poll"]
    lines = [
        f"Where the `{a['mode']}` overhead ({overhead:.1f} s a round, median) goes, at a machine load of "
        f"{a['load']:.1f} on {os.cpu_count()} cores:",
        "",
        f"- {transfer:.1f} s moving messages through the SuperLink (download {med['download']:.1f}, upload "
        f"{med['upload']:.1f}, reply pickup {med['reply-poll']:.1f}): Flower 1.41 sends every record, array and "
        "array chunk as its own HTTP request (a secure train message is 4 objects, the model packed in one "
        "record shared by all nodes, and its reply 3; an unmask message and its reply 3 each). At the SuperLink each request costs its FastAPI middleware stack "
        "(~4.4 ms of SuperLink CPU for a bare /health request here) plus, with a `--database`, the SQLAlchemy "
        "queries on its SQLite state (node-key lookup, run status, message and object rows), which cost "
        "more than the rest; the SuperLink process alone used "
        f"{a['superlink_cpu_per_round']:.1f} CPU-s a round, so requests queue behind each other.",
        f"- {med['pickup']:.1f} s until nodes noticed a new message (polling, 50 ms after their last message "
        "backing off to `poll-interval`).",
        f"- {med['start']:.1f} s from a stored message to the handler: the warm executor's fork, the task input "
        "and message pulled from the node's Runtime API, importing the app from the installed FAB.",
        f"- {med['handler']:.1f} s in handlers besides training: privacy-ledger accounting (RDP epsilon, twice "
        "per train message), secure-aggregation masking and unmasking, evaluating the received model, signed audit "
        "records.",
        f"- {med['return']:.1f} s handing replies to the node and {med['server']:.1f} s of coordinator work "
        "between exchanges.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, choices=range(2, 5))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["flower", "fedcare"], choices=["flower", "fedcare"])
    parser.add_argument(
        "--baseline-app-dir",
        type=Path,
        default=None,
        help="project to ship as the app in flower mode (default: this checkout); e.g. a copy "
        "of the code before this change, to measure the original ClientApp imports",
    )
    parser.add_argument(
        "--poll-interval",
        default=None,
        help="fedcare mode: the nodes' poll-interval (default: what `fedcare deploy init` writes)",
    )
    parser.add_argument(
        "--superlink-states",
        nargs="+",
        default=["database"],
        choices=["database", "memory"],
        help="where the SuperLink keeps its state (`fedcare deploy init --superlink-state`); "
        "each mode runs once per state",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, trace)")
    parser.add_argument("--write", type=Path, default=None, help="markdown file whose section to rewrite")
    args = parser.parse_args()
    os.environ.update(SAFE_ENVIRONMENT)
    work = Path(tempfile.mkdtemp(prefix="fedcare-bench-deploy-"))
    analyses = []
    try:
        for mode, state in [(m, s) for m in args.modes for s in args.superlink_states]:
            app_dir = args.baseline_app_dir.resolve() if (mode == "flower" and args.baseline_app_dir) else ROOT
            label = mode if state == "database" else f"{mode}, memory state"
            print(f"{label}: {args.nodes} nodes, {args.rounds} rounds (app {app_dir}) ...", flush=True)
            analysis = analyse(
                run_mode(
                    mode,
                    app_dir,
                    args.nodes,
                    args.rounds,
                    work / f"{mode}-{state}",
                    args.timeout,
                    args.poll_interval,
                    state,
                )
            )
            analysis["mode"] = label
            analyses.append(analysis)
            for r in analysis["rounds"]:
                print(
                    f"  round {r['round']}: wall {r['wall']:.1f} s, slowest training {r['slowest_train']:.2f} s, "
                    f"overhead {r['overhead']:.1f} s  " + " ".join(f"{k}={v:.2f}" for k, v in r["stages"].items()),
                    flush=True,
                )
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    command = "    .venv/bin/python bench/bench_deployment_overhead.py " + " ".join(
        a for a in sys.argv[1:] if a != "--keep"
    )
    text = "\n".join(
        [
            HEADING,
            "",
            f"Measured {date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} cores (shared), one "
            f"machine: SuperLink with TLS and --enable-supernode-auth (state in a SQLite file, `--database`, unless "
            f"the mode says memory state), {args.nodes} registered SuperNodes started "
            "with `fedcare node start` (Fed-Heart-Disease partitions, DP-SGD on), secure aggregation on, the default "
            f"logistic model, {args.rounds} rounds, everything on 127.0.0.1. Overhead = round wall time - the "
            "slowest node's local training time (`train-seconds` in its train reply). Stages follow each exchange's "
            "critical path (the node whose reply came last; see the script's docstring). `flower` = Flower 1.41's "
            "defaults (`warm-clientapp = false`, `poll-interval = 3`, `FEDCARE_FLOWER_POLLING=1`), `fedcare` = "
            "what `fedcare node start` runs by default."
            + (
                " The flower mode shipped the app as it was before this change (eager ClientApp imports)."
                if args.baseline_app_dir
                else ""
            ),
            "",
            command.rstrip(),
            "",
            *table(analyses),
            "",
            *exchange_table(analyses),
            "",
            *where_it_goes(analyses),
        ]
    )
    print("\n" + text)
    if args.write:
        replace_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
