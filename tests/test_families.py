"""Every architecture family users bring, on self-contained definitions: the budget holds by an independent
fvcore count (autograd on, as a user counts), or the call refuses with the smallest reachable ratio, which holds too."""

from __future__ import annotations

import re
import warnings
from typing import Callable

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

import autodac
from autodac.testing import (
    ConvNeXtLike, DenseNetLike, InceptionLike, InvertedResidualNet, ShuffleNetLike, SwinLikeNet, TinyViT, TwoInputNet, VideoNet,
)

MIN_RATIO = re.compile(r"`flops_budget >= (\d\.\d{4})` must hold")

FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[tuple[int, ...], ...]]] = {
    "inverted-residual": (InvertedResidualNet, ((1, 3, 32, 32),)),
    "densenet-concatenation": (DenseNetLike, ((1, 3, 32, 32),)),
    "inception-branches": (InceptionLike, ((1, 3, 32, 32),)),
    "convnext-layer-scale": (ConvNeXtLike, ((1, 3, 32, 32),)),
    "shufflenet-channel-shuffle": (ShuffleNetLike, ((1, 3, 32, 32),)),
    "two-inputs": (TwoInputNet, ((1, 3, 16, 16), (1, 1, 16, 16))),
    "vit-multihead-attention": (TinyViT, ((1, 3, 16, 16),)),
    "swin-functional-linears": (SwinLikeNet, ((1, 3, 16, 16),)),
    "video-conv3d": (VideoNet, ((1, 3, 4, 16, 16),)),
}


def fvcore_flops(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """fvcore's count as a user makes it: eval mode, autograd on (so torch takes no fused inference path)."""
    analysis = FlopCountAnalysis(model.eval(), inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.enable_grad():
        return int(analysis.total())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("budget", [0.5, 0.7])
def test_the_budget_holds_by_an_independent_count_or_is_refused_with_a_reachable_ratio(family: str, budget: float) -> None:
    factory, shapes = FAMILIES[family]
    model = factory()
    inputs = tuple(torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = fvcore_flops(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damage warning is allowed: the budget is the point here
        try:
            result = autodac.optimize(model, budget, example_inputs=inputs, progress=False)
        except autodac.BudgetError as refusal:
            reachable = float(MIN_RATIO.search(str(refusal)).group(1))
            assert reachable > budget
            result = autodac.optimize(model, reachable, example_inputs=inputs, progress=False)
            budget = reachable
    decomposed = fvcore_flops(result.model, inputs)
    assert decomposed <= budget * original, f"{family}: fvcore counts {decomposed / original:.4f} against a budget of {budget}"
    assert result.flops_ratio == pytest.approx(decomposed / original, abs=1e-9)  # what autodac reports is what fvcore counts
    assert result.plan.factorized, f"{family}: a budget of {budget} must factorise something"
    with torch.no_grad():
        assert result.model.eval()(*inputs).shape == model.eval()(*inputs).shape
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the caller's model is untouched


@pytest.mark.filterwarnings("ignore:autodac. the plan is predicted to damage")
def test_a_channel_shuffle_keeps_its_grouped_conv_dense_and_says_why() -> None:
    result = autodac.optimize(ShuffleNetLike(), 0.7, example_inputs=torch.randn(1, 3, 32, 32), progress=False)
    assert "grouped conv (groups=2)" in result.plan.skipped["grouped.0"]
    assert "depthwise conv (groups=" in result.plan.skipped["units.0.branch.1"]  # the depthwise 3x3


@pytest.mark.filterwarnings("ignore:autodac. the plan is predicted to damage")
def test_convnext_pointwise_linears_on_channels_last_maps_are_candidates() -> None:
    """ConvNeXt's 1x1s are Linear layers applied to N x H x W x C maps: their cost counts every position."""
    result = autodac.optimize(ConvNeXtLike(), 0.5, example_inputs=torch.randn(1, 3, 32, 32), progress=False)
    factorized = set(result.plan.factorized)
    assert any(name.endswith(("pwconv1", "pwconv2")) for name in factorized)


def test_a_video_net_plans_its_conv3d_layers_on_a_probe_and_apply_rebuilds_the_result() -> None:
    model = VideoNet()
    clips = torch.randn(48, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = autodac.optimize(model, 0.5, data=[clips], n_trials=2, progress=False)
    assert any(type(model.get_submodule(name)) is nn.Conv3d for name in result.plan.factorized), result.plan.factorized
    assert result.flops_ratio <= 0.5 and fvcore_flops(result.model, (clips[:1],)) <= 0.5 * fvcore_flops(model, (clips[:1],))
    with torch.no_grad():
        torch.testing.assert_close(autodac.apply(model, result.plan, [clips])(clips), result.model(clips), rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_conv3d_is_weighed_by_the_batchnorm3d_after_it_and_keeps_a_channels_last_3d_layout() -> None:
    model, x = VideoNet(), torch.randn(1, 3, 4, 16, 16)
    followed = {t.name: t.followed_by for t in autodac.surgery.trace_layers(model, (x,))}
    assert followed["stem.0"] == "stem.1" and followed["conv.0"] == "conv.1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = autodac.optimize(model.to(memory_format=torch.channels_last_3d), 0.5, example_inputs=x, progress=False)
    factorised = [(name, p) for name, p in result.model.named_parameters() if p.dim() == 5 and name.rpartition(".")[0] not in
                  {n for n, m in model.named_modules() if isinstance(m, nn.Conv3d)}]
    assert factorised and all(p.is_contiguous(memory_format=torch.channels_last_3d) for _, p in factorised)
