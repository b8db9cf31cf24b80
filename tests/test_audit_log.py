"""`audit.signing` and `audit.audit_log`: keys, signed hash-chained appends, refusals, digests."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from audit.audit_log import (
    GENESIS,
    AuditLog,
    AuditLogError,
    DPParams,
    ReleaseRecord,
    SecAggInfo,
    canonical_json,
    code_digest,
    digest_arrays,
    line_hash,
)
from audit.signing import load_or_create_key, public_key_bytes, sign, verify_signature
from audit.verify import verify
from fedcare.errors import FedcareError

ROOT = Path(__file__).resolve().parents[1]


def _release(rnd: int = 1, eps: float | None = 0.5) -> ReleaseRecord:
    return ReleaseRecord(
        "7",
        rnd,
        "train",
        "a" * 64,
        "f" * 64,
        "b" * 64,
        "c" * 64,
        DPParams(1.1, 0.1, 10, 1.0, 1e-5) if eps is not None else None,
        eps,
        SecAggInfo("masked", [1, 2, 3], 2),
    )


def test_key_is_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit" / "node.pem"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_or_create_key(path)
    assert public_key_bytes(again) == public_key_bytes(key) and len(public_key_bytes(key)) == 32
    sig = sign(key, b"data")
    assert verify_signature(public_key_bytes(key), b"data", sig)
    assert not verify_signature(public_key_bytes(key), b"datA", sig)
    assert not verify_signature(b"short", b"data", sig)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(FedcareError, match="not a readable PEM"):
        load_or_create_key(bad)


def test_append_writes_a_signed_chained_canonical_line(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "k.pem")
    log = AuditLog(tmp_path / "node.jsonl", key, "Cleveland")
    first = log.release(_release(1))
    second = log.append("refusal", {"run_id": "7", "round": np.int64(2), "reason": "budget", "kind": "budget"})
    raw = (tmp_path / "node.jsonl").read_bytes().split(b"\n")
    assert raw[2] == b"" and len(raw) == 3
    assert raw[0] == canonical_json(first) and raw[1] == canonical_json(second)
    assert first["seq"] == 0 and first["prev"] == GENESIS and second["seq"] == 1
    assert second["prev"] == line_hash(raw[0])
    assert second["time"].endswith("+00:00") and second["body"]["round"] == 2
    assert first["body"]["dp"] == {
        "noise_multiplier": 1.1,
        "sample_rate": 0.1,
        "steps": 10,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
    }
    unsigned = {k: v for k, v in second.items() if k != "sig"}
    assert verify_signature(bytes.fromhex(second["pubkey"]), canonical_json(unsigned), bytes.fromhex(second["sig"]))
    assert stat.S_IMODE((tmp_path / "node.jsonl").stat().st_mode) == 0o600


def test_malformed_records_are_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "node.jsonl", load_or_create_key(tmp_path / "k.pem"), "A")
    with pytest.raises(AuditLogError, match="lacks 'sent_digest'"):
        log.append("release", {"run_id": "1", "round": 1})
    with pytest.raises(AuditLogError, match="not plain JSON"):
        log.release(_release(1, eps=math.nan))
    with pytest.raises(AuditLogError, match="stage"):
        log.append(
            "release", {**_release().__dict__, "stage": "weights", "dp": None, "epsilon_after": None, "secagg": None}
        )
    with pytest.raises(AuditLogError, match="mixes"):
        DPParams.from_entries([(1.0, 0.1, 3), (2.0, 0.1, 3)], 1.0, 1e-5)
    assert DPParams.from_entries([(1.0, 0.1, 3), (1.0, 0.1, 4)], 1.0, 1e-5).steps == 7
    assert not (tmp_path / "node.jsonl").exists() or (tmp_path / "node.jsonl").read_bytes() == b""


def test_refuses_to_extend_a_corrupt_or_foreign_log(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "k.pem")
    path = tmp_path / "node.jsonl"
    log = AuditLog(path, key, "A")
    for rnd in range(1, 4):
        log.release(_release(rnd, eps=None))  # no DP: this test is about the chain, not epsilon
    good = path.read_bytes()
    # edited last line
    path.write_bytes(good.replace(b'"round":3', b'"round":4'))
    with pytest.raises(AuditLogError, match=r"last line \(3\) does not verify: its signature"):
        log.release(_release(5))
    # torn write
    path.write_bytes(good[:-10])
    with pytest.raises(AuditLogError, match=r"\(3\) does not verify: it is incomplete"):
        log.release(_release(5))
    # someone else's key, or another actor with our key
    path.write_bytes(good)
    with pytest.raises(AuditLogError, match="another key"):
        AuditLog(path, load_or_create_key(tmp_path / "other.pem"), "A").release(_release(5))
    with pytest.raises(AuditLogError, match="belongs to actor 'A'"):
        AuditLog(path, key, "B").release(_release(5))
    assert path.read_bytes() == good  # every refusal left the log untouched
    log.release(_release(4, eps=None))
    assert verify([path]).ok


_CHILD = """
import sys
sys.path.insert(0, {root!r})
from audit.audit_log import AuditLog, RefusalRecord
from audit.signing import load_or_create_key
log = AuditLog({log!r}, load_or_create_key({key!r}), "Hungary")
for i in range(int(sys.argv[1])):
    log.refusal(RefusalRecord("9", int(sys.argv[2]) * 100 + i, "budget", "budget"))
"""


def test_concurrent_fresh_processes_keep_one_chain(tmp_path: Path) -> None:
    """Like a ClientApp started per message: the file is the only state, appends are locked."""
    log_path, key_path = tmp_path / "node.jsonl", tmp_path / "keys" / "node.pem"
    code = _CHILD.format(root=str(ROOT), log=str(log_path), key=str(key_path))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, "8", str(p)], env=env) for p in range(3)]
    assert [p.wait() for p in procs] == [0, 0, 0]
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [line["seq"] for line in lines] == list(range(24))
    assert sorted(line["body"]["round"] for line in lines) == sorted(p * 100 + i for p in range(3) for i in range(8))
    assert len({line["pubkey"] for line in lines}) == 1  # one key, created once under the lock
    report = verify([log_path])
    assert report.ok, [str(f) for f in report.findings]


def test_digest_arrays_is_order_free_and_strict() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)).astype(np.float32), np.arange(5, dtype=np.int64)
    d = digest_arrays({"w": a, "b": b})
    assert d == digest_arrays({"b": b, "w": a.copy()})
    assert d != digest_arrays({"w": a.astype(np.float64), "b": b})
    assert d != digest_arrays({"w": a.reshape(4, 3), "b": b})
    assert d != digest_arrays({"w2": a, "b": b})
    flipped = a.copy()
    flipped.view(np.uint8).reshape(-1)[5] ^= 1
    assert d != digest_arrays({"w": flipped, "b": b})
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord({"w": Array(a), "b": Array(b)})
    assert digest_arrays(record) == d  # the server's ArrayRecord and the node's arrays agree


def test_code_digest_tracks_source_only(tmp_path: Path) -> None:
    pkg = tmp_path / "client"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "app.py").write_text("x = 1\n")
    d = code_digest([pkg])
    (pkg / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    assert code_digest([pkg]) == d
    (pkg / "app.py").write_text("x = 2\n")
    assert code_digest([pkg]) != d
    assert len(code_digest([ROOT / "audit"])) == 64
