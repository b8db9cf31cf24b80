"""Append-only, hash-chained, Ed25519-signed audit log (one JSON object per line).

Each hospital node and the coordinator's server keep their own log. A line is

    {"seq", "time", "actor", "kind", "prev", "body", "pubkey", "sig"}

``seq`` counts from 0; ``time`` is UTC ISO-8601; ``prev`` is the SHA-256 (hex) of the previous
line's bytes (without its newline), 64 zeros on the first line; ``body`` is the record; ``pubkey``
is the signer's raw Ed25519 public key (hex); ``sig`` (hex) signs the canonical JSON of every
other field. Canonical JSON = sorted keys, no spaces, UTF-8, no NaN; every line is written in
canonical form, so the chain hash of a line equals the hash of its canonical bytes.

Why this shape: an auditor can verify a log offline with nothing but the file (and, to rule
out a wholesale re-signed forgery, the actor's registered public key); a flipped byte, a deleted,
reordered or inserted line all break a signature or a chain link. Appends are locked (flock),
atomic (one ``write`` on an ``O_APPEND`` descriptor, then fsync) and keep no state outside the
file, so a ClientApp started fresh for every message appends safely; a log whose last line
does not verify is refused rather than extended.

The record kinds (the dataclasses below document each field; ``append`` accepts the dataclass
or the equivalent dict):

node   ``release``  one release of data-derived values to the server (stats sums or a model update)
       ``refusal``  the node refused a request (privacy budget, policy, bad data)
       ``unmask``   the node revealed secure-aggregation shares for a round
       ``budget``   a dataset's privacy budget was set or raised (by the hospital, explicitly)
server ``round``    one completed (or failed) training round
       ``run``      a run's settings, logged once at its start
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit.signing import public_key_bytes, sign, verify_signature
from fedcare.errors import FedcareError

GENESIS = "0" * 64
LINE_FIELDS = ("seq", "time", "actor", "kind", "prev", "body", "pubkey", "sig")

KIND_RELEASE, KIND_REFUSAL, KIND_UNMASK, KIND_BUDGET = "release", "refusal", "unmask", "budget"
KIND_ROUND, KIND_RUN = "round", "run"
NODE_KINDS = (KIND_RELEASE, KIND_REFUSAL, KIND_UNMASK, KIND_BUDGET)
SERVER_KINDS = (KIND_ROUND, KIND_RUN)
STAGES = ("feature-stats", "train", "personalise")


class AuditLogError(FedcareError):
    """The audit log cannot be extended (corrupt tail, foreign key, unwritable, bad record)."""


# ---- canonical form and digests -----------------------------------------------------------------
def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, NaN/Infinity refused: the bytes that are hashed and signed."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    ).encode("utf-8")


def line_hash(raw: bytes) -> str:
    """The chain hash of one log line (its bytes without the trailing newline)."""
    return hashlib.sha256(raw).hexdigest()


def digest_arrays(arrays: Mapping[str, Any]) -> str:
    """SHA-256 over a name -> array mapping, in name order: name, dtype, shape, then the bytes.

    Node ``sent_digest``/``global_model_digest`` and server ``aggregate_digest`` use this one
    function, so both sides of a release compute the same value. Accepts numpy arrays, anything
    ``np.asarray`` takes, or objects with a ``.numpy()`` method (a Flower ``ArrayRecord``'s
    values), so ``digest_arrays(array_record)`` works directly.
    """
    h = hashlib.sha256(b"fedcare-arrays-v1\0")
    for name in sorted(arrays):
        value = arrays[name]
        arr = value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else np.asarray(value)
        arr = np.ascontiguousarray(arr)
        for part in (name.encode("utf-8"), arr.dtype.str.encode(), repr(tuple(arr.shape)).encode()):
            h.update(len(part).to_bytes(8, "big") + part)
        h.update(arr.nbytes.to_bytes(8, "big"))
        h.update(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # in place, no copy (numpy: Buffer on 3.12+ only)
    return h.hexdigest()


def code_digest(paths: Iterable[str | Path]) -> str:
    """SHA-256 of the application code: every file under ``paths`` (recursively), in path order.

    Each file contributes its path relative to the argument it was found under, and its bytes;
    ``__pycache__`` folders and ``*.pyc`` files are skipped so the digest only changes with the
    source. Use it for a release's ``app_digest``, e.g. over the ``client``, ``shared_models``,
    ``secure_aggregation`` and ``fedcare`` package folders.
    """
    files: list[tuple[str, Path]] = []
    for root in (Path(p) for p in paths):
        if root.is_file():
            files.append((root.name, root))
            continue
        for f in root.rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                files.append((f"{root.name}/{f.relative_to(root).as_posix()}", f))
    h = hashlib.sha256(b"fedcare-code-v1\0")
    for rel, f in sorted(files):
        data = f.read_bytes()
        for part in (rel.encode("utf-8"), data):
            h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


# ---- record kinds ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPParams:
    """The DP-SGD (or Gaussian) parameters of one release: one RDP accountant history entry.

    ``steps`` = 0 marks a release that cost nothing (e.g. a statistics answer re-sent from the
    privacy ledger: post-processing). ``delta`` is the hospital's delta for this data.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float | None
    delta: float

    @classmethod
    def from_entries(
        cls, entries: Iterable[tuple[float, float, int]], max_grad_norm: float | None, delta: float
    ) -> DPParams:
        """From the Opacus accountant history of one release (``TrainOutcome.steps``).

        Entries must share one noise multiplier and sample rate (one engine per round does);
        their steps are summed. No entries (no batch was drawn) -> zero steps.
        """
        entries = [(float(s), float(q), int(k)) for s, q, k in entries]
        if not entries:
            return cls(0.0, 0.0, 0, max_grad_norm, float(delta))
        if len({(s, q) for s, q, _ in entries}) != 1:
            raise AuditLogError(
                "one release mixes noise multipliers or sample rates",
                "log each (noise multiplier, sample rate) as its own release",
            )
        s, q, _ = entries[0]
        return cls(s, q, sum(k for _, _, k in entries), max_grad_norm, float(delta))


@dataclass(frozen=True)
class SecAggInfo:
    """How a release reached the server: ``masked`` (secure aggregation) or ``plain``.

    ``participants``: node ids (or names) of the round's key-agreed participants; ``threshold``:
    the t of t-of-n Shamir recovery (None for plain).
    """

    role: str
    participants: list[Any] = field(default_factory=list)
    threshold: int | None = None


@dataclass(frozen=True)
class ReleaseRecord:
    """Node: values derived from patient data left the hospital (kind ``release``).

    Append it *before* the reply leaves (a node that cannot log should refuse instead).
    ``stage``: ``feature-stats`` (round 0) or ``train``. ``app_digest``: ``code_digest`` of the
    ClientApp code; ``data_fingerprint``: ``HospitalData.fingerprint()`` (the full hex, the
    privacy ledger's key); ``global_model_digest``: ``digest_arrays`` of the model received
    ("" for feature-stats); ``sent_digest``: ``digest_arrays`` of what was sent (the masked
    ArrayRecord under secure aggregation, the model otherwise; for feature-stats the digest of
    ``{"sum": np.array(sums)}``). ``dp``: None without DP; ``epsilon_after``: the privacy ledger's
    cumulative epsilon after this release (None without DP).
    """

    run_id: str
    round: int
    stage: str
    app_digest: str
    data_fingerprint: str
    global_model_digest: str
    sent_digest: str
    dp: DPParams | None
    epsilon_after: float | None
    secagg: SecAggInfo | None = None
    dataset_id: str = ""  # the privacy ledger's key (the hospital's declared dataset identity)


@dataclass(frozen=True)
class BudgetRecord:
    """Node: the privacy budget of ``dataset_id`` is ``budget`` from now on (kind ``budget``).

    Written once when the dataset's ledger is created (``reason`` "initial") and by the hospital's
    explicit ``fedcare node budget`` command; a ledger whose budget exceeds the last such record was
    raised by hand, and the node refuses to train on it.
    """

    dataset_id: str
    budget: float
    previous: float | None
    reason: str


@dataclass(frozen=True)
class RefusalRecord:
    """Node: a request refused (``kind``: ``budget``, ``data`` or ``clip-range``) -- nothing released."""

    run_id: str
    round: int
    reason: str
    kind: str


@dataclass(frozen=True)
class UnmaskRecord:
    """Node: shares revealed for ``round`` (self-mask shares of ``survivors``, key shares of ``dropped``)."""

    run_id: str
    round: int
    survivors: list[Any]
    dropped: list[Any]


@dataclass(frozen=True)
class ServerRoundRecord:
    """Server: one training round.

    ``sampled``/``responded``: hospital names (the names nodes log as their ``actor``) asked to
    train / whose update was aggregated. ``failed``: name -> reason (errors, timeouts, dropped
    during secure aggregation); ``refused``: name -> the hospital's reason. ``aggregate_digest``:
    ``digest_arrays`` of the global model after the round (the next round's
    ``global_model_digest`` at every node). ``secagg``: ``{"threshold": t, "survivors": [node ids]}``
    or None. ``checkpoint_digest``: SHA-256 of the checkpoint file written after the round ("" if none).
    ``received_digests``: without secure aggregation, name -> ``digest_arrays`` of the update
    received (cross-checked with the node's ``sent_digest``); empty under secure aggregation.
    """

    run_id: str
    round: int
    strategy: str
    sampled: list[str]
    responded: list[str]
    failed: dict[str, str]
    refused: dict[str, str]
    aggregate_digest: str
    secagg: dict[str, Any] | None = None
    checkpoint_digest: str = ""
    received_digests: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerRunRecord:
    """Server: a run starts. ``settings``: ``RunSettings.to_config()`` plus deployment facts an
    ethics board asks about, e.g. ``{"tls": true, "node-auth": true}``; ``initial_model_digest``:
    ``digest_arrays`` of the round-1 global model (checked against the nodes' round-1 receipts).
    """

    run_id: str
    settings: dict[str, Any]
    initial_model_digest: str = ""


RECORD_TYPES: dict[str, type] = {
    KIND_RELEASE: ReleaseRecord,
    KIND_REFUSAL: RefusalRecord,
    KIND_UNMASK: UnmaskRecord,
    KIND_BUDGET: BudgetRecord,
    KIND_ROUND: ServerRoundRecord,
    KIND_RUN: ServerRunRecord,
}
_REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    KIND_RELEASE: {
        "run_id": (str,),
        "round": (int,),
        "stage": (str,),
        "app_digest": (str,),
        "data_fingerprint": (str,),
        "global_model_digest": (str,),
        "sent_digest": (str,),
        "dp": (dict, type(None)),
        "epsilon_after": (int, float, type(None)),
    },
    KIND_REFUSAL: {"run_id": (str,), "round": (int,), "reason": (str,), "kind": (str,)},
    KIND_UNMASK: {"run_id": (str,), "round": (int,), "survivors": (list,), "dropped": (list,)},
    KIND_BUDGET: {"dataset_id": (str,), "budget": (int, float), "previous": (int, float, type(None)), "reason": (str,)},
    KIND_ROUND: {
        "run_id": (str,),
        "round": (int,),
        "strategy": (str,),
        "sampled": (list,),
        "responded": (list,),
        "failed": (dict,),
        "refused": (dict,),
        "aggregate_digest": (str,),
    },
    KIND_RUN: {"run_id": (str,), "settings": (dict,)},
}
_DP_FIELDS: dict[str, tuple[type, ...]] = {
    "noise_multiplier": (int, float),
    "sample_rate": (int, float),
    "steps": (int,),
    "delta": (int, float),
}


def schema_problems(kind: str, body: Any) -> list[str]:
    """What is wrong with ``body`` as a record of ``kind`` (empty when it is well formed)."""
    if kind not in _REQUIRED:
        return [f"unknown record kind {kind!r}"]
    if not isinstance(body, dict):
        return [f"{kind} body is not an object"]
    problems = []
    for name, types in _REQUIRED[kind].items():
        if name not in body:
            problems.append(f"{kind} body lacks {name!r}")
        elif not isinstance(body[name], types) or (isinstance(body[name], bool) and bool not in types):
            problems.append(f"{kind} body field {name!r} has type {type(body[name]).__name__}")
    if kind == KIND_RELEASE and not problems:
        if body["stage"] not in STAGES:
            problems.append(f"release stage {body['stage']!r} is not one of {', '.join(STAGES)}")
        dp = body["dp"]
        if dp is not None:
            for name, types in _DP_FIELDS.items():
                if not isinstance(dp.get(name), types) or isinstance(dp.get(name), bool):
                    problems.append(f"release dp.{name} missing or not a number")
            if not problems and (
                dp["steps"] < 0
                or not 0 <= dp["sample_rate"] <= 1
                or not 0 < dp["delta"] < 1
                or dp["noise_multiplier"] < 0
            ):
                problems.append("release dp parameters out of range")
            if not problems and body["epsilon_after"] is None:
                problems.append("release has dp parameters but no epsilon_after")
        secagg = body.get("secagg")
        if secagg is not None and (not isinstance(secagg, dict) or secagg.get("role") not in ("masked", "plain")):
            problems.append("release secagg.role must be 'masked' or 'plain'")
    return problems


def _as_body(record: Mapping[str, Any] | Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.asdict(record)
    if isinstance(record, Mapping):
        return dict(record)
    raise AuditLogError(f"an audit record must be a dict or a record dataclass, not {type(record).__name__}")


# ---- the log --------------------------------------------------------------------------------------
class AuditLog:
    """One actor's append-only log file; the file is the only state (safe across processes)."""

    def __init__(self, path: str | Path, key: Ed25519PrivateKey, actor: str) -> None:
        self.path = Path(path)
        self.key = key
        self.actor = str(actor)
        self.pubkey_hex = public_key_bytes(key).hex()
        self.key_existed_before = True  # set by whoever created the key with the log (see client.audit_trail)

    def append(self, kind: str, record: Mapping[str, Any] | Any) -> dict[str, Any]:
        """Sign and append one record of ``kind``; returns the full line written (as a dict).

        Raises ``AuditLogError`` when the record is malformed, or when the file's last line does
        not verify (torn write, edited, foreign key or actor): the log is then left untouched.
        """
        try:
            body = json.loads(canonical_json(_as_body(record)))  # numpy scalars etc. -> plain JSON
        except (TypeError, ValueError) as exc:
            raise AuditLogError(f"refusing to log a {kind} record that is not plain JSON ({exc})") from None
        if kind in _REQUIRED and (problems := schema_problems(kind, body)):
            raise AuditLogError(f"refusing to log a malformed {kind} record: {'; '.join(problems)}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditLogError(
                f"cannot open the audit log {self.path}: {exc.strerror}", "point the audit log at a writable folder"
            ) from None
        try:
            with _flocked(fd):
                seq, prev = self._tail(fd)
                line = {
                    "seq": seq,
                    "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                    "actor": self.actor,
                    "kind": str(kind),
                    "prev": prev,
                    "body": body,
                    "pubkey": self.pubkey_hex,
                }
                line["sig"] = sign(self.key, canonical_json(line)).hex()
                _write_all(fd, canonical_json(line) + b"\n")
                os.fsync(fd)
        finally:
            os.close(fd)
        if seq == 0:
            _fsync_dir(self.path.parent)
        return json.loads(canonical_json(line))

    def _tail(self, fd: int) -> tuple[int, str]:
        """(next seq, prev hash), after checking the last line verifies and is ours."""
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, GENESIS
        raw = _last_line(fd, size)
        last: Any = None
        problem: str | None
        if raw is None:
            problem = "it is incomplete (no final newline: a torn write?)"
        else:
            try:
                last = json.loads(raw.decode("utf-8"))
                problem = last_line_problem(last, raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                problem = "it is not valid JSON"
        if problem is None and last["pubkey"] != self.pubkey_hex:
            problem = "it was signed by another key"
        if problem is None and last["actor"] != self.actor:
            problem = f"it belongs to actor {last['actor']!r}, not {self.actor!r}"
        if problem is not None:
            raise AuditLogError(
                f"refusing to append to audit log {self.path}: its last line ({_count_lines(fd, size)}) "
                f"does not verify: {problem}",
                "an auditor must inspect it (`fedcare audit verify`); start a new log file, never repair this one",
            )
        return int(last["seq"]) + 1, line_hash(cast(bytes, raw))  # a line: problem is None

    # Convenience wrappers, one per kind.
    def release(self, record: ReleaseRecord | Mapping[str, Any]) -> dict[str, Any]:
        return self.append(KIND_RELEASE, record)

    def refusal(self, record: RefusalRecord | Mapping[str, Any]) -> dict[str, Any]:
        return self.append(KIND_REFUSAL, record)

    def unmask(self, record: UnmaskRecord | Mapping[str, Any]) -> dict[str, Any]:
        return self.append(KIND_UNMASK, record)

    def budget(self, record: BudgetRecord | Mapping[str, Any]) -> dict[str, Any]:
        return self.append(KIND_BUDGET, record)

    def read_verified(self) -> list[dict[str, Any]]:
        """Every line of this log, after checking the whole chain; raises ``AuditLogError`` on any break.

        The hash links from the first line to the last plus the last line's signature authenticate
        every earlier line (each line's ``prev`` is the hash of the one before), so one signature
        check covers the file. Every line must carry this log's key and actor.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise AuditLogError(f"cannot read the audit log {self.path}: {exc.strerror}") from None
        if data and not data.endswith(b"\n"):
            raise AuditLogError(
                f"audit log {self.path} ends in an incomplete line (a torn write?)",
                "an auditor must inspect it (`fedcare audit verify`)",
            )
        lines, prev = [], GENESIS
        raws = data.split(b"\n")[:-1] if data else []
        for number, raw in enumerate(raws, start=1):
            try:
                line = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                line = None
            problem = None
            if not isinstance(line, dict) or set(line) != set(LINE_FIELDS):
                problem = "it is not a log record"
            elif line["prev"] != prev or line["seq"] != number - 1:
                problem = "it does not chain to the line before (a record was deleted, inserted or edited)"
            elif line["pubkey"] != self.pubkey_hex or line["actor"] != self.actor:
                problem = "it was written by another key or actor"
            elif number == len(raws):
                problem = last_line_problem(line, raw)
            if problem is not None:
                raise AuditLogError(
                    f"audit log {self.path} line {number} does not verify: {problem}",
                    "an auditor must inspect it (`fedcare audit verify`); never repair it by hand",
                )
            lines.append(line)
            prev = line_hash(raw)
        return lines

    def round(self, record: ServerRoundRecord | Mapping[str, Any]) -> dict[str, Any]:
        return self.append(KIND_ROUND, record)

    def run(self, record: ServerRunRecord | Mapping[str, Any]) -> dict[str, Any]:
        return self.append(KIND_RUN, record)


def last_line_problem(line: Any, raw: bytes) -> str | None:
    """Why one parsed line does not stand on its own (fields, canonical form, signature), or None."""
    if not isinstance(line, dict) or set(line) != set(LINE_FIELDS):
        return "it does not have exactly the fields " + ", ".join(LINE_FIELDS)
    try:
        canonical = canonical_json(line)
    except (TypeError, ValueError):
        return "it is not canonical JSON"
    if canonical != raw:
        return "it is not in canonical form (edited after signing)"
    if not isinstance(line["seq"], int) or isinstance(line["seq"], bool) or line["seq"] < 0:
        return "its seq is not a non-negative integer"
    try:
        pub, sig = bytes.fromhex(line["pubkey"]), bytes.fromhex(line["sig"])
    except (TypeError, ValueError):
        return "its pubkey or sig is not hex"
    unsigned = {k: v for k, v in line.items() if k != "sig"}
    if not verify_signature(pub, canonical_json(unsigned), sig):
        return "its signature does not verify"
    return None


@contextlib.contextmanager
def _flocked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _last_line(fd: int, size: int) -> bytes | None:
    """The bytes of the last line (no newline), or None when the file does not end in a newline."""
    if os.pread(fd, 1, size - 1) != b"\n":
        return None
    pos, buf = size - 1, b""  # buf holds bytes [pos, size - 1): the last line grows leftwards
    while pos > 0:
        start = max(0, pos - 65536)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        cut = buf.rfind(b"\n")
        if cut != -1:
            return buf[cut + 1 :]
    return buf


def _count_lines(fd: int, size: int) -> int:
    count, offset = 0, 0
    while offset < size:
        block = os.pread(fd, min(1 << 20, size - offset), offset)
        count += block.count(b"\n")
        offset += len(block)
    return count if os.pread(fd, 1, size - 1) == b"\n" else count + 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
