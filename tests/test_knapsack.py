"""The multiple-choice knapsack against brute force on small random instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from autodac.search.knapsack import LayerOptions, Secondary, minimum_cost, pareto_front, solve


def _instance(rng: np.random.Generator, max_cost: int) -> list[LayerOptions]:
    layers = []
    for _ in range(rng.integers(1, 5)):
        count = int(rng.integers(1, 6))
        costs = rng.integers(0, max_cost, size=count).astype(np.int64)
        errors = rng.random(count)
        if rng.random() < 0.3 and count > 1:  # ties in cost and in error
            costs[1] = costs[0]
            errors[-1] = errors[0]
        layers.append(LayerOptions(costs, errors))
    return layers


def _brute_force(layers: list[LayerOptions], budget: int) -> float:
    """Smallest summed error over every combination within the budget (inf if none fits)."""
    best = np.inf
    for combo in itertools.product(*(range(len(o.costs)) for o in layers)):
        cost = sum(int(o.costs[i]) for o, i in zip(layers, combo))
        if cost <= budget:
            best = min(best, sum(float(o.errors[i]) for o, i in zip(layers, combo)))
    return best


def _evaluate(layers: list[LayerOptions], selection: list[int]) -> tuple[int, float]:
    assert len(selection) == len(layers)
    assert all(0 <= s < len(o.costs) for o, s in zip(layers, selection))
    cost = sum(int(o.costs[s]) for o, s in zip(layers, selection))
    return cost, sum(float(o.errors[s]) for o, s in zip(layers, selection))


@pytest.mark.parametrize("seed", range(40))
def test_exact_grid_matches_brute_force(seed: int) -> None:
    """With budgets below ``resolution`` the grid is one unit: the answer is optimal."""
    rng = np.random.default_rng(seed)
    layers = _instance(rng, max_cost=60)
    low, high = minimum_cost(layers), int(sum(o.costs.max() for o in layers))
    for budget in sorted({low, (low + high) // 2, int(rng.integers(low, high + 1)), high}):
        cost, error = _evaluate(layers, solve(layers, budget))
        assert cost <= budget
        assert error <= _brute_force(layers, budget) + 1e-12


@pytest.mark.parametrize("seed", range(40))
def test_coarse_grid_is_feasible_and_near_optimal(seed: int) -> None:
    """On a coarse grid the answer still fits exactly, and is at least as good as the optimum
    at the budget less one grid unit per layer (what rounding costs up can lose)."""
    rng = np.random.default_rng(100 + seed)
    layers = _instance(rng, max_cost=10_000)
    low, high = minimum_cost(layers), int(sum(o.costs.max() for o in layers))
    resolution = 16
    for budget in sorted({low, (low + high) // 2, int(rng.integers(low, high + 1)), high}):
        cost, error = _evaluate(layers, solve(layers, budget, resolution=resolution))
        optimum = _brute_force(layers, budget)
        assert cost <= budget
        assert error >= optimum - 1e-12
        unit = max(1.0, budget / resolution)
        assert error <= _brute_force(layers, int(budget - len(layers) * unit)) + 1e-12


def test_large_costs_with_default_resolution_are_near_optimal() -> None:
    rng = np.random.default_rng(7)
    for _ in range(10):
        layers = [
            LayerOptions(np.sort(rng.integers(10**6, 10**8, size=6)).astype(np.int64), np.sort(rng.random(6))[::-1].copy())
            for _ in range(4)
        ]
        budget = int(sum(int(o.costs[2]) for o in layers))
        cost, error = _evaluate(layers, solve(layers, budget))
        assert cost <= budget
        assert error <= _brute_force(layers, int(budget * (1 - 4 / 20000))) + 1e-12


def test_infeasible_budget_raises() -> None:
    layers = [LayerOptions(np.array([5, 9]), np.array([1.0, 0.0])), LayerOptions(np.array([3]), np.array([0.0]))]
    assert minimum_cost(layers) == 8
    assert _evaluate(layers, solve(layers, 8)) == (8, 1.0)
    with pytest.raises(ValueError, match="minimum cost 8 exceeds budget 7"):
        solve(layers, 7)


def test_budget_spent_on_the_best_improvement() -> None:
    """A hand-made instance: the budget buys the option that lowers the error most, not the nearest."""
    layers = [
        LayerOptions(np.array([10, 20, 30]), np.array([0.9, 0.5, 0.0])),
        LayerOptions(np.array([10, 15]), np.array([0.6, 0.0])),
    ]
    assert solve(layers, 25) == [0, 1]  # 0.9: spend 5 on layer 2 (-0.6), not 10 on layer 1 (-0.4)
    assert solve(layers, 35) == [1, 1]
    assert solve(layers, 45) == [2, 1]
    assert solve(layers, 20) == [0, 0]


def _dominated(costs: np.ndarray, errors: np.ndarray, i: int) -> bool:
    return any(
        costs[j] <= costs[i] and errors[j] <= errors[i] and (costs[j] < costs[i] or errors[j] < errors[i])
        for j in range(len(costs))
    )


@pytest.mark.parametrize("seed", range(40))
def test_pareto_front(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    count = int(rng.integers(1, 12))
    costs = rng.integers(0, 8, size=count).astype(np.int64)  # many ties on a small range
    errors = rng.integers(0, 5, size=count) / 4.0
    front = pareto_front(LayerOptions(costs, errors))
    assert front.dtype == np.int64 and len(set(front.tolist())) == len(front)
    assert np.all(np.diff(costs[front]) > 0) and np.all(np.diff(errors[front]) < 0)  # cheapest first
    assert not any(_dominated(costs, errors, i) for i in front)
    undominated = {(int(costs[i]), float(errors[i])) for i in range(count) if not _dominated(costs, errors, i)}
    assert {(int(costs[i]), float(errors[i])) for i in front} == undominated


@pytest.mark.parametrize("seed", range(40))
def test_a_secondary_budget_holds_whenever_some_allocation_meets_both(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    layers = _instance(rng, 50)
    second = [rng.integers(0, 50, size=len(o.costs)).astype(np.int64) for o in layers]
    combos = list(itertools.product(*(range(len(o.costs)) for o in layers)))
    primary_budget = int(rng.integers(minimum_cost(layers), sum(int(o.costs.max()) for o in layers) + 1))
    feasible = [c for c in combos if sum(int(o.costs[i]) for o, i in zip(layers, c)) <= primary_budget]
    secondary_budget = int(min(sum(int(s[i]) for s, i in zip(second, c)) for c in feasible)) + int(rng.integers(0, 30))
    selection = solve(layers, primary_budget, secondary=Secondary(second, secondary_budget))
    assert sum(int(o.costs[i]) for o, i in zip(layers, selection)) <= primary_budget
    assert sum(int(s[i]) for s, i in zip(second, selection)) <= secondary_budget


def test_a_secondary_budget_that_already_holds_changes_nothing() -> None:
    rng = np.random.default_rng(7)
    layers = _instance(rng, 40)
    budget = minimum_cost(layers) + 30
    loose = Secondary([np.zeros(len(o.costs), dtype=np.int64) for o in layers], 0)
    assert solve(layers, budget, secondary=loose) == solve(layers, budget)


def test_no_allocation_meeting_both_budgets_is_a_value_error() -> None:
    layers = [LayerOptions(np.array([0, 5]), np.array([1.0, 0.0]))]
    with pytest.raises(ValueError, match="both budgets"):
        solve(layers, 0, secondary=Secondary([np.array([10, 0])], 5))


def _met_by_some_allocation(rng: np.random.Generator, count: int):
    """A random instance, ``count`` secondary costs per option, a primary budget, and secondary budgets that one
    allocation within the primary budget (drawn at random) meets exactly."""
    layers = _instance(rng, 50)
    extra = [[rng.integers(0, 50, size=len(o.costs)).astype(np.int64) for o in layers] for _ in range(count)]
    combos = list(itertools.product(*(range(len(o.costs)) for o in layers)))
    primary_budget = int(rng.integers(minimum_cost(layers), sum(int(o.costs.max()) for o in layers) + 1))
    feasible = [c for c in combos if sum(int(o.costs[i]) for o, i in zip(layers, c)) <= primary_budget]
    witness = feasible[int(rng.integers(len(feasible)))]
    return layers, extra, primary_budget, [int(sum(int(c[i]) for c, i in zip(costs, witness))) for costs in extra]


@pytest.mark.parametrize("seed", range(40))
def test_several_secondary_budgets_all_hold(seed: int) -> None:
    """Any number of budgets: each met by the answer whenever some allocation meets them all (here, a random one does)."""
    layers, extra, primary_budget, budgets = _met_by_some_allocation(np.random.default_rng(2000 + seed), 2)
    selection = solve(layers, primary_budget, secondary=[Secondary(costs, b) for costs, b in zip(extra, budgets)])
    assert sum(int(o.costs[i]) for o, i in zip(layers, selection)) <= primary_budget
    for costs, b in zip(extra, budgets):
        assert sum(int(c[i]) for c, i in zip(costs, selection)) <= b


@pytest.mark.parametrize("seed", range(40))
def test_with_secondary_budgets_no_move_to_a_better_option_still_fits(seed: int) -> None:
    """A multiplier reaches only the convex hull of (secondary cost, error): a parameter budget of 0.9 was met at 0.79
    when a better option fit. What it leaves is spent: no single layer can move to a lower error within every budget."""
    layers, extra, primary_budget, budgets = _met_by_some_allocation(np.random.default_rng(3000 + seed), 1 + seed % 2)
    selection = solve(layers, primary_budget, secondary=[Secondary(costs, b) for costs, b in zip(extra, budgets)])
    tables = [[o.costs for o in layers]] + extra
    limits = [primary_budget] + budgets
    spent = [sum(int(t[i][s]) for i, s in enumerate(selection)) for t in tables]
    assert all(used <= limit for used, limit in zip(spent, limits))
    for i, options in enumerate(layers):
        for j in range(len(options.costs)):
            if options.errors[j] < options.errors[selection[i]]:
                moved = [used + int(t[i][j]) - int(t[i][selection[i]]) for used, t in zip(spent, tables)]
                assert any(m > limit for m, limit in zip(moved, limits)), (i, j, selection)


def test_a_list_of_one_secondary_is_the_single_secondary() -> None:
    rng = np.random.default_rng(11)
    layers = _instance(rng, 40)
    second = [rng.integers(0, 40, size=len(o.costs)).astype(np.int64) for o in layers]
    budget, limit = minimum_cost(layers) + 20, int(sum(int(s.min()) for s in second)) + 5
    assert solve(layers, budget, secondary=[Secondary(second, limit)]) == solve(layers, budget, secondary=Secondary(second, limit))


def test_no_allocation_meeting_three_budgets_is_a_value_error() -> None:
    layers = [LayerOptions(np.array([0, 5]), np.array([1.0, 0.0]))]
    fits = Secondary([np.array([0, 0])], 0)
    with pytest.raises(ValueError, match="all 3 budgets"):
        solve(layers, 5, secondary=[fits, Secondary([np.array([10, 10])], 5)])
