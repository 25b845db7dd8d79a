"""Attention: counted as fvcore counts it with autograd on, whatever fast path torch takes; its projections
are ordinary candidates through ``UnfusedMultiheadAttention``, exact at full rank; functional layers named as such."""

from __future__ import annotations

import copy
import itertools
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autodac
from autodac.attention import UnfusedMultiheadAttention, unfuse_attention
from autodac.cost import count_flops
from autodac.testing import SwinLikeNet, TinyViT

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def user_count(model: nn.Module, inputs: tuple) -> int:
    """fvcore's count as a user makes it: the model in eval mode, autograd on (no autodac code involved)."""
    from fvcore.nn import FlopCountAnalysis

    training = model.training
    model.eval()
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("fvcore").setLevel(logging.ERROR)
            analysis = FlopCountAnalysis(model, inputs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return int(analysis.total())
    finally:
        model.train(training)


class _Attend(nn.Module):
    """Self-attention through one ``nn.MultiheadAttention`` call with the given keyword arguments."""

    def __init__(self, attention: nn.Module, **kwargs) -> None:
        super().__init__()
        self.attention = attention
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, weights = self.attention(x, x, x, **self.kwargs)
        return out if weights is None else out + weights.sum()


class _SDPA(nn.Module):
    """A linear projection, then ``F.scaled_dot_product_attention`` over 2 heads."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


MHA_FORMS = [
    pytest.param(heads, batch_first, need_weights, id=f"heads{heads}-{'bf' if batch_first else 'sf'}-{'weights' if need_weights else 'noweights'}")
    for heads, batch_first, need_weights in itertools.product((2, 3), (True, False), (True, False))
]


@pytest.mark.parametrize("heads, batch_first, need_weights", MHA_FORMS)
def test_mha_count_equals_user_count(heads: int, batch_first: bool, need_weights: bool) -> None:
    """Even heads, batch-first, eval, no grad is torch's fused path, which fvcore cannot see: counting must not take it."""
    model = _Attend(nn.MultiheadAttention(12, heads, batch_first=batch_first), need_weights=need_weights).eval()
    x = torch.randn(2, 5, 12)
    expected = user_count(model, (x,))
    assert expected >= 2 * 5 * 4 * 12 * 12  # the four projections at least
    assert count_flops(model, (x,)).total == expected
    unfused = unfuse_attention(model)
    assert isinstance(unfused.attention, UnfusedMultiheadAttention)
    assert count_flops(unfused, (x,)).total == user_count(unfused, (x,)) == expected


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_count_equals_user_count(norm_first: bool) -> None:
    layer = nn.TransformerEncoderLayer(12, 2, 24, batch_first=True, norm_first=norm_first).eval()
    x = torch.randn(2, 5, 12)
    expected = user_count(layer, (x,))
    assert expected >= 2 * 5 * (4 * 12 * 12 + 2 * 12 * 24)
    assert count_flops(layer, (x,)).total == expected
    unfused = unfuse_attention(layer)
    assert count_flops(unfused, (x,)).total == expected
    with torch.no_grad():  # the fused path of the layer stays off (it would read the packed weight) and outputs agree
        assert torch.allclose(unfused(x), layer(x), atol=1e-5)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_encoder_stack_with_padding_mask_runs_unfused() -> None:
    """The encoder's nested-tensor fast path is turned off once its layers hold the unfused attention."""
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(12, 2, 24, batch_first=True), 2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 5, 12)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    unfused = unfuse_attention(encoder)
    with torch.no_grad():
        expected, got = encoder(x, src_key_padding_mask=mask), unfused(x, src_key_padding_mask=mask)
    assert torch.allclose(got[0], expected[0], atol=1e-5) and torch.allclose(got[1, :3], expected[1, :3], atol=1e-5)


def test_sdpa_is_not_counted_by_fvcore_and_not_by_autodac() -> None:
    """fvcore has no handle for scaled_dot_product_attention: only the projections count, in both counts."""
    model = _SDPA().eval()
    x = torch.randn(2, 5, 8)
    projections = 2 * 5 * (8 * 24 + 8 * 8)
    assert user_count(model, (x,)) == projections
    assert count_flops(model, (x,)).total == projections


@pytest.mark.filterwarnings("ignore:autodac. the plan is predicted to damage")
def test_vit_count_and_budget_by_user_count() -> None:
    """The ViT's attention (even heads, batch-first: fused in eval) counts as the user counts it, and 0.5 holds by that count."""
    model = TinyViT()
    original = user_count(model, (X,))
    assert count_flops(model, (X,)).total == original
    result = autodac.optimize(model, 0.5, example_inputs=X, progress=False)
    assert result.original_flops == original
    assert result.flops == user_count(result.model, (X,))
    assert user_count(result.model, (X,)) / original <= 0.5
