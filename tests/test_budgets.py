"""Budgets as values (Flops, Latency, Params), the parameter budget, and its closed-form counts."""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch
from torch import nn

import autodac
from autodac import zoo
from autodac.api import DEFAULT_METHODS, _build, _choices, _collect, _Factors, _option_params
from autodac.budgets import Budgets, gather
from autodac.cost import count_flops, count_params
from autodac.testing import ConvNeXtLike, DenseNetLike, InvertedResidualNet, ShuffleNetLike, SmallConvNet, VideoNet

MIN_PARAMS = re.compile(r"`params_budget >= (\d\.\d{4})` must hold")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- the values and what optimize accepts


@pytest.mark.parametrize("kind", [autodac.Flops, autodac.Params, autodac.Latency])
@pytest.mark.parametrize("ratio", [0, 1.3, -0.5, float("nan"), "0.5", True])
def test_each_budget_checks_its_ratio(kind, ratio) -> None:
    name = f"{kind.kind}_budget"
    with pytest.raises(autodac.BudgetError, match=re.escape(f"0 < {name} <= 1")) as caught:
        kind(ratio)
    assert f"{name}={ratio!r}" in str(caught.value) or f"{name}={float(ratio)!r}" in str(caught.value)


def test_budgets_are_frozen_values() -> None:
    assert autodac.Params(0.4) == autodac.Params(0.4) and autodac.Params(1).ratio == 1.0
    with pytest.raises(AttributeError):
        autodac.Flops(0.5).ratio = 0.1  # type: ignore[misc]
    assert autodac.Latency(0.7).device is None and autodac.Latency(0.7).runtime is None  # optimize's, else "torch"
    assert gather(autodac.Latency(0.7)).latency.runtime == "torch"


def test_a_latency_runtime_given_twice_must_agree_whichever_it_names() -> None:
    assert gather(autodac.Latency(0.9), runtime="onnxruntime").latency.runtime == "onnxruntime"
    assert gather(autodac.Latency(0.9, runtime="onnxruntime"), runtime="onnxruntime").latency.runtime == "onnxruntime"
    for own, given in (("torch", "onnxruntime"), ("onnxruntime", "torch")):  # "torch" named is not "torch" by default
        with pytest.raises(autodac.BudgetError, match=rf"runtime must be given once, but got runtime='{given}' and Latency"):
            gather(autodac.Latency(0.9, runtime=own), runtime=given)


def test_gather_reads_values_lists_and_shorthands() -> None:
    assert gather(0.5) == Budgets(flops=autodac.Flops(0.5))
    assert gather(autodac.Params(0.4)).ratios() == {"params": 0.4}
    both = gather([autodac.Flops(0.5), autodac.Params(0.4)], latency_budget=0.7, device="cpu")
    assert both.ratios() == {"flops": 0.5, "latency": 0.7, "params": 0.4} and both.latency.device == "cpu"
    assert gather(autodac.Latency(0.7), device="cpu").latency == autodac.Latency(0.7, device="cpu", runtime="torch")


@pytest.mark.parametrize("given, latency, rule", [
    ([autodac.Flops(0.5), autodac.Flops(0.4)], None, "at most one budget of each kind must be given, but got two flops budgets"),
    (autodac.Latency(0.5), 0.7, "two latency budgets"),
    ([], None, "a list of budgets must hold at least one"),
    ([autodac.Flops(0.5), "params"], None, "each budget in a list must be autodac.Flops, autodac.Latency or autodac.Params, but got 'params'"),
    (object(), None, "`flops_budget` must be a real number with 0 < flops_budget <= 1 (or a budget"),
])
def test_malformed_budgets_are_refused_in_one_line(given, latency, rule) -> None:
    model = SmallConvNet()
    before = _state(model)
    with pytest.raises(autodac.BudgetError) as caught:
        autodac.optimize(model, given, latency_budget=latency, example_inputs=torch.randn(1, 3, 8, 8), progress=False)
    assert rule in str(caught.value) and "\n" not in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_latency_value_and_device_that_disagree_are_refused() -> None:
    with pytest.raises(autodac.BudgetError, match="a latency budget's device must be given once"):
        gather(autodac.Latency(0.7, device="cpu"), device="cuda:0")


@pytest.mark.parametrize("where", [{"device": "cuda:0"}, {"runtime": "onnxruntime"}])
def test_a_device_or_runtime_without_a_latency_budget_is_refused_not_ignored(where) -> None:
    model = SmallConvNet()
    before = _state(model)
    with pytest.raises(autodac.BudgetError, match=r"`device` and `runtime` say where a latency budget is timed.*no latency budget"):
        autodac.optimize(model, 0.5, example_inputs=torch.randn(1, 3, 8, 8), progress=False, **where)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert gather(autodac.Latency(0.7), **where).latency is not None  # with one, they time it


def test_flops_as_a_value_plans_as_the_shorthand() -> None:
    x = torch.randn(1, 3, 8, 8)
    by_value = autodac.optimize(SmallConvNet(), autodac.Flops(0.5), example_inputs=x, progress=False).plan
    by_ratio = autodac.optimize(SmallConvNet(), flops_budget=0.5, example_inputs=x, progress=False).plan
    assert by_value.to_dict() == by_ratio.to_dict()


# ----------------------------------------------------------------------------- a budget out of reach, refused early


@pytest.mark.parametrize("factory, shape", [
    (SmallConvNet, (1, 3, 8, 8)), (InvertedResidualNet, (1, 3, 16, 16)), (DenseNetLike, (1, 3, 16, 16)),
    (ConvNeXtLike, (1, 3, 16, 16)), (ShuffleNetLike, (1, 3, 16, 16)), (VideoNet, (1, 3, 4, 16, 16)),
    (zoo.resnet20, (1, 1, 28, 28)),
])
@pytest.mark.parametrize("methods", [("dac",), DEFAULT_METHODS + ("tdac",)])
def test_the_early_floor_is_the_scored_options_floor(factory, shape, methods) -> None:
    """The most FLOPs a plan saves, known from the costs before any statistics, is what the scored options allow
    (widths, their producers' factorisations and layers no option makes cheaper included)."""
    torch.manual_seed(0)
    model, x = factory().eval(), torch.randn(*shape)
    seen: list[tuple[int, dict[str, str]]] = []
    _, candidates, skipped = _collect(model, (x,), methods, (), False, by_module=count_flops(model, (x,)).by_module, notes=[],
                                      check_reach=lambda saved, skipped, narrowed: seen.append((saved, skipped)))
    assert seen and seen[0][0] == sum(c.dense_cost - min(o[2] for o in c.options) for c in candidates) > 0
    assert seen[0][1] == skipped  # the early refusal names the same layers left as they are
    if factory in (InvertedResidualNet, ShuffleNetLike):  # width units (and their producers' options) are in the floor
        assert any(c.unit is not None for c in candidates)


@pytest.mark.parametrize("data", [False, True])
def test_a_budget_out_of_reach_is_refused_before_statistics_or_errors(monkeypatch, data) -> None:
    """Refused from the costs alone: no implied moments, no probe statistics, no SVD (seconds, not a minute, at 224 px)."""
    import autodac.api as api

    def gathered(*args, **kwargs):
        raise AssertionError("statistics or errors computed for a budget out of reach")

    for name in ("_implied_statistics", "_statistics", "reconstruction_errors"):
        monkeypatch.setattr(api, name, gathered)
    x = torch.randn(8, 3, 16, 16)
    kwargs = {"data": [x]} if data else {}
    with pytest.raises(autodac.BudgetError, match=r"`flops_budget >= 0\.\d{4}` must hold.*flops_budget=0\.001"):
        autodac.optimize(InvertedResidualNet().eval(), 0.001, example_inputs=x[:1], progress=False, **kwargs)


# ----------------------------------------------------------------------------- parameter counts in closed form


def _candidates(model: nn.Module, x: torch.Tensor, methods: tuple[str, ...] = DEFAULT_METHODS + ("tdac",)):
    by_module = count_flops(model, (x,)).by_module
    return _collect(model, (x,), methods, (), False, by_module=by_module, notes=[])[1]


class _SpatialConsumerNet(nn.Module):
    """A width unit whose consumer is a 3x3 conv without bias (its width options gain a bias and keep the kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.producer = nn.Conv2d(8, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.consumer = nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.consumer(torch.relu(self.bn(self.producer(torch.relu(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("factory, shape", [
    (SmallConvNet, (1, 3, 8, 8)), (InvertedResidualNet, (1, 3, 16, 16)), (_SpatialConsumerNet, (1, 3, 8, 8)),
])
def test_every_options_parameter_count_equals_the_built_models(factory, shape) -> None:
    """The per-option counts the knapsack sums (widths with their producer and chain too) are what the built model holds."""
    torch.manual_seed(0)
    model = factory().eval()
    candidates = _candidates(model, torch.randn(shape))
    assert any(c.unit is not None for c in candidates)  # widths, with their producer and chain, are among the options
    counts = [_option_params(c) for c in candidates]
    fixed = count_params(model) - sum(int(p[0]) for p in counts)
    factors = _Factors(candidates, model)
    seen = set()
    for i, candidate in enumerate(candidates):
        for j, option in enumerate(candidate.options):
            key = (option[0].split(":")[0], option[1] is None or option[1] % 7 == 1)  # every kind, a spread of ranks
            if j and key in seen and option[1] % 7 != 1:
                continue
            seen.add(key)
            selection = [0] * len(candidates)
            selection[i] = j
            built = _build(model, candidates, selection, factors)
            assert count_params(built) == fixed + sum(int(p[s]) for p, s in zip(counts, selection)), (candidate.layer.name, option[:2])
            saved = sum(c.params_before - c.params_after for c in _choices(candidates, selection).values())
            assert count_params(model) - saved == count_params(built), (candidate.layer.name, option[:2])  # what plans record


# ----------------------------------------------------------------------------- the parameter budget on ResNet-20


@functools.lru_cache(maxsize=None)
def _resnet20(budgets: tuple):
    """(model, input, result) of ResNet-20 under ``budgets``; cached so tests share the work."""
    model = zoo.resnet20()
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deep cuts are flagged as predicted damage: not what these tests are about
        return model, x, autodac.optimize(model, list(budgets), example_inputs=x, progress=False)


def test_resnet20_params_budget_holds_on_the_built_model() -> None:
    model, _, result = _resnet20((autodac.Params(0.4),))
    assert count_params(result.model) == result.params
    assert result.params / count_params(model) <= 0.4
    assert result.params / result.original_params > 0.35  # the budget is spent, not overshot
    assert result.plan.budget == {"params": 0.4}
    saved = sum(c.params_before - c.params_after for c in result.plan.layers.values())
    assert result.original_params - saved == result.params  # the plan's per-layer counts add up to the model's


def test_resnet20_flops_and_params_both_hold() -> None:
    model, x, result = _resnet20((autodac.Flops(0.5), autodac.Params(0.4)))
    assert count_params(result.model) / count_params(model) <= 0.4
    assert count_flops(result.model, (x,)).total / count_flops(model, (x,)).total <= 0.5
    assert result.plan.budget == {"flops": 0.5, "params": 0.4}


def test_unreachable_params_budget_is_refused_with_the_smallest_ratio_which_then_holds() -> None:
    model = zoo.resnet20()
    x = torch.randn(1, 1, 28, 28)
    before = _state(model)
    with pytest.raises(autodac.BudgetError) as caught:
        autodac.optimize(model, autodac.Params(0.01), example_inputs=x, progress=False)
    message = str(caught.value)
    assert "smallest reachable ratio" in message and "params_budget=0.01" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    smallest = float(MIN_PARAMS.search(message).group(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = autodac.optimize(model, autodac.Params(smallest), example_inputs=x, progress=False)
    assert count_params(result.model) / count_params(model) <= smallest


def test_with_a_probe_every_trial_is_within_every_budget() -> None:
    """The Optuna refinement re-solves the knapsack under all budgets: no trial it evaluates breaks one."""
    model = InvertedResidualNet()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = autodac.optimize(model, [autodac.Flops(0.6), autodac.Params(0.5)], data=data, n_trials=4, progress=False)
    assert result.params_ratio <= 0.5 and result.flops_ratio <= 0.6 and len(result.trials) == 4
    x = data[0][0][:1]
    candidates = _candidates(model, x, DEFAULT_METHODS)  # the same candidates optimize planned with (data-free fits do not change options)
    counts = [_option_params(c) for c in candidates]
    fixed = count_params(model) - sum(int(p[0]) for p in counts)
    for trial in result.trials:
        assert len(trial.selection) == len(counts)
        assert fixed + sum(int(p[s]) for p, s in zip(counts, trial.selection)) <= 0.5 * count_params(model)


def test_a_damage_warning_under_a_binding_params_budget_does_not_send_the_user_to_more_flops() -> None:
    # it advised "from flops_budget >= 1.0000", which cannot help while the parameter budget binds
    x = torch.randn(1, 1, 28, 28)
    with pytest.warns(UserWarning, match=r"no FLOPs budget brings both within it: the other budgets \(parameters\) bind, so raise them"):
        autodac.optimize(zoo.pretrained("resnet20"), [autodac.Flops(0.5), autodac.Params(0.3)], example_inputs=x, progress=False)
