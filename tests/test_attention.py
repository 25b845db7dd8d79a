"""Attention: counted as fvcore counts it with autograd on, whatever fast path torch takes; its projections
are ordinary candidates through ``UnfusedMultiheadAttention``, exact at full rank; functional layers named as such."""

from __future__ import annotations

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


class _PooledEncoder(nn.Module):
    """A padded-sequence classifier that averages over every position, padding included."""

    def __init__(self, final_norm: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if final_norm else None, enable_nested_tensor=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=padding).mean(1))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("final_norm", [False, True])
def test_padded_positions_come_out_as_torchs_nested_path_leaves_them(final_norm: bool) -> None:
    # torch's path zeros the padded positions (then norms them); unfused layers compute something there
    torch.manual_seed(0)
    model = _PooledEncoder(final_norm).eval()
    x = torch.randn(4, 7, 16)
    left = torch.arange(7)[None] >= torch.tensor([7, 5, 3, 6])[:, None]  # padding ends each row: torch nests
    scattered = left.clone()
    scattered[0, 2] = True  # a hole mid-row: torch does not nest, and neither may the copy
    unfused = unfuse_attention(model)
    with torch.no_grad():
        for padding in (left, scattered):
            torch.testing.assert_close(unfused(x, padding), model(x, padding), atol=1e-5, rtol=0)
    torch.testing.assert_close(unfused(x, left), model(x, left), atol=1e-5, rtol=0)  # grad on: torch's slow path, both
    result = autodac.optimize(model, 1.0, example_inputs=(x[:1], left[:1]), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x, left), model(x, left), atol=1e-5, rtol=0)


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


# ----------------------------------------------------------------------------- the unfused equivalent

# (heads, batch_first, self-attention, kdim/vdim, bias, add_bias_kv, add_zero_attn)
EQUIVALENT_FORMS = [
    (2, True, True, None, True, False, False),  # the fused form: even heads, batch-first, self-attention
    (3, True, True, None, True, False, False),
    (2, False, True, None, False, False, False),
    (2, True, False, None, True, True, False),
    (3, False, False, 5, True, False, True),
    (2, True, False, 7, True, True, True),
]
MASKS = ["none", "key_padding", "key_padding_float", "attn_2d", "attn_3d_float", "both", "causal"]


def _masks(kind: str, batch: int, heads: int, target: int, source: int) -> dict:
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.triu(torch.ones(target, source, dtype=torch.bool), diagonal=1)
    return {
        "none": {},
        "key_padding": {"key_padding_mask": padding},
        "key_padding_float": {"key_padding_mask": torch.where(padding, -1e4, 0.0)},
        "attn_2d": {"attn_mask": causal},
        "attn_3d_float": {"attn_mask": torch.randn(batch * heads, target, source)},
        "both": {"attn_mask": causal, "key_padding_mask": padding},
        "causal": {"attn_mask": causal, "is_causal": True},
    }[kind]


@pytest.mark.parametrize("form", EQUIVALENT_FORMS, ids=lambda f: "-".join(map(str, f)))
def test_unfused_attention_equals_mha(form) -> None:
    """Same outputs and attention weights for every mask, weights option, grad mode and unbatched input."""
    heads, batch_first, self_attention, kv_dim, bias, bias_kv, zero_attn = form
    mha = nn.MultiheadAttention(12, heads, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kv_dim, vdim=kv_dim, batch_first=batch_first).eval()
    if bias_kv:
        with torch.no_grad():
            mha.bias_k.normal_(), mha.bias_v.normal_()
    unfused = UnfusedMultiheadAttention.from_mha(mha)
    batch, target, source = 2, 5, 5 if self_attention else 6
    shape = (lambda length, width: (batch, length, width)) if batch_first else (lambda length, width: (length, batch, width))
    query = torch.randn(shape(target, 12))
    key = query if self_attention else torch.randn(shape(source, kv_dim or 12))
    value = query if self_attention else torch.randn(shape(source, kv_dim or 12))
    for kind, need_weights, average, grad in itertools.product(MASKS, (True, False), (True, False), (True, False)):
        if kind == "causal" and need_weights:
            continue  # torch refuses is_causal with need_weights
        masks = _masks(kind, batch, heads, target, source)
        options = dict(need_weights=need_weights, average_attn_weights=average, **masks)
        with torch.set_grad_enabled(grad):
            expected, got = mha(query, key, value, **options), unfused(query, key, value, **options)
        assert torch.allclose(got[0], expected[0], atol=1e-5), (kind, need_weights, average, grad)
        assert (got[1] is None) == (expected[1] is None)
        if expected[1] is not None:
            assert torch.allclose(got[1], expected[1], atol=1e-6), (kind, average)
    if self_attention:  # unbatched input
        single = query[0] if batch_first else query[:, 0]
        assert torch.allclose(unfused(single, single, single)[0], mha(single, single, single)[0], atol=1e-5)
        assert torch.allclose(unfused(single, single, single)[1], mha(single, single, single)[1], atol=1e-6)


@pytest.mark.parametrize("need_weights", [True, False])
def test_unfused_attention_count_equals_mha_with_masks(need_weights: bool) -> None:
    """With masks torch's attention runs through baddbmm or SDPA (uncounted by fvcore): the same ops in both."""
    mha = nn.MultiheadAttention(12, 3, batch_first=True).eval()
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, -1] = True
    original = _Attend(mha, need_weights=need_weights, key_padding_mask=padding)
    unfused = _Attend(UnfusedMultiheadAttention.from_mha(mha), need_weights=need_weights, key_padding_mask=padding)
    x = torch.randn(2, 5, 12)
    assert count_flops(unfused, (x,)).total == user_count(original, (x,)) == count_flops(original, (x,)).total


@pytest.mark.parametrize("need_weights", [True, False])
def test_unfused_attention_dropout_matches_in_training(need_weights: bool) -> None:
    """In train mode dropout draws the same random numbers in the same order: equal outputs from one seed."""
    mha = nn.MultiheadAttention(12, 2, dropout=0.3, batch_first=True).train()
    unfused = UnfusedMultiheadAttention.from_mha(mha)
    assert unfused.training
    x = torch.randn(2, 5, 12)
    torch.manual_seed(3)
    expected = mha(x, x, x, need_weights=need_weights)
    torch.manual_seed(3)
    got = unfused(x, x, x, need_weights=need_weights)
    assert torch.allclose(got[0], expected[0], atol=1e-5)
    torch.manual_seed(4)
    assert not torch.allclose(unfused(x, x, x, need_weights=need_weights)[0], expected[0], atol=1e-3)  # dropout is on


def test_from_mha_copies_dtype_grad_flags_and_leaves_the_original() -> None:
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, dtype=torch.float64)
    mha.out_proj.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in mha.state_dict().items()}
    unfused = UnfusedMultiheadAttention.from_mha(mha)
    assert [tuple(m.weight.shape) for m in (unfused.q_proj, unfused.k_proj, unfused.v_proj, unfused.out_proj)] == [(8, 8), (8, 4), (8, 6), (8, 8)]
    assert all(p.dtype == torch.float64 for p in unfused.parameters())
    assert not unfused.out_proj.weight.requires_grad and unfused.q_proj.weight.requires_grad
    assert autodac.cost.count_params(unfused) == autodac.cost.count_params(mha)
    with torch.no_grad():
        unfused.q_proj.weight.zero_()
    assert all(torch.equal(mha.state_dict()[k], v) for k, v in before.items())
    assert unfuse_attention(nn.Linear(2, 2)).__class__ is nn.Linear  # nothing to swap: the model itself


# ----------------------------------------------------------------------------- in optimize / apply


@pytest.mark.filterwarnings("ignore:autodac. the plan is predicted to damage")
def test_swin_like_functional_layers_named_with_the_true_reason() -> None:
    model = SwinLikeNet()
    result = autodac.optimize(model, 0.5, example_inputs=X, progress=False)
    reason = "used through a functional call (F.linear), cannot be replaced"
    assert result.plan.skipped["qkv"] == reason
    assert result.plan.skipped["proj_weight"] == reason
    assert "qkv" not in result.plan.layers
    assert user_count(result.model, (X,)) / user_count(model, (X,)) <= 0.5


def test_mha_subclass_is_left_alone_and_named_functional() -> None:
    """A subclass may have its own forward: it is not swapped, and its projections say why they are not candidates."""

    class Custom(nn.MultiheadAttention):
        pass

    model = _Attend(Custom(12, 2), need_weights=False)
    traced = {t.name: t.functional for t in autodac.surgery.trace_layers(model, (torch.randn(2, 5, 12),))}
    assert unfuse_attention(model) is model
    assert traced == {"attention.out_proj": "F.multi_head_attention_forward", "attention.in_proj_weight": "F.multi_head_attention_forward"}


@pytest.mark.filterwarnings("ignore:autodac. the plan is predicted to damage")
def test_vit_with_probe_factorises_attention_projections_and_replays() -> None:
    model = TinyViT()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 3, 16, 16, generator=generator), torch.randint(0, 10, (16,), generator=generator)) for _ in range(2)]
    result = autodac.optimize(model, 0.5, example_inputs=X, data=data, n_trials=2, profile_size=8, progress=False)
    projections = {f"blocks.{b}.attn.{p}" for b in range(2) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert projections & set(result.plan.factorized)
    assert not any("not run" in why for why in result.plan.skipped.values())
    assert user_count(result.model, (X,)) / user_count(model, (X,)) <= 0.5
    assert result.flops == user_count(result.model, (X,)) and result.original_flops == user_count(model, (X,))
    # the caller's model is untouched: same weights, still nn.MultiheadAttention
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(type(block.attn) is nn.MultiheadAttention for block in model.blocks)
    # the plan replays on a fresh copy, from JSON, with the same data
    replayed = autodac.apply(TinyViT(), autodac.Plan.from_json(result.plan.to_json()), data=data)
    with torch.no_grad():
        assert torch.allclose(replayed.eval()(X), result.model.eval()(X), atol=1e-5)


def test_vit_unfused_equals_original_at_full_rank() -> None:
    """The swapped ViT, and its attention block by block, give the original's outputs to 1e-5."""
    model = TinyViT().eval()
    unfused = unfuse_attention(model).eval()
    tokens = torch.randn(2, 17, 32)
    with torch.no_grad():
        assert torch.allclose(unfused(X), model(X), atol=1e-5)
        for original, swapped in zip(model.blocks, unfused.blocks):
            assert isinstance(swapped.attn, UnfusedMultiheadAttention)
            expected, got = original.attn(tokens, tokens, tokens), swapped.attn(tokens, tokens, tokens)
            assert torch.allclose(got[0], expected[0], atol=1e-5) and torch.allclose(got[1], expected[1], atol=1e-5)
    full = {f"blocks.0.attn.{p}": autodac.decompose_conv(unfused.blocks[0].attn.get_submodule(p), 32, "lowrank") for p in ("q_proj", "v_proj", "out_proj")}
    factorised = autodac.surgery.replace_layers(unfused, full).eval()
    with torch.no_grad():
        assert torch.allclose(factorised(X), model(X), atol=1e-5)


@pytest.mark.filterwarnings("ignore:autodac. the plan is predicted to damage")
def test_a_planned_attention_model_exports_and_pt_refuses_it_naming_the_other_formats(tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx round trip needs autodac[deploy]")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = autodac.optimize(TinyViT(), 0.6, example_inputs=x, progress=False)
    assert any(name.endswith("_proj") for name in result.plan.factorized)
    for fmt in ("torchscript", "pt2", "onnx"):
        done = autodac.export(result, tmp_path / f"vit.{fmt}", format=fmt)
        assert done.max_difference <= done.allowed  # loaded back and compared by export itself
    with pytest.raises(autodac.ModelError, match=r"UnfusedMultiheadAttention.*use format 'torchscript'"):
        autodac.export(result, tmp_path / "vit.pt", format="pt")
