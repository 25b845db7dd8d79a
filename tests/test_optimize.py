"""``autodac.optimize``: the budget always holds and is used, the caller's model is untouched, bad input is refused."""

from __future__ import annotations

import functools
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

import autodac
from autodac import zoo
from autodac.api import DEFAULT_METHODS
from autodac.cost import count_flops
from autodac.factorize import METHODS
from autodac.plan import LayerChoice, Plan
from autodac.testing import Conv1dNet, DepthwiseOnlyNet, GroupedConvNet, LinearHeadNet, SmallConvNet

ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet20": (zoo.resnet20, (1, 1, 28, 28)),
    "cifar_vgg": (zoo.cifar_vgg, (1, 1, 28, 28)),
    "resnet50_shaped": (zoo.resnet50_shaped, (1, 3, 224, 224)),
}
MIN_RATIO = re.compile(r"`flops_budget >= (\d\.\d{4})` must hold")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


@functools.lru_cache(maxsize=None)
def _zoo_run(name: str, budget: float, methods: tuple[str, ...] = DEFAULT_METHODS):
    """(model, input, state before, result) for one zoo model; cached so tests share the work."""
    factory, shape = ZOO[name]
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(shape)
    before = _state(model)
    result = autodac.optimize(model, budget, example_inputs=x, methods=methods, progress=False)
    return model, x, before, result


ZOO_RUNS = [
    pytest.param("resnet20", 0.3), pytest.param("resnet20", 0.5), pytest.param("resnet20", 0.7),
    pytest.param("cifar_vgg", 0.3), pytest.param("cifar_vgg", 0.5), pytest.param("cifar_vgg", 0.7),
    pytest.param("resnet50_shaped", 0.3),
    pytest.param("resnet50_shaped", 0.5, marks=pytest.mark.slow),
    pytest.param("resnet50_shaped", 0.7, marks=pytest.mark.slow),
]


# ----------------------------------------------------------------------------- the budget


@pytest.mark.parametrize("name, budget", ZOO_RUNS)
def test_budget_holds_and_is_used(name: str, budget: float) -> None:
    model, x, _, result = _zoo_run(name, budget)
    original = count_flops(model, (x,)).total
    counted = count_flops(result.model, (x,)).total
    assert result.original_flops == original
    assert counted == result.flops == result.plan.flops
    assert counted <= math.floor(budget * original)
    assert result.flops_ratio <= budget
    assert result.flops_ratio >= budget - 0.01  # the knapsack spends the budget
    assert result.plan.budget == {"flops": budget}
    assert result.plan.input_shapes == [list(x.shape)] and not result.plan.input_assumed


@pytest.mark.parametrize("name, budget", ZOO_RUNS)
def test_callers_model_is_untouched(name: str, budget: float) -> None:
    model, x, before, result = _zoo_run(name, budget)
    _assert_same_state(model, before)
    assert result.model is not model
    assert not any(isinstance(m, autodac.FactorizedLayer) for m in model.modules())
    assert not {p.data_ptr() for p in result.model.parameters()} & {p.data_ptr() for p in model.parameters()}


def test_training_modes_are_kept() -> None:
    """A model in training mode with a frozen BatchNorm keeps exactly those modes (and so does the copy)."""
    model = SmallConvNet().train()
    model.bn1.eval()
    modes = [m.training for m in model.modules()]
    result = autodac.optimize(model, 0.5, example_inputs=torch.randn(2, 3, 8, 8), progress=False)
    assert [m.training for m in model.modules()] == modes
    assert not result.model.bn1.training and result.model.bn2.training


def test_resnet50_shaped_reaches_03_only_with_lowrank() -> None:
    _, x, _, result = _zoo_run("resnet50_shaped", 0.3)
    assert "lowrank" in {c.method for c in result.plan.factorized.values()}
    # the 1x1 convs (about half of the FLOPs) can only be cut by the channel split
    assert any(c.method == "lowrank" and c.weight_shape[2:] == (1, 1) for c in result.plan.factorized.values())
    model = ZOO["resnet50_shaped"][0]()
    with pytest.raises(autodac.BudgetError) as caught:
        autodac.optimize(model, 0.3, example_inputs=x, methods=("dac",), progress=False)
    minimum = float(MIN_RATIO.search(str(caught.value)).group(1))
    assert minimum > 0.3
    assert "flops_budget=0.3" in str(caught.value) and "methods=['dac']" in str(caught.value)


def test_minimum_ratio_in_the_message_is_reachable() -> None:
    """The smallest reachable ratio the error names is exact to its four decimals."""
    model = zoo.resnet20()
    x = torch.randn(1, 1, 28, 28)
    before = _state(model)
    with pytest.raises(autodac.BudgetError) as caught:
        autodac.optimize(model, 0.01, example_inputs=x, methods=("dac",), progress=False)
    _assert_same_state(model, before)
    minimum = float(MIN_RATIO.search(str(caught.value)).group(1))
    assert "flops_budget=0.01" in str(caught.value)
    result = autodac.optimize(model, minimum, example_inputs=x, methods=("dac",), progress=False)
    assert result.flops_ratio <= minimum
    with pytest.raises(autodac.BudgetError):
        autodac.optimize(model, minimum - 1e-4, example_inputs=x, methods=("dac",), progress=False)


# ----------------------------------------------------------------------------- what the planner picks


def test_methods_restrict_the_choice() -> None:
    _, _, _, result = _zoo_run("resnet20", 0.5, ("dac",))
    assert {c.method for c in result.plan.layers.values()} <= {"dac", "dense"}
    assert result.plan.factorized
    # 1x1 shortcuts and the Linear head cannot take DAC, so they are skipped with a reason
    assert "fc" in result.plan.skipped and "layers.3.shortcut.0" in result.plan.skipped


def test_knapsack_beats_uniform_rank_dac() -> None:
    """The planned allocation has a lower summed error than every-layer-at-rank-r DAC at no more FLOPs."""
    model = zoo.resnet20()
    x = torch.randn(1, 1, 28, 28)
    original = count_flops(model, (x,)).total
    dac = METHODS["dac"]
    for rank in (1, 2, 3, 4):
        layers, uniform_error = {}, 0.0
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and dac.applies_to(tuple(module.weight.shape)):
                uniform_error += float(dac.errors(module.weight)[rank - 1])
                layers[name] = LayerChoice("dac", rank, tuple(module.weight.shape), 0, 0, 0, 0)
        uniform = autodac.apply(model, Plan(layers=layers, original_flops=original))
        uniform_flops = count_flops(uniform, (x,)).total
        budget = (uniform_flops + 0.5) / original  # floor(budget * original) == uniform_flops
        result = autodac.optimize(model, budget, example_inputs=x, methods=("dac",), weighting="none", progress=False)
        planned_error = sum(c.error for c in result.plan.layers.values())
        assert result.flops <= uniform_flops
        if rank == 1:  # rank 1 everywhere is the cheapest DAC plan, so it is the only one that fits
            assert planned_error == pytest.approx(uniform_error, rel=1e-12)
        else:
            assert planned_error < uniform_error, (rank, planned_error, uniform_error)


def test_more_budget_never_means_more_error() -> None:
    errors = [sum(c.error for c in _zoo_run("resnet20", b)[3].plan.layers.values()) for b in (0.3, 0.5, 0.7)]
    assert errors[0] > errors[1] > errors[2] > 0


@pytest.mark.parametrize("budget", [1.0, 1])
def test_full_budget_changes_nothing(budget: float) -> None:
    model = zoo.resnet20().eval()
    x = torch.randn(2, 1, 28, 28)
    result = autodac.optimize(model, budget, example_inputs=x, progress=False)
    assert result.flops == result.original_flops
    assert not result.plan.factorized and all(c.error == 0.0 for c in result.plan.layers.values())
    with torch.no_grad():
        assert torch.equal(result.model.eval()(x), model(x))


def test_high_budget_keeps_outputs_close() -> None:
    model = SmallConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    result = autodac.optimize(model, 0.95, example_inputs=x, progress=False)
    assert result.flops_ratio <= 0.95
    with torch.no_grad():
        expected = model(x)
        low = autodac.optimize(model, 0.4, example_inputs=x, progress=False).model.eval()(x)
        high = result.model.eval()(x)
    assert (high - expected).norm() < (low - expected).norm()


def test_deterministic() -> None:
    model, x, _, first = _zoo_run("resnet20", 0.5)
    torch.manual_seed(123)  # the global RNG must play no part
    second = autodac.optimize(model, 0.5, example_inputs=x, progress=False)
    assert second.plan.to_json() == first.plan.to_json()
    with torch.no_grad():
        assert torch.equal(second.model.eval()(x), first.model.eval()(x))


@pytest.mark.parametrize(
    "factory, shape, budget",
    [(Conv1dNet, (2, 4, 16), 0.4), (LinearHeadNet, (2, 2, 6, 6), 0.3), (SmallConvNet, (2, 3, 8, 8), 0.5)],
    ids=["conv1d", "linear_head", "small_conv"],
)
def test_tiny_models(factory: Callable[[], nn.Module], shape: tuple[int, ...], budget: float) -> None:
    model = factory()
    x = torch.randn(shape)
    before = _state(model)
    result = autodac.optimize(model, budget, example_inputs=x, progress=False)
    assert count_flops(result.model, (x,)).total <= math.floor(budget * count_flops(model, (x,)).total)
    _assert_same_state(model, before)
    if factory is LinearHeadNet:  # the Linear holds most FLOPs: only cutting it reaches 0.3, by rank or by its width
        layers = result.plan.layers
        cut_by_width = layers["fc2"].method == "width" and "fc1" in layers["fc2"].sliced
        assert cut_by_width or layers["fc1"].method == "lowrank", result.summary()


class _AliasedConvNet(nn.Module):
    """One conv registered under two names (``self.a = self.b = conv``), each name called once."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        shared = nn.Conv2d(16, 16, 3, padding=1)
        self.stem, self.a, self.b, self.fc = nn.Conv2d(3, 16, 3, padding=1), shared, shared, nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(torch.relu(self.stem(x))))))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("with_data", [False, True], ids=["data-free", "data"])
def test_a_layer_registered_under_two_names_is_replaced_under_both(with_data: bool) -> None:
    model = _AliasedConvNet().eval()
    x = torch.randn(1, 3, 16, 16)
    before = _state(model)
    kwargs = {"data": [torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))], "n_trials": 2} if with_data else {}
    result = autodac.optimize(model, 0.5, example_inputs=x, progress=False, **kwargs)
    assert "a" in result.plan.layers and result.model.a is result.model.b and not isinstance(result.model.b, nn.Conv2d)
    assert count_flops(result.model, (x,)).total == result.flops <= math.floor(0.5 * count_flops(model, (x,)).total)
    assert model.a is model.b and isinstance(model.b, nn.Conv2d)
    _assert_same_state(model, before)
    rebuilt = autodac.apply(model, result.plan, kwargs.get("data"))
    assert torch.equal(rebuilt(x), result.model(x))


def test_a_channels_last_model_gets_channels_last_replacements() -> None:
    model = SmallConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    fast = autodac.optimize(model.to(memory_format=torch.channels_last), 0.5, example_inputs=x, progress=False).model
    plain = autodac.optimize(SmallConvNet().eval(), 0.5, example_inputs=x, progress=False).model
    weights = {n: p for n, p in fast.named_parameters() if p.dim() == 4 and n.split(".")[0] in ("conv1", "conv2")}
    assert any("." in n.split(".", 1)[1] for n in weights)  # a factorised layer among them
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights.values())
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for n, p in plain.named_parameters() if n in weights)
    assert torch.allclose(fast(x), plain(x), atol=1e-5)


def test_grouped_and_depthwise_convs_are_skipped_with_a_reason() -> None:
    result = autodac.optimize(GroupedConvNet(), 0.8, example_inputs=torch.randn(1, 4, 6, 6), progress=False)
    assert set(result.plan.skipped) == {"grouped", "depthwise"}
    assert "groups=2" in result.plan.skipped["grouped"] and "groups=8" in result.plan.skipped["depthwise"]
    assert set(result.plan.layers) == {"conv"}
    assert isinstance(result.model.grouped, nn.Conv2d) and isinstance(result.model.depthwise, nn.Conv2d)


class _VolumeNet(nn.Module):
    """A 3-D conv net with a transposed conv and a small Linear head: the transposed conv is not a candidate."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv3d(1, 8, 3, padding=1), nn.Conv3d(8, 16, 3, padding=1, stride=2)
        self.up, self.fc = nn.ConvTranspose3d(16, 16, 2, stride=2), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.up(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(x.mean((2, 3, 4)))


def test_torch_layers_autodac_does_not_factorise_are_named_by_type_and_blamed_for_an_unreachable_budget() -> None:
    model, x = _VolumeNet().eval(), torch.randn(1, 1, 4, 8, 8)
    result = autodac.optimize(model, 1.0, example_inputs=x, progress=False)
    assert "up" in result.plan.skipped and not {"c1", "c2"} & set(result.plan.skipped)  # Conv3d layers are candidates
    assert result.plan.skipped["up"] == "ConvTranspose3d is not a layer type autodac factorises (Conv1d, Conv2d, Conv3d, Linear)"
    with pytest.raises(autodac.BudgetError, match=r"but got flops_budget=0.1\. Left as they are: up \(\d+% of the FLOPs\): ConvTranspose3d is not"):
        autodac.optimize(model, 0.1, example_inputs=x, progress=False)


def test_exclude_keeps_layers_dense() -> None:
    result = autodac.optimize(SmallConvNet(), 0.7, example_inputs=torch.randn(2, 3, 8, 8), exclude=("conv[13]",), progress=False)
    assert set(result.plan.skipped) == {"conv1", "conv3"}
    assert "excluded" in result.plan.skipped["conv1"]
    assert set(result.plan.layers) == {"conv2", "fc"}
    assert isinstance(result.model.conv1, nn.Conv2d) and isinstance(result.model.conv3, nn.Conv2d)


def test_exclude_by_a_module_name_keeps_every_layer_in_it_and_a_pattern_that_matches_nothing_is_refused() -> None:
    model = zoo.resnet20()
    x = torch.randn(1, 1, 28, 28)
    result = autodac.optimize(model, 0.7, example_inputs=x, exclude=["layers.3"], progress=False)
    inside = {name for name, m in model.named_modules() if name.startswith("layers.3.") and isinstance(m, nn.Conv2d)}
    assert inside and all(result.plan.skipped.get(name) == "excluded by the caller" for name in inside)
    assert not any(name.startswith("layers.3.") for name in result.plan.layers)
    with pytest.raises(autodac.AutodacError, match=r"each `exclude` pattern must match a Conv/Linear layer .* but 'layer9' matches none of its"):
        autodac.optimize(model, 0.7, example_inputs=x, exclude=["layers.3", "layer9"], progress=False)


def test_missing_example_inputs_warns_and_is_recorded() -> None:
    model = SmallConvNet()
    with pytest.warns(UserWarning, match="no example_inputs given; assumed one input of shape \\[1, 3, 224, 224\\]"):
        result = autodac.optimize(model, 0.5, progress=False)
    assert result.plan.input_assumed
    assert result.plan.input_shapes == [[1, 3, 224, 224]]
    assert autodac.Plan.from_json(result.plan.to_json()).input_assumed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not autodac.optimize(model, 0.5, example_inputs=torch.randn(1, 3, 8, 8), progress=False).plan.input_assumed
    assert not any("example_inputs" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- refusals


BAD_BUDGETS = [
    pytest.param("0.5", "flops_budget='0.5'", id="string"),
    pytest.param(True, "flops_budget=True", id="True"),
    pytest.param(False, "flops_budget=False", id="False"),
    pytest.param(0, "flops_budget=0 ", id="zero"),  # as typed, not as converted (0.0)
    pytest.param(-0.5, "flops_budget=-0.5", id="negative"),
    pytest.param(1.3, "flops_budget=1.3", id="above-one"),
    pytest.param(2, "flops_budget=2 ", id="two"),
    pytest.param(float("nan"), "flops_budget=nan", id="nan"),
    pytest.param(float("inf"), "flops_budget=inf", id="inf"),
    pytest.param(float("-inf"), "flops_budget=-inf", id="-inf"),
    pytest.param(np.float64("nan"), "flops_budget=nan", id="numpy-nan"),
    pytest.param(np.int64(0), "flops_budget=0 ", id="numpy-zero"),
]


@pytest.mark.parametrize("budget, echoed", BAD_BUDGETS)
def test_bad_budget_is_refused(budget: Any, echoed: str) -> None:
    model = SmallConvNet()
    before = _state(model)
    with pytest.raises(autodac.BudgetError) as caught:
        autodac.optimize(model, budget, example_inputs=torch.randn(1, 3, 8, 8), progress=False)
    message = str(caught.value) + " "
    assert "0 < flops_budget <= 1" in message and echoed in message
    _assert_same_state(model, before)


def test_no_budget_is_refused_naming_both() -> None:
    model = SmallConvNet()
    before = _state(model)
    with pytest.raises(autodac.BudgetError, match=r"at least one budget must be given \(flops_budget or latency_budget"):
        autodac.optimize(model, None, example_inputs=torch.randn(1, 3, 8, 8), progress=False)
    _assert_same_state(model, before)


def test_numpy_budget_is_accepted() -> None:
    result = autodac.optimize(SmallConvNet(), np.float32(0.5), example_inputs=torch.randn(1, 3, 8, 8), progress=False)
    assert result.flops_ratio <= 0.5


def test_budget_below_the_reachable_minimum() -> None:
    model = SmallConvNet()
    before = _state(model)
    with pytest.raises(autodac.BudgetError, match=r"`flops_budget >= 0\.\d{4}` must hold.*smallest reachable ratio.*flops_budget=0\.001"):
        autodac.optimize(model, 0.001, example_inputs=torch.randn(1, 3, 8, 8), progress=False)
    _assert_same_state(model, before)


def test_nothing_to_decompose() -> None:
    model = DepthwiseOnlyNet()
    before = _state(model)
    with pytest.raises(autodac.ModelError, match=r"at least one layer that can be decomposed.*depthwise: depthwise conv \(groups=4\): one filter per channel"):
        autodac.optimize(model, 0.5, example_inputs=torch.randn(1, 4, 6, 6), progress=False)
    _assert_same_state(model, before)
    with pytest.raises(autodac.ModelError, match="no Conv1d, Conv2d, Conv3d or Linear layer"):
        autodac.optimize(nn.Sequential(nn.ReLU()), 0.5, progress=False)


def test_inputs_the_model_cannot_run() -> None:
    model = SmallConvNet()
    before = _state(model)
    with pytest.raises(autodac.ModelError, match=r"must run on its example inputs.*\(1, 5, 8, 8\)") as caught:
        autodac.optimize(model, 0.5, example_inputs=torch.randn(1, 5, 8, 8), progress=False)
    assert not isinstance(caught.value, RuntimeError)
    assert isinstance(caught.value.__cause__, RuntimeError)  # the torch error is kept as the cause
    _assert_same_state(model, before)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"example_inputs": ()}, autodac.ModelError, "non-empty tuple of model arguments, but got tuple"),
        ({"example_inputs": {"x": 1}}, autodac.ModelError, "but got dict"),
        ({"methods": ("tucker",)}, autodac.AutodacError, "method='tucker'"),
        ({"methods": ()}, autodac.AutodacError, r"methods=\(\)"),
        ({"seed": "a"}, autodac.AutodacError, r"`seed` must be an integer from 0 to 2\*\*32 - 1 .*, but got seed='a'"),
        ({"seed": -1}, autodac.AutodacError, r"but got seed=-1"),
        ({"timeout": 0}, autodac.AutodacError, r"`timeout` must be None or a positive finite number, but got timeout=0"),
        ({"latency_cache": 5}, autodac.AutodacError, r"`latency_cache` must be True, False, None or a file path, but got int 5"),
        ({"latency_cache": "."}, autodac.AutodacError, r"`latency_cache` must be the path of a file .* but '\.' is a folder"),
        ({"data": [torch.full((4, 3, 8, 8), float("nan"))]}, autodac.AutodacError,
         r"the inputs in `data` must be finite, but batch 0 holds 768 NaN or infinite values"),
        ({"data": [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, -100, 2]))]}, autodac.AutodacError,
         r"class labels must be >= 0 \(class indices\), but batch 0 of `data` holds -100"),
        ({"data": [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 5, 2]))]}, autodac.AutodacError,
         r"class labels must be below the 5 classes the model's outputs score \(dim 1\), but `data` holds label 5"),
    ],
    ids=["empty-inputs", "dict-inputs", "unknown-method", "no-methods", "seed-str", "seed-negative", "timeout-zero", "cache-int", "cache-folder",
         "nan-data", "negative-labels", "labels-beyond-classes"],
)
def test_other_bad_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    model = SmallConvNet()
    before = _state(model)
    kwargs = {"example_inputs": torch.randn(1, 3, 8, 8), **kwargs}
    with pytest.raises(error, match=message):
        autodac.optimize(model, 0.5, progress=False, **kwargs)
    _assert_same_state(model, before)


@pytest.mark.parametrize("where", ["weight", "running_var"])
def test_a_model_with_nan_weights_or_statistics_is_refused_naming_them(where: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    with torch.no_grad():
        (model[3].weight if where == "weight" else model[1].running_var)[0] = float("nan")
    name = "3.weight" if where == "weight" else "1.running_var"
    with pytest.raises(autodac.ModelError, match=f"must be finite, but '{re.escape(name)}' holds"):
        autodac.optimize(model, 0.5, example_inputs=torch.randn(1, 3, 8, 8), progress=False)


def test_ordinary_output_weights_weigh_bit_for_bit_as_they_did_and_extreme_ones_stay_finite() -> None:
    """The overflow guard must not touch ordinary weightings: a division by an odd power of two enters as sqrt(2)."""
    from autodac.factorize.base import out_scale

    def unguarded(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # out_scale as it was before the guard
        w = w.to(like.dtype).clamp_min(0)
        return w.clamp_min(w.mean().clamp_min(torch.finfo(like.dtype).tiny) * 1e-6).sqrt()

    like = torch.zeros(1)
    for seed in range(20):
        w = torch.rand(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 * (seed + 1)
        assert torch.equal(out_scale(w, like), unguarded(w, like))
    extreme = torch.tensor([1e40, 1.0, 1e-3], dtype=torch.float64)
    assert bool(torch.isfinite(out_scale(extreme, like)).all()) and not bool(torch.isfinite(unguarded(extreme, like)).all())


@pytest.mark.parametrize("where, scale", [("filter", 1e-20), ("layer", 1e20)], ids=["dead-filter", "huge-layer"])
@pytest.mark.parametrize("data", [False, True])
def test_weights_far_from_one_plan_within_budget_without_overflow(where: str, scale: float, data: bool) -> None:
    """A filter weight decay left at 1e-20 before a BatchNorm (its output weight gamma^2/|W|^2 ~ 1e40 overflowed
    float32), and a layer of weights near 1e20 (its Gram, energy and input covariances overflowed): eigh and
    Cholesky failed, or NaN errors gave a plan over budget. Exact power-of-two scalings keep them finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        if where == "filter":
            model[0].weight[5] *= scale
        else:
            model[3].weight *= scale
    x = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    kwargs = {"data": [x], "n_trials": 2} if data else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = autodac.optimize(model, 0.5, example_inputs=x[:1], progress=False, **kwargs)
    assert result.flops <= 0.5 * result.original_flops and result.plan.factorized
    assert all(math.isfinite(c.error) for c in result.plan.factorized.values())
    assert bool(torch.isfinite(result.model(x)).all())


def test_a_negative_running_variance_is_refused_naming_it() -> None:
    """Finite, so the finiteness check let it through, and the original (and a data-free plan) output NaN."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    with torch.no_grad():
        model[1].running_var[3] = -1.0
    refused = r"running variances plus eps must be > 0, but '1\.running_var' holds 1 values that are not \(the smallest -1, eps 1e-05\)"
    with pytest.raises(autodac.ModelError, match=refused):
        autodac.optimize(model, 0.5, example_inputs=torch.randn(1, 3, 8, 8), progress=False)
    with torch.no_grad():
        model[1].running_var[3] = -1e-7  # a converted model's rounding: eps keeps its outputs finite
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert autodac.optimize(model, 0.5, example_inputs=torch.randn(1, 3, 8, 8), progress=False).plan.factorized


def test_an_original_whose_outputs_overflow_is_refused_on_the_probe_and_warned_of_on_example_inputs() -> None:
    """A float16 model whose activations overflow output NaN: a probe run crashed in a Cholesky factorisation, a
    data-free plan was returned computing NaN, unsaid. Example inputs may be noise standing for a shape (a model taking
    log(x) makes NaN of it), so there it is warned of; a -inf there (masked logits) is an output, not an overflow."""

    class Masked(nn.Module):
        def __init__(self, fill: float) -> None:
            super().__init__()
            self.net, self.fill = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), fill

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.net(x)
            return torch.cat([out, torch.full_like(out[:, :1], self.fill)], 1)

    x = torch.randn(4, 3, 8, 8)
    for fill in ("nan", "-inf"):  # a probe's divergences from -inf outputs are NaN too: every trial scored 0
        with pytest.raises(autodac.ModelError, match=r"outputs on the probe must be finite to score plans against, but 32 of 288 are"):
            autodac.optimize(Masked(float(fill)).eval(), 0.7, data=[x], n_trials=1, progress=False)
    with pytest.warns(UserWarning, match=r"outputs on example_inputs hold 16 NaN or \+inf values of 144") as caught:
        result = autodac.optimize(Masked(float("nan")).eval(), 0.7, example_inputs=x[:1], progress=False)
    assert any(Path(w.filename).name == Path(__file__).name for w in caught) and any("example_inputs hold 16" in n for n in result.plan.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # -inf on example inputs: an output, not warned of
        assert autodac.optimize(Masked(float("-inf")).eval(), 0.8, example_inputs=x[:1], progress=False).plan.factorized


@pytest.mark.parametrize("shape", [(8, 3, 16, 16), (8, 1, 8, 8)], ids=["other-size", "other-channels"])
def test_apply_refuses_data_of_another_shape_than_the_plan_was_made_at(shape: tuple[int, ...]) -> None:
    data = [torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))]
    model = SmallConvNet()
    result = autodac.optimize(model, 0.5, data=data, n_trials=1, progress=False)
    with pytest.raises(autodac.AutodacError, match=re.escape(
        f"the examples in `data` must have the shape of `plan.input_shapes` (FLOPs are counted and the plan made at plan.input_shapes, "
        f"quality measured on data), but data has examples of shape {shape[1:]} and plan.input_shapes has shape (1, 3, 8, 8)"
    )):
        autodac.apply(model, result.plan, data=[torch.randn(shape)])
    assert torch.equal(autodac.apply(model, result.plan, data=data)(data[0]), result.model(data[0]))


def test_not_a_model() -> None:
    with pytest.raises(autodac.ModelError, match="must be a torch.nn.Module, but got str"):
        autodac.optimize("resnet", 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "layer, shape",
    [(nn.Conv2d(8, 8, 3, padding=1), (1, 8, 8, 8)), (nn.Linear(32, 32), (4, 32))],
    ids=["conv2d", "linear"],
)
def test_a_bare_layer_is_a_model(layer: nn.Module, shape: tuple[int, ...]) -> None:
    """The model may be the layer itself (its dotted name is ``''``); the result is its factorised form."""
    x = torch.randn(shape)
    before = _state(layer)
    result = autodac.optimize(layer, 0.5, example_inputs=x, progress=False)
    assert isinstance(result.model, autodac.FactorizedLayer)
    assert result.flops == count_flops(result.model, (x,)).total <= math.floor(0.5 * count_flops(layer, (x,)).total)
    _assert_same_state(layer, before)
    replayed = autodac.apply(layer, autodac.Plan.from_json(result.plan.to_json()))
    with torch.no_grad():
        assert torch.equal(replayed(x), result.model(x))
