"""The auditor's side of fedcare: signed hash-chained release logs, offline verification,
an ethics-board datasheet, and an empirical membership-inference audit.

Nodes and the server append to their own ``AuditLog`` (one JSON line per event, Ed25519-signed,
each line chained to the previous by SHA-256); ``verify`` checks the chains, the signatures, the
node/server cross-references and every recorded epsilon against Opacus's RDP accountant.
Heavy imports (torch, matplotlib, opacus) happen only inside the functions that need them.
"""

from audit.audit_log import (
    KIND_REFUSAL,
    KIND_RELEASE,
    KIND_ROUND,
    KIND_RUN,
    KIND_UNMASK,
    AuditLog,
    AuditLogError,
    DPParams,
    RefusalRecord,
    ReleaseRecord,
    SecAggInfo,
    ServerRoundRecord,
    ServerRunRecord,
    UnmaskRecord,
    canonical_json,
    code_digest,
    digest_arrays,
)
from audit.signing import load_or_create_key, public_key_bytes, sign, verify_signature

__all__ = [
    "KIND_REFUSAL",
    "KIND_RELEASE",
    "KIND_ROUND",
    "KIND_RUN",
    "KIND_UNMASK",
    "AuditLog",
    "AuditLogError",
    "DPParams",
    "RefusalRecord",
    "ReleaseRecord",
    "SecAggInfo",
    "ServerRoundRecord",
    "ServerRunRecord",
    "UnmaskRecord",
    "canonical_json",
    "code_digest",
    "digest_arrays",
    "load_or_create_key",
    "public_key_bytes",
    "sign",
    "verify_signature",
]
