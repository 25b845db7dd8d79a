"""Conv/Linear subclasses with their own ``forward``: reproduced exactly (padding and all) or skipped with the reason.

The subclasses are the kinds models ship with: TF-style static "same" padding (EfficientNet's
``Conv2dStaticSamePadding``), dynamic "same" padding that depends on the input size, weight
standardisation, a Conv1d that pads itself, and a Linear whose forward just calls the base.
"""

from __future__ import annotations

import dataclasses

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autodac
import autodac.subclasses
from autodac.cost import count_flops
from autodac.errors import AutodacError, PlanError
from autodac.factorize import METHODS
from autodac.layers import IMPLEMENTATIONS, build_factorized
from autodac.probes import input_covariances
from autodac.sequential import Refit, refit_in_order
from autodac.subclasses import explicit_padding
from autodac.surgery import trace_layers
from autodac.testing import seeded


class StaticSameConv2d(nn.Conv2d):
    """TF "same" padding fixed at construction for one image size, as ``efficientnet_lite_pytorch`` builds it."""

    def __init__(self, *args, image_size: int = 16, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph = max((math.ceil(image_size / sh) - 1) * sh + (kh - 1) * dh + 1 - image_size, 0)
        pw = max((math.ceil(image_size / sw) - 1) * sw + (kw - 1) * dw + 1 - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)) if ph or pw else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DynamicSameConv2d(nn.Conv2d):
    """TF "same" padding computed from each input's size: a fixed replacement cannot follow it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for axis in (1, 0):  # F.pad takes the width first
            size, k, s, d = x.shape[2 + axis], self.kernel_size[axis], self.stride[axis], self.dilation[axis]
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StandardizedConv2d(nn.Conv2d):
    """Weight standardisation: the forward convolves with a weight other than ``self.weight``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PaddedConv1d(nn.Conv1d):
    """A Conv1d that pads its input unevenly (one before, two after) before the base conv."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pad = nn.ConstantPad1d((1, 2), 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


class PlainLinear(nn.Linear):
    """A subclass whose forward is the base's in all but name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    return seeded(module, seed).double()


# (module, explicit padding its forward applies, two inputs of different sizes)
REPRODUCIBLE = {
    "static-same-stride2": (lambda: StaticSameConv2d(3, 6, 3, stride=2), (0, 1, 0, 1), [(2, 3, 16, 16), (1, 3, 11, 14)]),
    "static-same-5x5-bias-padding": (
        lambda: StaticSameConv2d(4, 5, 5, stride=2, padding=1), (1, 2, 1, 2), [(2, 4, 15, 15), (1, 4, 12, 9)]
    ),
    "static-same-1x1": (lambda: StaticSameConv2d(4, 6, 1, bias=False), (), [(2, 4, 7, 7), (1, 4, 5, 6)]),
    "static-same-dilated-stride1": (lambda: StaticSameConv2d(3, 4, 3, dilation=2), (2, 2, 2, 2), [(2, 3, 10, 10), (1, 3, 9, 12)]),
    "dynamic-same-stride1": (lambda: DynamicSameConv2d(3, 4, (3, 5)), (2, 2, 1, 1), [(2, 3, 10, 10), (1, 3, 9, 12)]),
    "padded-conv1d": (lambda: PaddedConv1d(3, 5, 4, stride=2), (1, 2), [(2, 3, 20), (1, 3, 17)]),
    "plain-linear": (lambda: PlainLinear(6, 4), (), [(2, 6), (3, 2, 6)]),
}
CASES = [
    pytest.param(name, method, impl, id=f"{name}-{method}" + (f"-{impl}" if impl else ""))
    for name, (make, _, _) in REPRODUCIBLE.items()
    for method in METHODS
    if METHODS[method].applies_to(tuple(make().weight.shape))
    for impl in IMPLEMENTATIONS[method]
]


def _inputs(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


# ----------------------------------------------------------------------------- reading the padding


@pytest.mark.parametrize("name", list(REPRODUCIBLE))
def test_padding_is_read_off_the_forward(name: str) -> None:
    make, padding, _ = REPRODUCIBLE[name]
    assert explicit_padding(make()) == padding


def test_plain_layers_are_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autodac.subclasses, "_read_padding", lambda module: pytest.fail(f"{module} needs no check"))
    for module in (nn.Conv2d(3, 4, 3, stride=2), nn.Conv1d(3, 4, 3, padding="same"), nn.Linear(3, 4)):
        assert explicit_padding(module) == ()


def test_reading_leaves_the_module_alone() -> None:
    module = _seeded(StaticSameConv2d(3, 6, 3, stride=2)).float()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    assert explicit_padding(module) == (0, 1, 0, 1)
    assert calls == [] and module.weight.dtype == torch.float32
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    "module, words",
    [
        pytest.param(DynamicSameConv2d(3, 4, 3, stride=2), "whose input padding depends on the input size", id="dynamic-same-stride2"),
        pytest.param(StandardizedConv2d(3, 4, 3, padding=1), "not the Conv2d of a zero-padded input", id="weight-standardised"),
    ],
)
def test_irreproducible_forwards_are_refused_with_the_reason(module: nn.Module, words: str) -> None:
    reason = explicit_padding(module)
    assert isinstance(reason, str) and words in reason and type(module).__name__ in reason
    for method in ("dac", "lowrank"):
        with pytest.raises(AutodacError, match=re.escape(words)):
            build_factorized(module, method, 1)
        with pytest.raises(AutodacError, match=re.escape(words)):
            autodac.decompose_conv(module, 1, method)


# ----------------------------------------------------------------------------- exact replacements


@pytest.mark.parametrize("name, method, impl", CASES)
def test_full_rank_is_exact_and_costs_what_the_formula_says(name: str, method: str, impl: str) -> None:
    make, padding, shapes = REPRODUCIBLE[name]
    module = _seeded(make())
    rank = METHODS[method].max_rank(tuple(module.weight.shape))
    layer = build_factorized(module, method, rank, impl=impl)
    assert tuple(layer.pad_first) + tuple(layer.pad_second) != () or not padding
    for x in _inputs(shapes):
        with torch.no_grad():
            expected, got = module(x), layer(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        geometry = next(t.geometry for t in trace_layers(module, (x,)) if t.name == "")
        for r in sorted({1, rank}):
            built = build_factorized(module, method, r, impl=impl)
            assert count_flops(built, (x,)).total == METHODS[method].cost(geometry, r), (r, tuple(x.shape))


@pytest.mark.parametrize("method", ["dac", "tdac", "spatial", "lowrank"])
def test_decompose_conv_pads_and_scripts(method: str) -> None:
    module = _seeded(StaticSameConv2d(3, 6, 3, stride=2))
    layer = autodac.decompose_conv(module, METHODS[method].max_rank(tuple(module.weight.shape)), method)
    x = _inputs([(1, 3, 16, 16)])[0]
    scripted = torch.jit.script(layer)
    with torch.no_grad():
        assert torch.allclose(layer(x), module(x), rtol=0, atol=1e-10)
        assert torch.allclose(scripted(x), layer(x), rtol=0, atol=1e-12)
    assert "pad_" in repr(layer)


def test_data_aware_patches_include_the_padding() -> None:
    """The input covariance of a self-padding conv is that of the plain conv on the padded input."""
    subclass = _seeded(StaticSameConv2d(3, 6, 3, stride=2))
    plain = _seeded(nn.Conv2d(3, 6, 3, stride=2))
    x = _inputs([(4, 3, 16, 16)])[0]
    padded = input_covariances(subclass, {"": subclass}, x)[""]
    assert torch.allclose(padded, input_covariances(plain, {"": plain}, F.pad(x, (0, 1, 0, 1)))[""])


def test_sequential_refit_keeps_the_padding() -> None:
    model = _net().double()
    x = _inputs([(8, 3, 16, 16)])[0]
    rank = METHODS["dac"].max_rank(tuple(model.stem.weight.shape))
    changed = copy.deepcopy(model)
    changed.stem = build_factorized(model.stem, "dac", rank)
    refitted, names = refit_in_order(model, changed, {"stem": Refit("dac", rank)}, x)
    assert names == ["stem"] and refitted.stem.pad_first == [0, 1, 0, 1]
    with torch.no_grad():
        assert torch.allclose(refitted(x), model(x), atol=1e-8)


# ----------------------------------------------------------------------------- optimize and apply


class StemNet(nn.Module):
    """EfficientNet-like: every conv pads itself TF-style; the stride-2 stem pads by (0, 1, 0, 1)."""

    def __init__(self, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = StaticSameConv2d(3, 16, 3, stride=2, bias=False, image_size=32)
        self.bn = nn.BatchNorm2d(16)
        self.conv = StaticSameConv2d(16, 32, 3, bias=False, image_size=16)
        self.down = StaticSameConv2d(32, 32, 3, stride=2, image_size=16)
        self.extra = extra if extra is not None else nn.Identity()
        self.head = PlainLinear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv(x))
        x = self.extra(torch.relu(self.down(x)))
        return self.head(x.mean((2, 3)))


def _net(extra: nn.Module | None = None) -> nn.Module:
    return seeded(StemNet(extra), 0).eval()  # eval: a forward in a test must not move BatchNorm statistics


def test_optimize_factorises_self_padding_layers_and_keeps_the_count() -> None:
    model = _net()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = autodac.optimize(model, 0.7, example_inputs=x, progress=False, widths=False)  # factorised, not narrowed
    assert result.flops == result.plan.flops and result.flops_ratio <= 0.7
    assert not result.plan.skipped.keys() & {"stem", "conv", "down", "head"}
    padded = [name for name in result.plan.factorized if name != "head"]
    assert padded, "the budget should need at least one of the self-padding convs"
    for name in padded:
        layer = result.model.get_submodule(name)
        assert layer.pad_first or layer.pad_second, name
    by_module = count_flops(result.model, (x,)).by_module
    assert all(sum(by_module[n] for n in (name, *(choice.sliced or ()))) == choice.flops_after for name, choice in result.plan.layers.items())
    with torch.no_grad():
        assert result.model(x).shape == model(x).shape
        for name in ("stem", "conv", "down"):  # every feature map keeps its size
            assert _output_shape(result.model, name, x) == _output_shape(model, name, x)


def test_apply_replays_the_padding() -> None:
    model = _net()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = autodac.optimize(model, 0.7, example_inputs=x, fit_to_data=False, progress=False)  # weight fits: replayable from the plan alone
    rebuilt = autodac.apply(model, autodac.Plan.from_json(result.plan.to_json()))
    assert any(isinstance(m, autodac.FactorizedLayer) and (m.pad_first or m.pad_second) for m in rebuilt.modules())
    assert rebuilt.state_dict().keys() == result.model.state_dict().keys()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in result.model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), result.model.eval()(x))


def _output_shape(model: nn.Module, name: str, x: torch.Tensor) -> tuple[int, ...]:
    shapes = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        model.eval()(x)
    finally:
        handle.remove()
    return shapes[0]


def test_optimize_skips_irreproducible_layers_with_the_reason() -> None:
    extra = nn.Sequential(DynamicSameConv2d(32, 32, 3, stride=2), StandardizedConv2d(32, 32, 3, padding=1))
    model = _net(extra)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = autodac.optimize(model, 0.7, example_inputs=x, progress=False)
    assert "depends on the input size" in result.plan.skipped["extra.0"]
    assert "weight standardisation" in result.plan.skipped["extra.1"]
    assert isinstance(result.model.extra[0], DynamicSameConv2d) and isinstance(result.model.extra[1], StandardizedConv2d)
    assert result.flops == result.plan.flops


def test_apply_refuses_a_plan_for_an_irreproducible_layer() -> None:
    model = _net()
    x = torch.randn(1, 3, 32, 32)
    plan = autodac.optimize(model, 0.7, example_inputs=x, progress=False).plan
    name = next(name for name in plan.factorized if name != "head")
    other = _net()
    dense = other.get_submodule(name)
    setattr(other, name, StandardizedConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, stride=dense.stride))
    with pytest.raises(PlanError, match=re.escape(name) + r"': plan has \w*Conv2d\(.*model has StandardizedConv2d\("):
        autodac.apply(other, plan)  # the plan records the model it was made for: another layer type is refused first
    unchecked = dataclasses.replace(plan, structure=None)  # a plan without that record (version 1) still meets the layer's own check
    with pytest.raises(PlanError, match=re.escape(name) + ".*weight standardisation"):
        autodac.apply(other, unchecked)


def test_the_cross_check_names_the_layers_it_disagrees_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed-form cost that is off by one for every factorised layer is caught and each such layer named."""
    for method in METHODS.values():
        monkeypatch.setattr(method, "cost", lambda geometry, rank, _cost=method.cost: _cost(geometry, rank) + 1)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(AutodacError, match="internal check failed") as caught:
        autodac.optimize(_net(), 0.7, example_inputs=x, progress=False)
    named = re.findall(r"'(\w+)' (\d+) vs (\d+)", str(caught.value))
    assert named and {name for name, _, _ in named} <= {"stem", "conv", "down", "head"}
    assert all(int(planned) == int(counted) + 1 for _, counted, planned in named)


def test_data_fits_and_the_sequential_refit_keep_the_padding() -> None:
    """With probe data (data-aware fits, re-fit in order), the plan is what fvcore counts and ``apply`` replays it."""
    model = _net()
    data = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = autodac.optimize(model, 0.6, data=data, n_trials=2, probe_size=64, profile_size=16, progress=False)
    assert result.flops == result.plan.flops
    assert any(c.fit.removeprefix("seq+").startswith("data") for c in result.plan.factorized.values())
    rebuilt = autodac.apply(model, result.plan, data)
    with torch.no_grad():
        assert torch.equal(rebuilt(data[:4]), result.model(data[:4]))
