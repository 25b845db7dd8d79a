"""Interaction-aware fitting: factorised layers re-fitted in execution order to what the layers before them now produce.

Each layer's own fit assumes it is fed the original model's activations. Once the layers
before it are truncated it is not, and the errors compound with depth, which is what makes
deep cuts (FLOPs ratios of 0.3 and below) collapse. Going in execution order, layer ``k`` is
re-fitted to reproduce the *original* layer's output ``W x_o`` from the inputs ``x_c`` the
already re-fitted model gives it: the best dense weight is the least-squares
``W* = W C_oc C_cc^-1`` and the best factorisation of the method and rank the plan chose is
the data-aware fit of ``W*`` under ``C_cc`` (``autodac.factorize.output_matching_weight``).
Closed form per layer; each layer costs two forward passes of the fit inputs, stopped at the
layer. A layer that runs more than once per forward pass keeps its own fit (its inputs are not
one distribution), and so does one whose input covariance would exceed
``autodac.probes.MAX_COVARIANCE_BYTES`` (the re-fit holds two of them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from autodac.batches import Batch, call
from autodac.factorize import get_method, output_matching_weight
from autodac.layers import build_factorized
from autodac.probes import covariance_fits, cross_covariances
from autodac.surgery import evaluating

__all__ = ["Refit", "execution_order", "refit_in_order"]


@dataclass(frozen=True)
class Refit:
    """What to re-fit one layer to: the plan's method, rank and implementation, and its output weighting."""

    method: str
    rank: int
    impl: str = ""
    out_weights: torch.Tensor | None = None


def execution_order(model: nn.Module, names: list[str], example: Batch) -> tuple[list[str], set[str]]:
    """``names`` in the order their layers first run on ``example``, and those that run more than once."""
    calls: dict[str, int] = {}
    handles = []
    for name in names:
        def tally(_module, _args, name=name):
            calls[name] = calls.get(name, 0) + 1
        handles.append(model.get_submodule(name).register_forward_pre_hook(tally))
    try:
        with evaluating(model):
            call(model, example, next(iter(model.parameters())).device)
    finally:
        for handle in handles:
            handle.remove()
    return list(calls), {name for name, n in calls.items() if n > 1}


def refit_in_order(
    original: nn.Module, changed: nn.Module, layers: Mapping[str, Refit], inputs: Batch, progress: bool = False
) -> tuple[nn.Module, list[str]]:
    """A copy of ``changed`` whose ``layers`` are re-fitted in execution order; also the names re-fitted.

    ``original`` is the dense model and ``changed`` a decomposition of it whose factorised
    layers sit at the same dotted names; ``inputs`` are the examples the fits are computed from.
    Neither model is modified. Layers that run more than once, or whose input covariance is over
    ``MAX_COVARIANCE_BYTES``, keep their fit and are not named.
    """
    refitted = copy.deepcopy(changed)
    order, repeated = execution_order(original, list(layers), inputs[:1])
    order = [  # a bare layer has nothing before it
        name for name in order if name and name not in repeated and covariance_fits(original.get_submodule(name))
    ]
    iterator = order
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(order, desc="autodac: re-fitting in order", unit="layer", disable=None, leave=False)
    for name in iterator:
        dense = original.get_submodule(name)
        covariances = cross_covariances(original, refitted, name, inputs)
        if covariances is None:  # pragma: no cover - the layer ran in execution_order, so it runs here too
            continue
        cross, gram = covariances
        choice = layers[name]
        target = output_matching_weight(dense.weight, cross, gram)
        decomposition = get_method(choice.method).decompose(target, choice.out_weights, gram)
        replacement = build_factorized(dense, choice.method, choice.rank, decomposition, choice.impl)
        parent_name, _, child = name.rpartition(".")
        setattr(refitted.get_submodule(parent_name) if parent_name else refitted, child, replacement)
    return refitted, order
