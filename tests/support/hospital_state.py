"""Test helper: a hospital's earlier spending, written the way a node writes it (ledger + signed audit chain)."""

from __future__ import annotations

from pathlib import Path

from client import audit_trail
from client.ledger_guard import open_checked_ledger
from client.privacy_ledger import PrivacyLedger


def spend(
    ledger_dir: Path,
    hospital: str,
    dataset_id: str,
    entries: list[tuple[float, float, int]],
    *,
    budget: float = 1.0,
    delta: float = 1e-4,
    run_id: str = "earlier-run",
    round_: int = 12,
    fingerprint: str = "f" * 64,
) -> PrivacyLedger:
    """Record a training release of ``entries`` in the hospital's ledger and audit log, as its node would."""
    log = audit_trail.open_log(ledger_dir, hospital)
    ledger = open_checked_ledger(log, str(ledger_dir), hospital, dataset_id, budget=budget, delta=delta)
    eps = ledger.record(run_id, round_, "train", entries, data_fingerprint=fingerprint)
    audit_trail.release(
        log,
        run_id=run_id,
        round_=round_,
        stage="train",
        data_fingerprint=fingerprint,
        global_arrays=None,
        sent={},
        dp=audit_trail.DPParams.from_entries(entries, 1.0, delta),
        epsilon=eps,
        secagg=None,
        dataset_id=dataset_id,
    )
    return ledger


def write_consortium(folder: Path, name: str) -> str:
    """identity.key for ``name`` and a roster.toml listing it (and one other member) in ``folder``;
    returns the hospital.toml section that points at them."""
    from secure_aggregation.identity import Roster, make_identity_key

    members = {
        name: make_identity_key(folder / "identity.key", force=True),
        "Other": make_identity_key(folder / "other.key", force=True),
    }
    (folder / "roster.toml").write_text(Roster.text(members))
    return f'[consortium]\nname = "{name}"\nroster = "roster.toml"\nidentity-key = "identity.key"\n'
