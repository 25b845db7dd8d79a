"""Every factorisation on every layer geometry: exact at full rank, error curves that are true and never rise."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

import autodac
from autodac.factorize import METHODS
from autodac.testing import conv_configs, method_cases, linear_configs

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

CONFIGS = conv_configs() + linear_configs()
CASES = [pytest.param(i, name, id=case_id) for i, name, case_id in method_cases(CONFIGS)]
REFUSED = [
    pytest.param(i, name, id=f"{config.name}-{name}")
    for i, config in enumerate(CONFIGS)
    for name, method in METHODS.items()
    if not method.applies_to(tuple(config.module.weight.shape))
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def _case(index: int, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor]:
    """A fresh copy of configuration ``index`` in ``dtype`` and a random input for it."""
    config = CONFIGS[index]
    module = copy.deepcopy(config.module).to(dtype)
    generator = torch.Generator().manual_seed(1000 + index)
    x = torch.randn(config.input_shape, generator=generator, dtype=torch.float64).to(dtype)
    return module, x


def _max_rank(module: nn.Module, method: str) -> int:
    return METHODS[method].max_rank(tuple(module.weight.shape))


def _ranks(module: nn.Module, method: str) -> list[int]:
    top = _max_rank(module, method)
    return sorted({1, (top + 1) // 2, top})


@torch.no_grad()
def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The dense ``N x C x k...`` (or ``N x C``) weight a two-layer pair computes, read off by probing.

    A copy of the pair has stride 1, dilation 1, no padding and no bias; fed one-hot inputs of
    exactly the composed kernel's size, output ``n`` of probe ``(c, p)`` is ``W[n, c, p]``.
    """
    probe = copy.deepcopy(layer)
    first, second = list(probe.children())
    for module in (first, second):
        module.bias = None
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = len(module.kernel_size)
            module.stride, module.dilation, module.padding = (1,) * dims, (1,) * dims, (0,) * dims
            module.padding_mode = "zeros"
    if isinstance(first, nn.Linear):
        eye = torch.eye(first.in_features, dtype=first.weight.dtype)
        return probe(eye).T
    kernel = tuple(a + b - 1 for a, b in zip(first.kernel_size, second.kernel_size))
    size = first.in_channels * math.prod(kernel)
    eye = torch.eye(size, dtype=first.weight.dtype).reshape(size, first.in_channels, *kernel)
    out = probe(eye).reshape(size, -1)
    return out.T.reshape(-1, first.in_channels, *kernel)


def _relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    weight, approx = weight.double(), approx.double()
    return float((weight - approx).pow(2).sum() / weight.pow(2).sum())


# ----------------------------------------------------------------------------- which method applies where


def test_applicability_table() -> None:
    def applies(shape: tuple[int, ...]) -> set[str]:
        return {name for name, method in METHODS.items() if method.applies_to(shape)}

    assert applies((8, 4, 3, 3)) == {"dac", "tdac", "spatial", "lowrank"}
    assert applies((8, 4, 9, 1)) == {"dac", "tdac", "lowrank"}  # a (9, 1) kernel is already one-dimensional
    assert applies((8, 4, 1, 5)) == {"dac", "tdac", "lowrank"}
    assert applies((8, 4, 1, 1)) == {"lowrank"}  # 1x1: only the channel split can save anything
    assert applies((8, 4, 5)) == {"dac", "tdac", "lowrank"}
    assert applies((8, 4, 1)) == {"lowrank"}
    assert applies((8, 4)) == {"lowrank"}


def test_enough_configurations() -> None:
    convs = [c for c in CONFIGS if not isinstance(c.module, nn.Linear)]
    assert len(convs) >= 20
    modes = {c.module.padding_mode for c in convs}
    assert modes == {"zeros", "reflect", "replicate", "circular"}
    kernels = {tuple(c.module.kernel_size) for c in convs}
    assert {(9, 1), (1, 5), (3, 5), (5, 1), (3,), (1, 1)} <= kernels
    assert {"same", "valid"} <= {c.module.padding for c in convs if isinstance(c.module.padding, str)}
    assert any(isinstance(c.module, nn.Conv1d) for c in convs)
    assert any(c.module.bias is None for c in convs) and any(c.module.bias is not None for c in convs)
    assert any(max(c.module.dilation) > 1 for c in convs) and any(max(c.module.stride) > 1 for c in convs)


@pytest.mark.parametrize("index, method", REFUSED)
def test_inapplicable_method_is_refused(index: int, method: str) -> None:
    module, _ = _case(index)
    with pytest.raises(autodac.AutodacError, match=f"method '{method}' does not apply"):
        autodac.decompose_conv(module, 1, method)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("index, method", CASES)
def test_full_rank_reproduces_the_layer(index: int, method: str, dtype: torch.dtype) -> None:
    module, x = _case(index, dtype)
    rank = _max_rank(module, method)
    layer = autodac.decompose_conv(module, rank, method)
    assert isinstance(layer, autodac.FactorizedLayer)
    assert (layer.method, layer.rank) == (method, rank)
    assert all(p.dtype == dtype for p in layer.parameters())
    with torch.no_grad():
        expected, actual = module(x), layer(x)
    assert actual.shape == expected.shape and actual.dtype == dtype
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("index, method", CASES)
def test_bfloat16_layer_is_built_in_bfloat16(index: int, method: str) -> None:
    module, x = _case(index, torch.bfloat16)
    layer = autodac.decompose_conv(module, _max_rank(module, method), method)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    with torch.no_grad():
        expected, actual = module(x), layer(x)
    assert actual.dtype == torch.bfloat16
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.05, atol=0.05 * scale)


@pytest.mark.parametrize("index, method", CASES)
def test_original_layer_is_unchanged(index: int, method: str) -> None:
    module, x = _case(index)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    geometry = {k: getattr(module, k, None) for k in ("stride", "padding", "dilation", "padding_mode", "groups")}
    with torch.no_grad():
        output = module(x)
    for rank in _ranks(module, method):
        autodac.decompose_conv(module, rank, method)
    after = module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert geometry == {k: getattr(module, k, None) for k in geometry}
    with torch.no_grad():
        assert torch.equal(module(x), output)


def test_built_layer_follows_training_mode() -> None:
    module, _ = _case(0)
    assert autodac.decompose_conv(module.train(), 2, "dac").training
    assert not autodac.decompose_conv(module.eval(), 2, "dac").training


@pytest.mark.parametrize("rank", [0, -1, 10**6, 1.5, True, "2", None])
def test_bad_rank_is_refused(rank: object) -> None:
    module, _ = _case(0)
    with pytest.raises(autodac.AutodacError, match=r"1 <= rank <= 6.*rank=" + re.escape(repr(rank))):
        autodac.decompose_conv(module, rank, "dac")  # type: ignore[arg-type]


def test_grouped_conv_and_unknown_method_are_refused() -> None:
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(autodac.AutodacError, match="groups=2"):
        autodac.decompose_conv(grouped, 1, "dac")
    with pytest.raises(autodac.AutodacError, match="method='tucker'"):
        autodac.decompose_conv(nn.Conv2d(4, 4, 3), 1, "tucker")
    with pytest.raises(autodac.AutodacError, match="BatchNorm2d"):
        autodac.decompose_conv(nn.BatchNorm2d(4), 1, "lowrank")


# ----------------------------------------------------------------------------- error curves


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[c.name for c in CONFIGS])
def test_effective_weight_probe_recovers_a_dense_layer(index: int) -> None:
    """The probe the error tests rely on reads a plain layer's weight back exactly."""
    module, _ = _case(index)
    n = module.weight.shape[0]
    if isinstance(module, nn.Linear):
        identity: nn.Module = nn.Linear(n, n, bias=False, dtype=torch.float64)
    else:
        identity = type(module)(n, n, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(n, dtype=torch.float64).reshape(identity.weight.shape))
    pair = nn.Sequential(module, identity)
    torch.testing.assert_close(effective_weight(pair), module.weight.detach(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("index, method", CASES)
def test_error_curve_is_the_true_error_and_never_rises(index: int, method: str, dtype: torch.dtype) -> None:
    module, _ = _case(index, dtype)
    weight = module.weight.detach()
    errors = METHODS[method].errors(weight)
    assert errors.dtype == torch.float64
    assert errors.shape == (_max_rank(module, method),)
    assert bool(torch.all(errors[1:] <= errors[:-1])), errors
    assert bool(torch.all((errors >= 0) & (errors <= 1)))
    assert float(errors[-1]) < (1e-12 if dtype == torch.float64 else 1e-6)
    if len(errors) > 1:
        assert float(errors[0]) > 1e-3  # random weights are far from rank one
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    for rank in _ranks(module, method):
        layer = autodac.decompose_conv(module, rank, method)
        actual = _relative_error(weight, effective_weight(layer))
        assert abs(actual - float(errors[rank - 1])) <= tolerance, (rank, actual, float(errors[rank - 1]))


@pytest.mark.parametrize("index, method", CASES)
def test_output_approaches_dense_output_as_rank_grows(index: int, method: str) -> None:
    module, x = _case(index)
    with torch.no_grad():
        expected = module(x)
        distances = [float((autodac.decompose_conv(module, r, method)(x) - expected).norm()) for r in _ranks(module, method)]
    scale = float(expected.norm())
    assert all(later <= earlier + 1e-12 * scale for earlier, later in zip(distances, distances[1:])), distances
    assert distances[-1] <= 1e-10 * scale
    if len(distances) > 1:
        assert distances[0] > 1e-3 * scale
