"""fedcare.dp_accounting: the one RDP computation the ledger charges with and the verifier replays."""

from __future__ import annotations

import ast

from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from audit import verify
from client import privacy_ledger
from fedcare import dp_accounting
from fedcare.dp_accounting import ALPHAS, RdpComposition, epsilon_of
from tests.conftest import ROOT

DELTA = 1e-5
# A few (noise, sample rate) pairs, as real histories repeat them (and the per-step cache stays small).
_RELEASE = st.tuples(
    st.sampled_from([0.6, 0.9, 1.3, 4.0, 40.0]),
    st.sampled_from([1 / 7, 0.05, 0.3, 1.0]),
    st.integers(min_value=0, max_value=300),
)
_HISTORY = st.lists(_RELEASE, max_size=6)


def test_the_ledger_charges_with_the_shared_computation() -> None:
    assert privacy_ledger.epsilon_of is dp_accounting.epsilon_of
    assert privacy_ledger.ALPHAS is dp_accounting.ALPHAS


def test_the_verifier_never_imports_the_hospitals_ledger() -> None:
    """The auditor's tool replays epsilon with the pure accounting module, not client/privacy_ledger.py."""
    tree = ast.parse((ROOT / "audit" / "verify.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not [m for m in imported if m and m.partition(".")[0] == "client"]
    assert "fedcare.dp_accounting" in imported


@settings(max_examples=60, deadline=None, derandomize=True)
@given(_HISTORY)
def test_ledger_and_verifier_agree_on_every_history(history) -> None:
    """Bit for bit, zero-step releases (a statistics answer re-sent at no cost) included."""
    ledger = privacy_ledger.epsilon_of(history, DELTA)
    assert verify._epsilon(history, DELTA) == ledger
    running = RdpComposition()  # the verifier checks each release's epsilon_after in turn
    for i, (sigma, q, steps) in enumerate(history):
        running.add(sigma, q, steps)
        assert running.epsilon(DELTA) == privacy_ledger.epsilon_of(history[: i + 1], DELTA)
    if all(steps == 0 for _, _, steps in history):
        assert ledger == 0.0


@settings(max_examples=8, deadline=None, derandomize=True)  # Opacus recomputes every release
@given(_HISTORY.filter(lambda h: h and all(steps > 0 for _, _, steps in h)))
def test_epsilon_is_opacus_rdp_accountant_bit_for_bit(history) -> None:
    accountant = RDPAccountant()
    accountant.history = list(history)
    assert epsilon_of(history, DELTA) == accountant.get_epsilon(delta=DELTA, alphas=ALPHAS)


def test_an_empty_history_spends_nothing() -> None:
    empty = RdpComposition()
    assert empty.empty and empty.epsilon(DELTA) == 0.0 and not empty.rdp.any()
    assert len(empty.rdp) == len(ALPHAS)
