"""The public verbs: ``optimize`` plans and applies a decomposition; ``apply`` replays a plan.

Data flows one way: check inputs -> trace the model once (shapes, fvcore count) -> score each
candidate (method, rank) per layer -> allocate under the budget -> build a decomposed copy ->
count it with fvcore to prove the budget holds. The caller's model is never changed.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import itertools
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from autodac._logging import get_logger
from autodac.cost import count_flops, count_params
from autodac.errors import AutodacError, BudgetError, ModelError, PlanError
from autodac.factorize import METHODS, get_method
from autodac.latency import LatencyCache, LatencyTable, describe_device, measure_table, resolve_device, side_by_side
from autodac.layers import IMPLEMENTATIONS, SUPPORTED_TYPES, build_factorized
from autodac.plan import DENSE, LayerChoice, Plan
from autodac.probes import (
    DEFAULT_PROBE_SIZE, Probe, _device_of, batchnorm_weights, collect_probe, fit_examples, input_covariances, split_probe, divergence, has_batchnorm, predict, reconstruction_errors,
    reestimate_batchnorm, top1_match,
)
from autodac.report import plan_table
from autodac.search.knapsack import LayerOptions, Secondary, minimum_cost, pareto_front, solve
from autodac.search.refine import Trial, refine
from autodac.search.sensitivity import SensitivityProfile, loss_curve, measure_profile, pick_ranks
from autodac.search.storage import SharedSearch, open_search
from autodac.sequential import Refit, refit_in_order
from autodac.surgery import TracedLayer, evaluating, replace_layers, run_model, trace_layers
from autodac.synthesis import DEFAULT_STEPS as SYNTHESIS_STEPS, synthesize_inputs

__all__ = ["optimize", "apply", "decompose_conv", "Result", "DEFAULT_METHODS"]

logger = get_logger(__name__)
# Transposed DAC ("tdac") is opt-in: it keeps more than DAC, but its pointwise-then-grouped pair runs
# slowly on CPUs, which made each probe evaluation of the search ~50% slower (ResNet-20: 68 s against 45 s).
DEFAULT_METHODS = ("dac", "spatial", "lowrank")


@dataclass
class Result:
    """What ``optimize`` returns: the decomposed copy, its plan, and fvcore's counts of both models."""

    model: nn.Module
    plan: Plan
    original_flops: int
    flops: int
    original_params: int
    params: int
    notes: list[str] = field(default_factory=list)
    profile: SensitivityProfile | None = None
    trials: list[Trial] = field(default_factory=list)
    pareto: list[Plan] = field(default_factory=list)  # with pareto=True: FLOPs-vs-quality front, cheapest first

    @property
    def metrics(self) -> dict[str, float]:
        """Measured figures: probe metric of the original and of the result, with and without BN re-estimation."""
        return self.plan.metrics

    @property
    def flops_ratio(self) -> float:
        """fvcore's count of ``model`` over fvcore's count of the original, at the plan's input shape."""
        return self.flops / self.original_flops

    @property
    def latency_ratio(self) -> float | None:
        """Measured latency of ``model`` over the original's (median of interleaved runs); None without a latency budget."""
        return self.plan.metrics.get("latency_ratio")

    def summary(self, tablefmt: str = "simple") -> str:
        """A per-layer table (method, rank, FLOPs before/after, predicted error) with totals."""
        head = (
            f"FLOPs (fvcore multiply-adds) {self.original_flops:,} -> {self.flops:,} "
            f"(ratio {self.flops_ratio:.4f}); parameters {self.original_params:,} -> {self.params:,}"
        )
        return plan_table(self.plan, tablefmt=tablefmt) + "\n" + head

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------- input checks


def _check_budget(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BudgetError(f"`{name}` must be a real number with 0 < {name} <= 1, but got {name}={value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise BudgetError(f"`0 < {name} <= 1` must hold, but got {name}={value!r}")
    return value


def _check_methods(methods: Iterable[str]) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    if not methods:
        raise AutodacError(f"`methods` must name at least one of {sorted(METHODS)}, but got methods={methods!r}")
    for name in methods:
        get_method(name)
    return methods


def _default_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """An input for the first Conv/Linear layer: 224x224 images, length-1024 signals, or one row."""
    for module in model.modules():
        if isinstance(module, SUPPORTED_TYPES):
            weight = module.weight
            options = {"device": weight.device, "dtype": weight.dtype}
            if isinstance(module, nn.Conv2d):
                return (torch.zeros(1, module.in_channels, 224, 224, **options),)
            if isinstance(module, nn.Conv1d):
                return (torch.zeros(1, module.in_channels, 1024, **options),)
            return (torch.zeros(1, module.in_features, **options),)
    raise ModelError("the model has no Conv1d, Conv2d or Linear layer, so there is nothing to decompose")


def _check_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...], bool]:
    if example_inputs is None:
        inputs = _default_inputs(model)
        return inputs, True
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), False
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs), False
    raise ModelError(
        f"`example_inputs` must be a tensor or a non-empty tuple of model arguments, but got {type(example_inputs).__name__}"
    )


def _input_shapes(inputs: tuple[Any, ...]) -> list[list[int]]:
    return [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)]


# ----------------------------------------------------------------------------- candidates


@dataclass
class _Candidate:
    layer: TracedLayer
    options: list[tuple[str, int | None, int, float]]  # (method, rank, cost, error); option 0 is dense
    fit: str = "plain"
    out_weights: torch.Tensor | None = None
    input_cov: torch.Tensor | None = None

    @property
    def dense_cost(self) -> int:
        return self.options[0][2]


def _skip_reason(layer: TracedLayer, methods: Sequence[str], excluded: bool) -> str | None:
    module = layer.module
    if excluded:
        return "excluded by the caller"
    if layer.geometry is None:
        return "not run on the example inputs"
    if getattr(module, "groups", 1) != 1:
        return f"grouped conv (groups={module.groups}); factorising it cannot save FLOPs"
    if getattr(module, "transposed", False):
        return "transposed conv"
    if not any(get_method(m).applies_to(tuple(module.weight.shape)) for m in methods):
        return f"none of the methods {list(methods)} applies to weight shape {tuple(module.weight.shape)}"
    return None


def _fit_weights(model: nn.Module, fit: str, layer: nn.Module) -> torch.Tensor | None:
    """The output-channel weights a layer's ``fit`` names (None unless it names a BatchNorm)."""
    fit = fit.removeprefix("seq+").removeprefix("data+")
    if fit in ("plain", "data"):
        return None
    name = fit[3:]
    try:
        norm = model.get_submodule(name)
    except AttributeError:
        raise PlanError(f"fit {fit!r} names a BatchNorm that must exist in the model, but {name!r} does not") from None
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.num_features != layer.weight.shape[0]:
        raise PlanError(
            f"fit {fit!r} must name a BatchNorm over the layer's {layer.weight.shape[0]} output channels, but {name!r} is {norm}"
        )
    return batchnorm_weights(norm, layer.weight)


def _layer_fit(model: nn.Module, layer: TracedLayer, weighting: str, data_fit: bool) -> str:
    fit = "plain"
    if weighting == "batchnorm" and layer.followed_by is not None:
        norm = model.get_submodule(layer.followed_by)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.num_features == layer.module.weight.shape[0]:
            fit = f"bn:{layer.followed_by}"
    if data_fit:
        return "data" if fit == "plain" else f"data+{fit}"
    return fit


def _candidate_options(
    layer: TracedLayer, methods: Sequence[str], out_weights: torch.Tensor | None = None, input_cov: torch.Tensor | None = None
) -> list[tuple[str, int | None, int, float]]:
    geometry = layer.geometry
    dense = geometry.dense_cost()
    options: list[tuple[str, int | None, int, float]] = [(DENSE, None, dense, 0.0)]
    shape = tuple(layer.module.weight.shape)
    for name in methods:
        method = get_method(name)
        if not method.applies_to(shape):
            continue
        errors = reconstruction_errors(layer.module, name, out_weights, input_cov)
        for rank in range(1, method.max_rank(shape) + 1):
            cost = method.cost(geometry, rank)
            if cost >= dense:
                break  # costs grow with rank: no higher rank can pay off
            options.append((name, rank, cost, float(errors[rank - 1])))
    return options


def _collect(
    model, inputs, methods, exclude, progress, weighting="batchnorm", fit_inputs: torch.Tensor | None = None
) -> tuple[list[TracedLayer], list[_Candidate], dict[str, str]]:
    """Trace the model, skip what cannot help, and list every (method, rank) option of the rest.

    With ``fit_inputs`` each layer is fitted (and scored) by the error of its output on them.
    """
    traced = trace_layers(model, inputs)
    covariances = {}
    if fit_inputs is not None:
        covariances = input_covariances(model, {t.name: t.module for t in traced if t.geometry is not None}, fit_inputs)
    candidates, skipped = [], {}
    iterator = traced
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(traced, desc="autodac: scoring layers", unit="layer", disable=None, leave=False)
    for layer in iterator:
        excluded = any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in exclude)
        reason = _skip_reason(layer, methods, excluded)
        if reason is None:
            input_cov = covariances.get(layer.name)
            fit = _layer_fit(model, layer, weighting, input_cov is not None)
            out_weights = _fit_weights(model, fit, layer.module)
            options = _candidate_options(layer, methods, out_weights, input_cov)
            if len(options) == 1:
                reason = "no factorisation is cheaper than the dense layer"
            else:
                candidates.append(_Candidate(layer, options, fit, out_weights, input_cov))
        if reason is not None:
            skipped[layer.name] = reason
    return traced, candidates, skipped


# ----------------------------------------------------------------------------- the verbs


def _params_after(module: nn.Module, method: str, rank: int) -> int:
    shape = tuple(module.weight.shape)
    n, c = shape[:2]
    k = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    bias = 0 if module.bias is None else n
    if method == "dac":
        return c * rank * k + n * c * rank + bias
    if method == "tdac":
        return c * n * rank + n * rank * k + bias
    if method == "spatial":
        return c * rank * shape[2] + rank * n * shape[3] + bias
    return rank * c * k + n * rank + bias


class _Factors:
    """One SVD per (layer, method), computed on first use and reused for every rank the search tries."""

    def __init__(self, candidates: list[_Candidate]) -> None:
        self.modules = {c.layer.name: c.layer.module for c in candidates}
        self.out_weights = {c.layer.name: c.out_weights for c in candidates}
        self.input_covs = {c.layer.name: c.input_cov for c in candidates}
        self.cache: dict[tuple[str, str], Any] = {}

    def build(self, name: str, method: str, rank: int, impl: str = "") -> nn.Module:
        key = (name, method)
        if key not in self.cache:
            self.cache[key] = get_method(method).decompose(self.modules[name].weight, self.out_weights[name], self.input_covs[name])
        return build_factorized(self.modules[name], method, rank, self.cache[key], impl)


def _choices(candidates: list[_Candidate], selection: Sequence[int], timing: LatencyTable | None = None) -> dict[str, LayerChoice]:
    layers = {}
    for i, (candidate, index) in enumerate(zip(candidates, selection)):
        method, rank, cost, error = candidate.options[index]
        latency = {}
        if timing is not None:
            latency = {
                "impl": "" if method == DENSE else timing.impls[i][index],
                "latency_before": timing.seconds[i][0] * 1e3, "latency_after": timing.seconds[i][index] * 1e3,
            }
        module = candidate.layer.module
        params = count_params(module)
        layers[candidate.layer.name] = LayerChoice(
            method=method, rank=rank, weight_shape=tuple(module.weight.shape), flops_before=candidate.dense_cost,
            flops_after=cost, params_before=params,
            params_after=params if method == DENSE else _params_after(module, method, rank), error=float(error),
            fit="plain" if method == DENSE else candidate.fit, **latency,
        )
    return layers


def _build(
    model: nn.Module, candidates: list[_Candidate], selection: Sequence[int], factors: _Factors, timing: LatencyTable | None = None
) -> nn.Module:
    replacements = {}
    for i, (candidate, index) in enumerate(zip(candidates, selection)):
        method, rank, _, _ = candidate.options[index]
        if method != DENSE:
            impl = timing.impls[i][index] if timing is not None else ""
            replacements[candidate.layer.name] = factors.build(candidate.layer.name, method, rank, impl)
    return replace_layers(model, replacements)


class _ProbeRunner:
    """Scores a candidate model on the probe, with or without BatchNorm re-estimation.

    Two figures per model from one pass over the held-out half: the *objective* the search
    maximises (minus the KL divergence from the original's outputs: smooth and label-free, so a
    1k-image probe ranks plans without the noise of top-1 counts) and the *metric* reported to
    the user (top-1 accuracy with labels, top-1 agreement without). ``evaluate`` replaces both.
    Re-estimation uses the calibration half, so a correction that only fits the images it saw
    cannot look like an improvement.
    """

    def __init__(self, model: nn.Module, probe: Probe | None, evaluate: Callable[[nn.Module], float] | None) -> None:
        self.evaluate = evaluate
        self.calibration: torch.Tensor | None = None
        self.held_out: Probe | None = None
        if probe is not None:
            if evaluate is not None:
                self.calibration = probe.inputs
            elif len(probe) < 2:  # nothing would be left to score on (the metric would crash on None)
                raise AutodacError(
                    f"`data` must hold at least 2 examples without `evaluate` (half calibrate, half score), but it held {len(probe)}"
                )
            else:
                self.calibration, self.held_out = split_probe(probe)
                self.held_out.reference = predict(model, self.held_out.inputs)

    @property
    def metric_name(self) -> str:
        if self.evaluate is not None:
            return "evaluate(model)"
        return "top-1 accuracy" if self.held_out.labels is not None else "top-1 agreement with the original"

    def score(self, model: nn.Module, reestimate: bool = False) -> tuple[float, float]:
        """``(objective, metric)`` of ``model`` (re-estimated on a copy first when asked)."""
        if reestimate:
            model = reestimate_batchnorm(copy.deepcopy(model), self.calibration)
        if self.evaluate is not None:
            value = self.evaluate(model)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise AutodacError(f"`evaluate(model)` must return a finite real number, but returned {value!r}")
            return float(value), float(value)
        outputs = predict(model, self.held_out.inputs)
        reference = self.held_out.reference
        targets = self.held_out.labels if self.held_out.labels is not None else reference.argmax(1)
        return -divergence(outputs, reference), top1_match(outputs, targets)


def optimize(
    model: nn.Module,
    flops_budget: float | None = None,
    *,
    latency_budget: float | None = None,
    device: Any = None,
    latency_cache: Any = True,
    example_inputs: Any = None,
    data: Iterable[Any] | None = None,
    synthesize: int = 0,
    evaluate: Callable[[nn.Module], float] | None = None,
    methods: Iterable[str] = DEFAULT_METHODS,
    exclude: Iterable[str] = (),
    weighting: str = "batchnorm",
    fit_to_data: bool = True,
    sequential_fit: bool = True,
    refit_candidates: int = 1,
    probe_size: int = DEFAULT_PROBE_SIZE,
    profile_size: int = 128,
    profile_points: int = 4,
    reestimate_bn: bool = True,
    n_trials: int = 16,
    timeout: float | None = None,
    seed: int = 0,
    pareto: bool = False,
    progress: bool = True,
    storage: Any = None,
    study_name: str | None = None,
) -> Result:
    """Decompose a copy of ``model`` to at most ``flops_budget`` of its fvcore FLOPs and/or ``latency_budget`` of its latency.

    ``flops_budget`` is a ratio in ``(0, 1]`` of fvcore's count of the model on
    ``example_inputs`` (a tensor or tuple of arguments; if omitted, the first probe example is
    used, or a 224x224 image batch of one is assumed with a warning). ``methods`` restricts the
    factorisations the planner may choose per layer; ``exclude`` lists glob patterns of layer
    names to keep dense.

    Without ``data`` the ranks come from an exact knapsack on reconstruction error. With
    ``data`` (batches ``x`` or ``(x, y)``; at most ``probe_size`` examples are used) each layer's
    sensitivity is measured on ``profile_size`` probe examples at ``profile_points`` options (the
    rest read off its loss-versus-error curve), the knapsack runs on it, and
    Optuna refines the allocation for ``n_trials`` trials (or ``timeout`` seconds) on the probe
    metric: top-1 accuracy with labels, agreement with the original without, or
    ``evaluate(model) -> float`` (higher is better) when given. With no data at all,
    ``synthesize=N`` makes an unlabeled probe of ``N`` inputs whose BatchNorm statistics match
    the model's stored ones (``autodac.synthesize_inputs``; needs BatchNorm layers) and plans on
    it as on data. BatchNorm statistics are
    re-estimated on the probe when ``reestimate_bn`` and kept only if, on probe examples the
    re-estimation did not see, the outputs move closer to the original's and the metric does not fall.
    With ``pareto=True`` the search is two-objective (FLOPs and the probe objective; each trial
    draws its own budget up to ``flops_budget``) and ``result.pareto`` lists the front as plans.
    ``latency_budget`` is the decomposed model's measured latency as a ratio of the original's, on
    ``device`` (default: where the model is) at the shape of ``example_inputs``, with the current
    thread count: every candidate option of every layer is timed (``latency_cache``: True for
    the per-user cache file, a path, or False), the planner picks method, rank and the fastest
    implementation per layer, and the result is timed side by side with the original
    (interleaved runs, median ratio), tightening and re-planning until the measured ratio meets
    the budget. Either budget alone or both together.
    ``fit_to_data`` fits each layer to the covariance of its probe inputs (output error instead
    of weight error); ``sequential_fit`` then re-fits the chosen layers in execution order to
    reproduce the original layers' outputs from the inputs the decomposed layers before them
    produce (``autodac.sequential``; errors stop compounding through depth), kept only when the
    held-out probe says so (with ``refit_candidates=k`` the search's ``k`` best plans are each
    re-fitted and the best on the held-out half is kept: at deep cuts the re-fit repairs some
    plans more than others, at ``k`` times the re-fit's cost); ``weighting`` ("batchnorm" or "none") weighs output channels by the
    BatchNorm that follows. Seeded runs without ``timeout`` are deterministic. The caller's model
    is not changed.
    ``storage`` (a database URL such as ``sqlite:///search.db`` or ``postgresql://host/db``, a
    ``.journal``/``.log`` file, or an Optuna storage) with ``study_name`` keeps the Optuna search
    there instead of in memory: every call naming the same study adds its ``n_trials`` to one
    search, reads back what another worker has measured (the sensitivity profile, the latency
    table of its device, the BatchNorm decision, plans already evaluated) and returns the best
    plan found by all of them; a study made for another model, budget or probe is refused, and
    a trial left running by a killed worker is failed and run again (``autodac.search.storage``).
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}")
    if flops_budget is None and latency_budget is None:
        raise BudgetError("at least one budget must be given (flops_budget or latency_budget, each a ratio in (0, 1]), but both were None")
    budget = None if flops_budget is None else _check_budget("flops_budget", flops_budget)
    latency = None if latency_budget is None else _check_budget("latency_budget", latency_budget)
    timing_device = resolve_device(device, model) if latency is not None else None
    methods = _check_methods(methods)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    if weighting not in ("batchnorm", "none"):
        raise AutodacError(f"`weighting` must be 'batchnorm' or 'none', but got weighting={weighting!r}")
    for name, value, low in (("probe_size", probe_size, 2), ("profile_size", profile_size, 1), ("profile_points", profile_points, 1), ("n_trials", n_trials, 1), ("refit_candidates", refit_candidates, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise AutodacError(f"`{name} >= {low}` must hold (an integer), but got {name}={value!r}")
    if evaluate is not None and not callable(evaluate):
        raise AutodacError(f"`evaluate` must be a callable model -> float, but got {type(evaluate).__name__}")
    if isinstance(synthesize, bool) or not isinstance(synthesize, int) or synthesize < 0 or synthesize == 1:
        raise AutodacError(f"`synthesize` must be 0 (off) or an integer >= 2 (inputs to synthesise), but got synthesize={synthesize!r}")
    if synthesize and data is not None:
        raise AutodacError("`data` and `synthesize` are alternatives (synthesised inputs stand in for missing data), but both were given")
    probe = collect_probe(data, probe_size) if data is not None else None
    if example_inputs is None and probe is not None:
        example_inputs = probe.inputs[:1].to(_device_of(model))
    inputs, assumed = _check_inputs(model, example_inputs)
    notes = []
    if assumed:
        note = f"no example_inputs given; assumed one input of shape {_input_shapes(inputs)[0]} (pass example_inputs to plan for your shape)"
        warnings.warn(f"autodac: {note}", UserWarning, stacklevel=2)
        notes.append(note)
    probe_source: dict[str, Any] = {}
    if probe is not None:
        probe_source = {"source": "data", "examples": len(probe)}
    elif synthesize:
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            raise AutodacError(f"`synthesize` needs a model of one tensor input, but example_inputs has {len(inputs)} arguments")
        run_model(model, inputs)  # a clear error for inputs the model cannot take, before any synthesis
        probe = Probe(synthesize_inputs(model, inputs[0], synthesize, seed=seed, progress=progress), None)
        probe_source = {"source": "synthetic", "examples": synthesize, "steps": SYNTHESIS_STEPS, "seed": seed}
        notes.append(f"no data: the probe is {synthesize} inputs synthesised to match the model's BatchNorm statistics")

    fit_inputs = fit_examples(probe) if (probe is not None and fit_to_data) else None
    traced, candidates, skipped = _collect(model, inputs, methods, exclude, progress, weighting, fit_inputs)
    if not candidates:
        detail = "; ".join(f"{name}: {why}" for name, why in skipped.items()) or "no Conv1d, Conv2d or Linear layer"
        raise ModelError(f"the model must have at least one layer that can be decomposed, but none can ({detail})")
    original = count_flops(model, inputs)
    target = math.floor(budget * original.total) if budget is not None else original.total
    fixed = original.total - sum(c.dense_cost for c in candidates)
    weight_scores = [_layer_options(c) for c in candidates]
    reachable = fixed + minimum_cost(weight_scores)
    if budget is not None and reachable > target:
        raise BudgetError(
            f"`flops_budget >= {math.ceil(reachable / original.total * 1e4) / 1e4:.4f}` must hold for this model with "
            f"methods={list(methods)} (the smallest reachable ratio), but got flops_budget={budget!r}"
        )

    shared = open_search(
        storage, study_name, model, probe, probe is not None or evaluate is not None, pareto=pareto, settings={
            "flops_budget": budget, "latency_budget": latency, "input_shapes": _input_shapes(inputs), "methods": list(methods),
            "exclude": list(exclude), "weighting": weighting, "fit_to_data": fit_to_data, "sequential_fit": sequential_fit,
            "refit_candidates": refit_candidates, "profile_size": profile_size,
            "profile_points": profile_points, "reestimate_bn": reestimate_bn, "evaluate": evaluate is not None,
        },
    )
    metrics: dict[str, float] = {}
    profile = None
    refined = None
    scores = weight_scores
    use_bn = False
    factors = _Factors(candidates)
    timing: LatencyTable | None = None
    secondary: Secondary | None = None
    capacity = target - fixed
    if latency is not None:
        measure = functools.partial(_measure_latency, model, inputs, candidates, factors, timing_device, latency_cache, progress)
        timing = measure() if shared is None else shared.latency(timing_device, measure)
        if budget is not None:
            secondary = Secondary([o.costs for o in weight_scores], target - fixed)
        capacity = timing.capacity(latency)
        fastest = minimum_cost(_costed(weight_scores, timing))
        if fastest > capacity:  # the tables say no plan is fast enough: believe only an end-to-end measurement
            measured = _latency_ratio(model, _build(model, candidates, timing.fastest(), factors, timing), inputs, timing.device)[0]
            if measured > latency:
                _refuse_latency(latency, measured, timing)
            capacity = fastest

    def allocate(layer_scores: list[LayerOptions], room: int | None = None) -> list[int]:
        try:
            return solve(_costed(layer_scores, timing), capacity if room is None else room, secondary=secondary)
        except ValueError:
            raise BudgetError(
                f"a plan must meet both flops_budget={budget!r} and latency_budget={latency!r}, but none of the measured "
                "options does: loosen one of them"
            ) from None

    if probe is None and evaluate is None:
        selection = allocate(scores)
    else:
        runner = _ProbeRunner(model, probe, evaluate)
        if runner.held_out is not None:
            profile, scores = _profile_scores(model, candidates, runner.held_out, factors, profile_size, profile_points, progress, shared)
        metrics["probe_original"] = runner.score(model)[1]
        can_reestimate = reestimate_bn and runner.calibration is not None and has_batchnorm(model)

        def decide_bn() -> bool:  # decide once, on the plain allocation, whether re-estimation helps at all
            first = _build(model, candidates, allocate(scores), factors, timing)
            with_bn, without = runner.score(first, reestimate=True), runner.score(first)
            return bool(with_bn[0] > without[0] and with_bn[1] >= without[1])

        use_bn = can_reestimate and (decide_bn() if shared is None else shared.piece("use_bn", decide_bn))

        def evaluate_selection(selection: tuple[int, ...]) -> float:
            return runner.score(_build(model, candidates, selection, factors, timing), reestimate=use_bn)[0]

        costed = _costed(scores, timing)
        refined = refine(
            costed, capacity, evaluate_selection, n_trials=n_trials, timeout=timeout, seed=seed, progress=progress,
            min_budget=minimum_cost(costed) if pareto else None, secondary=secondary,
            study=None if shared is None else shared.study,
        )
        selection = list(refined.best.selection)

    decomposed = _build(model, candidates, selection, factors, timing)
    if timing is not None:  # the tables predict; only side-by-side runs decide
        weights = refined.best.weights if refined is not None else None
        scaled = scores if weights is None else [LayerOptions(o.costs, o.errors * w) for o, w in zip(scores, weights)]
        selection, decomposed, measured = _meet_latency(
            latency, capacity, minimum_cost(_costed(weight_scores, timing)), selection, decomposed, timing,
            plan_at=lambda room: allocate(scaled, room), build=lambda chosen: _build(model, candidates, chosen, factors, timing),
            measure=lambda candidate: _latency_ratio(model, candidate, inputs, timing.device),
        )
        ratio, original_seconds, seconds = measured
        metrics.update(latency_ratio=ratio, latency_original_ms=original_seconds * 1e3, latency_ms=seconds * 1e3)

    planned_budget = {} if budget is None else {"flops": budget}
    if latency is not None:
        planned_budget["latency"] = latency
        notes.append(f"latency measured on {describe_device(timing.device)}, inputs {_input_shapes(inputs)}")
    plan = Plan(
        layers=_choices(candidates, selection, timing), original_flops=original.total, budget=planned_budget,
        input_shapes=_input_shapes(inputs), input_assumed=assumed, skipped=skipped, notes=notes, probe=probe_source,
    )
    published = refined.best if refined is not None else None
    if probe is not None and sequential_fit and _selection_factorizes(selection, candidates):
        pool = [(published, decomposed)]
        if refined is not None and timing is None:  # a latency plan was tuned on the device: it is not swapped
            for trial in _runners_up(refined, candidates, refit_candidates - 1):
                pool.append((trial, _build(model, candidates, trial.selection, factors)))
        decomposed, published = _refit_best(model, pool, plan, candidates, probe, runner, use_bn, progress)
    if probe is not None or evaluate is not None:
        plain = runner.score(decomposed)
        metrics["probe_without_bn_reestimate"] = metrics["probe"] = plain[1]
        if can_reestimate:
            reestimated = reestimate_batchnorm(copy.deepcopy(decomposed), runner.calibration)
            with_bn = runner.score(reestimated)
            metrics["probe_with_bn_reestimate"] = with_bn[1]
            if with_bn[0] > plain[0] and with_bn[1] >= plain[1]:
                decomposed = reestimated
                metrics["probe"] = with_bn[1]
                metrics["bn_reestimated"] = 1.0  # apply(model, plan, data) redoes it
                plan.notes.append("BatchNorm statistics re-estimated on the probe (kept: outputs closer to the original's, metric not lower)")
            else:
                plan.notes.append("BatchNorm re-estimation tried and rejected (outputs not closer to the original's, or metric lower)")
        metrics["probe_examples"] = float(len(probe)) if probe is not None else 0.0
        plan.notes.append(f"probe metric: {runner.metric_name} on {len(runner.held_out) if runner.held_out is not None else 0} held-out probe examples")
    plan.metrics.update(metrics)
    counted = count_flops(decomposed, inputs).total
    if counted != plan.flops or counted > target:  # the closed form and fvcore disagree: a bug, never a silent miss
        raise AutodacError(f"internal check failed: fvcore counts {counted} FLOPs, plan predicts {plan.flops}, budget {target}")
    logger.info("planned %d of %d layers; FLOPs ratio %.4f", len(plan.factorized), len(plan.layers), plan.flops_ratio)
    front = [] if not (pareto and refined) else [_front_plan(plan, candidates, t, timing) for t in refined.front]
    if shared is not None:
        plan.notes.append(shared.note(n_trials))
        shared.publish(plan, published.value, published.number, front)
    return Result(
        model=decomposed, plan=plan, original_flops=original.total, flops=counted,
        original_params=count_params(model), params=count_params(decomposed), notes=notes,
        profile=profile, trials=[] if refined is None else refined.trials, pareto=front,
    )


_LATENCY_ATTEMPTS = 6  # side-by-side measurements spent adjusting a latency plan
_LATENCY_SLACK = 0.03  # loosen a plan that meets its latency budget by more than this (fraction of the original's time)


def _selection_factorizes(selection: Sequence[int], candidates: list[_Candidate]) -> bool:
    return any(c.options[i][0] != DENSE for c, i in zip(candidates, selection))


def _refits(layers: dict[str, LayerChoice], model: nn.Module) -> dict[str, Refit]:
    """What ``refit_in_order`` needs for each factorised layer of ``layers``."""
    return {
        name: Refit(c.method, c.rank, c.impl, _fit_weights(model, c.fit, model.get_submodule(name)))
        for name, c in layers.items() if not c.is_dense
    }


def _runners_up(refined, candidates: list[_Candidate], count: int) -> list[Trial]:
    """The ``count`` best trials after the best, one per distinct plan that factorises something."""
    seen, picked = {tuple(refined.best.selection)}, []
    for trial in sorted(refined.trials, key=lambda t: (-t.value, t.number)):
        if len(picked) >= count:
            break
        if tuple(trial.selection) not in seen and _selection_factorizes(trial.selection, candidates):
            seen.add(tuple(trial.selection))
            picked.append(trial)
    return picked


def _refit_best(model, pool, plan: Plan, candidates, probe: Probe, runner: "_ProbeRunner", use_bn: bool, progress: bool):
    """The best of the pool's plans re-fitted in execution order, if it beats the search's plan as it was.

    ``pool`` holds ``(trial, model)`` pairs, the search's own plan first. Each is re-fitted and
    scored on the held-out probe half; the best is kept if it scores higher than the first
    without re-fit (objective up, metric not down). ``plan`` is updated in place to the winner
    (its layers, ``seq+`` fits, notes); returns the model to keep and the trial it came from.
    """
    first_trial, first_model = pool[0]
    before = runner.score(first_model, reestimate=use_bn)
    best = None
    for trial, candidate in pool:
        layers = plan.layers if trial is first_trial else _choices(candidates, trial.selection)
        refitted, names = refit_in_order(model, candidate, _refits(layers, model), fit_examples(probe), progress)
        after = runner.score(refitted, reestimate=use_bn)
        if names and (best is None or after[0] > best[0][0]):
            best = (after, trial, refitted, layers, names)
    if best is None or not (best[0][0] > before[0] and best[0][1] >= before[1]):
        after = best[0] if best is not None else before
        plan.notes.append(
            f"sequential re-fit tried and rejected (held-out objective {after[0]:.4g} vs {before[0]:.4g}, metric {after[1]:.4g} vs {before[1]:.4g})"
        )
        return first_model, first_trial
    after, trial, refitted, layers, names = best
    plan.layers = {name: dataclasses.replace(c, fit="seq+" + c.fit) if name in names else c for name, c in layers.items()}
    plan.metrics["probe_before_sequential_fit"] = before[1]
    plan.notes.append(f"{len(names)} layers re-fitted in execution order to the decomposed model's own inputs (kept: held-out probe better)")
    if len(pool) > 1:
        plan.notes.append(
            f"of the search's {len(pool)} best plans, each re-fitted, "
            + ("its best plan" if trial is first_trial else f"trial {trial.number}") + " scored best on the held-out probe"
        )
    return refitted, trial


def _meet_latency(budget, capacity, floor, selection, decomposed, timing, plan_at, build, measure):
    """The roomiest plan whose measured latency ratio meets ``budget``, found by re-planning at other capacities.

    Per-layer tables only predict the whole model's time (layers interact through caches and
    the scheduler), so each plan is timed side by side with the original: one that misses is
    re-planned with the overshoot taken off its room, one with more than ``_LATENCY_SLACK``
    to spare is given the slack back, bisecting between the two once both are known.
    Refuses the budget, with the best ratio measured, when even the fastest plan misses it.
    """
    best = None  # (capacity, selection, model, measurement) of the roomiest plan that met the budget
    missed = None  # the smallest capacity whose plan missed
    for _ in range(_LATENCY_ATTEMPTS):
        # an all-dense plan is the original itself: ratio 1 by definition, not by a noisy measurement
        measured = measure(decomposed) if any(selection) else (1.0, timing.original, timing.original)
        ratio = measured[0]
        logger.info("latency plan at %.3f ms of layer time: measured ratio %.4f (budget %.4f)", capacity / 1e6, ratio, budget)
        if ratio <= budget:
            if best is None or capacity > best[0]:
                best = (capacity, selection, decomposed, measured)
            if budget - ratio < _LATENCY_SLACK:
                break
            room = capacity + int((budget - ratio) * timing.original * 1e9) if missed is None else (capacity + missed) // 2
        else:
            missed = capacity if missed is None else min(missed, capacity)
            if capacity <= floor:
                break
            room = capacity - int((ratio - budget) * timing.original * 1e9 * 1.25) if best is None else (best[0] + capacity) // 2
            room = max(room, floor)
        chosen = plan_at(room)
        capacity = room
        if chosen == selection:
            if ratio <= budget:
                break  # more room buys nothing the tables can see
            continue  # the same plan again: keep tightening
        selection, decomposed = chosen, build(chosen)
    if best is None:
        _refuse_latency(budget, min(ratio, measure(build(timing.fastest()))[0]), timing)
    return best[1], best[2], best[3]


def _costed(scores: list[LayerOptions], timing: LatencyTable | None) -> list[LayerOptions]:
    """The scores with their costs in the unit the budget is in: FLOPs, or measured nanoseconds."""
    if timing is None:
        return scores
    return [LayerOptions(costs, o.errors) for costs, o in zip(timing.costs(), scores)]


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    if all(p.device == device for p in itertools.chain(module.parameters(), module.buffers())):
        return module
    return copy.deepcopy(module).to(device)


def _inputs_on(inputs: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


def _measure_latency(model, inputs, candidates: list[_Candidate], factors: _Factors, device, cache_path, progress) -> LatencyTable:
    cache = LatencyCache.open(cache_path)
    reference = _on_device(model, device)
    layers = [
        (c.layer.module, c.layer.geometry, [o[:2] for o in c.options], functools.partial(factors.build, c.layer.name))
        for c in candidates
    ]
    with evaluating(reference):
        return measure_table(reference, _inputs_on(inputs, device), layers, IMPLEMENTATIONS, device, cache, progress)


def _latency_ratio(model: nn.Module, decomposed: nn.Module, inputs, device) -> tuple[float, float, float]:
    """``(ratio, original s, decomposed s)``: medians of interleaved end-to-end runs on ``device``."""
    reference, candidate = _on_device(model, device), _on_device(decomposed, device)
    with evaluating(reference), evaluating(candidate):
        return side_by_side(reference, candidate, _inputs_on(inputs, device), device)


def _refuse_latency(budget: float, best: float, timing: LatencyTable):
    raise BudgetError(
        f"`latency_budget >= {math.ceil(best * 1e3) / 1e3:.3f}` must hold for this model on {describe_device(timing.device)} "
        f"(the best latency ratio measured, with every layer at its fastest option), but got latency_budget={budget!r}"
    )


def _front_plan(template: Plan, candidates: list[_Candidate], trial: Trial, timing: LatencyTable | None = None) -> Plan:
    """One plan of the Pareto front, with the probe objective it scored (no model is built)."""
    return Plan(
        layers=_choices(candidates, trial.selection, timing), original_flops=template.original_flops, budget=dict(template.budget),
        input_shapes=template.input_shapes, input_assumed=template.input_assumed, skipped=dict(template.skipped),
        metrics={"probe_objective": trial.value, "trial": float(trial.number)}, notes=list(template.notes),
    )


def _profile_scores(
    model, candidates, held_out: Probe, factors: _Factors, size: int, points: int, progress: bool, shared: SharedSearch | None = None
):
    """Measure each layer's probe loss at a few options and read every other option off that curve.

    The measured options are spread by cost along the layer's front of (cost, reconstruction
    error), whatever their method; each option's loss is then interpolated from the layer's
    measured loss-versus-error points, so methods compete on one per-layer scale. A ``shared``
    search measures the profile once for all its workers.
    """
    sample = held_out.subset(slice(0, size))
    reference = predict(model, sample.inputs)

    def loss(candidate_model: nn.Module) -> float:
        return divergence(predict(candidate_model, sample.inputs), reference)

    rows, fronts = [], []
    for candidate, options in zip(candidates, (_layer_options(c) for c in candidates)):
        front = [int(i) for i in pareto_front(options) if int(i) != 0]
        chosen = pick_ranks(front, [int(options.costs[i]) for i in front], points) if front else []
        rows.append((candidate.layer.name, candidate.layer.module, [candidate.options[i][:2] for i in chosen]))
        fronts.append(chosen)
    measure = functools.partial(measure_profile, model, rows, factors.build, loss, len(sample), progress)
    profile = measure() if shared is None else shared.profile(measure)
    scores = []
    for candidate, chosen in zip(candidates, fronts):
        options = _layer_options(candidate)
        measured = profile.losses[candidate.layer.name]
        curve_points = [(options.errors[i], measured[candidate.options[i][:2]]) for i in chosen]
        losses = loss_curve(options.errors, curve_points)
        losses[0] = 0.0  # dense
        scores.append(LayerOptions(options.costs, losses))
    return profile, scores


def _layer_options(candidate: _Candidate) -> LayerOptions:
    return LayerOptions(
        np.array([o[2] for o in candidate.options], dtype=np.int64), np.array([o[3] for o in candidate.options])
    )


def apply(model: nn.Module, plan: Plan, data: Iterable[Any] | None = None) -> nn.Module:
    """A copy of ``model`` with every layer of ``plan`` factorised; refuses a plan that does not fit.

    Layers the plan fitted to probe data (``fit`` starting with ``"data"``, or re-fitted in
    order: ``"seq+"``) need the same ``data`` again to be rebuilt identically (a plan made with ``synthesize=N`` makes its inputs
    again from the recipe it records); with it, BatchNorm statistics are re-estimated too
    when ``optimize`` kept that correction, so the copy equals ``result.model``. Every replacement is built and checked before
    anything is swapped, so a refused plan leaves nothing half done (and the caller's model is
    never touched).
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise PlanError(f"`plan` must be an autodac.Plan, but got {type(plan).__name__}")
    data_fitted = [name for name, c in plan.factorized.items() if c.fit.removeprefix("seq+").startswith("data")]
    refitted = [name for name, c in plan.factorized.items() if c.fit.startswith("seq+")]
    covariances: dict[str, torch.Tensor] = {}
    if data is None and plan.probe.get("source") == "synthetic" and (data_fitted or refitted or plan.metrics.get("bn_reestimated")):
        data = _replay_synthesis(model, plan)
    needing = data_fitted or refitted
    if needing and data is None:
        raise PlanError(
            f"layers fitted to probe data must be rebuilt from the same data, so `data` must be given, "
            f"but got data=None (layers {needing[:3]}{'...' if len(needing) > 3 else ''})"
        )
    examples = int(plan.metrics.get("probe_examples", DEFAULT_PROBE_SIZE))
    replayed = collect_probe(data, max(2, examples)) if data is not None else None  # once: `data` may be a one-shot iterator
    if data_fitted:
        modules = {}
        for name in data_fitted:
            try:
                modules[name] = model.get_submodule(name)
            except AttributeError:
                raise PlanError(f"the plan's layer {name!r} must exist in the model, but it does not") from None
        covariances = input_covariances(model, modules, fit_examples(replayed))
    replacements = {}
    for name, choice in plan.factorized.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise PlanError(f"the plan's layer {name!r} must exist in the model, but it does not") from None
        if not isinstance(module, SUPPORTED_TYPES):
            raise PlanError(f"the plan's layer {name!r} must be a Conv1d, Conv2d or Linear, but it is a {type(module).__name__}")
        if tuple(module.weight.shape) != tuple(choice.weight_shape):
            raise PlanError(
                f"layer {name!r} must have the weight shape the plan was made for, {tuple(choice.weight_shape)}, "
                f"but it has {tuple(module.weight.shape)}"
            )
        try:
            out_weights = _fit_weights(model, choice.fit, module)
            input_cov = covariances.get(name)
            decomposition = None
            if out_weights is not None or input_cov is not None:
                if choice.method not in METHODS:
                    raise AutodacError(f"`method` must be one of {sorted(METHODS)}, but got method={choice.method!r}")
                decomposition = get_method(choice.method).decompose(module.weight, out_weights, input_cov)
            replacements[name] = build_factorized(module, choice.method, choice.rank, decomposition, choice.impl)
        except AutodacError as error:
            raise PlanError(f"layer {name!r}: {error}") from None
    result = replace_layers(model, replacements)
    if refitted:  # replay the sequential re-fit optimize kept, on the same fit inputs, in the same order
        chosen = {name: plan.layers[name] for name in refitted}
        result, _ = refit_in_order(model, result, _refits(chosen, model), fit_examples(replayed))
    if plan.metrics.get("bn_reestimated") and replayed is not None:  # replay the re-estimation optimize kept
        reestimate_batchnorm(result, split_probe(replayed)[0])
    return result


def _replay_synthesis(model: nn.Module, plan: Plan) -> torch.Tensor:
    """The synthetic probe ``optimize(..., synthesize=N)`` planned on, made again from the plan's recipe."""
    recipe = plan.probe
    if not plan.input_shapes:
        raise PlanError("a plan made on a synthetic probe must record its input shape, but `input_shapes` is empty")
    weight = next(iter(model.parameters()), None)
    options = {} if weight is None else {"device": weight.device, "dtype": weight.dtype}
    try:
        example = torch.zeros(plan.input_shapes[0], **options)
        return synthesize_inputs(
            model, example, int(recipe["examples"]), steps=int(recipe.get("steps", SYNTHESIS_STEPS)),
            seed=int(recipe.get("seed", 0)), progress=False,
        )
    except (KeyError, TypeError, ValueError) as problem:
        raise PlanError(f"a synthetic probe recipe needs integer `examples`, `steps` and `seed`, but got {recipe!r} ({problem})") from None


def decompose_conv(conv: nn.Module, rank: int, method: str = "dac") -> nn.Module:
    """Factorise one ``Conv1d``/``Conv2d``/``Linear`` by ``method`` at ``rank`` (a new module; ``conv`` is unchanged)."""
    return build_factorized(conv, method, rank)
