"""Choose one quantization option per matrix to minimize total error under a bit budget.

This is a multiple-choice knapsack. The default solver is a dynamic program over the budget in
discrete units: each option's bits above its item's cheapest option are rounded UP to whole units,
so any plan the DP finds truly fits the budget; the unit is 1 bit (exact) when the table is small
enough and grows only as needed to keep the table near `MAX_DP_CELLS`. A greedy pass then spends
whatever the rounding left unused. Errors need not be monotone in bits: the DP compares every option.
The default also runs a Lagrangian relaxation (milliseconds) and keeps the better of the two plans,
which recovers the DP's rounding loss on large convex problems; `method="lagrangian"` runs it alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from exlq.errors import ExlqError

MAX_DP_CELLS = 20_000_000  # items × budget units; bounds time and the backtracking table's memory


@dataclass(frozen=True)
class Option:
    """One way to quantize one item: an identifier, what it costs, and how much error it causes."""

    key: str
    bits: int
    error: float


@dataclass
class Allocation:
    """The chosen option index per item, with the exact totals of that choice."""

    choices: list[int]
    total_bits: int
    total_error: float


@dataclass
class _Problem:
    """Items as padded arrays: bits [n, m] (padding = huge) and errors [n, m] (padding = inf)."""

    bits: np.ndarray
    errors: np.ndarray

    @classmethod
    def from_items(cls, items: list[list[Option]]) -> _Problem:
        if any(not opts for opts in items):
            raise ValueError("every item needs at least one option")
        width = max((len(opts) for opts in items), default=1)
        bits = np.full((len(items), width), np.iinfo(np.int64).max // 4, dtype=np.int64)
        errors = np.full((len(items), width), np.inf)
        for i, opts in enumerate(items):
            bits[i, : len(opts)] = [o.bits for o in opts]
            errors[i, : len(opts)] = [o.error for o in opts]
        counts = np.array([len(opts) for opts in items], dtype=np.int64)
        real = np.arange(width) < counts[:, None]
        if not np.isfinite(errors[real]).all():
            raise ValueError("option errors must be finite")
        if (bits[real] < 0).any():
            raise ValueError("option bits must be non-negative")
        return cls(bits, errors)

    def allocation(self, choices: np.ndarray) -> Allocation:
        rows = np.arange(len(choices))
        return Allocation(
            [int(c) for c in choices],
            int(self.bits[rows, choices].sum()),
            float(self.errors[rows, choices].sum()),
        )


def allocate(
    items: list[list[Option]],
    budget_bits: int,
    *,
    method: str = "dp",
    total_weights: int | None = None,
) -> Allocation:
    """The choice per item with the least total error whose total bits stay within budget_bits.

    `total_weights` only makes the infeasibility message speak in bits per weight.
    """
    if method not in METHODS:
        raise ValueError(f"unknown allocation method {method!r}; use one of {sorted(METHODS)}")
    problem = _Problem.from_items(items)
    cheapest = problem.bits.min(axis=1)
    _check_feasible(int(cheapest.sum()), budget_bits, total_weights)
    best = _best_error_choices(problem)
    if problem.allocation(best).total_bits <= budget_bits:
        return problem.allocation(best)  # the budget does not bind: nothing to trade off
    plans = [_spend_leftover(problem, solve(problem, budget_bits), budget_bits) for solve in METHODS[method]]
    return min((problem.allocation(plan) for plan in plans), key=lambda a: a.total_error)


def allocate_to_bpw(
    items: list[list[Option]], weights_per_item: list[int], target_bpw: float, *, method: str = "dp"
) -> Allocation:
    """allocate() with the converter's budget: int(Σ weights × target_bpw) (spec §13)."""
    if len(weights_per_item) != len(items):
        raise ValueError("need one weight count per item")
    total_weights = sum(weights_per_item)
    budget = int(total_weights * target_bpw)
    return allocate(items, budget, method=method, total_weights=total_weights)


def _check_feasible(cheapest_bits: int, budget_bits: int, total_weights: int | None) -> None:
    if cheapest_bits <= budget_bits:
        return
    if total_weights:
        lowest = math.ceil(cheapest_bits / total_weights * 1000) / 1000
        raise ExlqError(
            f"a target of {budget_bits / total_weights:.3f} bpw is below what the option grid can reach; "
            f"the lowest achievable is {lowest:.3f} bpw: raise the target to at least that"
        )
    raise ExlqError(
        f"a budget of {budget_bits} bits is below the cheapest choice ({cheapest_bits} bits): raise the budget"
    )


def _best_error_choices(problem: _Problem) -> np.ndarray:
    """Per item, the least-error option, the cheapest one among equal errors."""
    order = np.lexsort((problem.bits, problem.errors), axis=1)  # by error, then bits
    return order[:, 0]


def _solve_dp(problem: _Problem, budget_bits: int) -> np.ndarray:
    """Exact DP over budget units (see the module docstring); returns the choice index per item."""
    n = len(problem.bits)
    valid = np.isfinite(problem.errors)
    base = problem.bits.min(axis=1)
    extra = np.where(valid, problem.bits - base[:, None], 0)
    capacity = min(budget_bits - int(base.sum()), int(extra.max(axis=1).sum()))
    unit = _dp_unit(extra[valid], capacity, n)
    units = np.where(valid, -(-extra // unit), capacity // unit + 1)  # ceil; padding never fits
    cap = capacity // unit
    dtype = np.uint8 if problem.bits.shape[1] <= 255 else np.int32
    choice = np.zeros((n, cap + 1), dtype=dtype)
    best = np.zeros(cap + 1)  # least error of items so far using at most c units
    for i in range(n):
        best = _dp_step(best, units[i], problem.errors[i], choice[i])
    return _backtrack(choice, units, cap)


def _dp_unit(extras: np.ndarray, capacity: int, n_items: int) -> int:
    """Budget unit: the extras' common divisor (exact), coarsened only to fit MAX_DP_CELLS."""
    common = int(reduce(math.gcd, (int(e) for e in np.unique(extras)), 0)) or 1
    cells_per_item = max(2, MAX_DP_CELLS // max(n_items, 1))
    needed = math.ceil(capacity / (cells_per_item - 1))
    return common * max(1, math.ceil(needed / common))


def _dp_step(best: np.ndarray, units: np.ndarray, errors: np.ndarray, choice_row: np.ndarray) -> np.ndarray:
    """One item: new[c] = min_j best[c − units_j] + errors_j, recording the argmin j in choice_row."""
    cap1 = len(best)
    new = np.full(cap1, np.inf)
    for j, (w, e) in enumerate(zip(units, errors)):
        if w >= cap1 or not np.isfinite(e):
            continue
        cand = best[: cap1 - w] + e
        better = cand < new[w:]
        new[w:][better] = cand[better]
        choice_row[w:][better] = j
    return new


def _backtrack(choice: np.ndarray, units: np.ndarray, cap: int) -> np.ndarray:
    out = np.zeros(len(choice), dtype=np.int64)
    c = cap
    for i in range(len(choice) - 1, -1, -1):
        out[i] = choice[i, c]
        c -= int(units[i, out[i]])
    return out


def _solve_lagrangian(problem: _Problem, budget_bits: int, iters: int = 100) -> np.ndarray:
    """Minimize error + λ·bits per item, bisecting λ to the cheapest λ whose plan fits the budget.

    Only reaches points on the lower convex hull of (bits, error); near-optimal when items are many.
    """

    def plan(lam: float) -> np.ndarray:
        return np.argmin(problem.errors + lam * problem.bits, axis=1)

    def fits(choices: np.ndarray) -> bool:
        return problem.allocation(choices).total_bits <= budget_bits

    spread = np.ptp(np.where(np.isfinite(problem.errors), problem.errors, 0))
    lo, hi = 0.0, max(float(spread), 1.0)  # at λ ≥ max error spread / 1 bit, the cheapest plan wins
    cheapest = np.argmin(problem.bits, axis=1)
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(plan(mid)) else (mid, hi)
    return plan(hi) if fits(plan(hi)) else cheapest


# Each method's solvers; all plans are feasible, so taking the best one never hurts. The DP's plan is
# optimal up to its rounding; the Lagrangian plan (milliseconds) recovers that rounding loss on large
# problems whose errors fall convexly with bits, where it is itself near-optimal.
METHODS = {"dp": (_solve_dp, _solve_lagrangian), "lagrangian": (_solve_lagrangian,)}


def _spend_leftover(problem: _Problem, choices: np.ndarray, budget_bits: int) -> np.ndarray:
    """Greedily take the single switch that lowers error most while still fitting, until none does.

    Recovers what the DP's rounding-up of bits (or the Lagrangian's convex hull) left on the table.
    """
    choices = choices.copy()
    rows = np.arange(len(choices))
    while True:
        cur_bits = problem.bits[rows, choices]
        left = budget_bits - int(cur_bits.sum())
        gain = problem.errors[rows, choices][:, None] - problem.errors
        gain[(problem.bits - cur_bits[:, None]) > left] = 0
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        if not gain[i, j] > 0:
            return choices
        choices[i] = j
