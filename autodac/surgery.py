"""Module surgery: find the layers worth factorising, read their geometry, swap modules by dotted name.

Nothing here changes the caller's model: ``replace_layers`` works on a deep copy, and every
replacement is built and checked before the copy is touched.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from autodac.errors import AutodacError, ModelError
from autodac.factorize import Geometry
from autodac.layers import SUPPORTED_TYPES, FactorizedLayer

__all__ = ["TracedLayer", "trace_layers", "replace_layers", "run_model", "evaluating", "unfused_attention"]


@dataclass
class TracedLayer:
    """One candidate layer as seen in one forward pass."""

    name: str
    module: nn.Module
    geometry: Geometry | None  # None when the layer never ran
    followed_by: str | None = None  # dotted name of the BatchNorm that consumes its output, if any


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode and no grad for the block; afterwards every module's own mode is restored
    (restoring only the root's would silently un-freeze a BatchNorm the caller froze)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def unfused_attention():
    """Keep torch's fused attention kernels off for the block, so attention runs (and traces) as it
    does with autograd on: projections through ``F.linear``, products through ``bmm``/SDPA.

    torch >= 2.2 has a global switch; older torch decides per call, and takes the unfused path
    whenever grad is enabled and a projection requires grad, so grad is enabled there instead.
    """
    backend = getattr(torch.backends, "mha", None)
    if backend is not None and hasattr(backend, "set_fastpath_enabled"):
        previous = backend.get_fastpath_enabled()
        backend.set_fastpath_enabled(False)
        try:
            yield
        finally:
            backend.set_fastpath_enabled(previous)
    else:  # pragma: no cover - torch < 2.2
        with torch.enable_grad():
            yield


def run_model(model: nn.Module, example_inputs: tuple[Any, ...]) -> Any:
    """Run ``model`` in eval mode without grad, turning any failure into a ``ModelError``."""
    try:
        with evaluating(model):
            return model(*example_inputs)
    except Exception as error:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        raise ModelError(
            f"the model must run on its example inputs, but calling it on inputs of shape {shapes} "
            f"raised {type(error).__name__}: {error}"
        ) from error


def _inside_factorized(name: str, factorized_prefixes: list[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in factorized_prefixes)


def trace_layers(model: nn.Module, example_inputs: tuple[Any, ...]) -> list[TracedLayer]:
    """Every Conv1d/Conv2d/Linear of ``model`` with the shapes it saw in one forward pass.

    Also notes which BatchNorm (if any) reads a layer's output directly, by tensor identity,
    so the data-free error can weigh each output channel as that BatchNorm scales it.
    """
    factorized = [name for name, module in model.named_modules() if isinstance(module, FactorizedLayer)]
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, SUPPORTED_TYPES) and not _inside_factorized(name, factorized)
    }
    calls: dict[str, list[tuple[int, tuple[int, ...], tuple[int, ...]]]] = {name: [] for name in candidates}
    outputs: dict[int, str] = {}
    consumers: dict[str, str] = {}
    keep_alive: list[torch.Tensor] = []
    handles = []

    def layer_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0]
            if isinstance(module, nn.Linear):
                batch = x.numel() // x.shape[-1]
                calls[name].append((batch, (), ()))
            else:
                unbatched = x.dim() == len(module.kernel_size) + 1
                batch = 1 if unbatched else x.shape[0]
                calls[name].append((batch, tuple(x.shape[-len(module.kernel_size):]), tuple(output.shape[-len(module.kernel_size):])))
            if isinstance(output, torch.Tensor):
                outputs[id(output)] = name
                keep_alive.append(output)

        return hook

    def norm_hook(norm_name: str):
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            producer = outputs.get(id(inputs[0])) if inputs and isinstance(inputs[0], torch.Tensor) else None
            if producer is not None:
                consumers.setdefault(producer, norm_name)

        return hook

    for name, module in candidates.items():
        handles.append(module.register_forward_hook(layer_hook(name)))
    for name, module in model.named_modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            handles.append(module.register_forward_pre_hook(norm_hook(name)))
    try:
        run_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        keep_alive.clear()

    traced = []
    for name, module in candidates.items():
        geometry = None
        if calls[name]:
            weight = module.weight
            geometry = Geometry(
                in_channels=int(weight.shape[1]) * getattr(module, "groups", 1),
                out_channels=int(weight.shape[0]),
                kernel_size=tuple(int(k) for k in weight.shape[2:]),
                calls=tuple(calls[name]),
            )
        traced.append(TracedLayer(name, module, geometry, consumers.get(name)))
    return traced


def replace_layers(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with each named submodule swapped for its replacement."""
    result = copy.deepcopy(model)
    for name in replacements:
        try:
            result.get_submodule(name)
        except AttributeError:
            raise AutodacError(f"every replaced layer must exist in the model, but {name!r} does not") from None
    if "" in replacements:  # the model is the layer itself (a bare Conv/Linear): it has no parent to set it on
        return replacements[""]
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = result.get_submodule(parent_name) if parent_name else result
        setattr(parent, child, new)
    return result
