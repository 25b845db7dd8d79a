"""Costs: fvcore's count of a model (traced once), and the closed-form layer costs the search uses.

fvcore counts one multiply-add as one flop, and ignores element-wise ops such as residual
adds, activations and pooling (it logs a warning for each skipped op type, silenced here).
Budgets in autodac are ratios of two such counts.

Attention is counted as fvcore counts it with autograd on (what ``FlopCountAnalysis(model,
x).total()`` gives a user): torch's fused inference kernels for ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` (taken in eval mode without grad) are invisible to fvcore, so
counting turns them off (``autodac.surgery.unfused_attention``). fvcore has no handle for
``aten::scaled_dot_product_attention`` nor ``aten::baddbmm``: the score and value products
of attention run through them are not counted, in the original and the decomposed model alike
(with ``need_weights=True`` and no mask, torch's attention uses ``bmm``, which is counted).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from autodac.batches import tensor_leaves
from autodac.errors import ModelError
from autodac.surgery import HOOK_FLAG_TABLES, HOOK_TABLES, evaluating, unfused_attention

__all__ = ["FlopCount", "count_flops", "count_params"]


class FlopCount:
    """fvcore's total and per-module counts of one model on one input."""

    def __init__(self, total: int, by_module: dict[str, int]) -> None:
        self.total = total
        self.by_module = by_module


def _conv_mode_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore's conv count for ``aten::_convolution_mode``: what a conv with ``padding='same'``/``'valid'``
    (and ``padding_mode='zeros'``) traces to; fvcore has no handle for it and would count it as 0."""
    from fvcore.nn.jit_handles import conv_flop_count, get_shape

    return conv_flop_count(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0]), transposed=False)


@contextlib.contextmanager
def _hooks_kept(model: nn.Module) -> Iterator[None]:
    """Within the block, hooks added to ``model``'s modules are removed on the way out: fvcore's tracer adds a
    scope hook pair to every module and leaves them behind when tracing raises (on the caller's model, they would
    fire on every later call)."""
    hook_dicts = HOOK_TABLES + HOOK_FLAG_TABLES
    before = {(m, d): set(getattr(m, d, {})) for m in model.modules() for d in hook_dicts}
    try:
        yield
    finally:
        for (module, d), keys in before.items():
            table = getattr(module, d, None)
            for key in [k for k in (table or {}) if k not in keys]:
                del table[key]


class _TensorOutputs(nn.Module):
    """``model`` returning only the tensors of its output: what torch.jit's tracer takes from any model (a Python number in
    a dict, a dataclass of outputs) and all fvcore counts (the rest of an output holds no multiply-adds)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return tuple(tensor_leaves(self.model(*args)))


def _fvcore_count(model: nn.Module, example_inputs: tuple[Any, ...]) -> tuple[int, dict[str, int]]:
    from fvcore.nn import FlopCountAnalysis

    with _hooks_kept(model), evaluating(model), unfused_attention(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, example_inputs)
        analysis.set_op_handle("aten::_convolution_mode", _conv_mode_flop_jit)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        fvcore_logger = logging.getLogger("fvcore")
        previous = fvcore_logger.level
        fvcore_logger.setLevel(logging.ERROR)
        try:
            return int(analysis.total()), {name: int(value) for name, value in analysis.by_module().items()}
        finally:
            fvcore_logger.setLevel(previous)


def count_flops(model: nn.Module, example_inputs: tuple[Any, ...]) -> FlopCount:
    """Trace ``model`` once with fvcore (in eval mode, no grad, fused attention off) and return its multiply-add counts.

    An output torch.jit cannot trace (a number beside the tensors, a dataclass) is counted through the tensors it holds.
    """
    try:
        total, by_module = _fvcore_count(model, example_inputs)
    except Exception as error:  # fvcore traces with torch.jit: name what failed, keep the cause
        try:
            total, wrapped = _fvcore_count(_TensorOutputs(model), example_inputs)
        except Exception:
            raise ModelError(f"fvcore could not trace the model to count its FLOPs: {type(error).__name__}: {error}") from error
        by_module = {name.removeprefix("model").removeprefix("."): value for name, value in wrapped.items() if name}
    return FlopCount(total, by_module)


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
