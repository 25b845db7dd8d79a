"""Exact allocation of a cost budget across layers: a multiple-choice knapsack.

Each layer offers options (cost, error); exactly one is taken per layer; the total cost must
stay within the budget and the summed error is minimised. Costs are integers (multiply-adds).
The dynamic programme runs on costs rounded *up* to a grid, so every answer is feasible in
exact costs; a greedy pass then spends what the rounding left over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["LayerOptions", "Secondary", "pareto_front", "solve", "minimum_cost"]


@dataclass(frozen=True)
class LayerOptions:
    """The choices of one layer: parallel arrays of integer costs and errors (option 0 is any)."""

    costs: np.ndarray  # int64
    errors: np.ndarray  # float64


def pareto_front(options: LayerOptions) -> np.ndarray:
    """Indices of the options no other option beats on both cost and error, cheapest first."""
    order = np.lexsort((options.errors, options.costs))
    keep, best = [], math.inf
    for index in order:
        if options.errors[index] < best:
            keep.append(index)
            best = options.errors[index]
    return np.asarray(keep, dtype=np.int64)


def minimum_cost(layers: list[LayerOptions]) -> int:
    return int(sum(int(o.costs.min()) for o in layers))


def solve(
    layers: list[LayerOptions], budget: int, resolution: int = 20000, secondary: "Secondary | Sequence[Secondary] | None" = None
) -> list[int]:
    """The option index per layer minimising summed error with summed cost ``<= budget``.

    With ``secondary`` (a second cost per option and its budget, e.g. FLOPs beside latency, or
    a list of them: FLOPs and parameters beside latency) every other budget holds too: a
    Lagrange multiplier on the last one's cost is raised by bisection until the allocation fits
    it, each allocation tried being itself solved under the ones before. Raises ``ValueError``
    when even the cheapest options exceed the budget, or no allocation meets them all.
    """
    others = [] if secondary is None else [secondary] if isinstance(secondary, Secondary) else list(secondary)
    if not others:
        return _solve_one(layers, budget, resolution)
    *inner, secondary = others
    if inner:
        def plan(options: list[LayerOptions]) -> list[int]:
            return solve(options, budget, resolution, inner)
    else:
        def plan(options: list[LayerOptions]) -> list[int]:
            return _solve_one(options, budget, resolution)
    selection = plan(layers)
    if secondary.spent(selection) <= secondary.budget:
        return selection
    scale = max(float(sum(float(o.errors.max()) for o in layers)), 1e-12) / max(secondary.budget, 1)
    low, high, best = 0.0, scale, None
    for _ in range(60):  # find an upper multiplier that fits, then bisect down to the smallest
        candidate = plan(_penalised(layers, secondary, high))
        if secondary.spent(candidate) <= secondary.budget:
            best = candidate
            break
        low, high = high, high * 4.0
    if best is None:
        kinds = "both budgets" if len(others) == 1 else f"all {len(others) + 1} budgets"
        raise ValueError(f"no allocation meets {kinds} ({budget} and secondary {', '.join(str(s.budget) for s in others)})")
    for _ in range(30):
        middle = 0.5 * (low + high)
        candidate = plan(_penalised(layers, secondary, middle))
        if secondary.spent(candidate) <= secondary.budget:
            best, high = candidate, middle
        else:
            low = middle
    return _spend_every_leftover(layers, best, budget, others)


def _spend_every_leftover(layers: list[LayerOptions], selection: list[int], budget: int, others: Sequence["Secondary"]) -> list[int]:
    """Greedily move layers to better options while every budget still holds.

    A multiplier reaches only the allocations on the lower convex hull of (secondary cost, error): what it leaves of
    the secondary budget (a parameter budget met at 0.79 when 0.9 was allowed) is spent here, best error gained per
    share of the budgets it uses first.
    """
    selection = list(selection)
    budgets = np.array([budget] + [s.budget for s in others], dtype=np.float64)
    tables = [np.stack([o.costs.astype(np.int64)] + [s.costs[i].astype(np.int64) for s in others]) for i, o in enumerate(layers)]
    spent = np.sum([table[:, selection[i]] for i, table in enumerate(tables)], axis=0)
    while True:
        best_ratio, best_move = 0.0, None
        for i, (options, table) in enumerate(zip(layers, tables)):
            now = selection[i]
            gains = options.errors[now] - options.errors
            extras = table - table[:, now : now + 1]  # budgets x options
            fits = (gains > 0) & np.all(spent[:, None] + extras <= budgets[:, None], axis=0)
            if not fits.any():
                continue
            shares = (np.clip(extras, 0, None) / np.maximum(budgets, 1)[:, None]).sum(0)
            ratios = np.where(fits, gains / np.maximum(shares, 1e-300), -1.0)
            index = int(np.argmax(ratios))
            if ratios[index] > best_ratio:
                best_ratio, best_move = float(ratios[index]), (i, index)
        if best_move is None:
            return selection
        i, index = best_move
        spent += tables[i][:, index] - tables[i][:, selection[i]]
        selection[i] = index


@dataclass(frozen=True)
class Secondary:
    """A second cost per option (parallel to each layer's options) and the budget it must meet."""

    costs: list[np.ndarray]
    budget: int

    def spent(self, selection: list[int]) -> int:
        return int(sum(int(c[s]) for c, s in zip(self.costs, selection)))


def _penalised(layers: list[LayerOptions], secondary: Secondary, multiplier: float) -> list[LayerOptions]:
    return [LayerOptions(o.costs, o.errors + multiplier * c.astype(np.float64)) for o, c in zip(layers, secondary.costs)]


def _solve_one(layers: list[LayerOptions], budget: int, resolution: int) -> list[int]:
    if minimum_cost(layers) > budget:
        raise ValueError(f"minimum cost {minimum_cost(layers)} exceeds budget {budget}")
    fronts = [pareto_front(o) for o in layers]
    unit = max(1.0, budget / resolution)
    slots = int(budget // unit)
    dp = np.zeros(slots + 1)
    choices = np.zeros((len(layers), slots + 1), dtype=np.int32)
    for i, (options, front) in enumerate(zip(layers, fronts)):
        units = np.ceil(options.costs[front] / unit).astype(np.int64)
        best = np.full(slots + 1, math.inf)
        pick = np.zeros(slots + 1, dtype=np.int32)
        for j, (u, e) in enumerate(zip(units, options.errors[front])):
            if u > slots:
                continue
            candidate = dp[: slots + 1 - u] + e
            better = candidate < best[u:]
            best[u:][better] = candidate[better]
            pick[u:][better] = j
        dp = best
        choices[i] = pick
    if not math.isfinite(dp[slots]):  # rounding up made the cheapest set infeasible: fall back to it
        selection = [int(front[0]) for front in fronts]
    else:
        selection, remaining = [], slots
        for i in range(len(layers) - 1, -1, -1):
            j = int(choices[i, remaining])
            selection.append(int(fronts[i][j]))
            remaining -= int(math.ceil(layers[i].costs[fronts[i][j]] / unit))
        selection.reverse()
    return _spend_leftover(layers, fronts, selection, budget)


def _spend_leftover(layers: list[LayerOptions], fronts: list[np.ndarray], selection: list[int], budget: int) -> list[int]:
    """Greedily move layers to costlier, better options while the exact total fits the budget."""
    selection = list(selection)
    spent = sum(int(layers[i].costs[s]) for i, s in enumerate(selection))
    while True:
        best_gain, best_move = 0.0, None
        for i, front in enumerate(fronts):
            cost_now, error_now = int(layers[i].costs[selection[i]]), float(layers[i].errors[selection[i]])
            for index in front:
                extra = int(layers[i].costs[index]) - cost_now
                gain = error_now - float(layers[i].errors[index])
                if extra > 0 and gain > 0 and spent + extra <= budget and gain / extra > best_gain:
                    best_gain, best_move = gain / extra, (i, int(index), extra)
        if best_move is None:
            return selection
        i, index, extra = best_move
        selection[i] = index
        spent += extra
