"""The ``nn.Module`` pairs built from factors; each is exact at full rank.

A factorised layer is an ``nn.Sequential`` of two plain torch layers (so it scripts, exports
and is counted by fvcore like any conv), with names that say what each half does.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from autodac.errors import AutodacError
from autodac.factorize import Decomposition, get_method

__all__ = ["FactorizedLayer", "build_factorized", "SUPPORTED_TYPES"]

SUPPORTED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
_PART_NAMES = {"dac": ("depthwise", "pointwise"), "spatial": ("vertical", "horizontal"), "lowrank": ("reduce", "expand")}


class FactorizedLayer(nn.Sequential):
    """Two layers replacing one dense layer; ``method`` and ``rank`` say how it was made."""

    def __init__(self, method: str, rank: int, first: nn.Module, second: nn.Module) -> None:
        names = _PART_NAMES.get(method, ("first", "second"))
        super().__init__(OrderedDict([(names[0], first), (names[1], second)]))
        self.method = method
        self.rank = rank

    def extra_repr(self) -> str:
        return f"method={self.method!r}, rank={self.rank}"


def _conv_type(module: nn.Module) -> type[nn.Module]:
    return nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Conv1d


def _split_2d(value, axis: int, neutral):
    """Keep ``value`` along ``axis`` (0 = height, 1 = width) and ``neutral`` along the other."""
    if isinstance(value, str):
        return value
    return (value[0], neutral) if axis == 0 else (neutral, value[1])


@torch.no_grad()
def build_factorized(module: nn.Module, method: str, rank: int, decomposition: Decomposition | None = None) -> FactorizedLayer:
    """The factorised replacement of ``module`` at ``rank``, on its device and in its dtype.

    ``decomposition`` is the method's full SVD of this layer when the caller already has it
    (the search builds many ranks of one layer from one SVD).
    """
    factorization = get_method(method)
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
    layer = FactorizedLayer(method, rank, first, second)
    layer.train(module.training)
    return layer
