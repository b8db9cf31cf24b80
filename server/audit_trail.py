"""The coordinator's signed, hash-chained audit log: the run's settings and one record per round.

``<output-dir>/audit/server.jsonl``, signed with the coordinator's Ed25519 key kept beside it.
An auditor cross-checks it against the hospitals' logs with ``fedcare audit verify``: who was
asked, who answered, which model every hospital trained on, and what the aggregate became.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from audit.audit_log import AuditLog, ServerRoundRecord, ServerRunRecord, digest_arrays
from audit.signing import load_or_create_key


def open_log(output_dir: str | Path) -> AuditLog:
    folder = Path(output_dir) / "audit"
    return AuditLog(folder / "server.jsonl", load_or_create_key(folder / "server-signing-key.pem"), actor="server")


def run_started(log: AuditLog, run_id: Any, settings: dict[str, Any], initial_arrays: Any) -> None:
    log.run(ServerRunRecord(run_id=str(run_id), settings=settings, initial_model_digest=digest_arrays(initial_arrays)))


def round_done(
    log: AuditLog,
    *,
    run_id: Any,
    round_: int,
    strategy: str,
    sampled: list[str],
    responded: list[str],
    failed: dict[str, str],
    refused: dict[str, str],
    arrays: Any,
    secagg: dict[str, Any] | None,
    received: dict[str, Any],
    checkpoint: str = "",
) -> None:
    log.round(
        ServerRoundRecord(
            run_id=str(run_id),
            round=round_,
            strategy=strategy,
            sampled=sorted(sampled),
            responded=sorted(responded),
            failed=dict(failed),
            refused=dict(refused),
            aggregate_digest=digest_arrays(arrays),
            secagg=secagg,
            checkpoint_digest=checkpoint,
            received_digests={name: digest_arrays(a) for name, a in received.items()},
        )
    )
