"""Bit allocation: optimal against brute force, never over budget, fast and on target at realistic size."""

from __future__ import annotations

import itertools
import math
import random
import time

import numpy as np
import pytest

import exlq.quant.allocate as allocate_mod
from exlq.errors import ExlqError
from exlq.quant.allocate import Option, allocate, allocate_to_bpw


def random_items(rng: random.Random, n_items: int, n_options: int, max_bits: int = 1000) -> list[list[Option]]:
    """Options with arbitrary (non-monotone) errors, so nothing can lean on monotonicity."""
    return [
        [Option(f"o{j}", rng.randint(1, max_bits), rng.random()) for j in range(n_options)] for _ in range(n_items)
    ]


def brute_force(items: list[list[Option]], budget: int) -> float:
    """Least total error over every combination that fits (inf when none does)."""
    best = math.inf
    for combo in itertools.product(*items):
        if sum(o.bits for o in combo) <= budget:
            best = min(best, sum(o.error for o in combo))
    return best


def totals(items: list[list[Option]], choices: list[int]) -> tuple[int, float]:
    chosen = [opts[c] for opts, c in zip(items, choices)]
    return sum(o.bits for o in chosen), sum(o.error for o in chosen)


def random_budget(rng: random.Random, items: list[list[Option]]) -> int:
    low = sum(min(o.bits for o in opts) for opts in items)
    high = sum(max(o.bits for o in opts) for opts in items)
    return rng.randint(low, high)


@pytest.mark.parametrize("method", ["dp", "lagrangian"])
def test_reported_totals_are_the_choices_totals_and_fit(method):
    rng = random.Random(1)
    for _ in range(50):
        items = random_items(rng, 5, 4)
        budget = random_budget(rng, items)
        result = allocate(items, budget, method=method)
        assert (result.total_bits, result.total_error) == pytest.approx(totals(items, result.choices))
        assert result.total_bits <= budget


@pytest.fixture
def dp_only(monkeypatch):
    """The default method without its Lagrangian companion, so nothing masks a DP mistake."""
    monkeypatch.setitem(allocate_mod.METHODS, "dp", (allocate_mod._solve_dp,))


def test_dp_equals_brute_force_on_small_cases(dp_only):
    rng = random.Random(2)
    for _ in range(150):
        items = random_items(rng, 5, 4)
        budget = random_budget(rng, items)
        result = allocate(items, budget)
        assert result.total_bits <= budget
        assert result.total_error == pytest.approx(brute_force(items, budget), abs=1e-12)


def test_coarse_dp_is_within_its_rounding_slack(monkeypatch, dp_only):
    """With the table forced tiny, each item may lose < one unit: still no worse than the optimum
    under a budget tightened by n_items units, and never over the real budget."""
    cells_per_item = 12
    rng = random.Random(3)
    for _ in range(100):
        items = random_items(rng, 5, 4)
        monkeypatch.setattr(allocate_mod, "MAX_DP_CELLS", cells_per_item * len(items))
        budget = random_budget(rng, items)
        base = sum(min(o.bits for o in opts) for opts in items)
        extras = [o.bits - min(p.bits for p in opts) for opts in items for o in opts]
        capacity = min(budget - base, sum(max(o.bits for o in opts) for opts in items) - base)
        unit = math.ceil(capacity / (cells_per_item - 1)) + math.gcd(*extras)  # upper bound on the DP unit
        result = allocate(items, budget)
        assert result.total_bits <= budget
        assert result.total_error <= brute_force(items, budget - len(items) * unit) + 1e-12


def test_non_monotone_errors():
    # Item 0's expensive option is worse than its cheap one; item 1 rewards bits.
    items = [
        [Option("cheap", 10, 0.1), Option("pricey-but-bad", 50, 0.9)],
        [Option("small", 10, 1.0), Option("big", 40, 0.2)],
    ]
    assert allocate(items, 50).choices == [0, 1]
    assert allocate(items, 1000).choices == [0, 1]  # a generous budget takes the best errors, not the most bits
    assert allocate(items, 49).choices == [0, 0]


def test_generous_budget_takes_best_errors():
    rng = random.Random(4)
    items = random_items(rng, 30, 6)
    result = allocate(items, 10**9)
    assert result.choices == [min(range(6), key=lambda j: (opts[j].error, opts[j].bits)) for opts in items]


def test_infeasible_budget_says_the_lowest_achievable_bpw():
    items = [[Option("a", 250, 1.0), Option("b", 400, 0.5)], [Option("a", 250, 1.0)]]
    with pytest.raises(ExlqError, match=r"lowest achievable is 2\.500 bpw"):
        allocate_to_bpw(items, [100, 100], 2.4)
    with pytest.raises(ExlqError, match="500 bits"):
        allocate(items, 499)
    assert allocate_to_bpw(items, [100, 100], 2.5).choices == [0, 0]


def test_unknown_method_and_bad_items():
    items = [[Option("a", 1, 0.0)]]
    with pytest.raises(ValueError):
        allocate(items, 10, method="greedy")
    with pytest.raises(ValueError):
        allocate([[]], 10)
    with pytest.raises(ValueError):
        allocate_to_bpw(items, [1, 2], 4.0)


def realistic_problem(seed: int = 5) -> tuple[list[list[Option]], list[int]]:
    """200 matrices × 20 options, bits ≈ weights × bpw + overhead, error ∝ sensitivity · 2^(−2·bpw)."""
    rng = random.Random(seed)
    shapes = [(4096, 4096)] * 4 + [(4096, 11008), (4096, 11008), (11008, 4096)]
    items, weights = [], []
    for i in range(200):
        k, n = shapes[i % len(shapes)]
        sensitivity = math.exp(rng.gauss(0, 1.5))
        bpws = sorted(rng.uniform(2.0, 8.0) for _ in range(20))
        opts = [
            Option(f"{b:.2f}", int(k * n * b) + 32 * k, sensitivity * k * n * 2 ** (-2 * b) * rng.uniform(0.9, 1.1))
            for b in bpws
        ]
        items.append(opts)
        weights.append(k * n)
    return items, weights


def dual_lower_bound(items: list[list[Option]], budget: int) -> float:
    """max over λ of Σ min_j (e + λ·b) − λ·B: a lower bound on the optimum (Lagrangian duality)."""
    bits = np.array([[o.bits for o in opts] for opts in items], dtype=np.float64)
    errors = np.array([[o.error for o in opts] for opts in items])
    lambdas = np.logspace(-20, 2, 4000)
    return max(float((errors + lam * bits).min(axis=1).sum() - lam * budget) for lam in lambdas)


@pytest.mark.parametrize("target", [2.5, 4.0, 6.25])
@pytest.mark.parametrize("solver", ["default", "dp-only"])
def test_realistic_size_is_fast_on_target_and_near_optimal(target, solver, monkeypatch):
    if solver == "dp-only":
        monkeypatch.setitem(allocate_mod.METHODS, "dp", (allocate_mod._solve_dp,))
    items, weights = realistic_problem()
    start = time.perf_counter()
    result = allocate_to_bpw(items, weights, target)
    elapsed = time.perf_counter() - start
    achieved = result.total_bits / sum(weights)
    assert elapsed < 5.0
    assert target - 0.02 <= achieved <= target
    bound = dual_lower_bound(items, int(sum(weights) * target))
    assert bound <= result.total_error <= bound * 1.01
    lagrangian = allocate_to_bpw(items, weights, target, method="lagrangian")
    assert lagrangian.total_bits <= int(sum(weights) * target)
    assert result.total_error <= lagrangian.total_error * 1.001


def test_dp_beats_the_lagrangian_when_errors_are_not_convex(dp_only):
    """200 × 20 arbitrary options: the DP must still be fast, fit, and do at least as well."""
    rng = random.Random(6)
    items = random_items(rng, 200, 20, max_bits=10**7)
    budget = random_budget(rng, items)
    start = time.perf_counter()
    dp = allocate(items, budget)
    assert time.perf_counter() - start < 5.0
    lagrangian = allocate(items, budget, method="lagrangian")
    assert dp.total_bits <= budget and lagrangian.total_bits <= budget
    assert dp.total_error <= lagrangian.total_error
