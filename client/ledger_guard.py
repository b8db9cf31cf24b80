"""Before every release: the hospital's privacy ledger must agree with its signed audit chain.

A ledger is a JSON file on the hospital's disk; deleting it, restoring an older copy or raising
its budget by hand would reset what the hospital may still spend. The audit log next to it is
hash-chained and signed with the hospital's own key, and records every release (with its
epsilon) and every budget the hospital set. So before any training or statistics answer the
node checks, for the dataset it is about to release from:

- a ledger exists exactly when the chain has records of that dataset (a missing ledger beside a
  chain that records releases, or a ledger the chain never saw, means no release);
- the ledger holds at least the charged releases and the epsilon the chain records (a rolled-back
  ledger has less);
- neither the ledger's budget nor the hospital's configured budget exceeds the last signed
  ``budget`` record: raising a budget takes the explicit ``fedcare node budget`` command, which
  writes that record (lowering one in hospital.toml needs nothing);
- an audit signing key without its log means the log was removed: no release.

Every refusal says what is wrong and what to do. It is raised as ``LedgerTampered``, which the
ClientApp reports like any refusal (nothing is released).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from audit.audit_log import KIND_BUDGET, KIND_RELEASE, AuditLog, AuditLogError, BudgetRecord
from client.privacy_ledger import PrivacyLedger
from fedcare.errors import FedcareError

_TOLERANCE = 1e-9


class LedgerTampered(FedcareError):
    """The privacy ledger disagrees with the signed audit chain: no release until that is resolved."""


@dataclass(frozen=True)
class ChainView:
    """What the signed audit chain records about one dataset."""

    records: int = 0  # records of any kind naming this dataset
    charged: int = 0  # releases that cost privacy
    epsilon: float = 0.0  # the largest epsilon_after released
    budget: float | None = None  # the last signed budget


def chain_view(log: AuditLog, dataset_id: str) -> ChainView:
    """Read and verify the whole chain, and summarise what it says about ``dataset_id``."""
    try:
        lines = log.read_verified()
    except AuditLogError as exc:
        raise LedgerTampered(exc.problem, exc.hint) from None
    if not lines and log.key_existed_before:
        raise LedgerTampered(
            f"the audit log {log.path} is missing but its signing key exists: "
            "the record of what this hospital released was removed",
            "restore the audit log from backup; no data is released until then",
        )
    records = charged = 0
    epsilon, budget = 0.0, None
    for line in lines:
        body = line["body"]
        if body.get("dataset_id") != dataset_id:
            continue
        records += 1
        if line["kind"] == KIND_BUDGET:
            budget = float(body["budget"])
        elif line["kind"] == KIND_RELEASE and body.get("dp") and int(body["dp"]["steps"]) > 0:
            charged += 1
            epsilon = max(epsilon, float(body["epsilon_after"]))
    return ChainView(records, charged, epsilon, budget)


def open_checked_ledger(
    log: AuditLog, ledger_dir: str, hospital: str, dataset_id: str, budget: float, delta: float
) -> PrivacyLedger:
    """The dataset's ledger, opened with the hospital's configured ``budget`` once it agrees with the chain."""
    chain = chain_view(log, dataset_id)
    stored = PrivacyLedger.peek(ledger_dir, dataset_id)
    where = f"the privacy ledger of {dataset_id!r} in {ledger_dir}"
    restore = (
        "restore it from backup (it must hold every release the audit log records); no data is released until then"
    )
    # A ledger without charged releases loses nothing when it is missing (or appears without a chain
    # record: a node stopped between creating it and signing its first budget record).
    if stored is None and chain.charged:
        raise LedgerTampered(
            f"{where} is missing, but the signed audit log {log.path} records {chain.charged} release(s) on it", restore
        )
    if stored is not None and not chain.records and PrivacyLedger.charged_in(stored):
        raise LedgerTampered(
            f"{where} exists, but the signed audit log {log.path} has no record of it "
            "(the ledger was copied in, or the audit log was replaced)",
            "restore the audit log that belongs to this ledger",
        )
    signed = chain.budget
    if stored is not None and signed is not None and float(stored["budget"]) > signed + _TOLERANCE:
        raise LedgerTampered(
            f"{where} sets budget {float(stored['budget']):g}, above the {signed:g} "
            "last signed in the audit log (edited by hand)",
            f"restore the ledger, or raise the budget with `fedcare node budget ... --to "
            f"{float(stored['budget']):g}` (a signed record)",
        )
    if signed is not None and budget > signed + _TOLERANCE:
        raise LedgerTampered(
            f"{hospital}: the configured epsilon-budget {budget:g} for {dataset_id!r} is above "
            f"the {signed:g} last signed in its audit log",
            f"record the raise explicitly: `fedcare node budget --config hospital.toml --to {budget:g} "
            "--reason '...'` (or lower epsilon-budget back)",
        )
    ledger = PrivacyLedger.open(ledger_dir, hospital, dataset_id, budget=budget, delta=delta)
    if signed is None:
        log.budget(BudgetRecord(dataset_id=dataset_id, budget=budget, previous=None, reason="initial"))
    if ledger.charged_releases() < chain.charged or ledger.epsilon() < chain.epsilon - _TOLERANCE:
        raise LedgerTampered(
            f"{where} holds {ledger.charged_releases()} charged release(s) and epsilon "
            f"{ledger.epsilon():.4g}, less than the {chain.charged} release(s) and epsilon "
            f"{chain.epsilon:.4g} its signed audit log records (rolled back)",
            restore,
        )
    return ledger


def raise_budget(
    log: AuditLog, ledger_dir: str, hospital: str, dataset_id: str, new_budget: float, reason: str
) -> float:
    """The hospital's explicit budget change: a signed ``budget`` record, then the ledger follows.

    Returns the previous signed budget. Checks the ledger against the chain first (a tampered
    ledger is not blessed by a raise).
    """
    if not reason.strip():
        raise FedcareError("a budget change needs a reason", "pass --reason 'who approved it and why'")
    chain = chain_view(log, dataset_id)
    if chain.budget is None:
        raise FedcareError(
            f"{dataset_id!r} has no privacy ledger yet",
            "set epsilon-budget in hospital.toml; the ledger starts with the first release",
        )
    if new_budget <= chain.budget:
        raise FedcareError(
            f"{new_budget:g} is not above the signed budget {chain.budget:g}",
            "a lower budget needs no record: lower epsilon-budget in hospital.toml",
        )
    ledger = open_checked_ledger(
        log,
        ledger_dir,
        hospital,
        dataset_id,
        chain.budget,
        cast(dict[str, Any], PrivacyLedger.peek(ledger_dir, dataset_id))["delta"],
    )
    log.budget(BudgetRecord(dataset_id=dataset_id, budget=new_budget, previous=chain.budget, reason=reason))
    PrivacyLedger.open(ledger_dir, hospital, dataset_id, budget=new_budget, delta=ledger.delta)
    return chain.budget
