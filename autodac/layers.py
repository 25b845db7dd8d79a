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

from autodac.errors import AutodacError
from autodac.factorize import Decomposition, get_method
from autodac.subclasses import explicit_padding

__all__ = ["FactorizedLayer", "SplitDepthwise", "build_factorized", "plain_layer", "traced", "SUPPORTED_TYPES", "IMPLEMENTATIONS"]

SUPPORTED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
_PART_NAMES = {"dac": ("depthwise", "pointwise"), "tdac": ("pointwise", "per_output"), "spatial": ("vertical", "horizontal"), "lowrank": ("reduce", "expand")}
# Ways to run one factorisation; the math is the same, the speed is not. "" is the method's plain form.
IMPLEMENTATIONS = {"dac": ("grouped", "split"), "tdac": ("",), "spatial": ("",), "lowrank": ("",)}


class FactorizedLayer(nn.Sequential):
    """Two layers replacing one dense layer; ``method``, ``rank`` and ``impl`` say how it was made.

    ``pads`` are the ``F.pad`` amounts (zeros) applied before each half: empty unless the
    replaced layer's own forward padded its input before its conv.
    """

    # Real types, not the strings ``from __future__ import annotations`` makes: TorchScript reads them to type an empty list.
    __annotations__ = {"pad_first": List[int], "pad_second": List[int]}

    def __init__(
        self, method: str, rank: int, first: nn.Module, second: nn.Module, impl: str = "",
        pads: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
    ) -> None:
        names = _PART_NAMES.get(method, ("first", "second"))
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
    plain = nn.Sequential(OrderedDict(parts))
    plain.train(layer.training)
    return plain


def _conv_type(module: nn.Module) -> type[nn.Module]:
    return nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Conv1d


def _split_depthwise(grouped: nn.Module, pointwise: nn.Module, channels: int, rank: int) -> tuple[nn.Module, nn.Module]:
    """The grouped depthwise conv (output ``c*r + j``) as ``r`` multiplier-1 convs (output ``j*C + c``)."""
    conv = type(grouped)
    kernel = tuple(grouped.weight.shape[2:])
    per_rank = grouped.weight.reshape(channels, rank, 1, *kernel)
    convs = []
    for j in range(rank):
        part = conv(
            channels, channels, grouped.kernel_size, stride=grouped.stride, padding=grouped.padding, dilation=grouped.dilation,
            groups=channels, bias=False, padding_mode=grouped.padding_mode, device=grouped.weight.device, dtype=grouped.weight.dtype,
        )
        part.weight.copy_(per_rank[:, j])
        convs.append(part)
    n = pointwise.weight.shape[0]
    rest = pointwise.weight.shape[2:]
    pointwise.weight.copy_(pointwise.weight.reshape(n, channels, rank, *rest).transpose(1, 2).reshape(n, rank * channels, *rest))
    return SplitDepthwise(convs), pointwise


def _place_padding(pads: tuple[int, ...], method: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where a layer's own input padding goes: ``(before the first half, before the second)``.

    The first halves of TDAC (1x1) and spatial (``kh x 1``) have no bias and act on each
    pixel or column alone, so they map zero padding to zero padding: padding along what they
    do not convolve can wait for the second half. That keeps both halves at the sizes the
    closed-form costs assume (``Geometry.calls`` holds the unpadded input).
    """
    if method == "tdac":
        first, second = (), pads
    elif method == "spatial":  # F.pad order: (left, right, top, bottom)
        first, second = (0, 0, *pads[2:]), (*pads[:2], 0, 0)
    else:
        first, second = pads, ()
    return (first if any(first) else (), second if any(second) else ())


def _split_2d(value, axis: int, neutral):
    """Keep ``value`` along ``axis`` (0 = height, 1 = width) and ``neutral`` along the other."""
    if isinstance(value, str):
        return value
    return (value[0], neutral) if axis == 0 else (neutral, value[1])


@torch.no_grad()
def build_factorized(
    module: nn.Module, method: str, rank: int, decomposition: Decomposition | None = None, impl: str = ""
) -> FactorizedLayer:
    """The factorised replacement of ``module`` at ``rank``, on its device and in its dtype.

    ``decomposition`` is the method's full SVD of this layer when the caller already has it
    (the search builds many ranks of one layer from one SVD). ``impl`` picks one of the
    method's ``IMPLEMENTATIONS`` (same outputs, different speed); ``""`` is the first.
    """
    factorization = get_method(method)
    choices = IMPLEMENTATIONS.get(method, ("",))
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
    has_bias = module.bias is not None
    options = {"device": weight.device, "dtype": weight.dtype}
    n, c = shape[:2]

    if isinstance(module, nn.Linear):
        first: nn.Module = nn.Linear(c, rank, bias=False, **options)
        second: nn.Module = nn.Linear(rank, n, bias=has_bias, **options)
    elif method == "spatial":
        first = nn.Conv2d(
            c, rank, (shape[2], 1), stride=_split_2d(module.stride, 0, 1), padding=_split_2d(module.padding, 0, 0),
            dilation=_split_2d(module.dilation, 0, 1), bias=False, padding_mode=module.padding_mode, **options,
        )
        second = nn.Conv2d(
            rank, n, (1, shape[3]), stride=_split_2d(module.stride, 1, 1), padding=_split_2d(module.padding, 1, 0),
            dilation=_split_2d(module.dilation, 1, 1), bias=has_bias, padding_mode=module.padding_mode, **options,
        )
    elif method == "tdac":  # pointwise C -> N*r at the input's resolution, then each output channel's r kernels
        conv = _conv_type(module)
        first = conv(c, n * rank, 1, bias=False, **options)
        second = conv(
            n * rank, n, module.kernel_size, stride=module.stride, padding=module.padding, dilation=module.dilation,
            groups=n, bias=has_bias, padding_mode=module.padding_mode, **options,
        )
    else:
        conv = _conv_type(module)
        middle = c * rank if method == "dac" else rank
        first = conv(
            c, middle, module.kernel_size, stride=module.stride, padding=module.padding, dilation=module.dilation,
            groups=c if method == "dac" else 1, bias=False, padding_mode=module.padding_mode, **options,
        )
        second = conv(middle, n, 1, bias=has_bias, **options)
    first.weight.copy_(factors.first)
    second.weight.copy_(factors.second)
    if has_bias:
        second.bias.copy_(module.bias)
    if impl == "split" and not isinstance(module, nn.Linear):
        first, second = _split_depthwise(first, second, c, rank)
    layer = FactorizedLayer(method, rank, first, second, impl, _place_padding(padding, method))
    layer.train(module.training)
    return layer
