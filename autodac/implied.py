"""Input statistics without data, read off the BatchNorms: what each layer's inputs look like on real data.

A trained BatchNorm says how its output is distributed on the training data: per channel,
mean ``beta`` and spread ``gamma`` (its input normalised, then scaled and shifted). Replacing
every BatchNorm's output with independent noise of exactly that mean and spread, and running
the rest of the network as it is (activations, depthwise convs, residual adds, whatever ops the
model uses), gives each later layer inputs with the per-channel scales and means real data
would give it: a ReLU6 after a BatchNorm with ``beta = 4`` is mostly saturated, one with
``beta = -3`` mostly zero. Fitting a layer's factorisation to these moments weighs its error by
how much each input channel actually carries, which the plain weight error cannot see; on
networks of nearly full-rank ``1x1`` convs that is the difference between a plan that keeps the
network and one that destroys it. Cross-channel correlations of real data are not implied
(the noise is independent), so real data, or a synthetic probe, still fits better.

Layers whose input no BatchNorm precedes (a stem on the raw image) get no implied statistics.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from autodac.batches import Batch, Inputs
from autodac.surgery import evaluating

__all__ = ["batchnorm_noise", "implied_batch", "affected_layers", "positions_per_example"]

_MIN_ROWS_PER_CHANNEL = 4  # rows of the smallest map per input channel, so a C x C moment is well estimated
_MAX_BATCH = 64


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def batchnorm_noise(model: nn.Module, seed: int = 0):
    """Within the block, every BatchNorm of ``model`` outputs ``beta + gamma * N(0, 1)`` noise, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)

    def hook(module, _args, output):
        shape = [1] * output.dim()
        if output.dim() >= 2:
            shape[1] = output.shape[1]
        gamma = module.weight.detach() if module.weight is not None else torch.ones(output.shape[1], device=output.device)
        beta = module.bias.detach() if module.bias is not None else torch.zeros(output.shape[1], device=output.device)
        noise = torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output)
        return beta.reshape(shape).to(output) + gamma.reshape(shape).to(output) * noise

    handles = [m.register_forward_hook(hook) for m in _norms(model)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def affected_layers(model: nn.Module, layers: dict[str, nn.Module], example: tuple[Any, ...]) -> set[str]:
    """The names among ``layers`` whose first call comes after some BatchNorm has run (so noise reaches them)."""
    seen_norm = [False]
    affected: set[str] = set()
    handles = [m.register_forward_hook(lambda *_: seen_norm.__setitem__(0, True)) for m in _norms(model)]
    for name, module in layers.items():
        def mark(_module, _args, name=name):
            if seen_norm[0]:
                affected.add(name)
        handles.append(module.register_forward_pre_hook(mark))
    _run_hooked(model, example, handles)
    return affected


def _run_hooked(model: nn.Module, example: tuple[Any, ...], handles: list) -> None:
    """One eval-mode pass of ``example`` with ``handles``' hooks in place, removed after (also when it raises)."""
    try:
        with evaluating(model):
            model(*example)
    finally:
        for handle in handles:
            handle.remove()


def implied_batch(example: tuple[torch.Tensor, ...], widest: int, smallest_map: int) -> Batch:
    """The example inputs repeated often enough that the smallest map gives ``4 x`` rows per channel of the widest layer
    (a tensor for a model of one input, ``Inputs`` for several)."""
    count = math.ceil(_MIN_ROWS_PER_CHANNEL * max(widest, 1) / max(smallest_map, 1) / max(example[0].shape[0], 1))
    count = min(max(count, 2), _MAX_BATCH)
    repeated = tuple(x.repeat(count, *([1] * (x.dim() - 1))) for x in example)
    return repeated[0] if len(repeated) == 1 else Inputs(repeated)


def positions_per_example(model: nn.Module, modules: dict[str, nn.Module], example: tuple[Any, ...], outputs: bool) -> dict[str, int]:
    """How many positions (elements per channel per example) each module's input (or output) has.

    The noise is independent from position to position, so its moments hold only where a
    layer reads the BatchNorm's positions one by one: after a spatial pooling or a mean, real
    activations (correlated in space) keep far more spread than averaged noise would.
    """
    found: dict[str, int] = {}
    handles = []
    for name, module in modules.items():
        def record(_module, args, output=None, name=name):
            x = output if outputs else args[0]
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                found.setdefault(name, x.numel() // (x.shape[0] * (x.shape[1] if x.dim() > 2 else x.shape[-1])))
        if outputs:
            handles.append(module.register_forward_hook(lambda m, a, o, record=record: record(m, a, o)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, a, record=record: record(m, a)))
    _run_hooked(model, example, handles)
    return found
