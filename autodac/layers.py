"""The ``nn.Module`` pairs built from factors; each is exact at full rank.

A factorised layer is an ``nn.Sequential`` of two plain torch layers (so it scripts, exports
and is counted by fvcore like any conv), with names that say what each half does. A conv
subclass whose own forward zero-pads its input first (TF-style "same") gets that padding too,
applied in ``forward`` before the half that needs it (``autodac.subclasses``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from autodac.errors import AutodacError
from autodac.factorize import METHODS, Decomposition, get_method, method_table
from autodac.subclasses import explicit_padding

__all__ = [
    "FactorizedLayer", "SplitDepthwise", "build_factorized", "plain_layer", "traced", "keep_shape_attributes", "SUPPORTED_TYPES",
    "IMPLEMENTATIONS", "SHAPE_ATTRIBUTES",
]

SUPPORTED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Ways to run each registered factorisation (read live from the registry); the math is the same, the speed is not. "" is a plain form.
IMPLEMENTATIONS = method_table("implementations")


# What a model's own forward may read off a layer it calls (``x.view(n, self.conv.out_channels, -1)``): a
# replacement keeps them (the mapping from input to output they describe is the replaced layer's).
SHAPE_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
                    "in_features", "out_features")


def keep_shape_attributes(source: nn.Module, target: nn.Module) -> nn.Module:
    """``target`` given ``source``'s ``SHAPE_ATTRIBUTES`` (those it has); returns it."""
    for name in SHAPE_ATTRIBUTES:
        if hasattr(source, name):
            value = getattr(source, name)
            setattr(target, name, list(value) if isinstance(value, list) else value)
    return target


class FactorizedLayer(nn.Sequential):
    """Two layers replacing one dense layer; ``method``, ``rank`` and ``impl`` say how it was made.

    ``pads`` are the ``F.pad`` amounts (zeros) applied before each half: empty unless the
    replaced layer's own forward padded its input before its conv. ``build_factorized`` gives it
    the replaced layer's ``SHAPE_ATTRIBUTES`` (``out_channels``, ``in_features``, ...), which a
    model's forward may read.
    """

    # Real types, not the strings ``from __future__ import annotations`` makes: TorchScript reads them to type an empty list.
    __annotations__ = {"pad_first": List[int], "pad_second": List[int]}

    def __init__(
        self, method: str, rank: int, first: nn.Module, second: nn.Module, impl: str = "",
        pads: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
    ) -> None:
        names = METHODS[method].part_names if method in METHODS else ("first", "second")
        super().__init__(OrderedDict([(names[0], first), (names[1], second)]))
        self.method = method
        self.rank = rank
        self.impl = impl
        self.pad_first, self.pad_second = list(pads[0]), list(pads[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, part in enumerate(self):
            pad = self.pad_first if i == 0 else self.pad_second
            if len(pad) > 0:
                x = F.pad(x, pad)
            x = part(x)
        return x

    def extra_repr(self) -> str:
        pads = "".join(f", {name}={pad}" for name, pad in (("pad_first", self.pad_first), ("pad_second", self.pad_second)) if pad)
        return f"method={self.method!r}, rank={self.rank}" + (f", impl={self.impl!r}" if self.impl else "") + pads


class SplitDepthwise(nn.Module):
    """DAC's depthwise half as ``r`` depthwise convs of multiplier 1, outputs concatenated rank-major.

    Same weights and FLOPs as one grouped conv with multiplier ``r``; measured faster on CPUs for
    wide layers because multiplier-1 depthwise convs have a dedicated kernel.
    """

    def __init__(self, convs: list[nn.Module]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=-len(self.convs[0].kernel_size) - 1)


def traced(module: nn.Module) -> torch.fx.GraphModule:
    """``module`` traced by ``torch.fx`` into a ``GraphModule``, which pickles its generated code instead of its class.

    Annotations that ``from __future__ import annotations`` left as strings are dropped: fx
    would name them as globals of the code, which do not pickle.
    """
    graph_module = torch.fx.symbolic_trace(module)
    for node in graph_module.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    graph_module.recompile()
    graph_module.train(module.training)
    return graph_module


_ZERO_PADS = {2: nn.ZeroPad1d, 4: nn.ZeroPad2d, 6: nn.ZeroPad3d}


def plain_layer(layer: FactorizedLayer) -> nn.Module:
    """``layer`` rebuilt from torch's own classes only (same parameters, same outputs), for files that load without autodac.

    An ``nn.Sequential`` of the two halves under their names (so state-dict keys are unchanged),
    with an ``nn.ZeroPad*d`` before a half that pads its input; a split depthwise half becomes
    a ``torch.fx.GraphModule`` (its generated code is pickled with it, so it needs no class).
    """
    parts: list[tuple[str, nn.Module]] = []
    for (name, part), pad in zip(layer.named_children(), (layer.pad_first, layer.pad_second)):
        if pad:
            parts.append((f"pad_{name}", _ZERO_PADS[len(pad)](tuple(pad))))
        if isinstance(part, SplitDepthwise):
            part = traced(part)
        parts.append((name, part))
    plain = keep_shape_attributes(layer, nn.Sequential(OrderedDict(parts)))
    plain.train(layer.training)
    return plain


def trainable(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s tensor ``name`` trains: under ``torch.nn.utils.parametrize`` (weight norm, spectral
    norm) whether any of its originals does (the computed tensor, read without grad, never says so)."""
    if parametrize.is_parametrized(module, name):
        return any(p.requires_grad for p in module.parametrizations[name].parameters())
    return bool(getattr(module, name).requires_grad)


@torch.no_grad()
def build_factorized(
    module: nn.Module, method: str, rank: int, decomposition: Decomposition | None = None, impl: str = ""
) -> FactorizedLayer:
    """The factorised replacement of ``module`` at ``rank``, on its device and in its dtype.

    ``decomposition`` is the method's full SVD of this layer when the caller already has it
    (the search builds many ranks of one layer from one SVD). ``impl`` picks one of the
    method's ``implementations`` (same outputs, different speed); ``""`` is the first. Everything
    that differs between methods (the two layers, their names, implementations, padding) is the
    registered method's (``autodac.factorize``).
    """
    factorization = get_method(method)
    choices = factorization.implementations
    if impl not in ("", *choices):
        raise AutodacError(f"`impl` must be one of {list(choices)} for method {method!r}, but got impl={impl!r}")
    impl = impl or choices[0]
    if not isinstance(module, SUPPORTED_TYPES):
        raise AutodacError(f"only {[t.__name__ for t in SUPPORTED_TYPES]} can be factorised, but got {type(module).__name__}")
    weight = module.weight
    shape = tuple(weight.shape)
    if getattr(module, "groups", 1) != 1:
        raise AutodacError(f"grouped convs cannot be factorised, but got groups={module.groups}")
    if not factorization.applies_to(shape):
        raise AutodacError(f"method {method!r} does not apply to a {type(module).__name__} with weight shape {shape}")
    max_rank = factorization.max_rank(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise AutodacError(f"`1 <= rank <= {max_rank}` must hold for {method!r} on weight {shape}, but got rank={rank!r}")
    padding = explicit_padding(module)
    if isinstance(padding, str):
        raise AutodacError(f"a layer must be reproducible from its weight to be factorised, but {padding}")
    factors = factorization.truncate(decomposition if decomposition is not None else factorization.decompose(weight), rank)
    options = {"device": weight.device, "dtype": weight.dtype}
    first, second = factorization.modules(module, rank, options)
    first.weight.copy_(factors.first)
    second.weight.copy_(factors.second)
    if module.bias is not None:
        second.bias.copy_(module.bias)
    first, second = factorization.implement(first, second, impl, rank)
    for half in (first, second):  # a frozen layer's factors stay frozen, a trainable one's train: as the layer did
        for pname, parameter in half.named_parameters():
            parameter.requires_grad_(trainable(module, "bias" if pname == "bias" and half is second else "weight"))
    pads = tuple(p if any(p) else () for p in factorization.place_padding(padding))
    layer = keep_shape_attributes(module, FactorizedLayer(method, rank, first, second, impl, pads))
    layer.train(module.training)
    return layer
