"""Optuna refinement of a knapsack allocation on the real probe metric.

The search space is not the ranks themselves but one importance weight per layer: each trial
scales the layers' scores by its weights and re-solves the exact knapsack. So every trial is
a plan that fits the budget (a hard constraint by construction, no penalty needed) and spends
all of it, and the first trial is the unscaled allocation itself. Identical plans are
evaluated once, across every worker of a shared study too (``autodac.search.storage``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from autodac.search.knapsack import LayerOptions, Secondary, solve

if TYPE_CHECKING:  # optuna is imported when a search runs
    import optuna

__all__ = ["Trial", "RefineResult", "refine", "pareto_trials"]


@dataclass(frozen=True)
class Trial:
    number: int
    value: float
    cost: int
    selection: tuple[int, ...]
    weights: tuple[float, ...] = ()  # the per-layer score weights that produced the selection


@dataclass
class RefineResult:
    best: Trial
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0
    front: list[Trial] = field(default_factory=list)  # cost-vs-value Pareto front, cheapest first


def _no_failed_trial_traceback(record: logging.LogRecord) -> bool:
    """Optuna's warning of a failed trial carries the exception's traceback; the search raises that exception itself."""
    return record.exc_info is None


def pareto_trials(trials: Sequence[Trial]) -> list[Trial]:
    """The trials no other trial beats on both cost (lower) and value (higher), cheapest first."""
    front: list[Trial] = []
    for trial in sorted(trials, key=lambda t: (t.cost, -t.value, t.number)):
        if not front or trial.value > front[-1].value:
            if not any(t.selection == trial.selection for t in front):
                front.append(trial)
    return front


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
    min_budget: int | None = None,
    secondary: Secondary | None = None,
    study: "optuna.Study | None" = None,
) -> RefineResult:
    """Search per-layer score weights in ``[1/spread, spread]`` (log scale) maximising ``evaluate``.

    With ``min_budget`` the search is two-objective: each trial also draws its own budget in
    ``[min_budget, budget]`` and Optuna trades cost against value; ``front`` then holds the
    Pareto front of plans. ``best`` is always the highest value within ``budget``. ``secondary``
    is a second budget every trial's allocation also meets (see ``knapsack.solve``).

    With ``study`` (an Optuna study in a storage other workers share) the ``n_trials`` are added
    to it: a plan any worker has already evaluated is read back (user attribute ``reused``), the
    plain allocation is evaluated and added (finished) only by the first worker, and ``trials``, ``best`` and ``front``
    cover every finished trial of the study. The sampler is seeded from ``seed`` and this
    process, so that workers started together do not propose the same trials.
    """
    import optuna

    from autodac.search.storage import fail_dead_trials, stamping_sampler

    start = time.perf_counter()
    seen: dict[tuple[int, ...], float] = {}
    trials: list[Trial] = []
    shared = study is not None

    def objective(trial: "optuna.Trial") -> float:
        weights = np.array([trial.suggest_float(f"w{i}", 1.0 / spread, spread, log=True) for i in range(len(layers))])
        scaled = [LayerOptions(o.costs, o.errors * w) for o, w in zip(layers, weights)]
        trial_budget = budget
        if min_budget is not None:
            trial_budget = int(min_budget + trial.suggest_float("budget", 0.0, 1.0) * (budget - min_budget))
        selection = tuple(solve(scaled, trial_budget, secondary=secondary))
        if shared and selection not in seen:
            seen.update(_finished(trial.study))
        reused = selection in seen
        if not reused:
            seen[selection] = float(evaluate(selection))
        value = seen[selection]
        cost = int(sum(int(o.costs[s]) for o, s in zip(layers, selection)))
        trial.set_user_attr("selection", list(selection))
        if shared:
            trial.set_user_attr("reused", reused)
        trials.append(Trial(trial.number, value, cost, selection, tuple(float(w) for w in weights)))
        return value if min_budget is None else (value, float(cost))

    def add_plain(params: dict[str, float]) -> None:
        """The plain allocation (every weight 1, the whole budget) as a finished trial of the shared study."""
        selection = tuple(solve(layers, budget, secondary=secondary))
        value = seen[selection] = float(evaluate(selection))
        cost = int(sum(int(o.costs[s]) for o, s in zip(layers, selection)))
        distributions = {f"w{i}": optuna.distributions.FloatDistribution(1.0 / spread, spread, log=True) for i in range(len(layers))}
        if min_budget is not None:
            distributions["budget"] = optuna.distributions.FloatDistribution(0.0, 1.0)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, values=[value] if min_budget is None else [value, float(cost)],
            user_attrs={"selection": list(selection), "reused": False},
        ))

    optuna_logger = logging.getLogger("optuna")
    previous = optuna_logger.level
    optuna_logger.setLevel(max(optuna_logger.getEffectiveLevel(), logging.WARNING))  # no line per trial; the caller's ERROR stands
    handlers = list(optuna_logger.handlers)  # its modules log through them (a filter on the logger would not see their records)
    for handler in handlers:
        handler.addFilter(_no_failed_trial_traceback)
    try:
        startup = min(5, max(1, n_trials // 4))
        first = {f"w{i}": 1.0 for i in range(len(layers))}
        if min_budget is not None:
            first["budget"] = 1.0
        if shared:
            worker_seed = int(np.random.SeedSequence([seed, os.getpid(), len(study.get_trials(deepcopy=False))]).generate_state(1)[0])
            study.sampler = stamping_sampler(seed=worker_seed, n_startup_trials=startup, constant_liar=True)
            if not study.get_trials(deepcopy=False):
                # added finished, not queued: two processes can pop one queued trial from an SQLite
                # storage (no row locks), and the second then fails telling a finished trial
                add_plain(first)
                n_trials -= 1
        else:
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
            if min_budget is None:
                study = optuna.create_study(direction="maximize", sampler=sampler)
            else:
                study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
            study.enqueue_trial(first)
        bar = progress and sys.stderr.isatty()
        if not shared and n_trials > 0:  # the plain allocation is always evaluated, however short the timeout: a result exists
            study.optimize(objective, n_trials=1, show_progress_bar=False)
            n_trials -= 1
        remaining = None if timeout is None else timeout - (time.perf_counter() - start)
        if n_trials > 0 and (remaining is None or remaining > 0):
            study.optimize(objective, n_trials=n_trials, timeout=remaining, show_progress_bar=bar)
        if shared:
            fail_dead_trials(study)
            trials = _study_trials(study, layers)
            if not trials:  # a timeout that let no trial of this worker finish, and none of another's yet
                study.optimize(objective, n_trials=1, show_progress_bar=False)
                trials = _study_trials(study, layers)
    finally:
        optuna_logger.setLevel(previous)
        for handler in handlers:
            handler.removeFilter(_no_failed_trial_traceback)
    # Ties go to the earliest trial (the plain allocation first), so noise never replaces it for nothing.
    best = max((t for t in trials if t.cost <= budget), key=lambda t: (t.value, -t.number))
    return RefineResult(best=best, trials=trials, seconds=time.perf_counter() - start, front=pareto_trials(trials))


def _finished(study: "optuna.Study") -> dict[tuple[int, ...], float]:
    """``{selection: value}`` of the study's finished trials, whoever ran them."""
    from optuna.trial import TrialState

    return {
        tuple(t.user_attrs["selection"]): float(t.values[0])
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "selection" in t.user_attrs
    }


def _study_trials(study: "optuna.Study", layers: Sequence[LayerOptions]) -> list[Trial]:
    """Every finished trial of the study, its cost counted with ``layers`` (this worker's costs)."""
    from optuna.trial import TrialState

    trials = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        selection = tuple(int(i) for i in t.user_attrs.get("selection", ()))
        if len(selection) != len(layers):
            continue
        cost = int(sum(int(o.costs[s]) for o, s in zip(layers, selection)))
        weights = tuple(float(t.params.get(f"w{i}", 1.0)) for i in range(len(layers)))
        trials.append(Trial(t.number, float(t.values[0]), cost, selection, weights))
    return trials
