"""The hospital's signed, hash-chained audit log: one record per release, refusal and unmask.

It lives next to the privacy ledger (``<ledger-dir>/audit/<hospital>.jsonl``, signed with the
hospital's own Ed25519 key kept beside it), and every epsilon it records is the value the privacy
ledger has just returned, so the two agree by construction. Auditors verify it offline with
``fedcare audit verify``; nothing in it is patient data (digests, parameters, counts).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from audit.audit_log import (
    AuditLog,
    BudgetRecord,
    DPParams,
    RefusalRecord,
    ReleaseRecord,
    SecAggInfo,
    UnmaskRecord,
    code_digest,
    digest_arrays,
)
from audit.signing import load_or_create_key

APP_PACKAGES = ("client", "shared_models", "secure_aggregation", "fedcare")


@lru_cache(maxsize=1)
def app_digest() -> str:
    """Digest of the code that runs at the hospital (what the auditor can compare with a release)."""
    root = Path(__file__).resolve().parents[1]
    return code_digest(sorted(p for pkg in APP_PACKAGES for p in (root / pkg).rglob("*.py")))


def file_slug(name: str) -> str:
    """A hospital's name as a file-name part (what its audit log, key and kept models are named by)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "hospital"


def open_log(ledger_dir: str | Path, hospital: str) -> AuditLog:
    """The hospital's log; ``key_existed_before`` tells whether its signing key was already there
    (a key without a log means the log was removed: ``client/ledger_guard.py`` refuses then)."""
    folder = Path(ledger_dir) / "audit"
    key_path = folder / f"{file_slug(hospital)}-signing-key.pem"
    existed = key_path.exists()
    log = AuditLog(folder / f"{file_slug(hospital)}.jsonl", load_or_create_key(key_path), actor=hospital)
    log.key_existed_before = existed
    return log


def release(
    log: AuditLog,
    *,
    run_id: Any,
    round_: int,
    stage: str,
    data_fingerprint: str,
    global_arrays: Any,
    sent: Any,
    dp: DPParams | None,
    epsilon: float | None,
    secagg: SecAggInfo | None,
    dataset_id: str = "",
) -> None:
    log.release(
        ReleaseRecord(
            run_id=str(run_id),
            round=round_,
            stage=stage,
            app_digest=app_digest(),
            data_fingerprint=data_fingerprint,
            global_model_digest=digest_arrays(global_arrays) if global_arrays is not None else "",
            sent_digest=digest_arrays(sent),
            dp=dp,
            epsilon_after=epsilon,
            secagg=secagg,
            dataset_id=dataset_id,
        )
    )


def refusal(log: AuditLog, *, run_id: Any, round_: int, reason: str, kind: str) -> None:
    log.refusal(RefusalRecord(run_id=str(run_id), round=round_, reason=reason, kind=kind))


def unmask(log: AuditLog, *, run_id: Any, round_: int, survivors: list[int], dropped: list[int]) -> None:
    log.unmask(UnmaskRecord(run_id=str(run_id), round=round_, survivors=survivors, dropped=dropped))


__all__ = [
    "BudgetRecord",
    "DPParams",
    "SecAggInfo",
    "app_digest",
    "file_slug",
    "open_log",
    "refusal",
    "release",
    "unmask",
]
