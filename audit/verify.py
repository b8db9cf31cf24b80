"""Offline verification of fedcare audit logs (nodes' and server's), and of the privacy ledgers.

What is checked, and why each check catches a kind of tampering:

1. Per file, per line: valid JSON with exactly the line fields, in canonical form (a changed byte
   that still parses breaks this or the signature), a valid Ed25519 signature, and a well-formed
   body for its kind.
2. Per file, the chain: ``seq`` counts 0, 1, 2, ... (a deleted, inserted or reordered line
   breaks it), ``prev`` is the SHA-256 of the previous line (same), the first line chains to
   the genesis hash (a removed head), one public key and one actor throughout (a line inserted
   by anyone else), and the same key for an actor across files (and the registered key, when
   ``trusted_keys`` is given: a wholesale re-signed forgery).
3. Across files, node vs server: every node ``release`` of a training round appears among the
   server round's ``responded`` (or, as a note, its ``failed``: released but not aggregated; or,
   as a note, the round after the last one the server logged for that run: charged, not
   aggregated, because the server crashed);
   every ``responded`` hospital whose log is supplied has a release for that round; the model a
   node says it received is the server's previous aggregate (or the run's initial model); a
   plain-aggregation update digest matches what the server says it received; a node's unmask
   survivors match the server's.
4. Epsilon: per hospital and dataset (its declared ``dataset_id``; the data fingerprint for
   records that carry none), the RDP accountant (Opacus, fedcare's orders) is replayed over the
   recorded DP parameters of every release in order, and each ``epsilon_after`` must match to
   1e-6 relative and stay within the budget the hospital last signed (``budget`` records). A
   release at no cost (zero steps: a statistics answer re-sent from the ledger) must send exactly
   an answer paid for earlier on the same data (or an empty one). With ``ledger_dirs`` (one
   folder per hospital in a deployment), each privacy ledger (``privacy-ledger-*.json``) must hold
   the same charged releases, the same epsilons, a history whose epsilon equals the replayed one,
   and no budget above the last one signed in its hospital's chain (a budget raised by hand); a
   ledger with charged releases whose chain signed no budget at all is a finding too.

Corrupt input never raises: everything wrong is a ``Finding(file, line, reason)``; a finding of
level ``note`` is information for the auditor (e.g. a hospital whose log was not supplied) and
does not make ``ok`` False.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np

from audit.audit_log import (
    GENESIS,
    KIND_BUDGET,
    KIND_REFUSAL,
    KIND_RELEASE,
    KIND_ROUND,
    KIND_RUN,
    KIND_UNMASK,
    NODE_KINDS,
    SERVER_KINDS,
    digest_arrays,
    last_line_problem,
    line_hash,
    schema_problems,
)

EPS_RTOL = 1e-6


@dataclass(frozen=True)
class Finding:
    """One problem: ``file``, 1-based ``line`` (0 = the file as a whole), ``reason``, ``level``."""

    file: str
    line: int
    reason: str
    level: str = "error"  # "error" makes the report fail; "note" informs

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.level}: {self.reason}"


@dataclass(frozen=True)
class Entry:
    """A line that verified on its own (signature, form, schema): safe to reason about."""

    file: str
    line: int
    seq: int
    time: str
    actor: str
    kind: str
    body: dict[str, Any]
    pubkey: str


@dataclass
class ReleaseView:
    """One node release as the report shows it: claimed and replayed epsilon side by side."""

    run_id: str
    round: int
    stage: str
    time: str
    data_fingerprint: str
    dp: dict[str, Any] | None
    epsilon_after: float | None
    epsilon_replayed: float | None
    secagg: dict[str, Any] | None
    file: str
    line: int
    dataset_id: str = ""

    @property
    def data_key(self) -> str:
        """What the privacy ledger is keyed by: the declared dataset identity (else the fingerprint)."""
        return self.dataset_id or self.data_fingerprint


@dataclass
class HospitalView:
    """Everything verified about one node (actor)."""

    actor: str
    pubkey: str = ""
    files: list[str] = field(default_factory=list)
    releases: list[ReleaseView] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    unmasks: int = 0
    epsilon: dict[str, float] = field(default_factory=dict)  # dataset id (or fingerprint) -> replayed epsilon
    delta: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)  # dataset id -> the last signed budget


@dataclass
class VerifyReport:
    """The result of ``verify``: findings plus the verified records, for the datasheet."""

    files: list[str]
    findings: list[Finding] = field(default_factory=list)
    hospitals: dict[str, HospitalView] = field(default_factory=dict)
    rounds: list[Entry] = field(default_factory=list)
    runs: list[Entry] = field(default_factory=list)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> last seq, its hash, key
    ledgers: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if f.level != "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files": self.files,
            "ledgers": self.ledgers,
            "errors": [asdict(f) for f in self.errors],
            "notes": [asdict(f) for f in self.notes],
            "heads": self.heads,
            "hospitals": {
                a: {
                    "pubkey": h.pubkey,
                    "files": h.files,
                    "releases": len(h.releases),
                    "refusals": len(h.refusals),
                    "epsilon": h.epsilon,
                    "delta": h.delta,
                }
                for a, h in sorted(self.hospitals.items())
            },
            "server_rounds": len(self.rounds),
            "server_runs": len(self.runs),
        }


def verify(
    paths: Iterable[str | Path],
    ledger_dirs: str | Path | Iterable[str | Path] | None = None,
    trusted_keys: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Verify audit logs ``paths`` together (and the privacy ledgers in every folder of ``ledger_dirs``).

    ``ledger_dirs``: one folder or several (a deployment keeps one ledger folder per hospital);
    every folder is checked. ``trusted_keys`` (optional): actor -> registered public key (hex); a
    log signed by another key is then a finding even if it is internally consistent.
    """
    files = [str(p) for p in paths]
    report = VerifyReport(files=files)
    entries: list[Entry] = []
    seen: set[Path] = set()
    for name in files:
        resolved = Path(name).resolve()
        if resolved in seen:
            report.findings.append(Finding(name, 0, "passed twice: checked once", "note"))
            continue
        seen.add(resolved)
        entries += _check_file(name, report)
    _check_keys(entries, report, trusted_keys or {})
    node = [e for e in entries if e.kind in NODE_KINDS]
    server = [e for e in entries if e.kind in SERVER_KINDS]
    report.rounds = [e for e in server if e.kind == KIND_ROUND]
    report.runs = [e for e in server if e.kind == KIND_RUN]
    _replay_epsilon(node, report)
    _cross_check(node, server, report)
    for folder in _folders(ledger_dirs):
        _check_ledgers(folder, report)
    return report


def _folders(ledger_dirs: str | Path | Iterable[str | Path] | None) -> list[Path]:
    """``ledger_dirs`` as a list of distinct folders (one path, several, or none)."""
    if ledger_dirs is None:
        return []
    many = [ledger_dirs] if isinstance(ledger_dirs, (str, Path)) else list(ledger_dirs)
    folders: list[Path] = []
    for folder in map(Path, many):
        if folder.resolve() not in {f.resolve() for f in folders}:
            folders.append(folder)
    return folders


# ---- 1 and 2: one file ----------------------------------------------------------------------------
def _check_file(name: str, report: VerifyReport) -> list[Entry]:
    """Check one log file line by line and as a chain (1 and 2); return the entries that verified."""

    def bad(line: int, reason: str) -> None:
        report.findings.append(Finding(name, line, reason))

    lines = _log_lines(name, report)
    if lines is None:
        return []
    good = _verified_lines(*lines, bad)
    return _entries_of(name, good, bad, report)


def _log_lines(name: str, report: VerifyReport) -> tuple[list[bytes], bool] | None:
    """The file's raw lines and whether the last one is torn (no final newline); None if unreadable or empty."""
    try:
        data = Path(name).read_bytes()
    except OSError as exc:
        report.findings.append(Finding(name, 0, f"cannot read the file: {exc.strerror or exc}"))
        return None
    if not data:
        report.findings.append(Finding(name, 0, "empty log (no records)", "note"))
        return None
    raws = data.split(b"\n")
    torn = raws[-1] != b""
    if not torn:
        raws.pop()
    return raws, torn


def _verified_lines(
    raws: list[bytes], torn: bool, bad: Callable[[int, str], None]
) -> list[tuple[int, bytes, dict[str, Any]]]:
    """The lines that verify on their own, as (line number, raw, parsed); the chain is checked on the way."""
    good: list[tuple[int, bytes, dict[str, Any]]] = []
    prev_raw, prev_ok, expected_seq = None, False, 0
    for number, raw in enumerate(raws, start=1):
        if torn and number == len(raws):
            bad(number, "the last line is incomplete (no final newline: a torn or truncated write)")
        line, ok = _parse_line(number, raw, bad)
        expected_seq = _check_link(number, line, prev_raw, prev_ok, expected_seq, bad)
        if ok:
            good.append((number, raw, line))
        prev_raw, prev_ok = raw, ok and line is not None
    return good


def _parse_line(number: int, raw: bytes, bad: Callable[[int, str], None]) -> tuple[Any, bool]:
    """A line parsed (None when not JSON) and whether it verifies on its own: signature, form, schema."""
    line: Any = None
    try:
        line = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        bad(number, "not valid JSON (a corrupted or non-log line)")
    ok = False
    if line is not None:
        problem = last_line_problem(line, raw)
        if problem is not None:
            bad(number, f"record does not verify: {problem}")
        else:
            ok = True
            if problems := schema_problems(line["kind"], line["body"]):
                bad(number, "malformed record: " + "; ".join(problems))
                ok = False
    return line, ok


def _check_link(
    number: int, line: Any, prev_raw: bytes | None, prev_ok: bool, expected_seq: int, bad: Callable[[int, str], None]
) -> int:
    """Check a line's ``seq`` and ``prev`` against the line before it; return the next expected ``seq``."""
    if isinstance(line, dict) and isinstance(line.get("seq"), int):
        seq = line["seq"]
        if seq != expected_seq:
            what = "missing before this line (deleted)" if seq > expected_seq else "out of order or duplicated"
            bad(number, f"seq {seq} where {expected_seq} was expected: records {what}")
        expected_seq = seq + 1
    if isinstance(line, dict):
        want = GENESIS if prev_raw is None else line_hash(prev_raw)
        if line.get("prev") != want and (prev_raw is None or prev_ok):
            bad(
                number,
                "does not chain to the start of the log: earlier records were removed"
                if prev_raw is None
                else f"prev hash does not match line {number - 1}: a record was deleted, inserted or reordered here",
            )
    return expected_seq


def _entries_of(
    name: str, good: list[tuple[int, bytes, dict[str, Any]]], bad: Callable[[int, str], None], report: VerifyReport
) -> list[Entry]:
    """The verified lines signed by the file's one key and actor, as entries; records the file's head."""
    keys = Counter(line["pubkey"] for _, _, line in good)
    actors = Counter(line["actor"] for _, _, line in good)
    file_key = keys.most_common(1)[0][0] if keys else ""
    file_actor = actors.most_common(1)[0][0] if actors else ""
    entries = []
    for number, _raw, line in good:
        if line["pubkey"] != file_key:
            bad(
                number,
                f"signed by key {line['pubkey'][:16]}..., not this log's key {file_key[:16]}... "
                "(a record inserted by someone else)",
            )
            continue
        if line["actor"] != file_actor:
            bad(number, f"actor {line['actor']!r} in the log of {file_actor!r}")
            continue
        entries.append(
            Entry(
                name, number, line["seq"], str(line["time"]), line["actor"], line["kind"], line["body"], line["pubkey"]
            )
        )
    if good:
        number, raw, line = good[-1]
        report.heads[name] = {
            "actor": file_actor,
            "pubkey": file_key,
            "last_seq": line["seq"],
            "last_line": number,
            "head_hash": line_hash(raw),
        }
    return entries


def _check_keys(entries: list[Entry], report: VerifyReport, trusted: Mapping[str, str]) -> None:
    first: dict[str, Entry] = {}
    flagged: set[tuple[str, str]] = set()
    for e in entries:
        if e.actor in trusted and e.pubkey != trusted[e.actor].lower() and (e.file, e.actor) not in flagged:
            flagged.add((e.file, e.actor))
            report.findings.append(
                Finding(
                    e.file,
                    e.line,
                    f"{e.actor} signs with key {e.pubkey[:16]}..., not its registered key {trusted[e.actor][:16]}...",
                )
            )
        seen = first.setdefault(e.actor, e)
        if seen.pubkey != e.pubkey and (e.file, "key") not in flagged:
            flagged.add((e.file, "key"))
            report.findings.append(
                Finding(
                    e.file,
                    e.line,
                    f"{e.actor} signs with key {e.pubkey[:16]}... here but with {seen.pubkey[:16]}... in {seen.file}",
                )
            )


# ---- 4: epsilon ------------------------------------------------------------------------------------
def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of an accountant ``history`` at ``delta``: the ledger's own computation."""
    from fedcare.dp_accounting import epsilon_of  # opacus (and torch) only when epsilons are checked

    return epsilon_of(history, delta)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=EPS_RTOL, abs_tol=1e-12)


def _ordered(group: list[Entry]) -> list[Entry]:
    if len({e.file for e in group}) == 1:
        return sorted(group, key=lambda e: e.line)
    return sorted(group, key=lambda e: (e.time, e.file, e.line))


def _replay_epsilon(node: list[Entry], report: VerifyReport) -> None:
    """Replay each hospital's epsilon per dataset from its releases' DP parameters (4)."""
    from fedcare.dp_accounting import RdpComposition  # opacus (and torch) only when epsilons are checked

    groups = _group_by_dataset(node, report)
    for (actor, key), group in groups.items():
        # Opacus's RDP accountant, composed release by release
        _replay_group(actor, key, group, report.hospitals[actor], RdpComposition(), report)


def _group_by_dataset(node: list[Entry], report: VerifyReport) -> dict[tuple[str, str], list[Entry]]:
    """Node releases and budgets grouped by (hospital, dataset); refusals and unmasks counted in its view."""
    groups: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for e in node:
        view = report.hospitals.setdefault(e.actor, HospitalView(e.actor, e.pubkey))
        if e.file not in view.files:
            view.files.append(e.file)
        if e.kind == KIND_RELEASE:
            groups[(e.actor, e.body.get("dataset_id") or e.body["data_fingerprint"])].append(e)
        elif e.kind == KIND_BUDGET:
            groups[(e.actor, e.body["dataset_id"])].append(e)
        elif e.kind == KIND_REFUSAL:
            view.refusals.append(dict(e.body, time=e.time))
        elif e.kind == KIND_UNMASK:
            view.unmasks += 1
    return groups


def _replay_group(
    actor: str, key: str, group: list[Entry], view: HospitalView, replay: Any, report: VerifyReport
) -> None:
    """Replay one hospital's releases on one dataset in order into ``replay``; record them in ``view``."""
    delta: float | None = None
    budget: float | None = None
    no_dp = 0
    paid_answers = {_EMPTY_STATS_DIGEST}  # statistics answers this hospital paid for on this data
    for e in _ordered(group):
        b = e.body
        if e.kind == KIND_BUDGET:
            budget = float(b["budget"])
            view.budgets[key] = budget
            continue
        dp, claimed, replayed = b["dp"], b["epsilon_after"], None
        if dp is None:
            no_dp += 1
            if claimed is not None:
                report.findings.append(Finding(e.file, e.line, f"claims epsilon {claimed} without DP parameters"))
        else:
            delta, replayed = _replay_release(e, actor, key, replay, delta, budget, paid_answers, report)
        view.releases.append(
            ReleaseView(
                b["run_id"],
                b["round"],
                b["stage"],
                e.time,
                b["data_fingerprint"],
                dp,
                claimed,
                replayed,
                b.get("secagg"),
                e.file,
                e.line,
                b.get("dataset_id") or "",
            )
        )
    if delta is not None:
        view.epsilon[key] = replay.epsilon(delta)
        view.delta[key] = delta
    if no_dp:
        report.findings.append(
            Finding(
                group[0].file,
                0,
                f"{actor}: {no_dp} release(s) without differential privacy on data {key[:24]} (no epsilon guarantee)",
                "note",
            )
        )


def _replay_release(
    e: Entry,
    actor: str,
    key: str,
    replay: Any,
    delta: float | None,
    budget: float | None,
    paid_answers: set[str],
    report: VerifyReport,
) -> tuple[float, float | None]:
    """Add one DP release to ``replay`` and check its claimed epsilon; return (delta, replayed epsilon or None)."""
    b = e.body
    dp, claimed = b["dp"], b["epsilon_after"]
    if delta is None:
        delta = float(dp["delta"])
    elif not math.isclose(delta, float(dp["delta"]), rel_tol=1e-12):
        report.findings.append(
            Finding(
                e.file,
                e.line,
                f"delta {dp['delta']:g} differs from the {delta:g} "
                "of earlier releases on this data (epsilons are not comparable)",
            )
        )
    _check_free_release(e, paid_answers, report)
    try:
        replay.add(float(dp["noise_multiplier"]), float(dp["sample_rate"]), int(dp["steps"]))
        replayed = replay.epsilon(delta)
    except (ValueError, ArithmeticError, TypeError) as exc:
        report.findings.append(Finding(e.file, e.line, f"the accountant cannot replay these DP parameters ({exc})"))
        return delta, None
    if not _close(float(claimed), replayed):
        report.findings.append(
            Finding(
                e.file,
                e.line,
                f"{actor} claims epsilon_after {claimed:.9g} but the RDP accountant gives "
                f"{replayed:.9g} from the recorded DP parameters "
                f"(run {b['run_id']} round {b['round']})",
            )
        )
    if budget is not None and replayed > budget * (1 + EPS_RTOL) and int(dp["steps"]) > 0:
        report.findings.append(
            Finding(
                e.file,
                e.line,
                f"{actor} released up to epsilon {replayed:.6g} on {key!r}, above the "
                f"budget {budget:g} it last signed (run {b['run_id']} round {b['round']})",
            )
        )
    return delta, replayed


# The digest of an empty statistics answer (no numeric feature to release): sent at no cost.
_EMPTY_STATS_DIGEST = digest_arrays({"sum": np.asarray([], dtype=np.float64)})


def _check_free_release(e: Entry, paid_answers: set[str], report: VerifyReport) -> None:
    """A statistics answer is paid once; a release at zero steps must re-send one of those answers.

    Re-sending an answer already released is post-processing (no cost); anything else released
    at zero steps would be a release the accountant never counted.
    """
    b = e.body
    steps = int(b["dp"]["steps"])
    if b["stage"] != "feature-stats":
        return
    if steps > 0:
        paid_answers.add(b["sent_digest"])
    elif b["sent_digest"] not in paid_answers:
        report.findings.append(
            Finding(
                e.file,
                e.line,
                f"{e.actor} released a statistics answer at no privacy cost in run {b['run_id']}, "
                "but it is not an answer it paid for earlier on this data (an uncounted release)",
            )
        )


# ---- 3: node vs server -------------------------------------------------------------------------------
def _cross_check(node: list[Entry], server: list[Entry], report: VerifyReport) -> None:
    """Check the nodes' records against the server's (3)."""

    def error(e: Entry, reason: str) -> None:
        report.findings.append(Finding(e.file, e.line, reason))

    def note(e: Entry, reason: str) -> None:
        report.findings.append(Finding(e.file, e.line, reason, "note"))

    rounds = _server_rounds(server, error)
    runs = {e.body["run_id"]: e for e in server if e.kind == KIND_RUN}
    releases = _check_node_records(node, rounds, runs, error, note)
    for (run, rnd, actor), group in releases.items():
        trains = [g for g in group if g.body["stage"] == "train"]
        if len(trains) > 1:
            error(trains[1], f"{actor} logged a second training release for run {run} round {rnd}")
    _check_responded(rounds, {e.actor for e in node}, releases, error, note)


def _server_rounds(server: list[Entry], error: Callable[[Entry, str], None]) -> dict[tuple[str, int], Entry]:
    """The server's round records by (run, round): the first of each; a second one is an error."""
    rounds: dict[tuple[str, int], Entry] = {}
    for e in server:
        if e.kind == KIND_ROUND:
            key = (e.body["run_id"], e.body["round"])
            if key in rounds:
                first = rounds[key]
                error(e, f"a second server record for run {key[0]} round {key[1]} (first: {first.file}:{first.line})")
            rounds.setdefault(key, e)
    return rounds


def _check_node_records(
    node: list[Entry],
    rounds: dict[tuple[str, int], Entry],
    runs: dict[str, Entry],
    error: Callable[[Entry, str], None],
    note: Callable[[Entry, str], None],
) -> dict[tuple[str, int, str], list[Entry]]:
    """Check each node record against its server round; return the releases by (run, round, hospital)."""
    server_runs = {r for r, _ in rounds} | set(runs)
    in_flight = _rounds_in_flight(rounds, runs)
    releases: dict[tuple[str, int, str], list[Entry]] = defaultdict(list)
    unnoted_runs: set[str] = set()
    for e in node:
        b = e.body
        if e.kind == KIND_BUDGET:
            continue  # a hospital's own budget decision: no server side to compare with
        run, rnd = b["run_id"], b["round"]
        if run not in server_runs:
            if run not in unnoted_runs:
                unnoted_runs.add(run)
                note(e, f"no server log for run {run} among the inputs: its releases are not cross-checked")
            continue
        srv = rounds.get((run, rnd))
        if e.kind == KIND_RELEASE and b["stage"] == "personalise":
            continue  # local fine-tuning after the last round: nothing of it reaches the server
        if e.kind == KIND_RELEASE:
            releases[(run, rnd, e.actor)].append(e)
            if b["stage"] == "train" or srv is not None:
                _check_release(e, srv, rounds, runs, in_flight, error, note)
        elif e.kind == KIND_REFUSAL and srv is not None:
            _check_refusal(e, srv, error, note)
        elif e.kind == KIND_UNMASK and srv is not None and srv.body.get("secagg"):
            _check_unmask(e, srv, error)
    return releases


def _check_refusal(
    e: Entry, srv: Entry, error: Callable[[Entry, str], None], note: Callable[[Entry, str], None]
) -> None:
    """A node's refusal must not be counted as responded by the server's round record."""
    s = srv.body
    run, rnd = e.body["run_id"], e.body["round"]
    if e.actor in s["responded"]:
        error(
            e, f"{e.actor} refused run {run} round {rnd}, but the server ({srv.file}:{srv.line}) counts it as responded"
        )
    elif e.actor not in s["refused"] and e.actor not in s["failed"]:
        note(e, f"the server's round record ({srv.file}:{srv.line}) does not mention this refusal")


def _check_unmask(e: Entry, srv: Entry, error: Callable[[Entry, str], None]) -> None:
    """A node's unmask survivors and dropped hospitals must agree with the server's secure-aggregation round."""
    # a node reveals self-mask shares of its surviving neighbours only (all survivors in the
    # complete graph) and mask-key shares of dropped ones: both must agree with the server's round
    b = e.body
    mine = {str(v) for v in b["survivors"]}
    theirs = {str(v) for v in srv.body["secagg"].get("survivors", [])}
    if not mine <= theirs or {str(v) for v in b["dropped"]} & theirs:
        error(
            e,
            f"unmasked for survivors {sorted(mine)} and dropped {sorted(map(str, b['dropped']))}, but "
            f"the server ({srv.file}:{srv.line}) records survivors {sorted(theirs)}",
        )


def _check_responded(
    rounds: dict[tuple[str, int], Entry],
    covered: set[str],
    releases: dict[tuple[str, int, str], list[Entry]],
    error: Callable[[Entry, str], None],
    note: Callable[[Entry, str], None],
) -> None:
    """Every hospital a server round lists as responded, whose log is supplied, has a release for it."""
    uncovered_noted: set[str] = set()
    for (run, rnd), srv in sorted(rounds.items(), key=lambda kv: (kv[1].file, kv[1].line)):
        for actor in srv.body["responded"]:
            if actor not in covered:
                if actor not in uncovered_noted:
                    uncovered_noted.add(actor)
                    note(srv, f"no audit log supplied for {actor}: its releases cannot be cross-checked")
                continue
            if not releases.get((run, rnd, actor)):
                error(
                    srv,
                    f"the server lists {actor} as responded in run {run} round {rnd}, "
                    f"but {actor}'s log has no release for that round",
                )


def _plan_of(run: str, runs: dict[str, Entry]) -> str:
    """The run whose privacy plan ``run`` follows: the run it resumed (``resumed-from``), else itself."""
    record = runs.get(run)
    resumed = record.body["settings"].get("resumed-from") if record is not None else None
    return str(resumed) if resumed not in (None, "") else run


def _rounds_in_flight(rounds: dict[tuple[str, int], Entry], runs: dict[str, Entry]) -> dict[str, int]:
    """Per run, the round after the last one its server logged: the round in flight if the server stopped.

    A run resumed from a checkpoint starts after the last round logged by the runs of its plan.
    """
    last: dict[str, int] = defaultdict(int)
    for run, rnd in rounds:
        last[run] = max(last[run], rnd)
    in_flight = {}
    for run in set(last) | set(runs):
        if run in last:
            in_flight[run] = last[run] + 1
            continue
        plan = _plan_of(run, runs)
        family = [r for r in set(last) if r != run and (r == plan or _plan_of(r, runs) == plan)]
        in_flight[run] = max((last[r] for r in family), default=0) + 1
    return in_flight


def _check_release(
    e: Entry,
    srv: Entry | None,
    rounds: dict[tuple[str, int], Entry],
    runs: dict[str, Entry],
    in_flight: dict[str, int],
    error,
    note,
) -> None:
    b = e.body
    run, rnd, actor = b["run_id"], b["round"], e.actor
    if srv is None:
        if b["stage"] == "train" and in_flight.get(run) == rnd:
            note(
                e,
                f"{actor} released in run {run} round {rnd}: charged, not aggregated (server crash): the "
                "server's log of this run ends before that round",
            )
        else:
            error(e, f"{actor} released in run {run} round {rnd}, but the server logged no such round")
        return
    s = srv.body
    where = f"{srv.file}:{srv.line}"
    if actor in s["responded"]:
        pass
    elif actor in s["failed"]:
        note(
            e,
            f"{actor} released in run {run} round {rnd}; the server ({where}) records it as failed "
            f"({s['failed'][actor]}): the update was not aggregated",
        )
    elif actor in s["refused"]:
        error(e, f"{actor} released in run {run} round {rnd}, but the server ({where}) records a refusal")
    else:
        error(
            e,
            f"{actor} released in run {run} round {rnd}, but the server round ({where}) does not list it as responded",
        )
    received = s.get("received_digests") or {}
    if actor in received and received[actor] != b["sent_digest"]:
        error(e, f"sent_digest differs from the digest the server ({where}) says it received")
    if b["stage"] == "train":
        before = rounds.get((run, rnd - 1)) or _latest_of_plan(rounds, runs, run, rnd - 1)
        expected = (
            before.body["aggregate_digest"]
            if before is not None
            else (runs[run].body.get("initial_model_digest") if run in runs and rnd == 1 else "")
        )
        if expected and b["global_model_digest"] != expected:
            source = f"{before.file}:{before.line}" if before is not None else f"{runs[run].file}:{runs[run].line}"
            error(
                e,
                f"trained from a model (digest {b['global_model_digest'][:12]}...) that is not the server's "
                f"global model for round {rnd} ({expected[:12]}..., {source})",
            )


def _check_ledger_budget(
    name: str,
    data: dict[str, Any],
    hospital: str,
    dataset: str,
    match: tuple[HospitalView, list[ReleaseView]] | None,
    report: VerifyReport,
) -> None:
    """The ledger's budget must not exceed the last budget its hospital signed for this dataset.

    The hospital's chain signs a ``budget`` record when the ledger is created and at every explicit
    raise (``fedcare node budget``); a larger budget in the ledger was written by hand. Looked up
    by the ledger's own dataset identity, so a ledger with no release on record is checked too.
    """
    view = match[0] if match is not None else report.hospitals.get(hospital)
    if view is None:
        return  # this hospital's log was not supplied: noted elsewhere
    keys = [dataset] + ([match[1][0].data_key] if match is not None else [])
    signed = next((view.budgets[k] for k in keys if k in view.budgets), None)
    try:
        budget = float(data["budget"])
    except (KeyError, TypeError, ValueError):
        report.findings.append(Finding(name, 0, f"{hospital}: the ledger has no readable budget"))
        return
    if signed is None:
        charged = sum(1 for r in data.get("releases", []) if sum(int(k) for _, _, k in r.get("entries", [])) > 0)
        if charged:
            report.findings.append(
                Finding(
                    name,
                    0,
                    f"{hospital}: the ledger's budget {budget:g} on {dataset[:40]!r} has no signed budget "
                    f"record in {view.actor}'s audit log, yet it records {charged} charged release(s) "
                    "(budget not signed: it cannot be told from one raised by hand)",
                )
            )
        return
    if budget > signed * (1 + EPS_RTOL):
        report.findings.append(
            Finding(
                name,
                0,
                f"{hospital}: the ledger's budget {budget:g} is above the {signed:g} last signed in "
                f"{view.actor}'s audit log (raised by hand, without a signed budget record: "
                "`fedcare node budget` signs a raise)",
            )
        )


def _latest_of_plan(rounds: dict[tuple[str, int], Entry], runs: dict[str, Entry], run: str, rnd: int) -> Entry | None:
    """Round ``rnd``'s server record in an earlier run of ``run``'s plan (a resumed run's starting model)."""
    plan = _plan_of(run, runs)
    found = [e for (r, n), e in rounds.items() if n == rnd and r != run and (r == plan or _plan_of(r, runs) == plan)]
    return max(found, key=lambda e: (e.time, e.file, e.line), default=None)


# ---- 4b: the hospitals' privacy ledgers -------------------------------------------------------------
def _check_ledgers(directory: Path, report: VerifyReport) -> None:
    paths = sorted(directory.glob("privacy-ledger-*.json")) if directory.is_dir() else []
    if not paths:
        report.findings.append(Finding(str(directory), 0, "no privacy-ledger-*.json files in this folder"))
        return
    by_fingerprint: dict[str, tuple[HospitalView, list[ReleaseView]]] = {}
    for view in report.hospitals.values():
        for r in view.releases:
            by_fingerprint.setdefault(r.data_key, (view, []))[1].append(r)
    for path in paths:
        report.ledgers.append(str(path))
        _check_ledger(path, by_fingerprint, report)


def _check_ledger(
    path: Path, by_fingerprint: dict[str, tuple[HospitalView, list[ReleaseView]]], report: VerifyReport
) -> None:
    """Check one privacy ledger: its own history, its budget, and its releases against the audit logs."""
    name = str(path)

    def error(reason: str) -> None:
        report.findings.append(Finding(name, 0, reason))

    ledger = _read_ledger(path, error)
    if ledger is None:
        return
    data, fingerprint, hospital, delta, history, ledger_releases = ledger
    try:
        ledger_eps = _epsilon(history, delta)
    except (ValueError, ArithmeticError) as exc:
        error(f"the accountant cannot replay this ledger's history ({exc})")
        return
    if ledger_releases and not _close(ledger_releases[-1][3], ledger_eps):
        error(
            f"{hospital}: the ledger's history gives epsilon {ledger_eps:.9g}, its last release claims "
            f"{ledger_releases[-1][3]:.9g}"
        )
    match = next(
        (
            v
            for fp, v in by_fingerprint.items()
            if fp == fingerprint or (len(fp) >= 16 and (fingerprint.startswith(fp) or fp.startswith(fingerprint)))
        ),
        None,
    )
    _check_ledger_budget(name, data, hospital, fingerprint, match, report)
    if match is None:
        covered = hospital in report.hospitals
        if ledger_releases:
            report.findings.append(
                Finding(
                    name,
                    0,
                    f"{hospital}: the ledger records {len(ledger_releases)} release(s) on data "
                    f"{fingerprint[:12]}... that no supplied audit log records"
                    + ("" if covered else f" (no log of {hospital} supplied)"),
                    "error" if covered else "note",
                )
            )
        return
    _compare_ledger_releases(name, hospital, delta, ledger_eps, ledger_releases, match, error, report)


class _LedgerFile(NamedTuple):
    """What a privacy ledger file holds, read and typed."""

    data: dict[str, Any]
    dataset: str  # its dataset id (else its data fingerprint)
    hospital: str
    delta: float
    history: list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)
    releases: list[tuple[str, int, str, float]]  # (run, round, kind, epsilon after)


def _read_ledger(path: Path, error: Callable[[str], None]) -> _LedgerFile | None:
    """The ledger file read and typed; None (and an error) when it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        fingerprint, hospital = str(data.get("dataset_id") or data["fingerprint"]), str(data["hospital"])
        delta = float(data["delta"])
        history = [(float(s), float(q), int(k)) for s, q, k in data["history"]]
        ledger_releases = [
            (str(r["run_id"]), int(r["round"]), str(r["kind"]), float(r["epsilon_after"])) for r in data["releases"]
        ]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        error(f"unreadable privacy ledger ({type(exc).__name__}: {exc})")
        return None
    return _LedgerFile(data, fingerprint, hospital, delta, history, ledger_releases)


def _compare_ledger_releases(
    name: str,
    hospital: str,
    delta: float,
    ledger_eps: float,
    ledger_releases: list[tuple[str, int, str, float]],
    match: tuple[HospitalView, list[ReleaseView]],
    error: Callable[[str], None],
    report: VerifyReport,
) -> None:
    """The ledger and the audit log must hold the same delta, the same charged releases and the same epsilon."""
    view, audit_releases = match
    audit_fp = audit_releases[0].data_key
    # a release at zero steps (a re-sent statistics answer) cost nothing: the ledger need not list it
    dp_releases = [r for r in audit_releases if r.dp is not None and r.epsilon_after is not None]
    free = [r for r in dp_releases if int(cast(dict[str, Any], r.dp).get("steps", 0)) <= 0]
    audit_delta = view.delta.get(audit_fp)
    if audit_delta is not None and not math.isclose(audit_delta, delta, rel_tol=1e-12):
        error(f"{hospital}: the ledger's delta {delta:g} differs from the audit log's {audit_delta:g}")
    remaining = list(dp_releases)
    for run, rnd, kind, eps in ledger_releases:
        found = next((r for r in remaining if r.run_id == run and r.round == rnd and r.stage == kind), None)
        if found is None:
            error(f"{hospital}: ledger release run {run} round {rnd} ({kind}) has no audit-log record")
            continue
        remaining.remove(found)
        if not _close(eps, float(cast(float, found.epsilon_after))):
            report.findings.append(
                Finding(
                    found.file,
                    found.line,
                    f"{hospital}: epsilon_after {found.epsilon_after:.9g} "
                    f"differs from the privacy ledger's {eps:.9g} ({name})",
                )
            )
    for r in remaining:
        if r in free:
            continue
        report.findings.append(
            Finding(
                r.file,
                r.line,
                f"{view.actor}: release run {r.run_id} round {r.round} "
                f"({r.stage}) is missing from the privacy ledger {name}",
            )
        )
    replayed = view.epsilon.get(audit_fp)
    if replayed is not None and not _close(replayed, ledger_eps):
        error(
            f"{hospital}: the ledger's epsilon {ledger_eps:.9g} differs from the {replayed:.9g} replayed "
            "from the audit log"
        )
