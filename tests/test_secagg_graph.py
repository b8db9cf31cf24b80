"""SecAgg+ communication graph: FCP's (k, t) finder reproduced row by row, checked against exact
big-integer tails and scipy.stats, and the seeded random Harary graph's structure."""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections import Counter
from fractions import Fraction
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import hypergeom

from secure_aggregation import graph
from secure_aggregation.errors import SecAggError
from secure_aggregation.graph import (
    GraphParameters,
    choose_graph,
    find_parameters,
    full_graph_threshold,
    neighbours,
    ring_order,
)

CURIOUS, SEMI, NONE = "CURIOUS_SERVER", "SEMI_MALICIOUS_SERVER", "NONE"

# google-parfait/federated-compute @ de83f70c3b352eedc805aa25d804afc3398031f8,
# fcp/secagg/server/graph_parameter_finder_test.cc, HararyGraphParameterFinderTest_Feasible, all
# rows in file order: (number of clients, adversarial rate, dropout rate, adversary class,
# expected degree = k, expected threshold). FCP checks EXPECT_EQ on k and EXPECT_LE on t.
FCP_FEASIBLE = [
    (100, 0.45, 0.45, CURIOUS, 92, 46),
    (1000, 0.45, 0.45, CURIOUS, 822, 417),
    (10000, 0.45, 0.45, CURIOUS, 3494, 1771),
    (100000, 0.45, 0.45, CURIOUS, 5508, 2788),
    (1000000, 0.45, 0.45, CURIOUS, 6240, 3156),
    (10, 0.33, 0.33, CURIOUS, 8, 4),
    (100, 0.33, 0.33, CURIOUS, 68, 34),
    (1000, 0.33, 0.33, CURIOUS, 286, 150),
    (10000, 0.33, 0.33, CURIOUS, 422, 221),
    (100000, 0.33, 0.33, CURIOUS, 480, 251),
    (1000000, 0.33, 0.33, CURIOUS, 518, 270),
    (100, 0.3, 0.3, SEMI, 92, 62),
    (1000, 0.3, 0.3, SEMI, 872, 584),
    (10000, 0.3, 0.3, SEMI, 4822, 3230),
    (100000, 0.3, 0.3, SEMI, 9388, 6286),
    (1000000, 0.3, 0.3, SEMI, 11136, 7454),
    (10, 0.05, 0.33, CURIOUS, 4, 2),
    (100, 0.05, 0.33, CURIOUS, 28, 6),
    (1000, 0.05, 0.33, CURIOUS, 72, 24),
    (10000, 0.05, 0.33, CURIOUS, 86, 29),
    (100000, 0.05, 0.33, CURIOUS, 96, 32),
    (1000000, 0.05, 0.33, CURIOUS, 102, 34),
    (10, 0.05, 0.33, SEMI, 8, 5),
    (100, 0.05, 0.33, SEMI, 72, 39),
    (1000, 0.05, 0.33, SEMI, 398, 223),
    (10000, 0.05, 0.33, SEMI, 746, 420),
    (100000, 0.05, 0.33, SEMI, 882, 496),
    (1000000, 0.05, 0.33, SEMI, 970, 545),
    (10, 0.33, 0.05, CURIOUS, 4, 4),
    (100, 0.33, 0.05, CURIOUS, 34, 29),
    (1000, 0.33, 0.05, CURIOUS, 78, 60),
    (10000, 0.33, 0.05, CURIOUS, 92, 70),
    (100000, 0.33, 0.05, CURIOUS, 102, 77),
    (1000000, 0.33, 0.05, CURIOUS, 110, 83),
    (10, 0.33, 0.05, SEMI, 4, 4),
    (100, 0.33, 0.05, SEMI, 42, 37),
    (1000, 0.33, 0.05, SEMI, 132, 109),
    (10000, 0.33, 0.05, SEMI, 178, 146),
    (100000, 0.33, 0.05, SEMI, 196, 160),
    (1000000, 0.33, 0.05, SEMI, 212, 173),
    (10, 0.05, 0.05, CURIOUS, 2, 2),
    (100, 0.05, 0.05, CURIOUS, 12, 6),
    (1000, 0.05, 0.05, CURIOUS, 30, 17),
    (10000, 0.05, 0.05, CURIOUS, 34, 20),
    (100000, 0.05, 0.05, CURIOUS, 36, 21),
    (1000000, 0.05, 0.05, CURIOUS, 38, 22),
    (10, 0.05, 0.05, SEMI, 2, 2),
    (100, 0.05, 0.05, SEMI, 16, 11),
    (1000, 0.05, 0.05, SEMI, 52, 37),
    (10000, 0.05, 0.05, SEMI, 62, 44),
    (100000, 0.05, 0.05, SEMI, 68, 48),
    (1000000, 0.05, 0.05, SEMI, 74, 52),
    (10, 0.33, 0.0, CURIOUS, 4, 4),
    (100, 0.33, 0.0, CURIOUS, 26, 25),
    (1000, 0.33, 0.0, CURIOUS, 38, 36),
    (10000, 0.33, 0.0, CURIOUS, 42, 40),
    (100000, 0.33, 0.0, CURIOUS, 46, 44),
    (1000000, 0.33, 0.0, CURIOUS, 50, 47),
    (10, 0.33, 0.0, SEMI, 4, 4),
    (100, 0.33, 0.0, SEMI, 26, 26),
    (1000, 0.33, 0.0, SEMI, 38, 37),
    (10000, 0.33, 0.0, SEMI, 42, 41),
    (100000, 0.33, 0.0, SEMI, 46, 45),
    (1000000, 0.33, 0.0, SEMI, 50, 49),
    (10, 0.0, 0.33, CURIOUS, 4, 2),
    (100, 0.0, 0.33, CURIOUS, 26, 2),
    (1000, 0.0, 0.33, CURIOUS, 38, 2),
    (10000, 0.0, 0.33, CURIOUS, 42, 2),
    (100000, 0.0, 0.33, CURIOUS, 46, 2),
    (1000000, 0.0, 0.33, CURIOUS, 50, 2),
    (10, 0.0, 0.33, NONE, 4, 2),
    (100, 0.0, 0.33, NONE, 26, 2),
    (1000, 0.0, 0.33, NONE, 38, 2),
    (10000, 0.0, 0.33, NONE, 42, 2),
    (100000, 0.0, 0.33, NONE, 46, 2),
    (1000000, 0.0, 0.33, NONE, 50, 2),
    (10, 0.0, 0.33, SEMI, 8, 5),
    (100, 0.0, 0.33, SEMI, 68, 35),
    (1000, 0.0, 0.33, SEMI, 228, 115),
    (10000, 0.0, 0.33, SEMI, 326, 164),
    (100000, 0.0, 0.33, SEMI, 372, 187),
    (1000000, 0.0, 0.33, SEMI, 410, 206),
    (10, 0.0, 0.0, CURIOUS, 2, 2),
    (100, 0.0, 0.0, CURIOUS, 2, 2),
    (1000, 0.0, 0.0, CURIOUS, 2, 2),
    (10000, 0.0, 0.0, CURIOUS, 2, 2),
    (100000, 0.0, 0.0, CURIOUS, 2, 2),
    (1000000, 0.0, 0.0, CURIOUS, 2, 2),
    (1000, 0.0, 0.0, NONE, 2, 2),
    (10000, 0.0, 0.0, NONE, 2, 2),
    (100000, 0.0, 0.0, NONE, 2, 2),
    (1000000, 0.0, 0.0, NONE, 2, 2),
    (10, 0.0, 0.0, SEMI, 2, 2),
    (100, 0.0, 0.0, SEMI, 2, 2),
    (1000, 0.0, 0.0, SEMI, 2, 2),
    (10000, 0.0, 0.0, SEMI, 2, 2),
    (100000, 0.0, 0.0, SEMI, 2, 2),
    (1000000, 0.0, 0.0, SEMI, 2, 2),
]

# Same file, HararyGraphParameterFinderTest_InvalidOrUnfeasible: FCP's finder fails on each.
FCP_INVALID = [(0, 0.1, 0.1, CURIOUS), (1000, 0.1, 1.0, CURIOUS), (1000, 0.1, -1.0, CURIOUS)]
FCP_INFEASIBLE = [(1000, 0.5, 0.5, CURIOUS), (1000, 0.5, 0.5, SEMI), (1000, 0.33, 0.33, SEMI), (1000, 0.5, 0.5, NONE)]


def _semi(adversary_class: str) -> bool:
    # FCP's NONE class requires adversarial rate 0 and otherwise runs the CURIOUS_SERVER path.
    return adversary_class == SEMI


@cache
def _found(n: int, gamma: float, delta: float, semi: bool) -> GraphParameters | None:
    return find_parameters(n, gamma, delta, semi)


def _row_id(row: tuple) -> str:
    return f"{row[0]}-{row[1]}-{row[2]}-{row[3].lower()}"


# ---- FCP's table ------------------------------------------------------------------------------


def test_the_table_is_fcps_whole_feasible_suite() -> None:
    assert len(FCP_FEASIBLE) == 98
    assert len(set(FCP_FEASIBLE)) == 98


@pytest.mark.parametrize("row", FCP_FEASIBLE, ids=_row_id)
def test_finder_matches_fcp_test_values(row: tuple) -> None:
    """FCP's ComputesParametersThatMatchPrecomputedValues: k equal, t <= FCP's value."""
    n, gamma, delta, adversary_class, k, t = row
    params = _found(n, gamma, delta, _semi(adversary_class))
    assert params is not None
    assert params.k == k
    assert params.t <= t


def test_finder_reproduces_fcps_thresholds_exactly() -> None:
    """Stronger than FCP's own check: the port gives FCP's t too, on every row."""
    got = {row: tuple(_found(*row[:3], _semi(row[3]))) for row in FCP_FEASIBLE}
    assert [row for row in FCP_FEASIBLE if got[row] != row[4:]] == []


def _div(a: float, b: float) -> float:
    return a / b if b else math.inf  # C++ double division by zero


@pytest.mark.parametrize("row", FCP_FEASIBLE, ids=_row_id)
def test_finder_is_within_fcps_analytic_range(row: tuple) -> None:
    """FCP's ComputesParametersWithinExpectedRange, term for term (including its integer
    division n / (n - 1) and its switch-off of the lower bound for n < 20, b/260400215)."""
    n, gamma, delta, adversary_class, _, _ = row
    params = _found(n, gamma, delta, _semi(adversary_class))
    assert params is not None
    degree, threshold = params.k, params.t
    security, correctness = 40, 20
    unconstrained = gamma == 0 and delta == 0
    lower = 1 if unconstrained or n < 20 else math.log(n) + security * math.log(2) / 5.0
    beta = threshold / degree
    alpha = n // (n - 1)
    a = math.log(n) + correctness * math.log(2)
    b = 2 * (alpha * (1 - delta) - beta) ** 2
    c = min(2 * (beta - alpha * gamma) ** 2, -math.log(gamma + delta) if gamma + delta else math.inf)
    upper = 3 if unconstrained else max(_div(lower, c) + 1, _div(a, b))
    if adversary_class == SEMI:
        upper += upper * 1.0 / 5
    assert lower < degree < upper
    assert degree >= threshold > 0


@pytest.mark.parametrize("n, gamma, delta, adversary_class", FCP_INVALID)
def test_finder_rejects_fcps_invalid_inputs(n: int, gamma: float, delta: float, adversary_class: str) -> None:
    with pytest.raises(SecAggError):
        find_parameters(n, gamma, delta, _semi(adversary_class))


@pytest.mark.parametrize("n, gamma, delta, adversary_class", FCP_INFEASIBLE)
def test_finder_fails_on_fcps_infeasible_instances(n: int, gamma: float, delta: float, adversary_class: str) -> None:
    assert find_parameters(n, gamma, delta, _semi(adversary_class)) is None


def test_finder_input_checks() -> None:
    for bad in (-1, 0, 1.5, True, "10"):
        with pytest.raises(SecAggError):
            find_parameters(bad, 0.05, 0.05)  # type: ignore[arg-type]
    for rate in (-0.01, 1.0, math.nan):
        with pytest.raises(SecAggError):
            find_parameters(100, rate, 0.05)
        with pytest.raises(SecAggError):
            find_parameters(100, 0.05, rate)
    assert find_parameters(graph.MAX_CLIENTS + 1, 0.05, 0.05) is None  # FCP refuses > 1M
    assert find_parameters(1, 0.0, 0.0) is None and find_parameters(2, 0.0, 0.0) is None
    assert find_parameters(3, 0.0, 0.0) is None  # no even k < n - 1
    assert tuple(find_parameters(4, 0.0, 0.0)) == (2, 2)


def test_parameters_unpack_as_k_t() -> None:
    params = find_parameters(1000, 0.05, 0.05)
    assert params is not None
    k, t = params
    assert (k, t) == (52, 37) and params.degree == 53 and params.kind == "harary"
    assert not params.is_complete and params.n == 1000 and params.min_clients_to_proceed == 950


# ---- the quantiles against exact arithmetic and scipy.stats -----------------------------------


def _exact_pmf_numerators(total: int, marked: int, sampled: int) -> tuple[dict[int, int], int]:
    lo, hi = max(0, sampled - (total - marked)), min(marked, sampled)
    return (
        {x: math.comb(marked, x) * math.comb(total - marked, sampled - x) for x in range(lo, hi + 1)},
        math.comb(total, sampled),
    )


def _exact_upper(total: int, marked: int, sampled: int, q: float) -> int:
    """min{x : P[X > x] < q}, in exact rationals (q taken as the exact value of the float)."""
    weights, denominator = _exact_pmf_numerators(total, marked, sampled)
    qf = Fraction(q)
    tail = 0  # numerator of P[X > x], x going down from the top of the support
    for x in range(max(weights), min(weights) - 2, -1):
        if Fraction(tail, denominator) >= qf:
            return x + 1
        tail += weights.get(x, 0)
    raise AssertionError("P[X > lo - 1] = 1 >= q")


def _exact_lower(total: int, marked: int, sampled: int, q: float) -> int:
    """min{x : P[X <= x] >= q}, exactly."""
    weights, denominator = _exact_pmf_numerators(total, marked, sampled)
    qf = Fraction(q)
    head = 0
    for x in range(min(weights), max(weights) + 1):
        head += weights[x]
        if Fraction(head, denominator) >= qf:
            return x
    raise AssertionError("the cdf reaches 1")


@st.composite
def _distribution(draw: st.DrawFn, max_total: int) -> tuple[int, int, int]:
    total = draw(st.integers(1, max_total))
    return total, draw(st.integers(0, total)), draw(st.integers(0, total))


@settings(max_examples=300, deadline=None)
@given(_distribution(1500), st.sampled_from([41, 20, 30, 60]))
def test_quantiles_equal_exact_big_integer_tails(dist: tuple[int, int, int], bits: int) -> None:
    total, marked, sampled = dist
    q = math.pow(2, -bits) / total
    assert graph._upper_quantile(total, marked, sampled, q) == _exact_upper(total, marked, sampled, q)
    assert graph._lower_quantile(total, marked, sampled, q) == _exact_lower(total, marked, sampled, q)


@settings(max_examples=150, deadline=None)
@given(_distribution(1_000_000), st.sampled_from([41, 20]))
def test_quantiles_agree_with_scipy_stats(dist: tuple[int, int, int], bits: int) -> None:
    """Large populations: the tails at the returned quantiles, evaluated by scipy.stats (Boost),
    straddle q (up to a 1e-9 relative tolerance for the two libraries' rounding)."""
    total, marked, sampled = dist
    sampled = min(sampled, 20_000)
    q = math.pow(2, -bits) / total
    t1 = graph._upper_quantile(total, marked, sampled, q)
    assert hypergeom.sf(t1, total, marked, sampled) < q * (1 + 1e-9)
    assert hypergeom.sf(t1 - 1, total, marked, sampled) >= q * (1 - 1e-9)
    t2 = graph._lower_quantile(total, marked, sampled, q)
    assert hypergeom.cdf(t2, total, marked, sampled) >= q * (1 - 1e-9)
    assert hypergeom.cdf(t2 - 1, total, marked, sampled) < q * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(_distribution(1_000_000), st.data())
def test_log_pmf_agrees_with_scipy_stats(dist: tuple[int, int, int], data: st.DataObject) -> None:
    total, marked, sampled = dist
    lo, hi = max(0, sampled - (total - marked)), min(marked, sampled)
    x = data.draw(st.integers(lo, hi))
    expected = float(hypergeom.logpmf(x, total, marked, sampled))
    assert graph._log_pmf(total, marked, sampled, x) == pytest.approx(expected, rel=1e-9, abs=1e-6)
    end = min(hi, x + 50)
    window = graph._pmf_window(total, marked, sampled, x, end)
    reference = hypergeom.logpmf(np.arange(x, end + 1), total, marked, sampled)
    shown = reference > -700  # both libraries underflow differently near 1e-308
    assert np.allclose(np.log(window[shown]), reference[shown], rtol=1e-9, atol=1e-7)


# ---- the whole finder against an exact re-derivation ------------------------------------------


def _reference_find(n: int, gamma: float, delta: float, semi: bool) -> tuple[int, int] | None:
    """FCP's ComputeDegreeAndThreshold written out again, with exact rational quantiles."""
    if gamma + (2 * delta if semi else delta) > 0.9:
        return None
    adversarial = math.floor((gamma + 1e-14) * n)
    bad = adversarial + math.floor((delta + 1e-14) * n)
    surviving = math.ceil((1 - delta - 1e-14) * n)
    for k in range(2, n - 1, 2):
        if k <= bad:
            log_p = (
                math.log(n)
                + math.log(n - k - 1)
                - math.log(2)
                + math.lgamma(bad + 1)
                + math.lgamma(n - k + 1)
                - math.lgamma(n + 1)
                - math.lgamma(bad - k + 1)
            )
            if log_p >= -41 * math.log(2):
                continue
        t1 = _exact_upper(n, adversarial, k, math.pow(2, -41) / n)
        t2 = _exact_lower(n, surviving, k, math.pow(2, -20) / n)
        if semi:
            t1 = math.ceil((t1 + k - 1.25) / 2)
        if t2 > t1:
            return k, max(t1 + 1, 2)
    return None


@pytest.mark.parametrize("row", [r for r in FCP_FEASIBLE if r[0] <= 1000 and r[4] <= 400], ids=_row_id)
def test_exact_reference_reproduces_fcp_rows(row: tuple) -> None:
    """The exact re-derivation gives FCP's (k, t) too (rows with k <= 400, for speed; the two
    larger n = 1000 rows, k = 822 and 872, also match but take seconds in big integers)."""
    n, gamma, delta, adversary_class, k, t = row
    assert _reference_find(n, gamma, delta, _semi(adversary_class)) == (k, t)


RATES = [0.0, 0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.33, 0.4, 0.45]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 160), st.sampled_from(RATES), st.sampled_from(RATES), st.booleans())
def test_finder_equals_exact_reference(n: int, gamma: float, delta: float, semi: bool) -> None:
    params = find_parameters(n, gamma, delta, semi)
    assert (None if params is None else tuple(params)) == _reference_find(n, gamma, delta, semi)


@settings(max_examples=150, deadline=None)
@given(st.integers(3, 2000), st.sampled_from(RATES), st.sampled_from(RATES), st.booleans())
def test_finder_result_is_well_formed_and_meets_its_bounds(n: int, gamma: float, delta: float, semi: bool) -> None:
    params = find_parameters(n, gamma, delta, semi)
    if params is None:
        return
    k, t = params
    assert k % 2 == 0 and 2 <= k < n - 1 and 2 <= t <= k and params.kind == "harary"
    adversarial = math.floor((gamma + 1e-14) * n)
    surviving = math.ceil((1 - delta - 1e-14) * n)
    q_security, q_correct = math.pow(2, -41) / n, math.pow(2, -20) / n
    # t - 1 surviving neighbours or fewer (reconstruction fails): probability < 2**-20 / n, for
    # t = t1 + 1. FCP then raises t to 2 (its Shamir code needs t >= 2) without re-checking, so
    # when t1 = 0 and t2 = 1 the bound holds for 1, not 2 (e.g. n = 399, gamma = 0, delta = 0.01,
    # curious: k = 4, t = 2, P[fewer than 2 of 4 neighbours survive] ~ 4e-7 > 2**-20 / 399).
    assert hypergeom.cdf(t - 1 if t > 2 else 0, n, surviving, k) < q_correct * (1 + 1e-9)
    # Adversarial neighbours reaching t (curious) or 2t - k (semi-malicious): < 2**-41 / n.
    needed = 2 * t - k if semi else t
    assert hypergeom.sf(needed - 1, n, adversarial, k) < q_security * (1 + 1e-9)


# ---- monotonicity -----------------------------------------------------------------------------


def _k(n: int, gamma: float, delta: float, semi: bool = True, **kw: int) -> int | None:
    params = find_parameters(n, gamma, delta, semi, **kw)
    return None if params is None else params.k


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 3000), st.sampled_from(RATES), st.sampled_from(RATES), st.sampled_from(RATES), st.booleans())
def test_more_adversaries_or_dropouts_never_need_fewer_neighbours(
    n: int, r1: float, r2: float, other: float, semi: bool
) -> None:
    """Feasibility at each k is monotone in both rates (more bad nodes: a larger disconnection
    bound, a stochastically larger adversarial count, a smaller surviving count), so the first
    feasible k is too, and an instance infeasible at a rate stays infeasible above it."""
    low, high = sorted((r1, r2))
    for k_low, k_high in (
        (_k(n, low, other, semi), _k(n, high, other, semi)),
        (_k(n, other, low, semi), _k(n, other, high, semi)),
    ):
        if k_high is not None:
            assert k_low is not None and k_low <= k_high


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 3000), st.sampled_from(RATES), st.sampled_from(RATES))
def test_semi_malicious_never_needs_fewer_neighbours_than_curious(n: int, gamma: float, delta: float) -> None:
    semi, curious = _k(n, gamma, delta, True), _k(n, gamma, delta, False)
    if semi is not None:
        assert curious is not None and curious <= semi


@pytest.mark.parametrize(
    "n, gamma, delta", [(100, 0.05, 0.05), (1000, 0.05, 0.05), (1000, 0.1, 0.1), (1000, 0.2, 0.1), (10_000, 0.05, 0.05)]
)
def test_stronger_guarantees_never_need_fewer_neighbours(n: int, gamma: float, delta: float) -> None:
    by_security = [_k(n, gamma, delta, security=s) for s in (20, 30, 40, 60, 80)]
    by_correctness = [_k(n, gamma, delta, correctness=c) for c in (10, 20, 30, 40)]
    for ks in (by_security, by_correctness):
        assert None not in ks and ks == sorted(ks)
    assert _k(n, gamma, delta) == _k(n, gamma, delta, security=40, correctness=20)


def test_sparse_graph_saves_most_at_low_rates() -> None:
    """The 10**4-client example of Bell et al.: each client talks to a few percent of the others."""
    k = _k(10_000, 0.05, 0.05)
    assert k is not None and k / 10_000 < 0.03


# ---- complete graph ---------------------------------------------------------------------------


def test_full_graph_check_matches_fcps_test() -> None:
    """FCP FullGraphCeckParamsTest: n = 60, gamma = 0.05, delta = 0.3, curious: thresholds
    42..59 accepted, 0..41 refused; FCP's threshold is max(caller, ceil(n (1 - delta))) = 42."""
    for t in range(42, 60):
        assert graph._full_graph_problem(60, t, 0.05, 0.3, semi_malicious=False) is None
    for t in range(0, 42):
        assert graph._full_graph_problem(60, t, 0.05, 0.3, semi_malicious=False) is not None
    for caller in range(0, 61):
        assert full_graph_threshold(60, 0.05, 0.3, False, caller) == max(caller, 42)


def test_semi_malicious_full_graph_needs_more_than_half_plus_adversaries() -> None:
    # n = 1000, gamma = delta = 0.33: FCP's finder refuses (gamma + 2 delta > 0.9); complete graph
    # with t = ceil(0.67 n) = 670 > ceil((1000 + 330) / 2) = 665.
    assert full_graph_threshold(1000, 0.33, 0.33) == 670
    # with delta = 0.4, ceil((1 - delta) n) = 600 lets the semi-malicious bound decide:
    assert graph._full_graph_problem(1000, 665, 0.33, 0.4, semi_malicious=True) is not None
    assert graph._full_graph_problem(1000, 666, 0.33, 0.4, semi_malicious=True) is None
    assert graph._full_graph_problem(1000, 331, 0.33, 0.4, semi_malicious=False) is not None  # < 600
    assert graph._full_graph_problem(1000, 669, 0.33, 0.33, semi_malicious=True) is not None  # < 670
    with pytest.raises(SecAggError, match="must exceed"):
        full_graph_threshold(10, 0.3, 0.3)  # t = 7, not > ceil(13 / 2) = 7
    assert full_graph_threshold(10, 0.3, 0.3, semi_malicious=False) == 7
    with pytest.raises(SecAggError):
        full_graph_threshold(1, 0.0, 0.0)  # t = 1: Shamir needs t > 1


def test_choose_graph_prefers_the_sparse_graph() -> None:
    chosen = choose_graph(1000, 0.05, 0.05)
    assert chosen == GraphParameters(n=1000, k=52, t=37, kind="harary", min_clients_to_proceed=950)
    assert choose_graph(1000, 0.05, 0.05, min_clients_to_proceed=990).min_clients_to_proceed == 990
    complete = choose_graph(1000, 0.33, 0.33)
    assert complete == GraphParameters(n=1000, k=999, t=670, kind="complete", min_clients_to_proceed=670)
    assert complete.is_complete and complete.degree == 1000
    small = choose_graph(3, 0.05, 0.05)
    assert (small.kind, small.k, small.t) == ("complete", 2, 3)
    with pytest.raises(SecAggError):
        choose_graph(10, 0.3, 0.3)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 1500), st.sampled_from(RATES), st.sampled_from(RATES), st.booleans())
def test_choose_graph_is_sparse_or_complete(n: int, gamma: float, delta: float, semi: bool) -> None:
    try:
        chosen = choose_graph(n, gamma, delta, semi)
    except SecAggError:
        assert find_parameters(n, gamma, delta, semi) is None
        return
    assert chosen.min_clients_to_proceed == math.ceil(n * (1 - delta))
    if chosen.kind == "harary":
        assert chosen.k + 1 < n and tuple(chosen) == tuple(find_parameters(n, gamma, delta, semi))
    else:
        assert find_parameters(n, gamma, delta, semi) is None
        assert chosen.k == n - 1 and 1 < chosen.t <= n
        if semi:
            assert 2 * chosen.t > n + math.ceil(gamma * n) - 1  # t > ceil((n + gamma n) / 2)


# ---- the graph --------------------------------------------------------------------------------


def _seed(i: int) -> bytes:
    return hashlib.sha256(b"graph-test-%d" % i).digest()


IDS_64 = st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=120, unique=True)


def _ring_distance(order: list[int], u: int, v: int) -> int:
    pos = {node: i for i, node in enumerate(order)}
    d = abs(pos[u] - pos[v])
    return min(d, len(order) - d)


@settings(max_examples=80, deadline=None)
@given(IDS_64, st.integers(0, 130), st.integers(0, 2**32))
def test_graph_is_symmetric_regular_and_ring_shaped(ids: list[int], k: int, seed_index: int) -> None:
    n = len(ids)
    if k < n - 1 and k % 2:
        k -= 1
    seed = _seed(seed_index)
    g = neighbours(seed, ids, k)
    order = ring_order(seed, ids)
    assert sorted(order) == sorted(ids) and list(g) == order
    degree = min(k, n - 1)
    for node, adjacent in g.items():
        assert len(adjacent) == degree == len(set(adjacent))  # k-regular, no repeats
        assert node not in adjacent and set(adjacent) <= set(ids)  # within the node set
        for other in adjacent:
            assert node in g[other]  # symmetric
            if degree < n - 1:
                assert _ring_distance(order, node, other) <= k // 2
    if degree < n - 1:  # exactly the ring neighbourhood, in FCP's neighbour-index order
        for p, node in enumerate(order):
            expected = [order[(p + d) % n] for d in range(-(k // 2), k // 2 + 1) if d]
            assert g[node] == expected


@settings(max_examples=40, deadline=None)
@given(IDS_64, st.integers(0, 2**32))
def test_graph_is_complete_when_k_reaches_n_minus_1(ids: list[int], seed_index: int) -> None:
    n = len(ids)
    for k in (n - 1, n, n + 7):
        g = neighbours(_seed(seed_index), ids, k)
        assert g == {node: sorted(set(ids) - {node}) for node in ids}


@settings(max_examples=40, deadline=None)
@given(IDS_64, st.integers(0, 2**32), st.randoms(use_true_random=False))
def test_graph_is_deterministic_for_a_seed_and_a_set(ids: list[int], seed_index: int, rnd) -> None:
    k = 2 * (len(ids) // 4)
    shuffled = list(ids)
    rnd.shuffle(shuffled)
    assert neighbours(_seed(seed_index), ids, k) == neighbours(_seed(seed_index), shuffled, k)
    assert ring_order(_seed(seed_index), ids) == ring_order(bytearray(_seed(seed_index)), shuffled)


def test_graph_differs_across_seeds() -> None:
    ids = list(range(1000, 1100))
    graphs = {
        tuple(sorted((node, tuple(sorted(adj))) for node, adj in neighbours(_seed(i), ids, 6).items()))
        for i in range(20)
    }
    assert len(graphs) == 20
    assert len({tuple(ring_order(_seed(i), ids)) for i in range(200)}) == 200


def test_ring_order_of_a_subset_is_the_induced_order() -> None:
    """Sorting by a keyed permutation: dropping participants does not reshuffle the others."""
    ids = [7 * i + 3 for i in range(300)]
    full = ring_order(_seed(1), ids)
    subset = set(ids[::3])
    assert ring_order(_seed(1), sorted(subset)) == [node for node in full if node in subset]


def test_ring_order_is_uniform() -> None:
    """All 24 orders of 4 ids, 4800 fixed seeds: chi-square with 23 degrees of freedom (the
    0.999 quantile is 49.7; the seeds are fixed, so the test is deterministic)."""
    ids = [5, 2**64 - 1, 17, 2**40]
    counts = Counter(tuple(ring_order(_seed(i), ids)) for i in range(4800))
    assert set(counts) == set(itertools.permutations(ids))
    chi2 = sum((c - 200) ** 2 / 200 for c in counts.values())
    assert chi2 < 49.7
    # and where one node lands among 10: each position about 1/10 of 5000 seeds
    positions = Counter(ring_order(_seed(i), list(range(10))).index(0) for i in range(5000))
    chi2 = sum((positions[p] - 500) ** 2 / 500 for p in range(10))
    assert chi2 < 27.9  # 0.999 quantile, 9 degrees of freedom


def test_graph_follows_fcps_worked_example(monkeypatch: pytest.MonkeyPatch) -> None:
    """secret_sharing_harary_graph.h: degree 5 (k = 4), 10 nodes, permutation
    (3, 2, 5, 4, 1, 8, 9, 0, 6, 7); FCP's adjacency lists without the self edge. The header's
    last line reads "7 -> 0, 6, 7, 3, 1", but FCP's GetNeighbor (and symmetry with
    "2 -> 7, 3, 2, 5, 4") gives 0, 6, 7, 3, 2: a typo in the comment, corrected here."""
    permutation = [3, 2, 5, 4, 1, 8, 9, 0, 6, 7]
    monkeypatch.setattr(graph, "ring_order", lambda seed, ids: list(permutation))
    header = {
        3: [6, 7, 3, 2, 5],
        2: [7, 3, 2, 5, 4],
        5: [3, 2, 5, 4, 1],
        4: [2, 5, 4, 1, 8],
        1: [5, 4, 1, 8, 9],
        8: [4, 1, 8, 9, 0],
        9: [1, 8, 9, 0, 6],
        0: [8, 9, 0, 6, 7],
        6: [9, 0, 6, 7, 3],
        7: [0, 6, 7, 3, 2],
    }
    inverse = {node: i for i, node in enumerate(permutation)}
    degree, n = 5, 10
    get_neighbor = {
        node: [permutation[(inverse[node] - degree // 2 + index + n) % n] for index in range(degree)]
        for node in permutation
    }  # FCP SecretSharingHararyGraph::GetNeighbor
    assert get_neighbor == header
    assert neighbours(bytes(32), list(range(10)), 4) == {
        node: [v for v in adj if v != node] for node, adj in header.items()
    }


def test_graph_input_checks() -> None:
    ids = list(range(10))
    for seed in (b"short", bytes(33), "x" * 32):
        with pytest.raises(SecAggError, match="32 bytes"):
            neighbours(seed, ids, 4)  # type: ignore[arg-type]
    for bad_ids in ([1, 1, 2], [-1, 2, 3], [2**128, 1], [True, 2], [1.0, 2], ["1", 2]):
        with pytest.raises(SecAggError):
            neighbours(bytes(32), bad_ids, 2)  # type: ignore[arg-type]
    for k in (3, -2, 2.0, True):
        with pytest.raises(SecAggError):
            neighbours(bytes(32), ids, k)  # type: ignore[arg-type]
    assert neighbours(bytes(32), [], 4) == {}
    assert neighbours(bytes(32), [9], 0) == {9: []}
    assert neighbours(bytes(32), ids, 0) == {i: [] for i in ring_order(bytes(32), ids)}
    numpy_ids = np.array([2**64 - 1, 2**63, 5], dtype=np.uint64)
    assert neighbours(bytes(32), numpy_ids, 2) == neighbours(bytes(32), [2**64 - 1, 2**63, 5], 2)
    assert sorted(ring_order(bytes(32), [2**128 - 1, 0])) == [0, 2**128 - 1]


def test_graph_build_time(capsys: pytest.CaptureFixture[str]) -> None:
    """Rough timings only (no wall-clock assertion): the graph for n = 1,000 and 10,000 nodes
    with Flower-like 64-bit ids and the finder's k at gamma = delta = 0.05, semi-malicious."""
    lines = []
    for n in (1_000, 10_000):
        ids = [int.from_bytes(hashlib.sha256(b"id%d" % i).digest()[:8], "big") for i in range(n)]
        k = find_parameters(n, 0.05, 0.05).k  # type: ignore[union-attr]
        runs = []
        for i in range(5):
            start = time.perf_counter()
            g = neighbours(_seed(i), ids, k)
            runs.append(time.perf_counter() - start)
        assert len(g) == n
        lines.append(f"n={n} k={k}: best {min(runs) * 1e3:.1f} ms, median {sorted(runs)[2] * 1e3:.1f} ms")
        start = time.perf_counter()
        find_parameters(n, 0.05, 0.05)
        lines.append(f"  find_parameters(n={n}, 0.05, 0.05): {(time.perf_counter() - start) * 1e3:.1f} ms")
    with capsys.disabled():
        print("\nSecAgg+ graph build: " + "; ".join(lines))
