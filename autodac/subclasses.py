"""Conv/Linear subclasses with their own ``forward``: the input padding it adds, read off by running it.

A replacement is built from a layer's weight, stride, padding and dilation, so it matches a
subclass only if the subclass's forward is its base class's conv of a (zero-)padded input,
as TF-style "same" convs are (EfficientNet's ``Conv2dStaticSamePadding`` pads by (0, 1, 0, 1)
before the stride-2 stem). Nothing here relies on attribute names: the subclass's forward is
compared with the base conv on explicitly padded inputs at two input sizes, on a float64 copy.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["has_own_forward", "explicit_padding"]

_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_TOLERANCE = 1e-6  # relative to the largest output, in float64
_cache: "weakref.WeakKeyDictionary[nn.Module, tuple[str, tuple[int, ...] | str]]" = weakref.WeakKeyDictionary()


def _base(module: nn.Module) -> type[nn.Module]:
    return next(base for base in _BASES if isinstance(module, base))


def has_own_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class replaces its torch base class's ``forward`` (or ``_conv_forward``)."""
    base = _base(module)
    cls = type(module)
    return cls.forward is not base.forward or getattr(cls, "_conv_forward", None) is not getattr(base, "_conv_forward", None)


def explicit_padding(module: nn.Module) -> tuple[int, ...] | str:
    """The ``F.pad`` amounts ``module``'s forward applies before its base class's conv, or why it cannot be reproduced.

    ``()`` for a plain layer (or a subclass whose forward is the base's). A padding is accepted
    only if it is the same at two input sizes and reproduces the forward to 1e-6 relative; the
    string names the layer's class and says what its forward does instead. Checked once per
    module (the forward runs on a copy; ``module`` is not changed).
    """
    if not isinstance(module, _BASES) or not has_own_forward(module):
        return ()
    key = repr(module)
    cached = _cache.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        found = _read_padding(module)
    except Exception as error:  # a forward that cannot run on a float64 copy cannot be checked, so cannot be trusted
        found = f"{_describe(module)} has its own forward, which could not be checked on a float64 copy ({type(error).__name__}: {error})"
    _cache[module] = (key, found)
    return found


def _describe(module: nn.Module) -> str:
    return f"{_base(module).__name__} subclass {type(module).__name__}"


@torch.no_grad()
def _read_padding(module: nn.Module) -> tuple[int, ...] | str:
    base = _base(module)
    probe = copy.deepcopy(module).to(torch.float64)
    forward = type(module).forward  # the class's: bypasses hooks, and any forward patched onto the instance
    generator = torch.Generator().manual_seed(0)
    device = probe.weight.device

    def sample(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(device)

    not_base = (
        f"{_describe(module)} has its own forward, which is not the {base.__name__} of a zero-padded input "
        "(it changes the weight or the output, as weight standardisation does), so a replacement built from its weight cannot match it"
    )
    if base is nn.Linear:
        for shape in ((2, probe.in_features), (3, 2, probe.in_features)):
            x = sample(*shape)
            if not _close(forward(probe, x), F.linear(x, probe.weight, probe.bias)):
                return not_base
        return ()
    dims = len(probe.kernel_size)
    span = [probe.dilation[a] * (probe.kernel_size[a] - 1) + 1 for a in range(dims)]
    accepted: list[list[tuple[int, ...]]] = []
    sizes = []
    for extra in (0, 1):  # consecutive sizes differ modulo every stride, so a size-dependent padding shows
        size = [span[a] + 3 * probe.stride[a] + a + extra for a in range(dims)]
        x = sample(2, probe.in_channels, *size)
        out = forward(probe, x)
        if not isinstance(out, torch.Tensor) or out.dim() != x.dim():
            return not_base
        fits = [
            pads for pads in _candidates(probe, size, tuple(out.shape[2:]))
            if _close(out, base._conv_forward(probe, F.pad(x, pads), probe.weight, probe.bias))
        ]
        if not fits:
            return not_base
        accepted.append(fits)
        sizes.append(tuple(size))
    common = [pads for pads in accepted[0] if pads in accepted[1]]
    if not common:
        return (
            f"{_describe(module)} has its own forward, whose input padding depends on the input size "
            f"(F.pad {list(accepted[0][0])} at size {sizes[0]}, {list(accepted[1][0])} at size {sizes[1]}), "
            "so no fixed replacement can match it"
        )
    best = min(common, key=lambda pads: (sum(pads), pads))
    return best if any(best) else ()


def _out_length(module: nn.Module, axis: int, length: int) -> int:
    """The base conv's output length along ``axis`` for an input of ``length``."""
    if module.padding == "same":
        return length
    padding = 0 if module.padding == "valid" else module.padding[axis]
    span = module.dilation[axis] * (module.kernel_size[axis] - 1) + 1
    return (length + 2 * padding - span) // module.stride[axis] + 1


def _candidates(module: nn.Module, size: Sequence[int], out: tuple[int, ...]) -> list[tuple[int, ...]]:
    """``F.pad`` amounts (last dim first) after which the base conv's output has shape ``out``.

    Per axis, every extra total ``t`` that gives the right length, split all before, all after,
    or evenly either way (TF "same" puts the odd pixel after).
    """
    per_axis = []
    for axis, length in enumerate(size):
        splits = set()
        total = 0
        while _out_length(module, axis, length + total) <= out[axis]:
            if _out_length(module, axis, length + total) == out[axis]:
                splits |= {(b, total - b) for b in (0, total // 2, total - total // 2, total)}
            total += 1
        per_axis.append(sorted(splits))
    return [tuple(itertools.chain(*reversed(combo))) for combo in itertools.product(*per_axis)]


def _close(out: object, reference: torch.Tensor) -> bool:
    if not isinstance(out, torch.Tensor) or out.shape != reference.shape:
        return False
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return bool((out - reference).abs().max() <= _TOLERANCE * scale)
