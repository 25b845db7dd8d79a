"""The closed-form costs the search uses equal fvcore's count of the layers they describe."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autodac
from autodac.cost import count_flops
from autodac.factorize import METHODS, Geometry
from autodac.surgery import replace_layers, trace_layers
from autodac.testing import SharedConvNet, conv_configs, method_cases, linear_configs

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

CONFIGS = conv_configs() + linear_configs()
CASES = [pytest.param(i, name, id=case_id) for i, name, case_id in method_cases(CONFIGS)]


def _layer_and_input(index: int) -> tuple[nn.Module, torch.Tensor]:
    config = CONFIGS[index]
    return copy.deepcopy(config.module), torch.randn(config.input_shape)


def _geometry(model: nn.Module, x: torch.Tensor, name: str = "") -> Geometry:
    (layer,) = [t for t in trace_layers(model, (x,)) if t.name == name]
    assert layer.geometry is not None
    return layer.geometry


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[c.name for c in CONFIGS])
def test_dense_cost_equals_fvcore(index: int) -> None:
    module, x = _layer_and_input(index)
    count = count_flops(module, (x,)).total
    assert count > 0
    assert _geometry(module, x).dense_cost() == count


@pytest.mark.parametrize("index, method", CASES)
def test_closed_form_cost_equals_fvcore(index: int, method: str) -> None:
    module, x = _layer_and_input(index)
    geometry = _geometry(module, x)
    top = METHODS[method].max_rank(tuple(module.weight.shape))
    costs = []
    for rank in sorted({1, (top + 1) // 2, top}):
        layer = autodac.decompose_conv(module, rank, method)
        costs.append(METHODS[method].cost(geometry, rank))
        assert costs[-1] == count_flops(layer, (x,)).total, rank
    assert costs == sorted(costs)  # the planner stops at the first rank that is not cheaper


def test_hand_computed_counts() -> None:
    """Conv2d(4 -> 6, 3x3, padding 1) on 2 x 4 x 9 x 9, counted by hand (multiply-adds)."""
    module = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 9, 9)
    geometry = _geometry(module, x)
    assert geometry.calls == ((2, (9, 9), (9, 9)),)
    expected = {
        "dense": 2 * 81 * 6 * 4 * 9,  # 34992
        "dac": 2 * 81 * (4 * 2 * 9 + 6 * 4 * 2),  # depthwise 8 maps x 9 taps, then 8 -> 6 pointwise
        "spatial": 2 * (4 * 2 * 3 * 9 * 9 + 2 * 6 * 3 * 81),  # 3x1 to 2 maps of 9x9, then 1x3 to 6
        "lowrank": 2 * 81 * (2 * 36 + 6 * 2),
    }
    assert geometry.dense_cost() == expected["dense"] == count_flops(module, (x,)).total
    for method in ("dac", "spatial", "lowrank"):
        assert METHODS[method].cost(geometry, 2) == expected[method]
        assert count_flops(autodac.decompose_conv(module, 2, method), (x,)).total == expected[method]


def test_spatial_cost_with_stride_counts_the_unstrided_width() -> None:
    """The vertical conv strides the height only; the horizontal conv sees the full input width."""
    module = nn.Conv2d(3, 5, (3, 5), stride=(2, 3), padding=(1, 2))
    x = torch.randn(1, 3, 10, 12)
    geometry = _geometry(module, x)
    assert geometry.calls == ((1, (10, 12), (5, 4)),)
    expected = 3 * 2 * 3 * (5 * 12) + 2 * 5 * 5 * (5 * 4)
    assert METHODS["spatial"].cost(geometry, 2) == expected
    assert count_flops(autodac.decompose_conv(module, 2, "spatial"), (x,)).total == expected


@pytest.mark.parametrize("batch", [1, 3])
def test_cost_scales_with_batch(batch: int) -> None:
    module = nn.Conv1d(4, 6, 3, padding=1)
    x = torch.randn(batch, 4, 10)
    geometry = _geometry(module, x)
    one = _geometry(module, x[:1])
    for method in ("dac", "lowrank"):
        assert METHODS[method].cost(geometry, 2) == batch * METHODS[method].cost(one, 2)
        assert count_flops(autodac.decompose_conv(module, 2, method), (x,)).total == METHODS[method].cost(geometry, 2)


def test_linear_with_3d_input_counts_every_row() -> None:
    module = nn.Linear(6, 10)
    x = torch.randn(2, 3, 6)
    geometry = _geometry(module, x)
    assert geometry.calls == ((6, (), ()),)
    assert geometry.dense_cost() == 6 * 6 * 10 == count_flops(module, (x,)).total
    for rank in (1, 3, 6):
        expected = 6 * rank * (6 + 10)
        assert METHODS["lowrank"].cost(geometry, rank) == expected
        assert count_flops(autodac.decompose_conv(module, rank, "lowrank"), (x,)).total == expected


def test_layer_called_twice_costs_twice() -> None:
    model = SharedConvNet()
    x = torch.randn(2, 6, 5, 5)
    geometry = _geometry(model, x, "conv")
    assert len(geometry.calls) == 2
    assert geometry.dense_cost() == count_flops(model, (x,)).total == 2 * (2 * 25 * 6 * 6 * 9)
    for method in ("dac", "spatial", "lowrank"):
        decomposed = replace_layers(model, {"conv": autodac.decompose_conv(model.conv, 3, method)})
        assert count_flops(decomposed, (x,)).total == METHODS[method].cost(geometry, 3)


def test_padding_same_conv_is_counted() -> None:
    """fvcore has no handle for ``aten::_convolution_mode`` (string padding); autodac's counter must add it."""
    for padding in ("same", "valid"):
        module = nn.Conv2d(3, 4, 3, padding=padding)
        x = torch.randn(1, 3, 8, 8)
        side = 8 if padding == "same" else 6
        assert count_flops(module, (x,)).total == side * side * 4 * 3 * 9


def test_outputs_the_tracer_refuses_are_counted_through_their_tensors() -> None:
    import dataclasses

    @dataclasses.dataclass
    class Output:
        logits: torch.Tensor
        label: str

    class Net(nn.Module):
        def __init__(self, wrap) -> None:
            super().__init__()
            self.conv, self.fc, self.wrap = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4), wrap

        def forward(self, x: torch.Tensor):
            return self.wrap(self.fc(self.conv(x).mean((2, 3))))

    x = torch.randn(1, 3, 8, 8)
    plain = count_flops(Net(lambda t: t), (x,))
    # a number beside the tensors, and a dataclass: torch.jit's tracer refuses both, the multiply-adds are the tensor's
    for wrap in (lambda t: {"logits": t, "classes": 4}, lambda t: Output(t, "clf")):
        counted = count_flops(Net(wrap), (x,))
        assert counted.total == plain.total and counted.by_module == plain.by_module
