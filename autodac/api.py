"""The public verbs: ``optimize`` plans and applies a decomposition; ``apply`` replays a plan.

Data flows one way: check inputs -> trace the model once (shapes, fvcore count) -> score each
candidate (method, rank) per layer -> allocate under the budget -> build a decomposed copy ->
count it with fvcore to prove the budget holds. The caller's model is never changed.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from autodac._logging import get_logger
from autodac.cost import count_flops, count_params
from autodac.errors import AutodacError, BudgetError, ModelError, PlanError
from autodac.factorize import METHODS, get_method
from autodac.layers import SUPPORTED_TYPES, build_factorized
from autodac.plan import DENSE, LayerChoice, Plan
from autodac.probes import reconstruction_errors
from autodac.report import plan_table
from autodac.search.knapsack import LayerOptions, minimum_cost, solve
from autodac.surgery import TracedLayer, replace_layers, trace_layers

__all__ = ["optimize", "apply", "decompose_conv", "Result", "DEFAULT_METHODS"]

logger = get_logger(__name__)
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

    @property
    def flops_ratio(self) -> float:
        """fvcore's count of ``model`` over fvcore's count of the original, at the plan's input shape."""
        return self.flops / self.original_flops

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


def _candidate_options(layer: TracedLayer, methods: Sequence[str]) -> list[tuple[str, int | None, int, float]]:
    geometry = layer.geometry
    dense = geometry.dense_cost()
    options: list[tuple[str, int | None, int, float]] = [(DENSE, None, dense, 0.0)]
    shape = tuple(layer.module.weight.shape)
    for name in methods:
        method = get_method(name)
        if not method.applies_to(shape):
            continue
        errors = reconstruction_errors(layer.module, name)
        for rank in range(1, method.max_rank(shape) + 1):
            cost = method.cost(geometry, rank)
            if cost >= dense:
                break  # costs grow with rank: no higher rank can pay off
            options.append((name, rank, cost, float(errors[rank - 1])))
    return options


def _collect(model, inputs, methods, exclude, progress) -> tuple[list[TracedLayer], list[_Candidate], dict[str, str]]:
    traced = trace_layers(model, inputs)
    candidates, skipped = [], {}
    iterator = traced
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(traced, desc="autodac: scoring layers", unit="layer", disable=None, leave=False)
    for layer in iterator:
        excluded = any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in exclude)
        reason = _skip_reason(layer, methods, excluded)
        if reason is None:
            options = _candidate_options(layer, methods)
            if len(options) == 1:
                reason = "no factorisation is cheaper than the dense layer"
            else:
                candidates.append(_Candidate(layer, options))
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
    if method == "spatial":
        return c * rank * shape[2] + rank * n * shape[3] + bias
    return rank * c * k + n * rank + bias


def optimize(
    model: nn.Module,
    flops_budget: float,
    *,
    example_inputs: Any = None,
    methods: Iterable[str] = DEFAULT_METHODS,
    exclude: Iterable[str] = (),
    progress: bool = True,
) -> Result:
    """Decompose a copy of ``model`` to at most ``flops_budget`` of its fvcore FLOPs.

    ``flops_budget`` is a ratio in ``(0, 1]`` of fvcore's count of the model on
    ``example_inputs`` (a tensor or tuple of arguments; if omitted, a 224x224 image batch of one
    is assumed and a warning says so). ``methods`` restricts the factorisations the planner may
    choose per layer (``"dac"``, ``"spatial"``, ``"lowrank"``); ``exclude`` lists glob patterns of
    layer names to keep dense. Each layer's rank is chosen by an exact knapsack on the relative
    reconstruction error. Returns a ``Result``; the caller's model is not changed.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}")
    budget = _check_budget("flops_budget", flops_budget)
    methods = _check_methods(methods)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    inputs, assumed = _check_inputs(model, example_inputs)
    notes = []
    if assumed:
        note = f"no example_inputs given; assumed one input of shape {_input_shapes(inputs)[0]} (pass example_inputs to plan for your shape)"
        warnings.warn(f"autodac: {note}", UserWarning, stacklevel=2)
        notes.append(note)

    traced, candidates, skipped = _collect(model, inputs, methods, exclude, progress)
    if not candidates:
        detail = "; ".join(f"{name}: {why}" for name, why in skipped.items()) or "no Conv1d, Conv2d or Linear layer"
        raise ModelError(f"the model must have at least one layer that can be decomposed, but none can ({detail})")
    original = count_flops(model, inputs)
    target = math.floor(budget * original.total)
    fixed = original.total - sum(c.dense_cost for c in candidates)
    layer_options = [
        LayerOptions(np.array([o[2] for o in c.options], dtype=np.int64), np.array([o[3] for o in c.options])) for c in candidates
    ]
    reachable = fixed + minimum_cost(layer_options)
    if reachable > target:
        raise BudgetError(
            f"`flops_budget >= {math.ceil(reachable / original.total * 1e4) / 1e4:.4f}` must hold for this model with "
            f"methods={list(methods)} (the smallest reachable ratio), but got flops_budget={budget!r}"
        )
    selection = solve(layer_options, target - fixed)

    layers = {}
    for candidate, index in zip(candidates, selection):
        method, rank, cost, error = candidate.options[index]
        module = candidate.layer.module
        params = count_params(module)
        layers[candidate.layer.name] = LayerChoice(
            method=method, rank=rank, weight_shape=tuple(module.weight.shape), flops_before=candidate.dense_cost,
            flops_after=cost, params_before=params,
            params_after=params if method == DENSE else _params_after(module, method, rank), error=error,
        )
    plan = Plan(
        layers=layers, original_flops=original.total, budget={"flops": budget}, input_shapes=_input_shapes(inputs),
        input_assumed=assumed, skipped=skipped, notes=notes,
    )
    decomposed = apply(model, plan)
    counted = count_flops(decomposed, inputs).total
    if counted != plan.flops or counted > target:  # the closed form and fvcore disagree: a bug, never a silent miss
        raise AutodacError(f"internal check failed: fvcore counts {counted} FLOPs, plan predicts {plan.flops}, budget {target}")
    logger.info("planned %d of %d layers; FLOPs ratio %.4f", len(plan.factorized), len(layers), plan.flops_ratio)
    return Result(
        model=decomposed, plan=plan, original_flops=original.total, flops=counted,
        original_params=count_params(model), params=count_params(decomposed), notes=notes,
    )


def apply(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` with every layer of ``plan`` factorised; refuses a plan that does not fit.

    Every replacement is built and checked before anything is swapped, so a refused plan
    leaves nothing half done (and the caller's model is never touched).
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise PlanError(f"`plan` must be an autodac.Plan, but got {type(plan).__name__}")
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
            replacements[name] = build_factorized(module, choice.method, choice.rank)
        except AutodacError as error:
            raise PlanError(f"layer {name!r}: {error}") from None
    return replace_layers(model, replacements)


def decompose_conv(conv: nn.Module, rank: int, method: str = "dac") -> nn.Module:
    """Factorise one ``Conv1d``/``Conv2d``/``Linear`` by ``method`` at ``rank`` (a new module; ``conv`` is unchanged)."""
    return build_factorized(conv, method, rank)
