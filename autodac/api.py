"""The public verbs: ``optimize`` plans and applies a decomposition; ``apply`` replays a plan.

Data flows one way: check inputs -> trace the model once (shapes, fvcore count) -> score each
candidate (method, rank) per layer -> allocate under the budget -> build a decomposed copy ->
count it with fvcore to prove the budget holds. The caller's model is never changed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import functools
import inspect
import itertools
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from autodac._logging import get_logger, peak_memory_bytes
from autodac.attention import unfuse_attention
from autodac.cost import FlopCount, count_flops, count_params
from autodac.errors import AutodacError, BudgetError, ModelError, PlanError
from autodac.batches import Batch, arguments, count, per_example, tensor_leaves
from autodac.budgets import Budget, Budgets, gather
from autodac.factorize import METHODS, get_method
from autodac.latency import LatencyCache, LatencyTable, describe_device, measure_table, resolve_device, side_by_side
from autodac.options import (
    DEFAULT_METHODS, GROUPS, SWITCH, DistillOptions, FitOptions, ProbeOptions, SearchOptions, StudyOptions, fingerprinted,
)
from autodac.distill import distill as distill_model, replay as replay_distillation
from autodac.layers import IMPLEMENTATIONS, SUPPORTED_TYPES, build_factorized, keep_shape_attributes
from autodac.runtimes import Runtime, get_runtime
from autodac.plan import DENSE, LayerChoice, Plan
from autodac import probes as _probes
from autodac.probes import (
    BATCH_ELEMENTS, DEFAULT_PROBE_SIZE, Probe, _device_of, batchnorm_weights, collect_probe, fit_examples, input_covariances,
    split_probe, divergence, divergence_share, check_output_kind, output_kind, probe_metric, metric_name, has_batchnorm,
    predict, run_through, reconstruction_errors, reestimate_batchnorm, covariance_bytes, covariance_fits, patch_size, blocks_fit,
)
from autodac.report import plan_table
from autodac.search.knapsack import LayerOptions, Secondary, minimum_cost, pareto_front, solve
from autodac.search.refine import RefineResult, Trial, refine
from autodac.search.sensitivity import SensitivityProfile, loss_curve, measure_profile, pick_ranks
from autodac.search.storage import SharedSearch, open_search
from autodac.sequential import Refit, refit_in_order
from autodac.structure import check_structure, model_structure
from autodac.surgery import (
    TracedLayer, copy_model, evaluating, global_hooks, held_parametrizations, own_hooks, positional_inputs, replace_layers, run_model,
    trace_layers, weight_hook,
)
from autodac.subclasses import explicit_padding
from autodac.synthesis import DEFAULT_STEPS as SYNTHESIS_STEPS, synthesize_inputs
from autodac.factorize.base import covariance_for
from autodac.factorize.channels import ChannelOrder, order_channels, refit_kept
from autodac.implied import affected_layers, batchnorm_noise, implied_batch, positions_per_example
from autodac.widths import Gathered, WidthUnit, collecting_moments, consumable, find_width_units, plain_parameters, slice_unit

__all__ = ["optimize", "apply", "decompose_conv", "Result", "DEFAULT_METHODS"]

logger = get_logger(__name__)


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
    example_inputs: tuple[Any, ...] | None = None  # what the plan was made on; ``autodac.export`` checks files on them

    @property
    def metrics(self) -> dict[str, float]:
        """Measured figures: probe metric of the original and of the result, with and without BN re-estimation."""
        return self.plan.metrics

    @property
    def flops_ratio(self) -> float:
        """fvcore's count of ``model`` over fvcore's count of the original, at the plan's input shape."""
        return self.flops / self.original_flops

    @property
    def params_ratio(self) -> float:
        """Parameters of ``model`` over the original's (``autodac.cost.count_params``): what a ``Params`` budget bounds."""
        return self.params / self.original_params

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
        if "params" in self.plan.budget:  # the figure a parameter budget bounds (other summaries read as before)
            head += f" (ratio {self.params_ratio:.4f}, budget {self.plan.budget['params']:g})"
        planned = self.plan.factorized
        if planned and "probe" not in self.plan.metrics:  # no data: what the plan predicts is all there is to say
            worst = max(planned, key=lambda name: planned[name].error)
            head += (
                f"\npredicted (no data): worst layer output error {planned[worst].error:.3f} ({worst or 'the model itself'}), "
                f"summed over layers {sum(c.error for c in planned.values()):.3f}"
            )
        if self.plan.distilled:
            d, before = self.plan.distilled, self.plan.metrics.get("probe_before_distillation", float("nan"))
            head += f"\ndistilled on the probe: epoch {d['epoch']} of {d['epochs']} kept (probe metric {before:.4f} before it)"
        flagged = [note for note in self.plan.notes if note.startswith("the plan is predicted to damage")]
        return plan_table(self.plan, tablefmt=tablefmt) + "\n" + head + "".join(f"\nwarning: {note}" for note in flagged)

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------- input checks


@contextlib.contextmanager
def _stage(name: str):
    """Log how long one stage of ``optimize`` took and the process's peak memory after it (INFO): a long or large call says
    where its time went, and the stage after which the peak rose is the one that set it."""
    start, before = time.perf_counter(), peak_memory_bytes()
    logger.info("%s ...", name)
    yield
    after = peak_memory_bytes()
    memory = "" if after is None else f", process peak {after / 2**30:.2f} GiB" + (
        f" (+{(after - before) / 2**30:.2f} GiB in this stage)" if before is not None and after - before >= 2**30 // 100 else "")
    logger.info("%s: %.1f s%s", name, time.perf_counter() - start, memory)



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
            if isinstance(module, nn.Conv3d):  # a video clip: 16 frames of 112x112
                return (torch.zeros(1, module.in_channels, 16, 112, 112, **options),)
            return (torch.zeros(1, module.in_features, **options),)
    raise ModelError("the model has no Conv1d, Conv2d, Conv3d or Linear layer, so there is nothing to decompose")


def _check_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...], bool]:
    if example_inputs is None:
        inputs = _default_inputs(model)
        return inputs, True
    if isinstance(example_inputs, torch.Tensor):
        inputs = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)) and example_inputs:
        inputs = tuple(example_inputs)
    else:
        raise ModelError(
            f"`example_inputs` must be a tensor or a non-empty tuple of model arguments, but got {type(example_inputs).__name__}"
        )
    empty = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 0]
    if empty:  # every cost would count 0 and the width proofs would reduce over nothing
        raise ModelError(f"`example_inputs` must hold at least one example (batch dimension >= 1), but got a tensor of shape {empty[0]}")
    return inputs, False


def _check_runs_on_data(model: nn.Module, first: tuple[Any, ...]) -> Any:
    """The model's output on ``data``'s first example: inputs of a dtype it cannot take are refused here, naming both dtypes,
    not from inside the first probe stage; a layer called with its input as a keyword is refused (``positional_inputs``)."""
    try:
        with positional_inputs(model), evaluating(model):
            return model(*first)
    except ModelError:
        raise
    except Exception as error:
        seen = ", ".join(f"{str(x.dtype).removeprefix('torch.')} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                         for x in first)
        weight = next(model.parameters(), None)
        held = "" if weight is None else f"; the model's weights are {str(weight.dtype).removeprefix('torch.')}"
        raise ModelError(
            f"the model must run on `data`'s inputs, but on the first example ({seen}{held}) it raised {type(error).__name__}: {error}"
        ) from error


def _check_batched_outputs(model: nn.Module, probe: Probe, first_output: Any = None) -> None:
    """The built-in probe metric compares outputs example by example: an output tensor must hold the batch first.

    Checked on one and on two examples, so an output that averages over the batch (``C``) or puts it
    elsewhere (``C x N``, sequence-first ``T x N x C``) is refused before any work, not met as a
    failed concatenation mid-search or, worse, scored as if its rows were examples. ``first_output``
    is the output on the first example when the caller already has it.
    """
    for n in (1, 2)[: min(2, len(probe))]:
        out = first_output if n == 1 else None
        if out is None:
            with evaluating(model):
                out = model(*arguments(probe.inputs[:n].to(_device_of(model))))
        if not isinstance(out, torch.Tensor):
            return  # not one tensor: the metric refuses it with its own way out
        if out.dim() == 0 or out.shape[0] != n:
            raise ModelError(
                f"the built-in probe metric compares the model's outputs example by example, so they must hold the batch first "
                f"(dim 0 of size N on N examples), but on {n} example{'s' if n > 1 else ''} the model returned shape "
                f"{tuple(out.shape)}; pass evaluate=callable to score the model your way, or plan a wrapper whose output puts "
                "the batch first (for sequence-first outputs, out.transpose(0, 1))"
            )


def _input_shapes(inputs: tuple[Any, ...]) -> list[list[int]]:
    return [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)]


def _check_materialised(model: nn.Module) -> None:
    """Refuse a model whose weights hold no values (on the ``meta`` device, or lazy modules never run), or whose layers
    are hidden from module surgery and from fvcore (a ``torch.compile`` wrapper, TorchScript modules)."""
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise ModelError(
            "the model must be a plain nn.Module, but got a torch.compile wrapper (OptimizedModule), whose graph hides its "
            "layers: pass model._orig_mod, and compile the result"
        )
    compiled = [name for name, m in model.named_modules() if type(m).__name__ == "OptimizedModule" and name]
    if compiled:  # a compiled part: fvcore's tracer refuses dynamo code, and its layers are hidden the same way
        raise ModelError(
            f"the model's layers must be plain nn.Modules, but {compiled[0]!r} is a torch.compile wrapper (OptimizedModule), "
            f"whose graph hides its layers: set {compiled[0]} back to its ._orig_mod before optimizing, and compile the result"
        )
    scripted = [name or "(the model)" for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise ModelError(
            f"the model's layers must be Python modules, but {len(scripted)} are TorchScript ({', '.join(scripted[:3])}"
            f"{' ...' if len(scripted) > 3 else ''}), which hides their layers from autodac and from fvcore's tracer: "
            "build them from their Python classes (load a state dict into them)"
        )
    lazy = [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
            if isinstance(tensor, nn.parameter.UninitializedTensorMixin)]
    if lazy:
        raise ModelError(
            f"the model's weights must hold values to be factorised, but {len(lazy)} parameters and buffers are uninitialised "
            f"(lazy modules, e.g. {lazy[0]!r}); run the model once on an input to initialise them first"
        )
    empty = [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()) if tensor.is_meta]
    if empty:
        raise ModelError(
            f"the model's weights must hold values to be factorised, but {len(empty)} parameters and buffers are on the 'meta' "
            f"device (e.g. {empty[0]!r}); materialise and load them first (model.to_empty(device='cpu'), then load_state_dict)"
        )


def _check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN or infinite parameters or BatchNorm statistics: every spectrum and fit of it would be too.

    Other buffers may hold infinities by design (an additive attention mask of -inf) and are not read.
    """
    tensors = list(model.named_parameters())
    tensors += [
        (f"{name}.{key}" if name else key, buffer) for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) for key, buffer in module.named_buffers(recurse=False)
        if buffer is not None and buffer.is_floating_point()
    ]
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
            bad = int((~torch.isfinite(tensor.detach())).sum())
            raise ModelError(
                f"the model's parameters and BatchNorm statistics must be finite, but {name!r} holds {bad} NaN or infinite "
                f"values of {tensor.numel()}"
            )
    for name, module in model.named_modules():
        variance = getattr(module, "running_var", None) if isinstance(module, nn.modules.batchnorm._BatchNorm) else None
        if variance is None:
            continue
        bad = variance.detach() + module.eps <= 0  # finite, yet the model outputs NaN (a -1e-7 beside eps=1e-5 is rounding)
        if bool(bad.any()):
            key = f"{name}.running_var" if name else "running_var"
            raise ModelError(
                f"the model's BatchNorm running variances plus eps must be > 0, but {key!r} holds {int(bad.sum())} values "
                f"that are not (the smallest {float(variance.detach()[bad].min()):.4g}, eps {module.eps:g})"
            )


def _broken_outputs(output: Any, masked: bool = False) -> tuple[int, int]:
    """How many of the original model's output entries are not finite, of how many; with ``masked``, a -inf (a mask's,
    as in masked logits) is not counted."""
    tensors = [t for t in tensor_leaves(output) if t.is_floating_point()]
    broken = (lambda t: torch.isnan(t) | torch.isposinf(t)) if masked else (lambda t: ~torch.isfinite(t))
    return sum(int(broken(t).sum()) for t in tensors), sum(t.numel() for t in tensors)


def _check_finite_outputs(output: Any, what: str) -> None:
    """Refuse a probe on which the original's outputs are not finite (float16 overflow, masked logits): no plan can
    be scored against them (every divergence is NaN) or fitted to them (the factorisations fail)."""
    bad, total = _broken_outputs(output)
    if bad:
        raise ModelError(
            f"the model's outputs on {what} must be finite to score plans against, but {bad} of {total} are NaN or infinite "
            "(an overflow in a reduced-precision model, a broken statistic, or masked logits: pass evaluate= to score those)"
        )


def _check_label_range(labels: torch.Tensor | None, reference: torch.Tensor) -> None:
    """Refuse class labels the model's outputs cannot name (top-1 accuracy would be 0 for them, whatever the plan)."""
    if labels is None or not labels.numel():
        return
    regression = f"regression targets are not scored: {_probes.LEAVE_TARGETS_OUT}"
    if reference.dim() < 2:
        raise AutodacError(
            f"class labels need outputs with a class dimension (N x classes ...), but the model's outputs have shape "
            f"(N,) (here {tuple(reference.shape)}); {regression}"
        )
    if math.prod(reference.shape[2:]) != 1:
        raise AutodacError(
            f"class labels (one per example) score outputs of one class-score vector per example (N x classes, or "
            f"N x classes x 1 x 1), but the model's outputs are N x {' x '.join(map(str, reference.shape[1:]))}: a class at each of "
            f"{math.prod(reference.shape[2:])} positions; pass `data` without labels to score them by agreement with the original"
        )
    classes, top = reference.shape[1], int(labels.max())
    if top >= classes:
        raise AutodacError(
            f"class labels must be below the {classes} classes the model's outputs score (dim 1), but `data` holds label {top}"
            + (f"; {regression}" if classes == 1 else "")
        )


def _check_labels_fit(held_out: Probe, kind: str) -> None:
    """Refuse class labels beside outputs compared as values; warn when the original itself scores no better than chance on them."""
    labels, reference = held_out.labels, held_out.reference
    if labels is None or not labels.numel():
        return
    if kind == "values":
        raise AutodacError(
            "class labels are scored by top-1 over the outputs' dim 1, but output_kind='values' compares the outputs as values "
            f"(R^2 against the original's); {_probes.LEAVE_TARGETS_OUT}, or give output_kind='scores' if dim 1 holds class scores"
        )
    classes, accuracy = reference.shape[1], _probes.top1_match(reference, labels)
    if accuracy < 0.5 / classes:  # well below chance: not a weak classifier, labels of something else
        message = (
            f"the original model's own top-1 accuracy on the probe's labels is {accuracy:.3f}, below half of chance over its "
            f"{classes} outputs (1/{classes}): are the labels the model's classes? If its outputs are not class scores (an "
            f"embedding, a regression), {_probes.LEAVE_TARGETS_OUT}"
        )
        warnings.warn(f"autodac: {message}", UserWarning, stacklevel=5)
        logger.warning(message)


def _check_probe_shape(probe: Probe | None, inputs: tuple[Any, ...], given: bool, what: str = "example_inputs") -> None:
    """Refuse a probe whose examples have another shape than ``example_inputs`` (``what`` names them): FLOPs would be
    counted and the plan made at one shape while its quality is measured at another."""
    if probe is None or not given or not all(isinstance(x, torch.Tensor) for x in inputs):
        return
    example = [tuple(x.shape[1:]) for x in inputs]
    probed = [tuple(part.shape[1:]) for part in arguments(probe.inputs)]
    if example != probed:
        show = (lambda shapes: shapes[0]) if len(example) == 1 and len(probed) == 1 else (lambda shapes: shapes)
        raise AutodacError(
            f"the examples in `data` must have the shape of `{what}` (FLOPs are counted and the plan made at "
            f"{what}, quality measured on data), but data has examples of shape {show(probed)} and {what} has "
            f"shape {show([tuple(x.shape) for x in inputs])}, read as a batch of {inputs[0].shape[0] if inputs[0].dim() else 1} "
            f"example(s) of shape {show(example)} (the first dimension of {what} is the batch)"
        )


# ----------------------------------------------------------------------------- candidates


WIDTH = "width"  # a block's hidden width planned as the consumer's rank (autodac.widths)
PRODUCER = "producer:"  # an option of a width unit that factorises its producer instead (the width stays whole)


@dataclass
class _Candidate:
    layer: TracedLayer
    options: list[tuple[str, int | None, int, float]]  # (method, rank, cost, error); option 0 is dense
    fit: str = "plain"
    out_weights: torch.Tensor | None = None
    input_cov: torch.Tensor | None = None
    unit: WidthUnit | None = None  # with a width unit, option costs include the producer and chain
    moments: torch.Tensor | None = None  # E[z z^T] of the consumer's input with a constant (width fits)
    order: ChannelOrder | None = None
    root: nn.Module | None = None  # the model (a width unit's producer and chain live there)
    width_fit: str = "plain"  # the fit of its width options: where the moments came from, and the output weighting
    producer: "_Candidate | None" = None  # a width unit's producer, with its own factorisation options
    unit_extra: int = 0  # FLOPs of a width unit beyond the consumer's own (producer, chain, ops on the hidden channels)

    @property
    def dense_cost(self) -> int:
        return self.options[0][2]


_NO_CHEAPER = "no factorisation is cheaper than the dense layer"
_HOOKED = "has hooks of its own (register_forward_hook, ...), which its replacement would not run: remove them to let autodac change it"


def _skip_reason(layer: TracedLayer, methods: Sequence[str], excluded: bool) -> str | None:
    module = layer.module
    if excluded:
        return "excluded by the caller"
    if layer.unsupported is not None:
        return f"{layer.unsupported} is not a layer type autodac factorises (Conv1d, Conv2d, Conv3d, Linear)"
    if layer.shares_with is not None:
        return f"shares a parameter with {layer.shares_with!r} (tied weights): replacing one would untie them"
    if layer.functional is not None and layer.functional.startswith("Tensor."):
        return f"its weight is read outside its own forward ({layer.functional}), which a replacement could not serve"
    if layer.functional is not None and layer.geometry is not None:  # run as a module, and its weight read by a call elsewhere
        return (f"its weight is also read by a functional call ({layer.functional}) outside its own forward (a tied use, as a "
                "decoder reusing an encoder's kernels): a replacement would not serve that read")
    if layer.functional is not None:
        return f"used through a functional call ({layer.functional}), cannot be replaced"
    if layer.geometry is None:
        return "not run on the example inputs"
    legacy = weight_hook(module)
    if legacy == "prune":
        return ("torch.nn.utils.prune recomputes its pruned tensors (weight_orig x weight_mask) in a hook its replacement would not "
                "run: call torch.nn.utils.prune.remove(module, name) for each first, which keeps the pruned values")
    if legacy is not None:
        return (f"torch.nn.utils.{legacy} (the legacy form) recomputes its weight in a hook its replacement would not run: "
                f"use torch.nn.utils.parametrizations.{legacy}, which autodac reads, or remove it first")
    if own_hooks(module):
        return _HOOKED
    if getattr(module, "groups", 1) != 1 and module.groups == module.in_channels and module.weight.shape[0] == module.groups:
        return f"depthwise conv (groups={module.groups}): one filter per channel, nothing to factorise"
    if getattr(module, "groups", 1) != 1:
        return (f"grouped conv (groups={module.groups}): not supported, the methods factorise convs whose every output reads "
                "every input channel (a per-group split could save FLOPs; autodac does not make one)")
    if getattr(module, "transposed", False):
        return "transposed conv"
    if not any(get_method(m).applies_to(tuple(module.weight.shape)) for m in methods):
        return f"none of the methods {list(methods)} applies to weight shape {tuple(module.weight.shape)}"
    padding = explicit_padding(module)  # a subclass's own forward: reproduced by its padding, or the reason it cannot be
    return padding if isinstance(padding, str) else None


def _fit_weights(model: nn.Module, fit: str, layer: nn.Module) -> torch.Tensor | None:
    """The output-channel weights a layer's ``fit`` names (None unless it names a BatchNorm)."""
    fit = fit.removeprefix("seq+").removeprefix("data+").removeprefix("implied+")
    if fit in ("plain", "data", "implied"):
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


def _layer_fit(model: nn.Module, layer: TracedLayer, weighting: str, statistics: str | None) -> str:
    """The plan's ``fit`` for a layer: output weighting by its BatchNorm, after ``statistics`` ("data", "implied" or None)."""
    fit = "plain"
    if weighting == "batchnorm" and layer.followed_by is not None:
        norm = model.get_submodule(layer.followed_by)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.num_features == layer.module.weight.shape[0]:
            fit = f"bn:{layer.followed_by}"
    if statistics:
        return statistics if fit == "plain" else f"{statistics}+{fit}"
    return fit


def _option_costs(layer: TracedLayer, methods: Sequence[str]) -> list[tuple[str, int, int]]:
    """Every ``(method, rank, cost)`` of ``layer`` cheaper than the dense layer (costs grow with rank), without errors."""
    geometry, shape = layer.geometry, tuple(layer.module.weight.shape)
    dense = geometry.dense_cost()
    found: list[tuple[str, int, int]] = []
    for name in methods:
        method = get_method(name)
        if not method.applies_to(shape):
            continue
        for rank in range(1, method.max_rank(shape) + 1):
            cost = method.cost(geometry, rank)
            if cost >= dense:
                break  # costs grow with rank: no higher rank can pay off
            found.append((name, rank, cost))
    return found


def _candidate_options(
    layer: TracedLayer, costs: list[tuple[str, int, int]], out_weights: torch.Tensor | None = None, input_cov: torch.Tensor | None = None
) -> list[tuple[str, int | None, int, float]]:
    """The dense option, then each of ``costs`` (``_option_costs``) with its predicted error."""
    options: list[tuple[str, int | None, int, float]] = [(DENSE, None, layer.geometry.dense_cost(), 0.0)]
    errors: dict[str, Any] = {}
    for name, rank, cost in costs:
        if name not in errors:
            errors[name] = reconstruction_errors(layer.module, name, out_weights, input_cov)
        options.append((name, rank, cost, float(errors[name][rank - 1])))
    return options


def _most_saved(
    live: list[TracedLayer], costs: dict[str, list[tuple[str, int, int]]], units: dict[str, WidthUnit], unit_costs: dict[str, int]
) -> tuple[int, list[str]]:
    """The most FLOPs any plan of these layers saves, and the layers no option makes cheaper, from the costs alone.

    The same options ``_collect`` then scores (``costs``, a width unit's with its producer's factorisations and its
    widths), so a budget out of reach is refused before any statistics are gathered or any error is computed.
    """
    dense = {layer.name: layer.geometry.dense_cost() for layer in live}
    producers = {unit.producer for unit in units.values()}
    saved, none = 0, []
    for layer in live:
        name = layer.name
        if name in producers:
            continue  # planned inside its unit
        cheapest = min([dense[name]] + [cost for _, _, cost in costs[name]])
        whole = dense[name]
        unit = units.get(name)
        if unit is not None:
            whole = unit_costs[name] * unit.channels
            cheapest += whole - dense[name]
            step = _width_step(unit.channels)
            if step < unit.channels:
                cheapest = min(cheapest, unit_costs[name] * step)
            if unit.producer in costs and costs[unit.producer]:
                cheapest = min(cheapest, whole - dense[unit.producer] + min(cost for _, _, cost in costs[unit.producer]))
        saved += whole - cheapest
        if cheapest == whole:
            none.append(name)
    return saved, none


def _excluded_layers(names: Sequence[str], patterns: Sequence[str]) -> set[str]:
    """The layers ``patterns`` exclude: a glob matches a layer's name or the name of a module holding it (``layer2``
    excludes ``layer2.0.conv1``). A pattern that matches nothing is refused: a misspelt exclusion would go unnoticed."""
    def holders(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]

    matched: set[str] = set()
    for pattern in patterns:
        hits = {name for name in names if any(fnmatch.fnmatchcase(held, pattern) for held in holders(name))}
        if not hits:
            shown = ", ".join(repr(n) for n in names[:6]) + (" ..." if len(names) > 6 else "")
            raise AutodacError(
                f"each `exclude` pattern must match a Conv/Linear layer of the model (by its name or a module holding it), "
                f"but {pattern!r} matches none of its {len(names)}: {shown}"
            )
        matched |= hits
    return matched


def _collect(
    model, inputs, methods, exclude, progress, weighting="batchnorm", fit_inputs: Batch | None = None,
    implied_seed: int | None = None, by_module: dict[str, int] | None = None, notes: list[str] | None = None,
    check_reach: "Callable[[int, dict[str, str], set[str]], None] | None" = None,
) -> tuple[list[TracedLayer], list[_Candidate], dict[str, str]]:
    """Trace the model, skip what cannot help, and list every (method, rank) option of the rest.

    Candidates are decided first and statistics are collected only for them. With
    ``fit_inputs`` each layer is fitted (and scored) by the error of its output on them; without,
    with ``implied_seed``, by the input moments the BatchNorms imply (``autodac.implied``). With
    ``by_module`` (fvcore's per-module counts of the model) hidden widths become options too.
    ``check_reach`` gets the most FLOPs a plan can save, the skipped layers and the layers narrowed
    with a width, before any statistics: it raises for a budget out of reach.
    A layer whose input covariance would exceed ``autodac.probes.MAX_COVARIANCE_BYTES`` is
    fitted to its weights alone, with a note appended to ``notes``.
    """
    traced = trace_layers(model, inputs)
    matched = _excluded_layers([layer.name for layer in traced], exclude)
    skipped: dict[str, str] = {}
    live: list[TracedLayer] = []
    width_only: list[TracedLayer] = []  # no method given applies (a 1x1 conv under methods=["dac"]), but a width may
    for layer in traced:
        excluded = layer.name in matched
        reason = _skip_reason(layer, methods, excluded)
        if reason is None:
            live.append(layer)
        else:
            skipped[layer.name] = reason
            if by_module is not None and reason.startswith("none of the methods") and _skip_reason(layer, list(METHODS), excluded) is None:
                width_only.append(layer)
    units = _width_units(model, inputs, live + width_only, by_module) if by_module is not None else {}
    unit_costs = _unit_costs(model, inputs, units, by_module) if units else {}
    units = {name: unit for name, unit in units.items() if name in unit_costs}
    members = {unit.consumer for unit in units.values()} | {unit.producer for unit in units.values()}
    joined = {layer.name for layer in width_only if layer.name in members}
    if joined:  # a width's consumer or producer: planned in its unit (widths are offered whatever `methods` lists)
        names = joined | {layer.name for layer in live}
        live = [layer for layer in traced if layer.name in names]  # in execution order, as before
        for name in joined:
            del skipped[name]
    costs = {layer.name: _option_costs(layer, methods) for layer in live}  # reckoned once: the reach check and the scoring
    saved, unchanged = _most_saved(live, costs, units, unit_costs) if check_reach is not None else (0, [])
    if saved > 0:  # nothing to save is refused below as a model with nothing to decompose
        check_reach(saved, {**skipped, **{name: _NO_CHEAPER for name in unchanged}}, {n for unit in units.values() for n in unit.chain})
    modules = {t.name: t.module for t in live}
    consumers = {name: modules[name] for name in units}
    covariances: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    statistics = None
    fitted = {name: module for name, module in modules.items() if covariance_fits(module) or blocks_fit(module)}
    oversized = {name: m for name, m in modules.items() if not covariance_fits(m)}
    if oversized and fit_inputs is not None and notes is not None:
        notes.append(_oversized_note(oversized))
    if fit_inputs is not None:
        covariances, moments = _statistics(model, fitted, consumers, fit_inputs)
        statistics = "data"
        unseen = [name for name in consumers if name not in moments]
        if unseen and notes is not None:
            notes.append(
                f"{len(unseen)} width(s) ordered by their weights, not the probe ({', '.join(unseen[:3])}{' ...' if len(unseen) > 3 else ''}): "
                "the probe gave their layers fewer input rows (examples x positions) than input channels, and moments of lower "
                "rank than their size would call a width of that rank exact"
            )
    elif implied_seed is not None and consumers:  # widths only: factorisations fitted to implied moments measured worse
        _, moments = _implied_statistics(model, inputs, {}, _implied_consumers(model, inputs, units), implied_seed)
        if not _zeroable(inputs) and has_batchnorm(model) and notes is not None:
            notes.append(
                "widths are ordered by their weights, not by the input moments the BatchNorms imply: that pass replays the "
                "inputs as float zeros from their shapes, which these inputs (a dict, integers, or arguments not batched alike) "
                "do not allow; pass data, or give the model its floating inputs as tensor arguments (on EfficientNet-Lite0 at "
                "0.9 the implied moments keep 54.1% top-1 agreement, the weights 9.5%)"
            )
    candidates = []
    iterator = live
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(live, desc="autodac: scoring layers", unit="layer", disable=None, leave=False)
    scored: dict[str, _Candidate] = {}
    for layer in iterator:
        input_cov = covariances.get(layer.name)
        fit = _layer_fit(model, layer, weighting, statistics if input_cov is not None else None)
        out_weights = _fit_weights(model, fit, layer.module)
        options = _candidate_options(layer, costs[layer.name], out_weights, input_cov)
        scored[layer.name] = _Candidate(layer, options, fit, out_weights, input_cov)
    producers = {unit.producer: unit for unit in units.values()}
    for name, candidate in scored.items():
        if name in producers:
            continue  # planned inside its unit: sliced with the width, or factorised while the width stays whole
        unit = units.get(name)
        if unit is not None:
            found = moments.get(name)
            _add_width_options(candidate, unit, found, unit_costs[name], model, scored.get(unit.producer))
            candidate.width_fit = _layer_fit(model, candidate.layer, weighting, (statistics or "implied") if found is not None else None)
        if len(candidate.options) == 1:
            skipped[name] = _NO_CHEAPER
        else:
            candidates.append(candidate)
    _count_every_call(candidates, notes)
    return traced, candidates, skipped


def _count_every_call(candidates: list[_Candidate], notes: list[str] | None) -> None:
    """A layer the forward runs ``n`` times (weights shared) damages ``n`` outputs: its predicted errors count ``n`` times.

    Its FLOPs are already counted per call (fvcore's count and the closed forms alike); without this, the
    planner would see half the damage of two separate layers with the same factors, and so would the
    data-free damage flag and the summary's sum.
    """
    shared = [(c, len(c.layer.geometry.calls)) for c in candidates if len(c.layer.geometry.calls) > 1]
    for candidate, calls in shared:
        candidate.options = [(method, rank, cost, error * calls) for method, rank, cost, error in candidate.options]
    if shared and notes is not None:
        listed = ", ".join(f"{c.layer.name or 'the model itself'} ({calls} times)" for c, calls in shared[:5])
        more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
        notes.append(f"layers run more than once a forward (shared weights): {listed}{more}; their predicted errors are summed over "
                     "their runs")


def _oversized_note(oversized: dict[str, nn.Module]) -> str:
    """The note for layers whose input covariance is over the limit: which, how large, and what they get instead."""
    shown = ", ".join(
        f"{name} ({patch_size(m)}-wide patches: {covariance_bytes(m) / 2**30:.2f} GiB)" for name, m in list(oversized.items())[:5]
    )
    more = f" and {len(oversized) - 5} more" if len(oversized) > 5 else ""
    blocks = [name for name, m in oversized.items() if blocks_fit(m)]
    instead = (
        f"{len(blocks)} of them ({', '.join(blocks[:5])}{' ...' if len(blocks) > 5 else ''}) fitted by DAC to each input channel's "
        "own patch covariance (its channel blocks), the rest of their options and the other layers to their weights alone"
        if blocks else "fitted to their weights alone, not to input statistics"
    )
    return (
        f"{len(oversized)} layer(s) not re-fitted in order and {instead}: "
        f"an input covariance must be within {_probes.MAX_COVARIANCE_BYTES / 2**20:.0f} MiB "
        f"(autodac.probes.MAX_COVARIANCE_BYTES), but {shown}{more}"
    )


def _width_units(model, inputs, live: list[TracedLayer], by_module: dict[str, int]) -> dict[str, WidthUnit]:
    """Width units among the candidates whose producer is free to slice; a module belongs to one unit at most
    (where two compete, the one with more FLOPs behind it wins)."""
    names = {t.name for t in live}
    found = find_width_units(model, inputs, [t.name for t in live])
    # a producer the caller excluded (or that cannot be reproduced) is not sliced either; costs exactly linear in width
    found = {n: u for n, u in found.items() if u.producer in names and _unit_flops(u, by_module) % u.channels == 0}
    found = {n: u for n, u in found.items() if not any(own_hooks(model.get_submodule(m)) for m in u.chain)}  # sliced copies would drop them

    def behind(unit: WidthUnit) -> int:
        return _unit_flops(unit, by_module)

    taken: set[str] = set()
    units = {}
    for unit in sorted(found.values(), key=lambda u: (-behind(u), u.consumer)):
        members = {unit.consumer, unit.producer, *unit.chain}
        if members & taken:
            continue
        taken |= members
        units[unit.consumer] = unit
    return units


def _unit_costs(model: nn.Module, inputs, units: dict[str, WidthUnit], by_module: dict[str, int]) -> dict[str, int]:
    """fvcore's multiply-adds per channel of each unit: what one channel fewer saves, counted, not assumed.

    One count of the model with every unit one channel narrower; where that saving is not all
    inside the units' own modules (a pooling or mean over the hidden channels that fvcore counts
    at the parent), each unit is counted alone. A unit whose saving is not its own modules' cost
    scaled exactly is dropped: its cost would not be linear in its width.
    """
    def narrower(chosen: list[WidthUnit]) -> nn.Module:
        replacements = {}
        for unit in chosen:
            weight = model.get_submodule(unit.consumer).weight.detach()
            kept = torch.arange(unit.channels - 1)
            replacements.update(slice_unit(model, unit, kept, weight[:, : unit.channels - 1], torch.zeros(weight.shape[0]).to(weight)))
        return replace_layers(model, replacements)

    total = int(by_module[""])
    counted = count_flops(narrower(list(units.values())), inputs)
    own = {name: _unit_flops(unit, by_module) - _unit_flops(unit, counted.by_module) for name, unit in units.items()}
    saved = total - counted.total
    costs = {}
    if saved == sum(own.values()):
        costs = dict(own)
    else:
        for name, unit in units.items():
            costs[name] = total - count_flops(narrower([unit]), inputs).total
    return {
        name: cost for name, cost in costs.items()
        if cost > 0 and _unit_flops(units[name], by_module) + (cost - own[name]) * units[name].channels == cost * units[name].channels
    }


def _unit_flops(unit: WidthUnit, by_module: dict[str, int]) -> int:
    return sum(int(by_module.get(name, 0)) for name in (unit.consumer, unit.producer, *unit.chain))


def _width_step(channels: int) -> int:
    """The step between the widths a unit may take: 1 up to 64 channels, else about 64 widths in all
    (multiples of 8 from 256 channels, which vectorised kernels run best)."""
    if channels <= 64:
        return 1
    step = max(1, channels // 64)
    return max(8, step - step % 8) if channels >= 256 else step


def _add_width_options(
    candidate: _Candidate, unit: WidthUnit, moments: torch.Tensor | None, per_channel: int, root: nn.Module,
    producer: _Candidate | None = None,
) -> None:
    """Turn a consumer's candidate into its unit's: every cost includes the producer and chain, widths join the
    options, and so do the producer's own factorisations (``PRODUCER`` + method; the width then stays whole)."""
    total = per_channel * unit.channels
    extra = total - candidate.dense_cost
    candidate.unit_extra = extra
    module = candidate.layer.module
    if moments is None:  # no statistics: every channel alike, no mean to carry
        moments = torch.eye(unit.channels + 1, dtype=torch.float64)
    candidate.moments = moments
    step = _width_step(unit.channels)
    candidate.order = order_channels(module.weight, moments, candidate.out_weights, step=step)
    candidate.unit = unit
    candidate.root = root
    options = [(m, r, c + extra, e) for m, r, c, e in candidate.options]
    for width in range(step, unit.channels, step):
        options.append((WIDTH, width, per_channel * width, float(candidate.order.errors[width - 1])))
    if producer is not None:
        candidate.producer = producer
        for method, rank, cost, error in producer.options[1:]:
            options.append((PRODUCER + method, rank, total - producer.dense_cost + cost, error))
    candidate.options = options


def _implied_statistics(
    model: nn.Module, inputs, layers: dict[str, nn.Module], consumers: dict[str, nn.Module], seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Input covariances of ``layers`` (and moments of width ``consumers``) implied by the BatchNorms.

    Only for layers some BatchNorm precedes. The pass depends on the model, the input shape and
    ``seed`` alone (not on which layers are asked for), so ``apply`` gets the same statistics back.
    """
    if not has_batchnorm(model) or not _zeroable(inputs):
        return {}, {}
    zeros = _zeros_like(inputs)  # the values never matter past the first BatchNorm: replayable from the shapes alone
    traced = [t for t in trace_layers(model, zeros) if t.geometry is not None]
    reached = affected_layers(model, {t.name: t.module for t in traced}, zeros)
    if not reached:
        return {}, {}
    widest = max(int(t.module.weight[0].numel()) for t in traced if t.name in reached)
    smallest = min(
        max(1, sum(int(np.prod(out)) if out else 1 for _, _, out in t.geometry.calls)) for t in traced if t.name in reached
    )
    batch = implied_batch(zeros, widest, smallest)
    with batchnorm_noise(model, seed):
        return _statistics(
            model, {n: m for n, m in layers.items() if n in reached}, {n: m for n, m in consumers.items() if n in reached}, batch
        )


def _zeroable(inputs: tuple[Any, ...]) -> bool:
    """Whether the implied pass can replay the example inputs as zeros from the plan's shapes alone: every one a
    floating tensor batched along a first dimension they share. Integer inputs (token ids) would come back from
    ``apply`` in the model's float dtype, and an unbatched argument (an attention mask ``T x T``) cannot be cut to
    one example or stacked into a batch; such models keep the plain data-free fits."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if len(tensors) != len(inputs) or not all(x.dim() >= 1 and x.is_floating_point() for x in tensors):
        return False
    return len({int(x.shape[0]) for x in tensors}) == 1


def _zeros_like(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """One example of zeros per input, shaped like ``inputs``."""
    return tuple(torch.zeros_like(x[:1]) for x in inputs)


def _implied_consumers(model: nn.Module, inputs, units: dict[str, WidthUnit]) -> dict[str, nn.Module]:
    """The width consumers whose moments the BatchNorms imply: a BatchNorm in the chain, read position by position.

    After a spatial pooling between the BatchNorm and the consumer (a classifier on pooled
    features) independent noise averages away and would promise far too little damage, so such
    units keep the plain, data-free ordering.
    """
    last_norms = {}
    for name, unit in units.items():
        norms = [n for n in unit.chain if isinstance(model.get_submodule(n), nn.modules.batchnorm._BatchNorm)]
        if norms:
            last_norms[name] = norms[-1]
    if not last_norms or not _zeroable(inputs):
        return {}
    example = _zeros_like(inputs)
    consumed = positions_per_example(model, {n: model.get_submodule(n) for n in last_norms}, example, outputs=False)
    normalised = positions_per_example(model, {n: model.get_submodule(b) for n, b in last_norms.items()}, example, outputs=True)
    return {n: model.get_submodule(n) for n in last_norms if n in consumed and consumed[n] >= normalised.get(n, 1 << 62)}


def _statistics(model: nn.Module, layers: dict[str, nn.Module], consumers: dict[str, nn.Module], inputs: Batch):
    """Input covariances of ``layers`` and width moments of ``consumers`` from one pass over ``inputs``.

    Each layer's figures depend only on the inputs and their batching, never on which other
    layers are collected alongside, so ``apply`` rebuilds any subset exactly.
    """
    if not layers and not consumers:
        return {}, {}
    batch = _probes.batch_size_for(per_example(inputs), _probes._COVARIANCE_BATCH)  # moments are subsampled per batch: one batching for both
    with collecting_moments(consumers) as collected:
        covariances = input_covariances(model, layers, inputs, batch) if layers else (run_through(model, inputs, batch), {})[1]
    return covariances, collected()


# ----------------------------------------------------------------------------- the verbs


def _params_after(module: nn.Module, method: str, rank: int) -> int:
    """Parameters of the pair that replaces ``module`` under ``method`` at ``rank``: the registered method's count."""
    return get_method(method).params(tuple(module.weight.shape), rank, module.bias is not None)


def _sliced_params(module: nn.Module, width: int) -> int:
    """Parameters of a width unit's producer or chain module kept at ``width`` channels (as ``widths._sliced`` cuts them)."""
    return sum(p.numel() // p.shape[0] * width if p.dim() >= 1 else p.numel() for p in plain_parameters(module))


def _width_params(candidate: _Candidate, width: int) -> tuple[int, int]:
    """``(before, after)`` parameters of a width unit (consumer, producer, chain) kept at ``width`` channels.

    The consumer keeps its output channels and gets a bias (the re-fit's constant), its input
    channels cut to ``width``; the producer and chain keep ``width`` of their channels.
    """
    unit, module = candidate.unit, candidate.layer.module
    members = [candidate.root.get_submodule(n) for n in (unit.producer, *unit.chain)]
    before = count_params(module) + sum(count_params(m) for m in members)
    n = module.weight.shape[0]
    per_input = module.weight[0, 0].numel()  # the kernel's size (1 for a Linear)
    return before, n * width * per_input + n + sum(_sliced_params(m, width) for m in members)


def _option_params(candidate: _Candidate) -> np.ndarray:
    """Parameters of everything each option of ``candidate`` changes (a width unit: consumer, producer and chain), per option.

    Option 0 (dense) is what the model holds now; the ratio budget subtracts it from the model's
    count to find the parameters no option changes (BatchNorms outside units, depthwise convs, embeddings...).
    """
    module = candidate.layer.module
    own = count_params(module)
    unit = candidate.unit
    members = 0 if unit is None else sum(count_params(candidate.root.get_submodule(n)) for n in (unit.producer, *unit.chain))
    counts = []
    for method, rank, _, _ in candidate.options:
        if method == DENSE:
            counts.append(own + members)
        elif method == WIDTH:
            counts.append(_width_params(candidate, rank)[1])
        elif method.startswith(PRODUCER):
            producer = candidate.producer.layer.module
            counts.append(own + members - count_params(producer) + _params_after(producer, method.removeprefix(PRODUCER), rank))
        else:
            counts.append(_params_after(module, method, rank) + members)
    return np.array(counts, dtype=np.int64)


class _Factors:
    """One SVD per (layer, method), computed on first use and reused for every rank the search tries."""

    def __init__(self, candidates: list[_Candidate], root: nn.Module | None = None) -> None:
        self.root = root  # the model width units are sliced from
        everything = candidates + [c.producer for c in candidates if c.producer is not None]
        self.modules = {c.layer.name: c.layer.module for c in everything}
        self.out_weights = {c.layer.name: c.out_weights for c in everything}
        self.input_covs = {c.layer.name: c.input_cov for c in everything}
        self.producers = {c.layer.name: c.producer.layer.name for c in candidates if c.producer is not None}
        self.units = {c.layer.name: c for c in candidates if c.unit is not None}
        self.cache: dict[tuple[str, str], Any] = {}

    def width(self, name: str, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kept channels, consumer weight, bias)`` of a width unit at ``width``, re-fitted to its moments."""
        key = (name, f"{WIDTH}:{width}")
        if key not in self.cache:
            candidate = self.units[name]
            kept = candidate.order.order[:width]
            self.cache[key] = (kept, *refit_kept(candidate.layer.module.weight, candidate.moments, kept))
        return self.cache[key]

    def replacements(self, name: str, method: str, rank: int, impl: str = "") -> dict[str, nn.Module]:
        """Every module to swap for this choice: one factorised layer, or a width unit's sliced modules."""
        if method == WIDTH:
            kept, weight, bias = self.width(name, rank)
            return slice_unit(self.root, self.units[name].unit, kept, weight, bias)
        if method.startswith(PRODUCER):
            producer = self.producers[name]
            return {producer: self.build(producer, method.removeprefix(PRODUCER), rank, impl)}
        return {name: self.build(name, method, rank, impl)}

    def build(self, name: str, method: str, rank: int, impl: str = "") -> nn.Module:
        """The one module that replaces layer ``name`` (a width choice: the narrowed layer fed its full input)."""
        if method == WIDTH:
            kept, weight, bias = self.width(name, rank)
            narrowed = slice_unit(self.root, self.units[name].unit, kept, weight, bias)[name]
            return keep_shape_attributes(self.root.get_submodule(name), Gathered(kept, narrowed))  # it takes the full input
        key = (name, method)
        if key not in self.cache:
            factorization = get_method(method)
            self.cache[key] = factorization.decompose(
                self.modules[name].weight, self.out_weights[name], covariance_for(factorization, self.input_covs[name])
            )
        return build_factorized(self.modules[name], method, rank, self.cache[key], impl)


def _choices(candidates: list[_Candidate], selection: Sequence[int], timing: LatencyTable | None = None) -> dict[str, LayerChoice]:
    """The plan's entries: one per candidate, and one more for a width unit's producer when it is factorised.

    A width choice counts the whole unit (consumer, producer, chain) before and after; every other
    choice counts the layer it changes, so the savings always add up to what the option saves.
    """
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
        own = candidate.dense_cost - candidate.unit_extra  # the layer's own FLOPs
        if method == WIDTH:
            unit = candidate.unit
            before, after = _width_params(candidate, rank)
            layers[candidate.layer.name] = LayerChoice(
                method=method, rank=rank, weight_shape=tuple(module.weight.shape), flops_before=candidate.dense_cost,
                flops_after=cost, params_before=before, params_after=after,
                error=float(error), fit=candidate.width_fit, channels=tuple(int(c) for c in candidate.order.order[:rank]),
                sliced=(unit.producer, *unit.chain), **latency,
            )
            continue
        if method.startswith(PRODUCER):
            producer = candidate.producer
            inner = method.removeprefix(PRODUCER)
            before = producer.dense_cost
            layers[producer.layer.name] = LayerChoice(
                method=inner, rank=rank, weight_shape=tuple(producer.layer.module.weight.shape), flops_before=before,
                flops_after=cost - candidate.dense_cost + before, params_before=count_params(producer.layer.module),
                params_after=_params_after(producer.layer.module, inner, rank), error=float(error), fit=producer.fit, **latency,
            )
            method, rank, cost = DENSE, None, candidate.dense_cost
        dense = method == DENSE
        layers[candidate.layer.name] = LayerChoice(
            method=method, rank=rank, weight_shape=tuple(module.weight.shape), flops_before=own,
            flops_after=own if dense else cost - candidate.unit_extra, params_before=params,
            params_after=params if dense else _params_after(module, method, rank), error=0.0 if dense else float(error),
            fit="plain" if dense else candidate.fit, **({} if method.startswith(PRODUCER) else latency),
        )
    return {name: layers[name] for name in sorted(layers, key=lambda n: _positions(candidates).get(n, 1 << 30))}


def _positions(candidates: list[_Candidate]) -> dict[str, int]:
    """Where each candidate layer (and each unit's producer) sits in the model, so plans list layers in model order."""
    names = [c.layer.name for c in candidates] + [c.producer.layer.name for c in candidates if c.producer is not None]
    root = next((c.root for c in candidates if c.root is not None), None)
    if root is None:
        return {name: i for i, name in enumerate(names)}
    order = {name: i for i, (name, _) in enumerate(root.named_modules())}
    return {name: order.get(name, 1 << 30) for name in names}


def _build(
    model: nn.Module, candidates: list[_Candidate], selection: Sequence[int], factors: _Factors, timing: LatencyTable | None = None
) -> nn.Module:
    replacements = {}
    for i, (candidate, index) in enumerate(zip(candidates, selection)):
        method, rank, _, _ = candidate.options[index]
        if method != DENSE:
            impl = timing.impls[i][index] if timing is not None else ""
            replacements.update(factors.replacements(candidate.layer.name, method, rank, impl))
    return replace_layers(model, replacements)


class _ProbeRunner:
    """Scores a candidate model on the probe, with or without BatchNorm re-estimation.

    Two figures per model from one pass over the held-out half: the *objective* the search
    maximises (minus the divergence from the original's outputs that fits what they are, ``kind``:
    smooth and label-free, so a 1k-image probe ranks plans without the noise of top-1 counts) and
    the *metric* reported to the user (top-1 accuracy with labels, top-1 agreement without, R^2
    for values). ``evaluate`` replaces both.
    Re-estimation uses the calibration half, so a correction that only fits the images it saw
    cannot look like an improvement.
    """

    def __init__(self, model: nn.Module, probe: Probe | None, evaluate: Callable[[nn.Module], float] | None, kind: str = "auto") -> None:
        self.evaluate = evaluate
        self.original = model
        self.calibration: Batch | None = None
        self.held_out: Probe | None = None
        self.kind: str | None = None  # how outputs are compared (autodac.probes.output_kind): as asked, or read off the original's
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
                _check_finite_outputs(self.held_out.reference, "the probe")
                check_output_kind(kind, self.held_out.reference)
                _check_label_range(probe.labels, self.held_out.reference)
                self.kind = output_kind(self.held_out.reference, self.held_out.inputs) if kind == "auto" else kind
                _check_labels_fit(self.held_out, self.kind)
                self.energy = float(self.held_out.reference.double().pow(2).sum())  # what a squared error is relative to

    @property
    def metric_name(self) -> str:
        if self.evaluate is not None:
            return "evaluate(model)"
        return metric_name(self.held_out.labels is not None, self.kind)

    def score(self, model: nn.Module, reestimate: bool = False, floor: float | None = None) -> tuple[float, float]:
        """``(objective, metric)`` of ``model`` (re-estimated on a copy first when asked).

        With ``floor`` (an objective to beat) a model that cannot reach it is stopped early: the
        divergence is a mean of non-negative terms, so once the part summed over the examples seen
        so far, divided by all of them, exceeds ``-floor``, no later example can bring it back. Its
        score is then that bound (a model no better than it claims) and the metric is NaN. The held
        out examples are taken in chunks of ``BATCH_ELEMENTS`` input elements: a probe that fits in
        one (every 28x28 probe) is never stopped, and one that is stopped was a bigger probe.
        """
        if reestimate:
            model = reestimate_batchnorm(copy_model(model), self.calibration)
        if self.evaluate is not None:
            # a copy: an evaluation loop that runs it in train mode or ends in `model.train()` changes neither
            # the original nor the model a plan returns (its BatchNorm statistics and modes)
            value = self.evaluate(copy_model(model))
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise AutodacError(f"`evaluate(model)` must return a finite real number, but returned {value!r}")
            return float(value), float(value)
        reference = self.held_out.reference
        inputs = self.held_out.inputs
        chunk = max(1, BATCH_ELEMENTS // max(1, math.prod(per_example(inputs))))
        if floor is None or chunk >= len(inputs) or reference.dim() < 2:
            outputs = predict(model, inputs)
        else:
            parts, seen = [], 0.0
            rows = reference.numel() // reference.shape[1]
            for start in range(0, len(inputs), chunk):
                part = predict(model, inputs[start : start + chunk])
                parts.append(part)
                seen += divergence_share(part, reference[start : start + chunk], self.kind, rows, self.energy)
                if seen > -floor:
                    return -seen, float("nan")
            outputs = torch.cat(parts)
        return -divergence(outputs, reference, self.kind), probe_metric(outputs, reference, self.held_out.labels, self.kind)


def optimize(
    model: nn.Module,
    flops_budget: "float | Budget | Sequence[Budget] | None" = None,
    *,
    latency_budget: float | None = None,
    runtime: str | None = None,
    device: Any = None,
    latency_cache: Any = True,
    example_inputs: Any = None,
    data: Iterable[Any] | None = None,
    synthesize: int = ProbeOptions.synthesize,
    evaluate: Callable[[nn.Module], float] | None = None,
    methods: Iterable[str] = FitOptions.methods,
    exclude: Iterable[str] = FitOptions.exclude,
    weighting: str = FitOptions.weighting,
    fit_to_data: bool = FitOptions.fit_to_data,
    sequential_fit: bool = FitOptions.sequential_fit,
    refit_candidates: int = FitOptions.refit_candidates,
    probe_size: int = ProbeOptions.probe_size,
    profile_size: int = ProbeOptions.profile_size,
    profile_points: int = ProbeOptions.profile_points,
    reestimate_bn: bool = ProbeOptions.reestimate_bn,
    output_kind: str = ProbeOptions.output_kind,
    n_trials: int = SearchOptions.n_trials,
    timeout: float | None = SearchOptions.timeout,
    seed: int = SearchOptions.seed,
    pareto: bool = SearchOptions.pareto,
    widths: bool = FitOptions.widths,
    max_layer_error: float = FitOptions.max_layer_error,
    progress: bool = True,
    storage: Any = StudyOptions.storage,
    study_name: str | None = StudyOptions.study_name,
    fit: FitOptions | None = None,
    probe: ProbeOptions | None = None,
    search: SearchOptions | None = None,
    study: StudyOptions | None = None,
    distill: "bool | DistillOptions" = False,
) -> Result:
    """Decompose a copy of ``model`` to at most ``flops_budget`` of its fvcore FLOPs and/or ``latency_budget`` of its latency.

    The second argument is a ratio (a FLOPs budget), a budget value (``autodac.Flops(0.5)``,
    ``autodac.Latency(0.7, device=..., runtime=...)``, ``autodac.Params(0.4)``) or a list of
    them, at most one of each kind, every one of which the result meets (``autodac.budgets``).
    ``Params`` is the decomposed model's parameter count as a ratio of the original's, held
    exactly like FLOPs (counted on the built model).
    ``flops_budget`` is a ratio in ``(0, 1]`` of fvcore's count of the model on
    ``example_inputs`` (a tensor or tuple of arguments; if omitted, the first probe example is
    used, or a 224x224 image batch of one is assumed with a warning). ``methods`` restricts the
    factorisations the planner may choose per layer; ``exclude`` lists glob patterns of layer
    names to keep dense (a pattern naming a module keeps every layer in it; one that matches nothing is refused).

    Without ``data`` the ranks come from an exact knapsack on reconstruction error. With
    ``data`` (batches ``x`` or ``(x, y)``; at most ``probe_size`` examples are used) each layer's
    sensitivity is measured on ``profile_size`` probe examples at ``profile_points`` options (the
    rest read off its loss-versus-error curve), the knapsack runs on it, and
    Optuna refines the allocation for ``n_trials`` trials (or ``timeout`` seconds) on the probe
    metric: top-1 accuracy with labels, agreement with the original without (R^2 against the
    original's outputs for values: ``output_kind``, read off the outputs unless given), or
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
    the budget. ``runtime`` is where the latency is timed: ``"torch"`` (eager PyTorch, when neither it nor the ``Latency`` names one) or
    ``"onnxruntime"`` (each option and each side-by-side model exported to ONNX and run in an
    onnxruntime CPU session with torch's thread count; needs ``autodac[deploy]``); the plan
    records it. Either budget alone or both together.
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
    ``distill=True`` (or ``autodac.DistillOptions(...)``; needs ``data`` or ``synthesize``) then trains
    the decomposed model for a few epochs towards the original's outputs on the probe's calibration
    half, no labels used: an epoch the held-out half does not score best so far is undone and the
    learning rate divided by 3, and the result is kept only if it beats the model before it
    (``autodac.distill``); ``plan.distilled`` records it and ``apply(model, plan, data)`` repeats it.
    Every ``nn.MultiheadAttention`` is planned as ``autodac.attention.UnfusedMultiheadAttention``
    (the same outputs, with ``q_proj``/``k_proj``/``v_proj``/``out_proj`` as Linear candidates);
    ``result.model`` holds it, and ``apply`` swaps it in the same way.

    The options other than the budgets, ``runtime``, ``device``, ``latency_cache``,
    ``example_inputs``, ``data``, ``evaluate`` and ``progress`` also come in groups, each a frozen
    dataclass that holds their defaults, rules and help (``autodac.options``; the README's table
    of options is made from them): ``fit=FitOptions(...)``, ``probe=ProbeOptions(...)``,
    ``search=SearchOptions(...)``, ``study=StudyOptions(...)``. A group and options given flat
    combine; one option set both ways to two values other than its default is refused.
    """
    # inference mode off, whatever the caller's: synthesis and distillation take gradients, and the result must be fine-tunable
    with torch.inference_mode(False), _global_rng_kept(model):  # building modules draws (discarded) weights: the caller's seeding stands
        run = _check(dict(locals()))  # the arguments as given (the signature is their one list)
        _flag_global_hooks(run.notes, stacklevel=3)
        with held_parametrizations(run.model) as restore:  # a spectral norm in train mode is read, not stepped
            _probe(run)
            _count(run)
            _score(run)
            _reach(run)
            _open_search(run)
            _room(run)
            if run.probe is None and run.settings.evaluate is None:
                _allocate(run)
            else:
                _profile(run)
                _decide_batchnorm(run)
                _search(run)
            _meet_budgets(run)
            _draft_plan(run)
            _refit(run)
            _distill(run)
            _final_scores(run)
            _verify(run)
            result = _publish(run)
        restore(result.model)  # kept layers' parametrisations back in the caller's modes
        return result


# ----------------------------------------------------------------------------- the stages of optimize
#
# ``optimize`` is the sequence above: each stage is a function of one ``_Run``, reading what the
# stages before it wrote and writing its own fields (its docstring says which). Another verb can
# run the stages it needs: ``autodac profile`` runs check, probe, count, score and profile.


@dataclass(frozen=True)
class _Settings:
    """``optimize``'s arguments once checked: every stage reads them, none writes them."""

    budgets: Budgets
    flops: float | None  # the FLOPs ratio, the latency ratio and the parameter ratio (None: no such budget)
    latency: float | None
    params: float | None
    timing_device: torch.device | None  # where latency is timed (None: no latency budget)
    timing_runtime: Runtime
    latency_cache: Any
    example_inputs: Any
    data: Iterable[Any] | None
    evaluate: Callable[[nn.Module], float] | None
    progress: bool
    fit: FitOptions  # the option groups (``autodac.options``), in the order of ``GROUPS``
    probe: ProbeOptions
    search: SearchOptions
    study: StudyOptions
    distill: DistillOptions | None  # None: no distillation

    @property
    def groups(self) -> tuple[Any, ...]:
        """The option groups, in the order of ``autodac.options.GROUPS``."""
        return tuple(getattr(self, group.keyword) for group in GROUPS)


@dataclass
class _Run:
    """One call of ``optimize`` as its stages see it: the settings, and what each stage writes for the next."""

    settings: _Settings
    model: nn.Module  # the unfused copy every stage reads (the caller's model is never touched)
    inputs: tuple[Any, ...] = ()  # probe: the checked example inputs, whether they were assumed, the probe and its source
    assumed: bool = False
    probe: Probe | None = None
    probe_source: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    original: FlopCount | None = None  # count: fvcore's count of the model
    candidates: list[_Candidate] = field(default_factory=list)  # score: the layers that can change, why the others cannot, their factors
    skipped: dict[str, str] = field(default_factory=dict)
    factors: _Factors | None = None
    weight_scores: list[LayerOptions] = field(default_factory=list)  # reach: costs and predicted errors, targets, fixed parts
    target: int = 0
    fixed: int = 0
    original_params: int = 0
    option_params: list[np.ndarray] = field(default_factory=list)
    fixed_params: int = 0
    params_target: int = 0
    shared: SharedSearch | None = None  # open search: the stored search, when ``storage`` is given
    timing: LatencyTable | None = None  # room: latency tables, the knapsack's capacity and the other budgets
    secondary: list[Secondary] = field(default_factory=list)
    capacity: int = 0
    scores: list[LayerOptions] = field(default_factory=list)  # what the knapsack minimises: predicted errors, or probe losses
    runner: _ProbeRunner | None = None  # profile, batchnorm, search: the probe, the profile and the search's result
    profile: SensitivityProfile | None = None
    can_reestimate: bool = False
    use_bn: bool = False
    refined: RefineResult | None = None
    selection: list[int] = field(default_factory=list)  # allocate or search, then meet budgets: the plan's options
    decomposed: nn.Module | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    plan: Plan | None = None  # draft plan, re-fit, final scores: the plan and the trial it came from
    published: Trial | None = None
    flops: int = 0  # verify: fvcore's count and the parameter count of the decomposed model
    params: int = 0

    def allocate(self, layer_scores: list[LayerOptions], room: int | None = None) -> list[int]:
        """The knapsack's choice for ``layer_scores`` within ``room`` (default: the capacity) and every secondary budget."""
        try:
            return solve(_costed(layer_scores, self.timing), self.capacity if room is None else room, secondary=self.secondary)
        except ValueError:
            ratios = self.settings.budgets.ratios()
            given = " and ".join(f"{kind}_budget={ratio!r}" for kind, ratio in ratios.items())
            together = "both" if len(ratios) == 2 else "all of"
            raise BudgetError(
                f"a plan must meet {together} {given}, but none of the {'measured ' if self.timing is not None else ''}"
                "options does: loosen one of them"
            ) from None


def _start(model: nn.Module, flops_budget: Any = None, **options: Any) -> _Run:
    """A checked ``_Run`` for ``optimize(model, flops_budget, **options)`` (its defaults for the rest), for verbs that run some stages."""
    bound = inspect.signature(optimize).bind(model, flops_budget, **options)
    bound.apply_defaults()
    return _check(dict(bound.arguments))


def _working_copy(model: nn.Module) -> nn.Module:
    """The copy every pass runs on: the caller's model is never run, so a forward that updates its own
    buffers (an observer, a call counter, a running average) leaves the caller's as they were.
    Its attention projections are ``Linear`` modules (``unfuse_attention``)."""
    unfused = unfuse_attention(model)
    return copy_model(model) if unfused is model else unfused


def _check(given: dict[str, Any]) -> _Run:
    """Reads ``optimize``'s arguments; writes the settings and the model copy, refusing any argument that breaks its rule."""
    model = given["model"]
    if not isinstance(model, nn.Module):
        raise ModelError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}")
    _check_materialised(model)
    _check_finite(model)
    model = _working_copy(model)
    device, runtime = given["device"], given["runtime"]
    budgets = gather(given["flops_budget"], latency_budget=given["latency_budget"], device=device, runtime=runtime)
    latency = None if budgets.latency is None else budgets.latency.ratio
    if budgets.latency is not None:
        device, runtime = budgets.latency.device, budgets.latency.runtime
    timing_device = resolve_device(device, model) if latency is not None else None
    timing_runtime = get_runtime(runtime or "torch")
    if timing_device is not None:
        timing_runtime.check(timing_device)
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if timing_runtime.name == "onnxruntime" and dtypes - {torch.float32}:  # its CPU kernels: else a raw error mid-search
            raise AutodacError(
                f"runtime='onnxruntime' times float32 models (its CPU provider lacks kernels for other dtypes: float64 Conv, for one), but the model's "
                f"parameters are {', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}; time it with runtime='torch', "
                "or plan a float32 copy"
            )
    _check_latency_cache(given["latency_cache"])
    groups = {group.keyword: _group(group, given) for group in GROUPS}  # each group checks its options
    evaluate, data = given["evaluate"], given["data"]
    if evaluate is not None and not callable(evaluate):
        raise AutodacError(f"`evaluate` must be a callable model -> float, but got {type(evaluate).__name__}")
    SWITCH.check("progress", given["progress"])  # NumPy's booleans too: read as true or false from here on
    if groups["probe"].synthesize and data is not None:
        raise AutodacError("`data` and `synthesize` are alternatives (synthesised inputs stand in for missing data), but both were given")
    settings = _Settings(
        distill=_distill_options(given["distill"], data is not None or bool(groups["probe"].synthesize)),
        budgets=budgets, flops=None if budgets.flops is None else budgets.flops.ratio, latency=latency,
        params=None if budgets.params is None else budgets.params.ratio, timing_device=timing_device, timing_runtime=timing_runtime,
        latency_cache=given["latency_cache"], example_inputs=given["example_inputs"], data=data, evaluate=evaluate,
        progress=bool(given["progress"]), **groups,
    )
    return _Run(settings, model)


def _check_latency_cache(cache: Any) -> None:
    """``latency_cache`` is True (the per-user file), False or None (in memory), or the path of a file (not a folder)."""
    if isinstance(cache, bool) or cache is None:
        return
    if not isinstance(cache, (str, os.PathLike)):
        raise AutodacError(f"`latency_cache` must be True, False, None or a file path, but got {type(cache).__name__} {cache!r}")
    if os.path.isdir(cache):
        raise AutodacError(f"`latency_cache` must be the path of a file (the timings are written there), but {str(cache)!r} is a folder")
    LatencyCache.open(cache)  # refuses a file that is not a cache (a plan, say) before any work, rather than writing over it


def _distill_options(given: Any, has_probe: bool) -> DistillOptions | None:
    """``optimize``'s ``distill`` as options (None: off); it trains on the probe, so it needs ``data`` or ``synthesize``."""
    if given is False or given is None:
        return None
    options = DistillOptions() if given is True else given
    if not isinstance(options, DistillOptions):
        raise AutodacError(f"`distill` must be True, False or an autodac.DistillOptions, but got {type(given).__name__}")
    if not has_probe:
        raise AutodacError("`distill` trains on probe inputs, so it needs `data` or `synthesize=N`, but got neither")
    return options


def _group(group: type, given: dict[str, Any]):
    """The ``group`` of options ``optimize`` was given: the group, with the options given flat (not at their default) in it.

    An option set in both, to two values other than its default, is refused naming both.
    """
    flat = group(**{f.name: given[f.name] for f in dataclasses.fields(group)})  # checks the flat values
    grouped = given.get(group.keyword)
    if grouped is None:
        return _combined(flat)
    if not isinstance(grouped, group):
        raise AutodacError(f"`{group.keyword}` must be an autodac.{group.__name__}, but got {type(grouped).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(group)}
    changed = {name: getattr(flat, name) for name, default in defaults.items() if getattr(flat, name) != default}
    for name, value in changed.items():
        chosen = getattr(grouped, name)
        if chosen != value and chosen != defaults[name]:
            raise AutodacError(
                f"`{name}` must be given once, flat or in `{group.keyword}`, but got {name}={value!r} and "
                f"{group.keyword}={group.__name__}({name}={chosen!r})"
            )
    return _combined(dataclasses.replace(grouped, **changed))


def _combined(options: Any) -> Any:
    """``options`` once its rules across fields hold (``check_combined``, where a group has some): checked on what
    ``optimize`` ends up with, never on a flat half padded with defaults."""
    check = getattr(options, "check_combined", None)
    if check is not None:
        check()
    return options


def _probe(run: _Run) -> None:
    """Reads data, example_inputs, synthesize; writes the probe (collected or synthesised), its source, the inputs and notes."""
    s, model = run.settings, run.model
    probe = collect_probe(s.data, s.probe.probe_size) if s.data is not None else None
    example_inputs = s.example_inputs
    if example_inputs is None and probe is not None:
        example_inputs = arguments(probe.inputs[:1].to(_device_of(model)))
    inputs, assumed = _check_inputs(model, example_inputs)
    _check_probe_shape(probe, inputs, s.example_inputs is not None)
    first_output = None  # the model's output on the first probe example, kept for the output check below
    if probe is not None:
        first_output = _check_runs_on_data(model, arguments(probe.inputs[:1].to(_device_of(model))))
    if assumed:
        note = f"no example_inputs given; assumed one input of shape {_input_shapes(inputs)[0]} (pass example_inputs to plan for your shape)"
        warnings.warn(f"autodac: {note}", UserWarning, stacklevel=3)
        run.notes.append(note)
    if probe is not None:
        run.probe_source = {"source": "data", "examples": len(probe), "inputs": _probes.probe_fingerprint(probe.inputs)}
    elif s.probe.synthesize:
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            raise AutodacError(f"`synthesize` needs a model of one tensor input, but example_inputs has {len(inputs)} arguments")
        run_model(model, inputs, hooked=True)  # a clear error for inputs the model cannot take, before any synthesis
        probe = Probe(synthesize_inputs(model, inputs[0], s.probe.synthesize, seed=s.search.seed, progress=s.progress), None)
        run.probe_source = {"source": "synthetic", "examples": s.probe.synthesize, "steps": SYNTHESIS_STEPS, "seed": s.search.seed}
        run.notes.append(f"no data: the probe is {s.probe.synthesize} inputs synthesised to match the model's BatchNorm statistics")
    if probe is not None and s.evaluate is None:
        _check_batched_outputs(model, probe, first_output)
    if probe is not None and s.evaluate is not None:  # the runner calibrates on every probe input: apply must, too
        run.probe_source["calibration"] = "all"
    run.probe, run.inputs, run.assumed = probe, inputs, assumed


def _count(run: _Run) -> None:
    """Reads the model and inputs; writes fvcore's count of the original (after a clear error for inputs it cannot take)."""
    output = run_model(run.model, run.inputs, hooked=True)  # a clear error for inputs the model cannot take, before anything traces it
    bad, total = _broken_outputs(output, masked=True)
    if bad and not run.assumed:  # example inputs may stand for a shape (noise a model taking log(x) makes NaN of): said, not refused
        _flag(f"the model's outputs on example_inputs hold {bad} NaN or +inf values of {total}: data-free plans are costed on "
              "these inputs but fitted without them; if the model overflows (float16) or a statistic is broken, its plans "
              "compute the same NaN", run.notes, stacklevel=3)
    with _stage("counting FLOPs (fvcore)"):
        run.original = count_flops(run.model, run.inputs)


def _score(run: _Run) -> None:
    """Reads the model, inputs, probe and count; writes the candidates (options, costs, predicted errors), skipped layers, factor cache."""
    s = run.settings
    fit_inputs = fit_examples(run.probe) if (run.probe is not None and s.fit.fit_to_data) else None
    with _stage("tracing and scoring layers"):
        _, run.candidates, run.skipped = _collect(
            run.model, run.inputs, s.fit.methods, s.fit.exclude, s.progress, s.fit.weighting, fit_inputs,
            implied_seed=s.search.seed if run.probe is None and s.fit.fit_to_data else None,
            by_module=run.original.by_module if s.fit.widths else None, notes=run.notes,
            check_reach=functools.partial(_check_flops_reach, run),  # before any statistics or error: a refusal in seconds
        )
    if run.probe is None and any(c.fit.startswith("implied") for c in run.candidates):
        run.probe_source = {"source": "batchnorm", "seed": s.search.seed}
        run.notes.append("no data: layers are fitted to the input moments their BatchNorms imply (autodac.implied)")
    if not run.candidates:
        detail = "; ".join(f"{name or 'the model itself'}: {why}" for name, why in run.skipped.items()) or "no Conv1d, Conv2d, Conv3d or Linear layer"
        raise ModelError(f"the model must have at least one layer that can be decomposed, but none can ({detail})")
    run.factors = _Factors(run.candidates, run.model)


def _skipped_share(run: _Run, skipped: dict[str, str], narrowed: set[str], most: int = 3) -> str:
    """The skipped layers that hold the most FLOPs, with their share and reason: why a budget is out of reach.
    A layer in ``narrowed`` (a depthwise conv between a width unit's producer and consumer) is not one: it narrows
    with the width, and its FLOPs are in the unit's options."""
    by_module, total = run.original.by_module, run.original.total
    held = []
    for name, why in skipped.items():
        if name in narrowed:
            continue
        flops = by_module.get(name, by_module.get(name.rpartition(".")[0], 0)) if name else total
        if flops > 0:
            held.append((flops, name, why))
    if not held:
        return ""
    held.sort(key=lambda item: (-item[0], item[1]))
    listed = "; ".join(f"{name} ({flops / total:.0%} of the FLOPs): {why}" for flops, name, why in held[:most])
    more = f"; and {len(held) - most} more" if len(held) > most else ""
    return f". Left as they are: {listed}{more}"


def _check_flops_reach(run: _Run, saved: int, skipped: dict[str, str], narrowed: set[str]) -> None:
    """Refuses a FLOPs budget below the smallest plan (the count less the most any plan saves), naming the floor."""
    s, total = run.settings, run.original.total
    reachable = total - saved
    if s.flops is not None and reachable > math.floor(s.flops * total):
        raise BudgetError(
            f"`flops_budget >= {math.ceil(reachable / total * 1e4) / 1e4:.4f}` must hold for this model with "
            f"methods={list(s.fit.methods)} (the smallest reachable ratio), but got flops_budget={s.flops!r}"
            f"{_skipped_share(run, skipped, narrowed)}"
        )


def _reach(run: _Run) -> None:
    """Reads the count and candidates; writes FLOPs and parameter targets and fixed parts, refusing a budget no plan reaches."""
    s, total = run.settings, run.original.total
    run.target = math.floor(s.flops * total) if s.flops is not None else total
    run.fixed = total - sum(c.dense_cost for c in run.candidates)
    run.weight_scores = [_layer_options(c) for c in run.candidates]
    narrowed = {name for c in run.candidates if c.unit is not None for name in c.unit.chain}
    _check_flops_reach(run, total - run.fixed - minimum_cost(run.weight_scores), run.skipped, narrowed)  # refused earlier; kept as a check
    run.original_params = count_params(run.model)
    run.option_params = [_option_params(c) for c in run.candidates]
    run.fixed_params = run.original_params - sum(int(p[0]) for p in run.option_params)  # parameters no option changes
    run.params_target = math.floor(s.params * run.original_params) if s.params is not None else run.original_params
    smallest = run.fixed_params + sum(int(p.min()) for p in run.option_params)
    if s.params is not None and smallest > run.params_target:
        raise BudgetError(
            f"`params_budget >= {math.ceil(smallest / run.original_params * 1e4) / 1e4:.4f}` must hold for this model with "
            f"methods={list(s.fit.methods)} (the smallest reachable ratio), but got params_budget={s.params!r}"
        )


def _open_search(run: _Run) -> None:
    """Reads storage and study_name; writes the shared search (None without storage), refusing a study made for another search."""
    s = run.settings
    run.shared = open_search(
        s.study.storage, s.study.study_name, run.model, run.probe, run.probe is not None or s.evaluate is not None, pareto=s.search.pareto,
        settings={
            "flops_budget": s.flops, "latency_budget": s.latency, "input_shapes": _input_shapes(run.inputs),
            **fingerprinted(s.groups),  # the options flagged for it in ``autodac.options``
            "methods": tuple(m for m in METHODS if m in s.fit.methods),  # a set: naming them in another order is the same search
            **({} if s.fit.widths else {"widths": False}),  # other options, another shared profile; studies with widths keep theirs
            # latency studies once left widths out (other options, other tables): those made since are another search
            **({"latency_widths": True} if s.latency is not None and s.fit.widths else {}),
            "evaluate": s.evaluate is not None,
            **({} if s.params is None else {"params_budget": s.params}),  # studies without one keep the fingerprint they had
            **({} if s.probe.output_kind == "auto" else {"output_kind": s.probe.output_kind}),  # auto: as before the option
            # a study timed in another runtime is another search; eager studies keep the fingerprint they had
            **({} if s.timing_runtime.name == "torch" else {"runtime": s.timing_runtime.name}),
        },
    )


def _room(run: _Run) -> None:
    """Reads the budgets and targets; writes the scores, the latency tables (timing every option), the capacity and the other budgets."""
    s = run.settings
    run.scores = run.weight_scores
    if s.params is not None:
        run.secondary.append(Secondary(list(run.option_params), run.params_target - run.fixed_params))
    run.capacity = run.target - run.fixed
    if s.latency is not None:
        measure = functools.partial(
            _measure_latency, run.model, run.inputs, run.candidates, run.factors, s.timing_device, s.latency_cache, s.progress, s.timing_runtime,
        )
        run.timing = timing = measure() if run.shared is None else run.shared.latency(s.timing_device, measure, s.timing_runtime)
        if s.flops is not None:
            run.secondary.insert(0, Secondary([o.costs for o in run.weight_scores], run.target - run.fixed))
        run.capacity = timing.capacity(s.latency)
        fastest = minimum_cost(_costed(run.weight_scores, timing))
        if fastest > run.capacity:  # the tables say no plan is fast enough: believe only an end-to-end measurement
            measured = _latency_ratio(run.model, _build(run.model, run.candidates, timing.fastest(), run.factors, timing), run.inputs, timing)[0]
            if measured > s.latency:
                _refuse_latency(s.latency, measured, timing)
            run.capacity = fastest


def _allocate(run: _Run) -> None:
    """Reads the scores and capacity (no probe, no evaluate); writes the knapsack's selection, capped at max_layer_error when it can be."""
    s = run.settings
    run.selection = _allocate_capped(
        run.allocate, run.scores, run.capacity, run.fixed, run.original.total, s.fit.max_layer_error, run.notes,
        run.timing is None and s.flops is not None, stacklevel=4, flag=run.timing is None,  # a latency plan: once re-planned
    )


def _profile(run: _Run) -> None:
    """Reads the probe (or evaluate) and candidates; writes the probe runner and, with a held-out probe, the profile and its scores."""
    s = run.settings
    run.runner = _ProbeRunner(run.model, run.probe, s.evaluate, s.probe.output_kind)
    if run.runner.held_out is not None:
        with _stage(f"sensitivity profile (up to {s.probe.profile_points} options a layer)"):
            run.profile, run.scores = _profile_scores(
                run.model, run.candidates, run.runner.held_out, run.runner.kind, run.factors, s.probe.profile_size, s.probe.profile_points,
                s.progress, run.shared, run.notes,
            )


def _decide_batchnorm(run: _Run) -> None:
    """Reads the runner and scores; writes the original's probe metric and whether the search re-estimates BatchNorm (use_bn)."""
    s, runner = run.settings, run.runner
    run.metrics["probe_original"] = runner.score(run.model)[1]
    run.can_reestimate = s.probe.reestimate_bn and runner.calibration is not None and has_batchnorm(run.model)

    def decide_bn() -> bool:  # decide once, on the plain allocation, whether re-estimation helps at all
        first = _build(run.model, run.candidates, run.allocate(run.scores), run.factors, run.timing)
        with_bn, without = runner.score(first, reestimate=True), runner.score(first)
        return bool(with_bn[0] > without[0] and with_bn[1] >= without[1])

    with _stage("BatchNorm re-estimation decision"):
        run.use_bn = run.can_reestimate and (decide_bn() if run.shared is None else run.shared.piece("use_bn", decide_bn))


def _search(run: _Run) -> None:
    """Reads the scores, capacity, budgets and use_bn; writes the Optuna search's result and its best selection."""
    s = run.settings
    best_so_far: list[float] = []

    def evaluate_selection(selection: tuple[int, ...]) -> float:
        # a trial that cannot beat the best so far stops early (pareto searches need every value)
        floor = max(best_so_far) if best_so_far and not s.search.pareto else None
        value = run.runner.score(_build(run.model, run.candidates, selection, run.factors, run.timing), reestimate=run.use_bn, floor=floor)[0]
        best_so_far.append(value)
        return value

    costed = _costed(run.scores, run.timing)
    asked = f"{s.search.n_trials} trials" + (f", timeout {s.search.timeout:g} s" if s.search.timeout is not None else "")
    with _stage(f"search ({asked})"):
        run.refined = refine(
            costed, run.capacity, evaluate_selection, n_trials=s.search.n_trials, timeout=s.search.timeout, seed=s.search.seed, progress=s.progress,
            min_budget=minimum_cost(costed) if s.search.pareto else None, secondary=run.secondary or None,
            study=None if run.shared is None else run.shared.study,
        )
    logger.info("search: %d trials run (%d asked)", len(run.refined.trials), s.search.n_trials)  # a timeout may end it sooner
    run.selection = list(run.refined.best.selection)


def _meet_budgets(run: _Run) -> None:
    """Reads the selection; writes the decomposed model, re-planned until its measured latency meets a latency budget."""
    s, timing = run.settings, run.timing
    run.decomposed = _build(run.model, run.candidates, run.selection, run.factors, timing)
    if timing is None:
        return
    # the tables predict; only side-by-side runs decide
    weights = run.refined.best.weights if run.refined is not None else None
    scaled = run.scores if weights is None else [LayerOptions(o.costs, o.errors * w) for o, w in zip(run.scores, weights)]
    data_free = run.runner is None  # re-planned under the damage cap, and flagged for the plan it ends with
    cap = float(s.fit.max_layer_error)
    run.selection, run.decomposed, measured = _meet_latency(
        s.latency, run.capacity, minimum_cost(_costed(run.weight_scores, timing)), run.selection, run.decomposed, timing,
        plan_at=lambda room: _allocate_within_cap(run.allocate, scaled, cap, room) if data_free else run.allocate(scaled, room),
        build=lambda chosen: _build(run.model, run.candidates, chosen, run.factors, timing),
        measure=lambda candidate: _latency_ratio(run.model, candidate, run.inputs, timing),
    )
    ratio, original_seconds, seconds = measured
    run.metrics.update(latency_ratio=ratio, latency_original_ms=original_seconds * 1e3, latency_ms=seconds * 1e3)
    message = _predicted_damage(run.scores, run.selection, cap) if data_free else None
    if message is not None:
        _flag(message, run.notes, stacklevel=3)


def _draft_plan(run: _Run) -> None:
    """Reads the selection and decomposed model; writes the plan (layers, budgets, notes) and the trial it publishes."""
    s, timing = run.settings, run.timing
    planned_budget = {} if s.flops is None else {"flops": s.flops}
    if s.latency is not None:
        planned_budget["latency"] = s.latency
        run.notes.append(f"latency measured on {describe_device(timing.device, s.timing_runtime)}, inputs {_input_shapes(run.inputs)}")
    if s.params is not None:
        planned_budget["params"] = s.params
        run.metrics["params_ratio"] = count_params(run.decomposed) / count_params(run.model)  # what the budget bounds; compare shows it
    layers = _choices(run.candidates, run.selection, timing)
    for candidate in run.candidates:  # a width unit's producer kept whole: say why it is not a layer of its own
        name = candidate.producer.layer.name if candidate.producer is not None else None
        if name is not None and name not in layers and layers[candidate.layer.name].method != WIDTH:
            run.skipped[name] = f"kept whole: planned with {candidate.layer.name!r} as one width unit (sliced with its width, or factorised on its own)"
    run.plan = Plan(
        layers=layers, original_flops=run.original.total, budget=planned_budget,
        input_shapes=_input_shapes(run.inputs), input_assumed=run.assumed, skipped=run.skipped, notes=run.notes, probe=run.probe_source,
        structure=model_structure(run.model, _input_shapes(run.inputs)),
        runtime={} if timing is None else {
            "name": s.timing_runtime.name, "version": s.timing_runtime.version, "device": describe_device(timing.device, s.timing_runtime),
        },
    )
    run.published = run.refined.best if run.refined is not None else None


def _refit(run: _Run) -> None:
    """Reads the plan, selection and probe; writes the re-fitted model and plan when the held-out probe prefers them (sequential_fit)."""
    s, selection, candidates = run.settings, run.selection, run.candidates
    if not s.fit.sequential_fit and s.fit.refit_candidates > 1:  # the candidates are what the re-fit chooses among
        run.plan.notes.append(f"refit_candidates={s.fit.refit_candidates} had nothing to do: sequential_fit=False re-fits no plan")
        logger.warning(run.plan.notes[-1])
    if run.probe is None or not s.fit.sequential_fit or not _selection_factorizes(selection, candidates):
        return
    if not _selection_factorizes(selection, candidates, refittable=True):
        run.plan.notes.append("sequential re-fit skipped: every layer the plan changes is a width, already re-fitted to the probe")
        return
    pool = [(run.published, run.decomposed)]
    if run.refined is not None and run.timing is None:  # a latency plan was tuned on the device: it is not swapped
        for trial in _runners_up(run.refined, candidates, s.fit.refit_candidates - 1):
            pool.append((trial, _build(run.model, candidates, trial.selection, run.factors)))
    with _stage("sequential re-fit"):
        run.decomposed, run.published = _refit_best(run.model, pool, run.plan, candidates, run.probe, run.runner, run.use_bn, s.progress)
    if run.published is not pool[0][0]:  # a runner-up won: what is counted and reported from here on is its selection
        run.selection = list(run.published.selection)
        if "params_ratio" in run.metrics:
            run.metrics["params_ratio"] = count_params(run.decomposed) / count_params(run.model)


def _distill(run: _Run) -> None:
    """Reads the decomposed model, the plan and the runner; writes the distilled model and its record when the held-out probe prefers it (distill)."""
    s, plan = run.settings, run.plan
    if s.distill is None or not plan.factorized:
        return
    inputs = "probe" if run.runner.held_out is None else "calibration"  # with `evaluate`, the whole probe is the calibration
    layers = list(plan.factorized)
    with _stage(f"distillation ({s.distill.epochs} epochs on {count(run.runner.calibration)} probe inputs)"), _progress_bar(
        s.progress, "autodac: distilling", "step"
    ) as bar:
        model, report = distill_model(run.decomposed, run.model, run.runner.calibration, run.runner.score, s.distill, bar, layers, run.runner.kind)
    if report.kept:
        run.decomposed = model
        plan.distilled = {**s.distill.to_dict(), "epoch": report.best_epoch, "accepted": report.accepted, "inputs": inputs,
                          "output_kind": run.runner.kind}  # None with `evaluate`: each batch's read off the teacher's outputs
        run.metrics["probe_before_distillation"] = report.before[1]
        plan.notes.append(
            f"distilled from the original: epoch {report.best_epoch} of {s.distill.epochs} kept, {report.accepted.count(False)} before it "
            f"undone with the learning rate divided by 3 (held-out objective "
            f"{report.epochs[report.best_epoch - 1][0]:.4g} vs {report.before[0]:.4g}, metric {report.epochs[report.best_epoch - 1][1]:.4g} "
            f"vs {report.before[1]:.4g}); apply(model, plan, data) trains it again"
        )
    else:
        best = max(report.epochs) if report.epochs else report.before
        plan.notes.append(
            f"distillation tried and rejected (best held-out objective {best[0]:.4g} vs {report.before[0]:.4g}, metric {best[1]:.4g} vs {report.before[1]:.4g})"
        )


@contextlib.contextmanager
def _progress_bar(show: bool, description: str, unit: str):
    """A ``(done, total)`` callback drawing a tqdm bar on a terminal (None when ``show`` is off)."""
    if not show:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(desc=description, unit=unit, disable=None, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _final_scores(run: _Run) -> None:
    """Reads the decomposed model and runner; writes the final BatchNorm decision, the probe metrics and any damage flag to the plan."""
    s, runner, metrics, plan = run.settings, run.runner, run.metrics, run.plan
    measured = run.probe is not None or s.evaluate is not None
    if measured:
        with _stage("final BatchNorm re-estimation and scores"):
            _final_measurements(run)
    plan.metrics.update(metrics)
    if measured:  # the data-free allocation flags its own (_allocate_capped)
        _flag_measured_damage(plan, float(s.fit.max_layer_error), runner.metric_name, stacklevel=4)


def _final_measurements(run: _Run) -> None:
    """The final scores with and without BatchNorm re-estimation (kept when it helps), and the probe notes."""
    s, runner, metrics, plan = run.settings, run.runner, run.metrics, run.plan
    plain = runner.score(run.decomposed)
    metrics["probe_without_bn_reestimate"] = metrics["probe"] = plain[1]
    if run.can_reestimate:
        reestimated = reestimate_batchnorm(copy_model(run.decomposed), runner.calibration)
        with_bn = runner.score(reestimated)
        metrics["probe_with_bn_reestimate"] = with_bn[1]
        if with_bn[0] > plain[0] and with_bn[1] >= plain[1]:
            run.decomposed = reestimated
            metrics["probe"] = with_bn[1]
            metrics["bn_reestimated"] = 1.0  # apply(model, plan, data) redoes it
            plan.notes.append("BatchNorm statistics re-estimated on the probe (kept: outputs closer to the original's, metric not lower)")
        else:
            plan.notes.append("BatchNorm re-estimation tried and rejected (outputs not closer to the original's, or metric lower)")
    metrics["probe_examples"] = float(len(run.probe)) if run.probe is not None else 0.0
    plan.notes.append(
        f"probe metric: {runner.metric_name} on {len(runner.held_out)} held-out probe examples" if runner.held_out is not None
        else f"probe metric: {runner.metric_name}, the caller's own measure (every probe example calibrates)"
    )
    if runner.kind is not None:
        how = "as output_kind says" if s.probe.output_kind != "auto" else "read off the original's outputs"
        plan.notes.append(f"probe objective: {_probes.OUTPUT_KINDS[runner.kind]}, {how}")


def _verify(run: _Run) -> None:
    """Reads the decomposed model and plan; writes fvcore's and the parameter count, refusing (a bug) any that the plan did not predict."""
    s, plan = run.settings, run.plan
    count = count_flops(run.decomposed, run.inputs)
    counted = count.total
    if counted != plan.flops or counted > run.target:  # the closed form and fvcore disagree: a bug, never a silent miss
        raise AutodacError(f"internal check failed: fvcore counts {counted} FLOPs, plan predicts {plan.flops}, budget {run.target}{_miscounted(count, plan)}")
    params = count_params(run.decomposed)
    predicted = run.fixed_params + sum(int(p[i]) for p, i in zip(run.option_params, run.selection))
    if s.params is not None and (params != predicted or params > run.params_target):  # as for FLOPs: a bug, never a silent miss
        raise AutodacError(f"internal check failed: the model holds {params} parameters, the plan predicts {predicted}, budget {run.params_target}")
    run.flops, run.params = counted, params


def _miscounted(count: FlopCount, plan: Plan) -> str:
    """The plan's layers whose fvcore count (a width's with the modules it slices) is not the plan's, as an error's tail."""
    counted_as = {name: sum(count.by_module.get(n, 0) for n in (name, *(c.sliced or ()))) for name, c in plan.layers.items()}
    wrong = [f"{name!r} {counted_as[name]} vs {c.flops_after}" for name, c in plan.layers.items() if counted_as[name] != c.flops_after]
    if not wrong:
        return ""
    return f"; layers fvcore counts otherwise (fvcore vs plan): {', '.join(wrong[:5])}" + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")


def _publish(run: _Run) -> Result:
    """Reads everything before; writes the plan (and its front) to a shared search and returns the Result."""
    s, plan, refined = run.settings, run.plan, run.refined
    logger.info("planned %d of %d layers; FLOPs ratio %.4f", len(plan.factorized), len(plan.layers), plan.flops_ratio)
    front = [] if not (s.search.pareto and refined) else [
        _front_plan(plan, run.candidates, t, run.timing, run.use_bn and run.can_reestimate) for t in refined.front]
    if run.shared is not None:
        plan.notes.append(run.shared.note(s.search.n_trials))
        run.shared.publish(plan, run.published.value, run.published.number, front)
    return Result(
        model=run.decomposed, plan=plan, original_flops=run.original.total, flops=run.flops,
        original_params=run.original_params, params=run.params, notes=run.notes,
        profile=run.profile, trials=[] if refined is None else refined.trials, pareto=front, example_inputs=run.inputs,
    )


_LATENCY_ATTEMPTS = 6  # side-by-side measurements spent adjusting a latency plan
_LATENCY_SLACK = 0.03  # loosen a plan that meets its latency budget by more than this (fraction of the original's time)


_UNREACHABLE = 1 << 53  # the cost given to an option the damage cap forbids: no budget can pay it


def _capped(scores: list[LayerOptions], cap: float) -> list[LayerOptions]:
    """``scores`` with every option whose predicted error exceeds ``cap`` made unaffordable."""
    return [LayerOptions(np.where(o.errors > cap, _UNREACHABLE, o.costs), o.errors) for o in scores]


def _allocate_within_cap(allocate, scores: list[LayerOptions], cap: float, room: int | None = None) -> list[int]:
    """The allocation with no layer's predicted error above ``cap`` when the budgets allow it, else the uncapped one."""
    with contextlib.suppress(BudgetError):  # the budgets (or the other budgets: parameters) may need options the cap forbids
        return allocate(_capped(scores, cap), room)
    return allocate(scores, room)


def _predicted_damage(scores: list[LayerOptions], selection: Sequence[int], cap: float) -> str | None:
    """What a data-free plan's flag says when its worst layer's or its summed predicted error exceeds ``cap``; None if neither."""
    worst = max(float(o.errors[i]) for o, i in zip(scores, selection))
    summed = sum(float(o.errors[i]) for o, i in zip(scores, selection))
    return None if worst <= cap and summed <= cap else _predicted_text(summed, worst, cap)


def _predicted_text(summed: float, worst: float, cap: float) -> str:
    return (
        f"the plan is predicted to damage the model: its layers' predicted output errors sum to {summed:.2f} and reach "
        f"{worst:.2f} in one layer (max_layer_error={cap} is the most either should be)"
    )


def _flag_global_hooks(notes: list[str], stacklevel: int) -> None:
    """Warns of process-wide module hooks: they run on the replacements' convs too, so one that changes outputs
    makes the model returned compute what no plan was scored for."""
    count = global_hooks()
    if count:
        _flag(f"{count} process-wide module hook(s) (torch.nn.modules.module.register_module_forward_hook or _pre_hook) run on "
              "every module, the factorised layers' new convs too: one that changes outputs makes the model returned differ from "
              "what was planned and scored; remove them while autodac runs", notes, stacklevel)


def _flag(message: str, notes: list[str], stacklevel: int) -> None:
    warnings.warn(f"autodac: {message}", UserWarning, stacklevel=stacklevel + 1)  # pointed at optimize's caller
    logger.warning(message)
    notes.append(message)


def _allocate_capped(
    allocate, scores: list[LayerOptions], capacity: int, fixed: int, total: int, cap: float, notes: list[str], in_flops: bool = True,
    stacklevel: int = 3, flag: bool = True,
) -> list[int]:
    """The data-free allocation with no layer's predicted error above ``cap``, when the budget allows it.

    When it does not, the budget is still honoured (uncapped). Either way (with ``flag``), a plan whose worst
    layer, or whose summed predicted error (relative output errors add up through the network
    when they are independent), exceeds ``cap`` is flagged: warned, logged and noted, with the
    budget from which the prediction is within ``cap`` (the knapsack minimises the sum, so that
    budget is found by bisection on its room). A latency plan is flagged once its measured re-planning is done.
    """
    selection = _allocate_within_cap(allocate, scores, cap)
    message = _predicted_damage(scores, selection, cap) if flag else None
    if message is None:
        return selection
    if in_flops:
        safe = _safe_budget(allocate, scores, _capped(scores, cap), capacity, fixed, total, cap)
        message += (f"; from flops_budget >= {safe:.4f} both are predicted within it" if safe is not None else
                    "; no FLOPs budget brings both within it: the other budgets (parameters) bind, so raise them")
    _flag(message, notes, stacklevel)
    return selection


def _flag_measured_damage(plan: Plan, cap: float, metric_name: str, stacklevel: int = 3) -> None:
    """Flag a plan made with a probe as ``_allocate_capped`` flags a data-free one: warned, logged and noted when its
    layers' predicted output errors exceed ``cap`` (worst or summed), with what the probe measured beside them.

    The probe's figure is what the search went by; the predicted errors say how far the layers
    were cut (at the smallest reachable budget: rank 1 nearly everywhere), which a small probe
    may not show. A built-in probe metric below ``1 - cap`` of the original's is flagged too,
    whatever was predicted: predictions from a probe of a handful of examples can be 0."""
    factorized = plan.factorized.values()
    worst = max((c.error for c in factorized), default=0.0)
    summed = sum(c.error for c in factorized)
    measured = (plan.metrics["probe"], plan.metrics["probe_original"]) if {"probe", "probe_original"} <= plan.metrics.keys() else None
    builtin = measured is not None and metric_name != "evaluate(model)" and measured[1] > 0  # a caller's measure may be any scale
    lost = builtin and measured[0] < (1 - cap) * measured[1]  # what the probe saw, whatever was predicted
    if worst <= cap and summed <= cap and not lost:
        return
    if worst <= cap and summed <= cap:
        message = (
            f"the plan is measured to damage the model: on the probe, {metric_name} {measured[0]:.4f} against the original's "
            f"{measured[1]:.4f}, below 1 - max_layer_error = {1 - cap:g} of it (its layers' predicted output errors sum to {summed:.2f})"
        )
    else:
        message = _predicted_text(summed, worst, cap)
        if measured is not None:
            message += f"; on the probe, {metric_name} {measured[0]:.4f} against the original's {measured[1]:.4f}"
    _flag(message, plan.notes, stacklevel)


def _safe_budget(allocate, scores, capped, capacity: int, fixed: int, total: int, cap: float) -> float | None:
    """The smallest FLOPs budget whose data-free plan keeps every layer's and the summed predicted error within ``cap``;
    None when no FLOPs budget does, the other budgets (parameters) holding it beyond the cap however many FLOPs it may keep."""
    def within(room: int) -> bool:
        try:
            chosen = allocate(capped, room)
        except BudgetError:  # another budget (parameters) cannot be met within the cap at this room
            return False
        return sum(float(o.errors[i]) for o, i in zip(scores, chosen)) <= cap

    low, high = max(capacity, minimum_cost(capped)), total - fixed  # the whole model dense predicts 0
    if not within(high):
        return None
    if minimum_cost(capped) > capacity and within(low):
        high = low
    while high - low > max(1, total // 10000):
        middle = (low + high) // 2
        if within(middle):
            high = middle
        else:
            low = middle
    return math.ceil((fixed + high) / total * 1e4) / 1e4


def _selection_factorizes(selection: Sequence[int], candidates: list[_Candidate], refittable: bool = False) -> bool:
    """Whether the selection changes any layer (``refittable``: any the sequential re-fit can re-fit, i.e. not a width)."""
    return any(c.options[i][0] not in ((DENSE, WIDTH) if refittable else (DENSE,)) for c, i in zip(candidates, selection))


def _refits(layers: dict[str, LayerChoice], model: nn.Module) -> dict[str, Refit]:
    """What ``refit_in_order`` needs for each factorised layer of ``layers``."""
    return {
        name: Refit(c.method, c.rank, c.impl, _fit_weights(model, c.fit, model.get_submodule(name)))
        for name, c in layers.items() if not c.is_dense and c.method != WIDTH
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
    When the attempts run out with none meeting it (noisy timings, tables far off), the fastest
    plan within every other budget is timed and kept if it meets the budget; otherwise the budget
    is refused with that plan's ratio.
    """
    best = None  # (capacity, selection, model, measurement) of the roomiest plan that met the budget
    missed = None  # the smallest capacity whose plan missed
    timed = None  # (selection, model, measurement) timed last
    for _ in range(_LATENCY_ATTEMPTS):
        # an all-dense plan is the original itself: ratio 1 by definition, not by a noisy measurement
        measured = measure(decomposed) if any(selection) else (1.0, timing.original, timing.original)
        ratio, timed = measured[0], (selection, decomposed, measured)
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
        fastest = plan_at(floor)
        if fastest != timed[0]:  # the attempts ran out before the fastest plan was timed
            decomposed = build(fastest)
            timed = (fastest, decomposed, measure(decomposed))
            logger.info("latency plan at its fastest, %.3f ms of layer time: measured ratio %.4f (budget %.4f)", floor / 1e6, timed[2][0], budget)
        if timed[2][0] > budget:
            _refuse_latency(budget, timed[2][0], timing)
        return timed
    return best[1], best[2], best[3]


def _costed(scores: list[LayerOptions], timing: LatencyTable | None) -> list[LayerOptions]:
    """The scores with their costs in the unit the budget is in: FLOPs, or measured nanoseconds (an option the damage
    cap made unaffordable stays so)."""
    if timing is None:
        return scores
    return [LayerOptions(np.where(o.costs >= _UNREACHABLE, _UNREACHABLE, costs), o.errors) for costs, o in zip(timing.costs(), scores)]


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    if all(p.device == device for p in itertools.chain(module.parameters(), module.buffers())):
        return module
    return copy.deepcopy(module).to(device)


def _inputs_on(inputs: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


def _measure_latency(model, inputs, candidates: list[_Candidate], factors: _Factors, device, cache_path, progress, runtime: Runtime) -> LatencyTable:
    cache = LatencyCache.open(cache_path)
    reference = _on_device(model, device)
    shapes = _member_shapes(model, inputs, [c.unit for c in candidates if c.unit is not None])
    layers = [
        (c.layer.module, c.layer.geometry, [o[:2] for o in c.options], functools.partial(factors.build, c.layer.name),
         None if c.unit is None else functools.partial(_unit_parts, c, factors, shapes))
        for c in candidates
    ]
    # a unit's producer options run the producer's own forms
    implementations = {**IMPLEMENTATIONS, **{PRODUCER + m: impls for m, impls in IMPLEMENTATIONS.items()}}
    with evaluating(reference):
        return measure_table(reference, _inputs_on(inputs, device), layers, implementations, device, cache, progress, runtime)


def _member_shapes(model: nn.Module, inputs, units: list[WidthUnit]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The input shape of every call of every width unit member (producer, chain, consumer), from one pass."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    handles = []
    for unit in units:
        for name in (unit.producer, *unit.chain, unit.consumer):
            def record(_module, args, name=name):
                shapes.setdefault(name, []).append(tuple(args[0].shape))
            handles.append(model.get_submodule(name).register_forward_pre_hook(record))
    try:
        with evaluating(model), torch.no_grad():
            if units:
                model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: tuple(found) for name, found in shapes.items()}


def _unit_parts(candidate: _Candidate, factors: _Factors, shapes, method: str, rank: int | None, impl: str) -> list[tuple[nn.Module, Any]]:
    """What one option of a width unit runs, for timing: producer, chain and consumer, each on inputs of its traced
    shapes with the hidden channels at the option's width (the activations and other ops between are not timed)."""
    unit = candidate.unit
    names = (unit.producer, *unit.chain, unit.consumer)
    originals = {name: factors.root.get_submodule(name) for name in names}
    modules = dict(originals)
    width = unit.channels
    if rank is not None:
        modules.update(factors.replacements(unit.consumer, method, rank, impl))
        width = rank if method == WIDTH else width

    def narrowed(name: str) -> tuple[tuple[int, ...], ...]:
        if name == unit.producer or width == unit.channels:
            return shapes[name]
        axis = _channel_axis(originals[name])
        return tuple(tuple(width if d == axis % len(shape) else size for d, size in enumerate(shape)) for shape in shapes[name])

    return [(modules[name], narrowed(name)) for name in names]


def _channel_axis(module: nn.Module) -> int:
    """The axis of a module's input that holds its channels: the last for a Linear (tokens ``N x L x C`` too), the one
    before the spatial axes for a conv (an unbatched ``C x H x W`` input too), 1 for a BatchNorm."""
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return -(len(module.kernel_size) + 1)
    return 1


def _latency_ratio(model: nn.Module, decomposed: nn.Module, inputs, timing: LatencyTable) -> tuple[float, float, float]:
    """``(ratio, original s, decomposed s)``: medians of interleaved end-to-end runs on the table's device and runtime."""
    device = timing.device
    reference, candidate = _on_device(model, device), _on_device(decomposed, device)
    with evaluating(reference), evaluating(candidate):
        return side_by_side(reference, candidate, _inputs_on(inputs, device), device, runtime=get_runtime(timing.runtime))


def _refuse_latency(budget: float, best: float, timing: LatencyTable):
    where = describe_device(timing.device, get_runtime(timing.runtime))
    if best >= 1:  # the model as it is always meets 1: no bound above it
        raise BudgetError(
            f"`latency_budget >= 1` must hold for this model on {where}: no plan measured faster than the original (with every "
            f"layer at its fastest option the ratio measured {best:.3f}), but got latency_budget={budget!r}"
        )
    raise BudgetError(
        f"`latency_budget >= {math.ceil(best * 1e3) / 1e3:.3f}` must hold for this model on {where} "
        f"(the best latency ratio measured, with every layer at its fastest option), but got latency_budget={budget!r}"
    )


def _front_plan(template: Plan, candidates: list[_Candidate], trial: Trial, timing: LatencyTable | None = None,
                reestimated: bool = False) -> Plan:
    """One plan of the Pareto front, with the probe objective it scored (no model is built).

    It carries what ``apply`` needs to rebuild the model that trial scored: the probe's size and
    source (a synthetic recipe), where latency was timed, and whether BatchNorm statistics were
    re-estimated for its score; not the chosen plan's later stages (re-fit, distillation).
    """
    metrics = {"probe_objective": trial.value, "trial": float(trial.number)}
    if "probe_examples" in template.metrics:
        metrics["probe_examples"] = template.metrics["probe_examples"]
    if reestimated:  # trials were scored re-estimated on the calibration half: apply(model, plan, data) does it again
        metrics["bn_reestimated"] = 1.0
    notes = [f"a plan of the Pareto front (trial {trial.number}), as the search scored it: without the chosen plan's later "
             "stages (sequential re-fit, distillation); the notes after this one are the chosen plan's"]
    return Plan(
        layers=_choices(candidates, trial.selection, timing), original_flops=template.original_flops, budget=dict(template.budget),
        input_shapes=template.input_shapes, input_assumed=template.input_assumed, skipped=dict(template.skipped),
        metrics=metrics, notes=notes + list(template.notes), probe=dict(template.probe), structure=template.structure,
        runtime=dict(template.runtime),
    )


def _profile_scores(
    model, candidates, held_out: Probe, kind: str, factors: _Factors, size: int, points: int, progress: bool,
    shared: SharedSearch | None = None, notes: list[str] | None = None,
):
    """Measure each layer's probe loss at a few options and read every other option off that curve.

    The measured options are spread by cost along the layer's front of (cost, reconstruction
    error), whatever their method; each option's loss is then interpolated from the layer's
    measured loss-versus-error points, so methods compete on one per-layer scale. A ``shared``
    search measures the profile once for all its workers.
    """
    asked = size
    size, capped = _profile_size(model, held_out, asked)
    if capped is not None:
        logger.info(capped)
        if notes is not None and asked != ProbeOptions.profile_size:  # a size the caller chose (the default's cap is only logged)
            notes.append(capped)
    sample = held_out.subset(slice(0, size))
    rows, fronts = [], []
    for candidate, options in zip(candidates, (_layer_options(c) for c in candidates)):
        chosen_by_family = []
        for family, indices in _families(candidate).items():
            sub = LayerOptions(options.costs[indices], options.errors[indices])
            front = [int(indices[i]) for i in pareto_front(sub)]
            # a width unit's own and producer factorisations are its side options: one point sets their scale
            count = points if candidate.unit is None or family == WIDTH else 1
            chosen = pick_ranks(front, [int(options.costs[i]) for i in front], count) if front else []
            chosen_by_family.append((family, indices, chosen))
            row_name = candidate.producer.layer.name if family == PRODUCER else candidate.layer.name
            row_module = candidate.producer.layer.module if family == PRODUCER else candidate.layer.module
            rows.append((row_name, row_module, [_measured_key(candidate.options[i]) for i in chosen]))
        fronts.append(chosen_by_family)
    position = _positions(candidates)
    rows = sorted(_merge_rows(rows), key=lambda row: position.get(row[0], 1 << 30))  # the profile lists layers in model order
    # one batch size for every pass, bounded by the interior of every option measured: the layer under
    # test runs as its replacement's bound forward, which no hook sees, and the prefix replay needs
    # every pass batched alike
    batch = _probes.activation_batch_size(
        model, sample.inputs, _probes.batch_size_for(per_example(sample.inputs)),
        _stand_ins(factors, rows),
    )
    logger.info("sensitivity profile on %d probe examples, batches of %d", len(sample), batch)
    reference = predict(model, sample.inputs, batch)  # compared as the search compares them (``kind``: decided on the whole held-out half)

    def loss(candidate_model: nn.Module) -> float:
        return divergence(predict(candidate_model, sample.inputs, batch), reference, kind)

    measure = functools.partial(measure_profile, model, rows, factors.build, loss, len(sample), progress, _PROFILE_BYTES)
    profile = measure() if shared is None else shared.profile(measure)
    scores = []
    for candidate, chosen_by_family in zip(candidates, fronts):
        options = _layer_options(candidate)
        losses = np.zeros(len(candidate.options))
        for family, indices, chosen in chosen_by_family:
            measured = profile.losses[candidate.producer.layer.name if family == PRODUCER else candidate.layer.name]
            curve_points = [(options.errors[i], measured[_measured_key(candidate.options[i])]) for i in chosen]
            losses[indices] = loss_curve(options.errors[indices], curve_points)
        losses[0] = 0.0  # dense
        scores.append(LayerOptions(options.costs, losses))
    return profile, scores


_PROFILE_BYTES = 2 << 30  # the most the profile keeps of one recorded pass, so what runs before a layer is not run again


def _profile_size(model: nn.Module, held_out: Probe, asked: int) -> tuple[int, str | None]:
    """How many held-out examples the profile runs on, and why fewer than ``asked`` when it is fewer (said, not silent)."""
    fits = _profile_examples(model, held_out.inputs[:1])
    size = min(asked, fits, len(held_out))
    if size == asked:
        return size, None
    limit = (f"the probe's held-out half holds {len(held_out)}" if size == len(held_out)
             else f"one recorded pass of at most {_PROFILE_BYTES / 2**30:g} GiB holds {fits} examples of this model")
    return size, f"profile_size={asked}: the sensitivity profile ran on {size} probe examples ({limit})"


def _profile_examples(model: nn.Module, example: Batch) -> int:
    """How many examples one recorded pass of the profile can hold within ``_PROFILE_BYTES`` (at least 16).

    The profile replays what runs before the layer under test from one recorded pass; on small
    inputs that is every example asked for, at 224 px a few dozen (EfficientNet-Lite0 keeps
    ~30 MB of layer outputs an image), which still ranks layers and keeps the profile in minutes.
    """
    total = [0]
    leaves = [m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters(recurse=False))]

    def count(_module, _args, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        run_through(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return max(16, _PROFILE_BYTES // max(1, total[0]))


def _families(candidate: _Candidate) -> dict[str, np.ndarray]:
    """Option indices (dense excluded) by the scale their errors are on: the layer's factorisations,
    a width unit's widths, its producer's factorisations. Each gets its own loss curve."""
    families: dict[str, list[int]] = {}
    for i, option in enumerate(candidate.options[1:], start=1):
        method = option[0]
        family = WIDTH if method == WIDTH else PRODUCER if method.startswith(PRODUCER) else "own"
        owner = candidate.producer if family == PRODUCER else candidate
        covariance = owner.input_cov if owner is not None and family != WIDTH else None
        if covariance is not None and covariance_for(get_method(method.removeprefix(PRODUCER)), covariance) is None:
            family += " (weights)"  # channel blocks the method cannot use: its errors are on the weights' scale
        families.setdefault(family, []).append(i)
    return {family: np.asarray(indices, dtype=np.int64) for family, indices in families.items()}


def _measured_key(option: tuple) -> tuple[str, int]:
    """How the profile names an option: a producer's factorisation under the producer's own name and method."""
    return option[0].removeprefix(PRODUCER), option[1]


def _stand_ins(factors: _Factors, rows: list[tuple[str, nn.Module, list]]) -> dict[nn.Module, Iterable[nn.Module]]:
    """Each profile row's module and its options' replacements, built one at a time (a module under two names: both rows')."""
    def built(name: str, options: list[tuple[str, int]]) -> Iterable[nn.Module]:
        return (factors.build(name, method, rank) for method, rank in options)

    stand_ins: dict[nn.Module, Iterable[nn.Module]] = {}
    for name, module, options in rows:
        stand_ins[module] = itertools.chain(stand_ins.get(module, ()), built(name, options))
    return stand_ins


def _merge_rows(rows: list[tuple[str, nn.Module, list]]) -> list[tuple[str, nn.Module, list]]:
    """One profile row per layer (a consumer's widths and factorisations are measured on the same layer)."""
    merged: dict[str, tuple[str, nn.Module, list]] = {}
    for name, module, options in rows:
        if name in merged:
            merged[name][2].extend(o for o in options if o not in merged[name][2])
        else:
            merged[name] = (name, module, list(options))
    return list(merged.values())


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
    never touched). As in ``optimize``, every ``nn.MultiheadAttention`` of the copy becomes an
    ``UnfusedMultiheadAttention``, whose projections the plan names (``blocks.0.attn.q_proj``).
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise PlanError(f"`plan` must be an autodac.Plan, but got {type(plan).__name__}")
    _check_materialised(model)
    _flag_global_hooks([], stacklevel=3)
    # inference mode off (as in optimize): the copy is of ordinary tensors, and a distillation replay takes gradients
    with torch.inference_mode(False), _global_rng_kept(model), held_parametrizations(model) as restore:  # seeding kept; norms read
        model = _working_copy(model)  # as optimize's: plans name the unfused projections (``attn.q_proj``)
        _check_plan_fits(model, plan)
        example = _plan_example(model, plan)
        _check_widths(model, plan, example)
        data_fitted = [name for name, c in plan.factorized.items() if c.fit.removeprefix("seq+").startswith("data")]
        implied = [name for name, c in plan.factorized.items() if c.fit.removeprefix("seq+").startswith("implied")]
        refitted = [name for name, c in plan.factorized.items() if c.fit.startswith("seq+")]
        covariances: dict[str, torch.Tensor] = {}
        moments: dict[str, torch.Tensor] = {}
        synthetic_fit = plan.probe.get("source") == "synthetic" and (data_fitted or refitted or plan.metrics.get("bn_reestimated") or plan.distilled)
        if synthetic_fit and data is not None:
            raise PlanError(
                f"a plan made with synthesize={plan.probe.get('examples')} is rebuilt from the inputs its recorded recipe synthesises "
                "(what it was fitted to), so `data` must be None, but data was given: other inputs would give another model"
            )
        if data is None and synthetic_fit:
            data = _replay_synthesis(model, plan)
        needing = data_fitted or refitted
        if plan.distilled and data is None and plan.probe.get("source") != "synthetic":
            raise PlanError(
                "a distilled plan's weights come from training on the probe, so `data` must be given to rebuild them, but got data=None "
                "(or keep optimize's result.model: autodac.export writes it)"
            )
        if plan.metrics.get("bn_reestimated") and data is None:
            raise PlanError(
                "the plan's BatchNorm statistics were re-estimated on the probe, so `data` must be given to redo it, but got "
                "data=None (without it the model is not the one optimize returned; or keep result.model: autodac.export writes it)"
            )
        if needing and data is None:
            raise PlanError(
                f"layers fitted to probe data must be rebuilt from the same data, so `data` must be given, "
                f"but got data=None (layers {needing[:3]}{'...' if len(needing) > 3 else ''})"
            )
        examples = int(plan.metrics.get("probe_examples", DEFAULT_PROBE_SIZE))
        replayed = collect_probe(data, max(2, examples)) if data is not None else None  # once: `data` may be a one-shot iterator
        if replayed is not None and plan.input_shapes:  # the plan was made and fitted at its input shapes: the data must have them
            _check_probe_shape(replayed, tuple(torch.empty(shape, device="meta") for shape in plan.input_shapes), True, "plan.input_shapes")
        if replayed is not None:
            _check_runs_on_data(model, arguments(replayed.inputs[:1].to(_device_of(model))))
        recorded = plan.probe.get("inputs") if plan.probe.get("source") == "data" else None
        if replayed is not None and recorded and (needing or plan.metrics.get("bn_reestimated") or plan.distilled):
            given = _probes.probe_fingerprint(replayed.inputs)
            if given != recorded:  # other examples: fitted to them, which may be meant (a plan moved to new data), never silently
                message = (
                    f"`data` is not the probe the plan was fitted to (the plan's {plan.probe.get('examples')} examples are {recorded}, "
                    f"`data` gives {len(replayed)} that are {given}): the layers are fitted to this data, so the model is not the one "
                    "optimize returned; pass the same batches to rebuild that one"
                )
                warnings.warn(f"autodac: {message}", UserWarning, stacklevel=2)
                logger.warning(message)
        if data_fitted:
            modules = {name: model.get_submodule(name) for name in data_fitted}  # checked by _check_plan_fits
            widths = {n: m for n, m in modules.items() if plan.layers[n].method == WIDTH}
            covariances, moments = _statistics(model, {n: m for n, m in modules.items() if n not in widths}, widths, fit_examples(replayed))
        if implied:
            modules = {name: model.get_submodule(name) for name in implied}  # checked by _check_plan_fits
            if not plan.input_shapes:
                raise PlanError("a plan fitted to BatchNorm-implied statistics must record its input shape, but `input_shapes` is empty")
            weight = next(iter(model.parameters()))
            example = tuple(torch.zeros(shape, device=weight.device, dtype=weight.dtype) for shape in plan.input_shapes)
            units = {
                n: WidthUnit(n, plan.layers[n].sliced[0], tuple(plan.layers[n].sliced[1:]), int(plan.layers[n].weight_shape[1]))
                for n in modules if plan.layers[n].method == WIDTH and plan.layers[n].sliced
            }
            found = _implied_statistics(
                model, example, {n: m for n, m in modules.items() if n not in units}, _implied_consumers(model, example, units),
                int(plan.probe.get("seed", 0)),
            )
            covariances.update(found[0])
            moments.update(found[1])
        replacements = {}
        for name, choice in plan.factorized.items():
            if choice.method == WIDTH:
                replacements.update(_replay_width(model, name, choice, moments.get(name)))
                continue
            module = model.get_submodule(name)  # its existence, type and shape were checked first
            try:
                out_weights = _fit_weights(model, choice.fit, module)
                input_cov = covariances.get(name)
                decomposition = None
                if out_weights is not None or input_cov is not None:
                    if choice.method not in METHODS:
                        raise AutodacError(f"`method` must be one of {sorted(METHODS)}, but got method={choice.method!r}")
                    factorization = get_method(choice.method)
                    if getattr(module, "groups", 1) != 1 or not factorization.applies_to(tuple(module.weight.shape)):
                        build_factorized(module, choice.method, choice.rank, None, choice.impl)  # refuses, naming why, before any fit
                    decomposition = factorization.decompose(module.weight, out_weights, covariance_for(factorization, input_cov))
                replacements[name] = build_factorized(module, choice.method, choice.rank, decomposition, choice.impl)
            except AutodacError as error:
                raise PlanError(f"layer {name!r}: {error}") from None
        result = replace_layers(model, replacements)
        # checked as built: the re-fit, distillation and BatchNorm replays below change weights, never the layers or their cost
        _check_runs(result, example)
        if example is not None:  # a hand-edited rank the plan's FLOPs figures were not updated for must not pass as within budget
            count = count_flops(result, example)
            if count.total != plan.flops:
                raise PlanError(
                    f"the model a plan builds must have the FLOPs the plan states, but fvcore counts {count.total:,} and the plan "
                    f"says {plan.flops:,} (ratio {count.total / plan.original_flops:.4f} against {plan.flops_ratio:.4f}){_miscounted(count, plan)}"
                )
        if refitted:  # replay the sequential re-fit optimize kept, on the same fit inputs, in the same order
            chosen = {name: plan.layers[name] for name in refitted}
            result, _ = refit_in_order(model, result, _refits(chosen, model), fit_examples(replayed))
        if plan.distilled:  # replay the distillation optimize kept: the same inputs, options and epoch, so the same weights
            options = DistillOptions(**{k: v for k, v in plan.distilled.items() if k not in ("epoch", "accepted", "inputs", "output_kind")})
            inputs = split_probe(replayed)[0] if plan.distilled["inputs"] == "calibration" else replayed.inputs
            result = replay_distillation(result, model, inputs, options, plan.distilled["accepted"], list(plan.factorized),
                                         plan.distilled.get("output_kind"))  # plans from before it was recorded: read per batch, as then
        if plan.metrics.get("bn_reestimated") and replayed is not None:  # replay the re-estimation optimize kept
            reestimate_batchnorm(result, replayed.inputs if plan.probe.get("calibration") == "all" else split_probe(replayed)[0])
        return restore(result)  # kept layers' parametrisations back in the caller's modes


@contextlib.contextmanager
def _global_rng_kept(model: nn.Module):
    """torch's global random state (CPU, and the model's CUDA devices) as it was before the block.

    Every module autodac builds draws its initial weights (then overwritten) from it: without this a
    user who seeded before ``optimize`` would draw other numbers after it.
    """
    parameters = model.parameters() if isinstance(model, nn.Module) else ()  # not a model: _check says so, clearly
    devices = sorted({p.device.index or 0 for p in parameters if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


def _plan_example(model: nn.Module, plan: Plan) -> tuple[Any, ...] | None:
    """Zeros of the plan's input shapes, on the model's device and in its dtype; None when the plan records none
    or the model itself cannot run on them (inputs that are not floats, token ids say: nothing to check with). A layer
    called with its input as a keyword is refused here (``positional_inputs``): the width proof and the fits hook inputs."""
    if not plan.input_shapes:
        return None
    weight = next(iter(model.parameters()), None)
    options = {} if weight is None else {"device": weight.device, "dtype": weight.dtype}
    example = tuple(torch.zeros(shape, **options) for shape in plan.input_shapes)
    with positional_inputs(model):
        try:
            run_model(model, example)
        except ModelError:
            return None
    return example


def _check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """Every planned layer exists, is a Conv1d/Conv2d/Conv3d/Linear and has the weight shape the plan was made for
    (checked in plan order, before any statistic is collected: the first misfit is the one named); first of all,
    the model must be the one the plan was made for, when the plan records it (``autodac.structure``)."""
    check_structure(model, plan)
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in plan.layers:
        if name not in modules:
            raise PlanError(f"the plan's layer {name!r} must exist in the model, but it does not")
    for name, choice in plan.factorized.items():
        module = modules[name]
        if not isinstance(module, SUPPORTED_TYPES):
            raise PlanError(f"the plan's layer {name!r} must be a Conv1d, Conv2d, Conv3d or Linear, but it is a {type(module).__name__}")
        hooked = [(m, own_hooks(modules[m])) for m in (name, *(choice.sliced or ())) if m in modules and own_hooks(modules[m])]
        if hooked:  # a sliced module the model lacks is _check_widths' to name
            raise PlanError(
                f"the modules a plan changes must have no hooks of their own (register_forward_hook, ...: their replacements would "
                f"not run them), but {hooked[0][0]!r} has {hooked[0][1]}; remove them to apply the plan"
            )
        if tuple(module.weight.shape) != tuple(choice.weight_shape):
            raise PlanError(
                f"layer {name!r} must have the weight shape the plan was made for, {tuple(choice.weight_shape)}, "
                f"but it has {tuple(module.weight.shape)}"
            )


def _check_widths(model: nn.Module, plan: Plan, example: tuple[Any, ...] | None) -> None:
    """Every width choice slices a chain the planner itself would have found: a ``1x1`` conv or Linear consumer fed
    channel by channel from the producer through the layers the plan lists, sharing no module with another choice.

    Proven on the model as ``optimize`` proves it (``autodac.widths.find_width_units``), on ``example`` when one is
    known; without one only the consumer's kind and the overlaps are checked.
    """
    widths = {name: c for name, c in plan.factorized.items() if c.method == WIDTH}
    if not widths:
        return
    claimed: dict[str, str] = {name: name for name in plan.factorized}
    for name, choice in widths.items():
        consumer = model.get_submodule(name)
        if not consumable(consumer):
            raise PlanError(
                f"layer {name!r}: a width choice's layer must be a 1x1 conv or a Linear (it reads its kept channels as they "
                f"are), but it is {type(consumer).__name__} with weight shape {tuple(consumer.weight.shape)}"
            )
        for member in choice.sliced:
            if member in claimed and claimed[member] != name:
                other = claimed[member]
                raise PlanError(
                    f"layer {name!r}: a width may slice only layers no other choice changes, but {member!r} "
                    f"is also {'factorised' if other == member else f'sliced by the width of {other!r}'}"
                )
            claimed[member] = name
    if example is None:
        return
    found = find_width_units(model, example, list(widths))
    for name, choice in widths.items():
        unit = found.get(name)
        expected = None if unit is None else [unit.producer, *unit.chain]
        if list(choice.sliced) != expected:
            rule = "no chain that can be sliced feeds it" if unit is None else f"its chain is {expected}"
            raise PlanError(
                f"layer {name!r}: a width must slice the chain that feeds the layer channel by channel, but the plan lists "
                f"{list(choice.sliced)} and {rule} in this model"
            )


def _check_runs(model: nn.Module, example: tuple[Any, ...] | None) -> None:
    """The rebuilt model runs on the plan's inputs: a plan that passed every other check cannot return a model that fails."""
    if example is None:
        return
    try:
        run_model(model, example)
    except ModelError as error:  # a mismatch no earlier rule caught: name it instead of returning a broken model
        cause = error.__cause__ or error
        raise PlanError(
            f"the plan must give a model that runs on its inputs {[tuple(x.shape) for x in example if isinstance(x, torch.Tensor)]}, "
            f"but the rebuilt model fails: {type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"
        ) from cause


def _replay_width(model: nn.Module, name: str, choice: LayerChoice, moments: torch.Tensor | None) -> dict[str, nn.Module]:
    """The sliced modules of one width choice, re-fitted to the same moments as when it was planned."""
    if not choice.sliced or choice.channels is None or len(choice.channels) != choice.rank:
        raise PlanError(f"layer {name!r}: a width choice must list its `sliced` layers and `rank` kept `channels`, but got {choice}")
    members = {}
    for member in (name, *choice.sliced):
        try:
            members[member] = model.get_submodule(member)
        except AttributeError:
            raise PlanError(f"layer {name!r}: the layer {member!r} its width slices must exist in the model, but it does not") from None
    consumer = members[name]
    channels = consumer.in_features if isinstance(consumer, nn.Linear) else getattr(consumer, "in_channels", None)
    if tuple(consumer.weight.shape) != tuple(choice.weight_shape) or channels is None or max(choice.channels) >= channels:
        raise PlanError(
            f"layer {name!r} must have the weight shape the plan was made for, {tuple(choice.weight_shape)}, "
            f"but it has {tuple(consumer.weight.shape)}"
        )
    for member, module in members.items():
        if member == name:
            continue
        size = module.num_features if isinstance(module, nn.modules.batchnorm._BatchNorm) else module.weight.shape[0]
        if size != channels:
            raise PlanError(f"layer {name!r}: {member!r} must have the {channels} channels the width slices, but it has {size}")
    if moments is None:
        if choice.fit.removeprefix("seq+").split("+")[0] in ("data", "implied"):
            raise PlanError(f"layer {name!r}: its width was fitted to statistics ({choice.fit!r}) that could not be collected again")
        moments = torch.eye(channels + 1, dtype=torch.float64)
    kept = torch.tensor(choice.channels, dtype=torch.int64)
    weight, bias = refit_kept(consumer.weight, moments, kept)
    unit = WidthUnit(name, choice.sliced[0], tuple(choice.sliced[1:]), channels)
    return slice_unit(model, unit, kept, weight, bias)


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
    """Factorise one ``Conv1d``/``Conv2d``/``Conv3d``/``Linear`` by ``method`` at ``rank`` (a new module; ``conv`` is unchanged)."""
    return build_factorized(conv, method, rank)
