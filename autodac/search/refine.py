"""Optuna refinement of a knapsack allocation on the real probe metric.

The search space is not the ranks themselves but one importance weight per layer: each trial
scales the layers' scores by its weights and re-solves the exact knapsack. So every trial is
a plan that fits the budget (a hard constraint by construction, no penalty needed) and spends
all of it, and the first trial is the unscaled allocation itself. Identical plans are
evaluated once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from autodac.search.knapsack import LayerOptions, solve

__all__ = ["Trial", "RefineResult", "refine"]


@dataclass(frozen=True)
class Trial:
    number: int
    value: float
    cost: int
    selection: tuple[int, ...]


@dataclass
class RefineResult:
    best: Trial
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0


def refine(
    layers: Sequence[LayerOptions],
    budget: int,
    evaluate: Callable[[tuple[int, ...]], float],
    *,
    n_trials: int,
    timeout: float | None = None,
    seed: int = 0,
    spread: float = 4.0,
    progress: bool = False,
) -> RefineResult:
    """Search per-layer score weights in ``[1/spread, spread]`` (log scale) maximising ``evaluate``."""
    import optuna

    start = time.perf_counter()
    seen: dict[tuple[int, ...], float] = {}
    trials: list[Trial] = []

    def objective(trial: "optuna.Trial") -> float:
        weights = np.array([trial.suggest_float(f"w{i}", 1.0 / spread, spread, log=True) for i in range(len(layers))])
        scaled = [LayerOptions(o.costs, o.errors * w) for o, w in zip(layers, weights)]
        selection = tuple(solve(scaled, budget))
        if selection not in seen:
            seen[selection] = float(evaluate(selection))
        value = seen[selection]
        cost = int(sum(int(o.costs[s]) for o, s in zip(layers, selection)))
        trial.set_user_attr("selection", list(selection))
        trials.append(Trial(trial.number, value, cost, selection))
        return value

    optuna_logger = logging.getLogger("optuna")
    previous = optuna_logger.level
    optuna_logger.setLevel(logging.WARNING)
    try:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, n_trials // 4)))
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.enqueue_trial({f"w{i}": 1.0 for i in range(len(layers))})
        study.optimize(objective, n_trials=n_trials, timeout=timeout, show_progress_bar=progress)
    finally:
        optuna_logger.setLevel(previous)
    # Ties go to the earliest trial (the plain allocation first), so noise never replaces it for nothing.
    best = max(trials, key=lambda t: (t.value, -t.number))
    return RefineResult(best=best, trials=trials, seconds=time.perf_counter() - start)
