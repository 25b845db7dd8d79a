"""The probe-driven search: exact sensitivity profiles (prefix replay changes nothing), rank sampling and
interpolation, a refinement that never leaves the budget, and ``optimize(data=..., evaluate=...)`` end to end."""

from __future__ import annotations

import copy
import functools
import json
import math
import random
import re
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import autodac
from autodac import zoo
from autodac.cost import count_flops
from autodac.probes import divergence, predict, reestimate_batchnorm, top1_match
from autodac.search.knapsack import LayerOptions, solve
from autodac.search.refine import refine
from autodac.search.sensitivity import interpolate_losses, measure_profile, pick_ranks
from autodac.surgery import replace_layers
from autodac.testing import LinearHeadNet, SmallConvNet, seeded

_BN = nn.modules.batchnorm._BatchNorm


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{buffer}": value.clone()
        for name, module in model.named_modules() if isinstance(module, _BN)
        for buffer, value in module.named_buffers(recurse=False)
    }


# ----------------------------------------------------------------------------- sensitivity profile


class _InplaceResidual(nn.Module):
    """A torchvision-style block: in-place ReLUs and an in-place residual add on a BatchNorm's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        seeded(self, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.head(self.relu(out))


def _inplace_sequential() -> nn.Module:
    return seeded(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 6),
    ), 4)


def _resnet20() -> nn.Module:
    return seeded(zoo.resnet20(), 5)


PROFILE_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], list[tuple[str, list[tuple[str, int]]]]]] = {
    "resnet20": (_resnet20, (8, 1, 28, 28), [
        ("layers.1.conv1", [("dac", 1), ("spatial", 2)]),
        ("layers.3.shortcut.0", [("lowrank", 1), ("lowrank", 4)]),  # runs after its block's convs, on their input
    ]),
    "inplace_sequential": (_inplace_sequential, (8, 3, 8, 8), [
        ("3", [("dac", 1), ("lowrank", 2)]),
        ("9", [("lowrank", 1), ("lowrank", 3)]),
    ]),
    "inplace_residual": (_InplaceResidual, (8, 3, 8, 8), [
        ("conv2", [("dac", 1), ("spatial", 2)]),
        ("head.0", [("lowrank", 1), ("lowrank", 2)]),  # after the in-place add on bn2's replayed output
    ]),
}


class _CountLayerCalls(TorchFunctionMode):
    """Counts conv and linear calls: the work that prefix replay saves."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in ("conv1d", "conv2d", "linear"):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _profile_setup(case: str):
    factory, shape, layers = PROFILE_CASES[case]
    model = factory().eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    reference = predict(model, x)
    rows = [(name, model.get_submodule(name), options) for name, options in layers]

    def build(name: str, method: str, rank: int) -> nn.Module:
        return autodac.decompose_conv(model.get_submodule(name), rank, method)

    def loss(candidate: nn.Module) -> float:  # not tiny, so a stale replay cannot hide in rounding
        return float((predict(candidate, x) - reference).pow(2).sum())

    return model, x, rows, build, loss


def _assert_restored(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, outputs: torch.Tensor) -> None:
    assert _same_state(_state(model), state)
    for module in model.modules():
        assert "forward" not in module.__dict__ and "forward" not in module._modules
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert type(module).forward is module.forward.__func__
    assert torch.equal(predict(model, x), outputs)


@pytest.mark.parametrize("case", list(PROFILE_CASES))
def test_prefix_replay_gives_the_same_losses(case: str) -> None:
    model, x, rows, build, loss = _profile_setup(case)
    state, outputs = _state(model), predict(model, x)
    with _CountLayerCalls() as replayed_calls:
        replayed = measure_profile(model, rows, build, loss, x.shape[0])
    _assert_restored(model, state, x, outputs)
    with _CountLayerCalls() as plain_calls:
        plain = measure_profile(model, rows, build, loss, x.shape[0], max_cache_bytes=0)
    _assert_restored(model, state, x, outputs)
    assert replayed.losses == plain.losses
    assert replayed_calls.calls < plain_calls.calls  # the replay really skipped work
    assert replayed.samples == plain.samples == x.shape[0]
    assert list(replayed.losses) == [name for name, _, _ in rows]
    for name, _, options in rows:
        assert list(replayed.losses[name]) == options


@pytest.mark.parametrize("case", list(PROFILE_CASES))
def test_profile_losses_are_those_of_the_factorised_model(case: str) -> None:
    """Each loss is the loss of a copy of the model with that one layer really replaced (and it is not 0)."""
    model, x, rows, build, loss = _profile_setup(case)
    profile = measure_profile(model, rows, build, loss, x.shape[0])
    for name, _, options in rows:
        measured = [profile.losses[name][option] for option in options]
        for (method, rank), value in zip(options, measured):
            replaced = replace_layers(model, {name: build(name, method, rank)})
            assert value == pytest.approx(loss(replaced), rel=1e-5, abs=1e-9)
        assert all(v > 0 for v in measured) and len(set(measured)) == len(measured)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("fail_at", [1, 2, 4])  # 1: the recording pass; later: mid-profile, patched
@pytest.mark.parametrize("max_cache_bytes", [1 << 30, 0], ids=["replay", "no-replay"])
def test_a_failing_loss_propagates_and_restores_the_model(fail_at: int, max_cache_bytes: int) -> None:
    model, x, rows, build, loss = _profile_setup("inplace_residual")
    state, outputs = _state(model), predict(model, x)
    calls = [0]

    def failing(candidate: nn.Module) -> float:
        calls[0] += 1
        if calls[0] == fail_at:
            raise _Stop
        return loss(candidate)

    with pytest.raises(_Stop):
        measure_profile(model, rows, build, failing, x.shape[0], max_cache_bytes=max_cache_bytes)
    assert calls[0] == fail_at
    _assert_restored(model, state, x, outputs)
    # and the model profiles as before
    assert measure_profile(model, rows, build, loss, x.shape[0]).losses == measure_profile(
        model, rows, build, loss, x.shape[0], max_cache_bytes=0
    ).losses


# ----------------------------------------------------------------------------- rank sampling and interpolation


def _curve(seed: int, count: int, zero_tail: bool) -> np.ndarray:
    """A strictly falling relative error per rank (the last one 0 when ``zero_tail``)."""
    rng = np.random.default_rng(seed)
    errors = np.sort(rng.random(count))[::-1] * 0.9 + 0.05 + np.linspace(1e-3, 0, count)
    if zero_tail:
        errors[-1] = 0.0
    return errors


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("zero_tail", [False, True])
def test_interpolation_is_exact_at_measured_ranks_and_never_rises(seed: int, zero_tail: bool) -> None:
    errors = _curve(seed, 12, zero_tail)
    rng = np.random.default_rng(100 + seed)
    ranks = sorted(rng.choice(np.arange(2, 11), size=3, replace=False).tolist())  # rank 1 and the tail unmeasured
    losses = np.sort(rng.random(3))[::-1] * 2  # falling with rank, as the errors do
    measured = dict(zip(ranks, losses.tolist()))
    curve = interpolate_losses(errors, measured)
    assert curve.shape == errors.shape
    for rank, value in measured.items():
        assert curve[rank - 1] == pytest.approx(value, rel=1e-12)
    assert np.all(np.diff(curve) <= 1e-15) and np.all(curve >= 0)
    if zero_tail:
        assert curve[-1] == 0.0
    # past the largest measured error the loss grows in proportion to the error
    assert curve[0] == pytest.approx(errors[0] * measured[ranks[0]] / errors[ranks[0] - 1], rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_interpolation_of_noisy_measurements_never_rises(seed: int) -> None:
    rng = np.random.default_rng(seed)
    errors = _curve(seed, 10, zero_tail=True)
    measured = {int(r): float(v) for r, v in zip(rng.choice(np.arange(1, 10), 4, replace=False), rng.normal(0.5, 1.0, 4))}
    curve = interpolate_losses(errors, measured)
    assert np.all(np.diff(curve) <= 1e-15) and np.all(curve >= 0) and curve[-1] == 0.0
    # the largest value is the proportional extrapolation of the largest measured loss to the largest error
    assert curve.max() == pytest.approx(max(0.0, *measured.values()) * errors[0] / max(errors[r - 1] for r in measured), rel=1e-12)


def test_interpolation_at_zero_error() -> None:
    errors = np.array([0.5, 0.2, 0.0])
    assert interpolate_losses(errors, {1: 3.0}).tolist() == [3.0, pytest.approx(1.2), 0.0]
    assert interpolate_losses(errors, {1: 0.0}).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("count", [2, 3, 4, 7, 20, 30])
@pytest.mark.parametrize("costs", ["linear", "convex", "plateau"])
def test_pick_ranks(count: int, costs: str) -> None:
    ranks = list(range(1, 21))
    values = {
        "linear": [10 * r for r in ranks],
        "convex": [r * r + 3 for r in ranks],
        "plateau": [min(r, 5) * 7 for r in ranks],  # equal costs: ties
    }[costs]
    chosen = pick_ranks(ranks, values, count)
    assert 1 <= len(chosen) <= count
    assert chosen == sorted(set(chosen)) and set(chosen) <= set(ranks)
    assert chosen[0] == ranks[0]
    assert values[ranks.index(chosen[-1])] == max(values)  # the most expensive rank is measured
    if count >= len(ranks):
        assert chosen == ranks
    if costs == "linear":
        assert len(chosen) == min(count, len(ranks)) and chosen[-1] == ranks[-1]


# ----------------------------------------------------------------------------- refinement stays within budget


def _instance(seed: int) -> tuple[list[LayerOptions], int]:
    """Layers whose option 0 is dense (most expensive, no error), and a budget between the cheapest and the dense cost."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(int(rng.integers(3, 7))):
        dense = int(rng.integers(100, 1000))
        count = int(rng.integers(2, 8))
        costs = np.concatenate([[dense], np.sort(rng.integers(1, dense, count))]).astype(np.int64)
        errors = np.concatenate([[0.0], np.sort(rng.random(count))[::-1]])
        layers.append(LayerOptions(costs, errors))
    low = sum(int(o.costs.min()) for o in layers)
    high = sum(int(o.costs[0]) for o in layers)
    return layers, int(low + (high - low) * rng.uniform(0.1, 0.7))


ADVERSARIES: dict[str, Callable[[list[LayerOptions]], Callable[[tuple[int, ...]], float]]] = {
    "dense": lambda layers: lambda s: float(sum(i == 0 for i in s)),
    "expensive": lambda layers: lambda s: float(sum(int(o.costs[i]) for o, i in zip(layers, s))),
    "random": lambda layers: (lambda rng: lambda s: rng.random())(random.Random(0)),
}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("adversary", list(ADVERSARIES))
def test_refinement_never_leaves_the_budget(seed: int, adversary: str) -> None:
    layers, budget = _instance(seed)
    calls: list[tuple[int, ...]] = []
    value = ADVERSARIES[adversary](layers)

    def evaluate(selection: tuple[int, ...]) -> float:
        calls.append(selection)
        return value(selection)

    result = refine(layers, budget, evaluate, n_trials=8, seed=seed)
    assert len(result.trials) == 8 and [t.number for t in result.trials] == list(range(8))
    for trial in result.trials:
        assert trial.cost == sum(int(o.costs[i]) for o, i in zip(layers, trial.selection)) <= budget
    assert result.trials[0].selection == tuple(solve(layers, budget))  # the plain allocation comes first
    assert result.best in result.trials and result.best.value == max(t.value for t in result.trials)
    assert len(calls) == len(set(calls)) == len({t.selection for t in result.trials})  # each plan evaluated once


def test_refinement_is_seeded() -> None:
    layers, budget = _instance(7)
    evaluate = lambda s: -float(sum(i * (k + 1) for k, i in enumerate(s)))  # noqa: E731
    first = refine(layers, budget, evaluate, n_trials=6, seed=3)
    assert refine(layers, budget, evaluate, n_trials=6, seed=3).trials == first.trials


# ----------------------------------------------------------------------------- optimize with data


BUDGET = 0.5
SEARCH = {"probe_size": 64, "profile_size": 16, "profile_points": 2, "n_trials": 4, "progress": False}


def _trained_small_net() -> nn.Module:
    """SmallConvNet whose BatchNorm statistics come from standard-normal inputs (as if trained on them)."""
    model = SmallConvNet(seed=0)
    reestimate_batchnorm(model, torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(21)))
    return model


def _probe_data(model: nn.Module, labeled: bool, scale: float = 1.0, n: int = 80) -> tuple[torch.Tensor, list[Any]]:
    """``n`` standard-normal inputs times ``scale`` in batches of 16; labels (if any) never the original's top-1."""
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(22)) * scale
    y = (predict(model, x).argmax(1) + 1) % 5
    return x, [(x[i : i + 16], y[i : i + 16]) if labeled else x[i : i + 16] for i in range(0, n, 16)]


@functools.lru_cache(maxsize=None)
def _run(kind: str, scale: float = 1.0, reestimate_bn: bool = True, widths: bool = True):
    """(model, probe inputs, state before, modes before, result); cached so the tests share the work."""
    model = LinearHeadNet(seed=0) if kind == "no_bn" else _trained_small_net()
    if kind == "no_bn":
        x = torch.randn(80, 2, 6, 6, generator=torch.Generator().manual_seed(22))
        data: Any = x
    else:
        x, data = _probe_data(model, labeled=kind == "labeled", scale=scale)
    state, modes = _state(model), [m.training for m in model.modules()]
    result = autodac.optimize(model, BUDGET, data=data, reestimate_bn=reestimate_bn, widths=widths, **SEARCH)
    return model, x, state, modes, result


@pytest.mark.parametrize("head, objective", [(nn.Identity(), "KL of the softmax"), (nn.Sigmoid(), "Bernoulli KL"), (nn.Softmax(1), "already distributions")])
def test_the_search_objective_follows_what_the_outputs_are(head: nn.Module, objective: str) -> None:
    """Scores, a sigmoid's independent probabilities (CREPE) and a softmax's distributions are each compared as what they are."""
    model = nn.Sequential(_trained_small_net(), head).eval()
    _, data = _probe_data(model[0], labeled=False)
    result = autodac.optimize(model, BUDGET, data=data, **SEARCH)
    notes = [note for note in result.plan.notes if note.startswith("probe objective: ")]
    assert len(notes) == 1 and objective in notes[0], result.plan.notes
    assert all(t.value < 0 for t in result.trials)  # minus a divergence: every changed plan is measurably off the original


def _fixed_cost(result: autodac.Result) -> int:
    """FLOPs outside the candidate layers (what no trial can change)."""
    return result.original_flops - sum(c.flops_before for c in result.plan.layers.values())


@pytest.mark.parametrize("kind", ["labeled", "unlabeled", "no_bn"])
def test_budget_holds_with_data(kind: str) -> None:
    model, x, _, _, result = _run(kind)
    original = count_flops(model, (x[:1],)).total
    target = math.floor(BUDGET * original)
    counted = count_flops(result.model, (x[:1],)).total
    assert result.original_flops == original
    assert counted == result.flops == result.plan.flops <= target
    assert result.plan.input_shapes == [[1, *x.shape[1:]]] and not result.plan.input_assumed
    assert all(t.cost + _fixed_cost(result) <= target for t in result.trials)


@pytest.mark.parametrize("kind", ["labeled", "unlabeled", "no_bn"])
def test_callers_model_is_untouched_with_data(kind: str) -> None:
    model, _, state, modes, result = _run(kind)
    assert _same_state(_state(model), state)
    assert [m.training for m in model.modules()] == modes
    assert result.model is not model


@pytest.mark.parametrize("kind", ["labeled", "unlabeled", "no_bn"])
def test_metrics_are_reported(kind: str) -> None:
    _, _, _, _, result = _run(kind)
    metrics = result.metrics
    expected = {"probe_original", "probe_without_bn_reestimate", "probe", "probe_examples"}
    if kind != "no_bn":
        expected.add("probe_with_bn_reestimate")
    kept = any("re-estimated on the probe (kept" in note for note in result.plan.notes)
    if kept:
        expected.add("bn_reestimated")  # so that apply(model, plan, data) redoes it
    assert set(metrics) == expected
    assert metrics["probe_examples"] == 64.0  # the cap, not the 80 examples given
    assert all(0.0 <= metrics[k] <= 1.0 for k in expected - {"probe_examples"})
    assert metrics["probe"] == metrics["probe_with_bn_reestimate" if kept else "probe_without_bn_reestimate"]
    assert result.plan.metrics == metrics
    assert json.loads(result.plan.to_json())["metrics"] == metrics


@pytest.mark.parametrize("kind, metric, original", [("labeled", "top-1 accuracy", 0.0), ("unlabeled", "top-1 agreement", 1.0)])
def test_the_metric_follows_the_labels(kind: str, metric: str, original: float) -> None:
    """With labels the metric is accuracy (the labels here never match the original: 0); without, agreement (1)."""
    _, _, _, _, result = _run(kind)
    assert any(note.startswith(f"probe metric: {metric}") and note.endswith(" on 32 held-out probe examples") for note in result.plan.notes)
    assert result.metrics["probe_original"] == original


@pytest.mark.parametrize("kind", ["labeled", "unlabeled", "no_bn"])
def test_profile_covers_every_candidate(kind: str) -> None:
    _, _, _, _, result = _run(kind)
    profile = result.profile
    assert profile is not None and profile.samples == 16
    # every candidate is profiled, and so is each width unit's producer (its own factorisations are the unit's options)
    producers = {c.sliced[0] for c in result.plan.layers.values() if c.sliced} | {
        name for name, why in result.plan.skipped.items() if "width unit" in why
    }
    assert set(result.plan.layers) <= set(profile.losses) <= set(result.plan.layers) | producers and result.plan.layers
    for name, losses in profile.losses.items():
        assert losses and all(math.isfinite(v) and v >= 0 for v in losses.values())
        assert max(losses.values()) > 0, name  # a factorised layer changes the outputs
        # a few points per layer, spread along its front (a width unit: its widths, and one point for its factorisations)
        assert len(losses) <= SEARCH["profile_points"] + 1


@pytest.mark.parametrize("kind", ["labeled", "unlabeled", "no_bn"])
def test_trials(kind: str) -> None:
    _, _, _, _, result = _run(kind)
    trials = result.trials
    assert len(trials) == SEARCH["n_trials"] and [t.number for t in trials] == list(range(len(trials)))
    best = max(trials, key=lambda t: (t.value, -t.number))
    assert trials[0].value <= best.value
    assert result.flops == _fixed_cost(result) + best.cost  # the plan is the best trial's


def test_seeded_runs_are_identical() -> None:
    model, _, _, _, first = _run("unlabeled")
    _, data = _probe_data(model, labeled=False)
    torch.manual_seed(1234)  # the global RNG must play no part
    second = autodac.optimize(model, BUDGET, data=data, **SEARCH)
    assert json.loads(second.plan.to_json())["layers"] == json.loads(first.plan.to_json())["layers"]
    assert second.trials == first.trials
    assert second.metrics == first.metrics
    assert second.profile.losses == first.profile.losses


def test_reestimate_bn_false_keeps_the_statistics() -> None:
    model, _, _, _, result = _run("unlabeled", reestimate_bn=False, widths=False)  # widths would slice BatchNorms
    assert "probe_with_bn_reestimate" not in result.metrics
    assert result.metrics["probe"] == result.metrics["probe_without_bn_reestimate"]
    assert not any("BatchNorm" in note for note in result.plan.notes)
    assert _same_state(_bn_buffers(result.model), _bn_buffers(model))


@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_bn_reestimation_is_kept_only_when_it_helps(scale: float) -> None:
    """Re-estimating on the calibration half (even probe examples) is kept exactly when it brings the outputs
    on the held-out half (odd examples) closer to the original's without lowering the metric. On inputs 50x larger than those the
    statistics came from, re-estimation normalises the scale away, so it must be (and is) rejected."""
    model, x, _, _, result = _run("unlabeled", scale=scale, widths=False)  # the original statistics must fit the result
    probe = x[:64]
    calibration, held_out = probe[0::2], probe[1::2]
    plain = copy.deepcopy(result.model)
    plain.load_state_dict({**plain.state_dict(), **_bn_buffers(model)})  # the decomposed model, original statistics
    reestimated = reestimate_batchnorm(copy.deepcopy(plain), calibration)
    reference = predict(model, held_out)
    without, with_bn = predict(plain, held_out), predict(reestimated, held_out)
    helps = divergence(with_bn, reference) < divergence(without, reference) and top1_match(
        with_bn, reference.argmax(1)
    ) >= top1_match(without, reference.argmax(1))
    assert result.metrics["probe_without_bn_reestimate"] == top1_match(without, reference.argmax(1))
    assert result.metrics["probe_with_bn_reestimate"] == top1_match(with_bn, reference.argmax(1))
    note = next(note for note in result.plan.notes if "BatchNorm" in note)
    if helps:
        assert "kept" in note
        assert _same_state(_bn_buffers(result.model), _bn_buffers(reestimated))
    else:
        assert "rejected" in note
        assert _same_state(_bn_buffers(result.model), _bn_buffers(model))
    if scale == 50.0:
        assert not helps
        assert divergence(with_bn, reference) > 2 * divergence(without, reference)


def test_a_probe_of_one_example_is_refused() -> None:
    model = _trained_small_net()
    state = _state(model)
    with pytest.raises(autodac.AutodacError, match="at least 2 examples.*held 1"):
        autodac.optimize(model, BUDGET, data=torch.randn(1, 3, 8, 8), **SEARCH)
    assert _same_state(_state(model), state)


# ----------------------------------------------------------------------------- optimize with evaluate


def _counting_evaluate(model: nn.Module, x: torch.Tensor) -> tuple[Callable[[nn.Module], float], list[float]]:
    """``-|outputs - original outputs|`` on ``x``: higher is better, 0 for the original; every value returned is logged."""
    reference = predict(model, x)
    returned: list[float] = []

    def evaluate(candidate: nn.Module) -> float:
        value = -float((predict(candidate, x) - reference).abs().sum())
        returned.append(value)
        return value

    return evaluate, returned


@pytest.mark.parametrize("verbosity", ["WARNING", "ERROR"])
def test_a_failing_evaluate_is_raised_once_without_optuna_s_traceback_or_its_verbosity_lowered(capfd, verbosity) -> None:
    """The search sets optuna's level to WARNING (no line per trial): a caller's ERROR was lowered to it, and a failed
    trial printed optuna's copy of the traceback before autodac raised the same exception."""
    import optuna

    model = _trained_small_net()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(23))
    calls, seen = [0], []

    def evaluate(candidate: nn.Module) -> float:
        calls[0] += 1
        seen.append(optuna.logging.get_verbosity())
        if calls[0] == 3:
            raise ValueError("the caller's metric broke")
        return 0.5

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(getattr(optuna.logging, verbosity))
    try:
        with pytest.raises(ValueError, match="the caller's metric broke"):
            autodac.optimize(model, BUDGET, evaluate=evaluate, example_inputs=x[:1], **{**SEARCH, "n_trials": 4})
        assert set(seen) == {max(getattr(optuna.logging, verbosity), optuna.logging.WARNING)}
        assert optuna.logging.get_verbosity() == getattr(optuna.logging, verbosity)
    finally:
        optuna.logging.set_verbosity(before)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("with_data", [False, True], ids=["no-data", "data"])
def test_evaluate_is_the_metric(with_data: bool) -> None:
    model = _trained_small_net()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(23))
    evaluate, returned = _counting_evaluate(model, x)
    kwargs = {"data": _probe_data(model, labeled=False)[1]} if with_data else {"example_inputs": x[:1]}
    result = autodac.optimize(model, BUDGET, evaluate=evaluate, **{**SEARCH, "n_trials": 3}, **kwargs)
    distinct = len({t.selection for t in result.trials})
    assert len(returned) >= 2 + distinct  # the original, each distinct plan, and the result
    assert result.metrics["probe_original"] == 0.0
    assert result.metrics["probe"] in returned[-2:]  # the result as scored last (plain, or re-estimated when kept)
    assert result.metrics["probe"] == evaluate(result.model) < 0
    assert {t.value for t in result.trials} <= set(returned)
    assert any(note.startswith("probe metric: evaluate(model)") for note in result.plan.notes)
    assert ("probe_with_bn_reestimate" in result.metrics) == with_data  # re-estimation needs probe inputs
    assert result.flops <= math.floor(BUDGET * result.original_flops)


class _DictOutputs(nn.Module):
    """Class scores and an auxiliary map, returned in a dict: the built-in metric cannot read it, ``evaluate`` can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.fc, self.aux = nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32, 10), nn.Conv2d(32, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return {"logits": self.fc(h.mean((2, 3))), "aux": torch.sigmoid(self.aux(h))}


@pytest.mark.parametrize("source", ["data", "synthesize"])
def test_a_model_returning_a_dict_is_planned_on_data_with_evaluate(source: str) -> None:
    torch.manual_seed(0)
    model = _DictOutputs().eval()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    reference = model(x)["logits"]
    state = _state(model)

    def evaluate(candidate: nn.Module) -> float:
        with torch.no_grad():
            return -float((candidate(x)["logits"] - reference).pow(2).mean())

    kwargs = {"data": [x]} if source == "data" else {"synthesize": 8, "example_inputs": x[:1]}
    result = autodac.optimize(model, BUDGET, evaluate=evaluate, **{**SEARCH, "n_trials": 2}, **kwargs)
    assert result.metrics["probe"] == evaluate(result.model) and set(result.model(x)) == {"logits", "aux"}
    assert result.plan.layers and _same_state(_state(model), state)
    with pytest.raises(autodac.AutodacError, match="returns one tensor, but it returned dict; pass evaluate="):
        autodac.optimize(model, BUDGET, **{**SEARCH, "n_trials": 2}, **kwargs)


@pytest.mark.parametrize(
    "value",
    [None, "0.9", float("nan"), float("inf"), True, torch.tensor(0.5), [0.5]],
    ids=["None", "str", "nan", "inf", "bool", "tensor", "list"],
)
def test_evaluate_must_return_a_finite_number(value: Any) -> None:
    model = _trained_small_net()
    state = _state(model)
    with pytest.raises(autodac.AutodacError, match=r"`evaluate\(model\)` must return a finite real number, but returned"):
        autodac.optimize(model, BUDGET, example_inputs=torch.randn(1, 3, 8, 8), evaluate=lambda m: value, **SEARCH)
    assert _same_state(_state(model), state)


def test_evaluate_may_return_a_numpy_number() -> None:
    result = autodac.optimize(
        _trained_small_net(), BUDGET, example_inputs=torch.randn(1, 3, 8, 8), evaluate=lambda m: np.float32(0.25),
        **{**SEARCH, "n_trials": 2},
    )
    assert result.metrics["probe"] == 0.25 and all(t.value == 0.25 for t in result.trials)


@pytest.mark.parametrize("evaluate", [0.5, "accuracy", [len]], ids=["float", "str", "list"])
def test_evaluate_must_be_callable(evaluate: Any) -> None:
    with pytest.raises(autodac.AutodacError, match=f"`evaluate` must be a callable model -> float, but got {type(evaluate).__name__}"):
        autodac.optimize(_trained_small_net(), BUDGET, example_inputs=torch.randn(1, 3, 8, 8), evaluate=evaluate, **SEARCH)


@pytest.mark.parametrize("name", ["probe_size", "profile_size", "profile_points", "n_trials"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "4", None], ids=["0", "-1", "1.5", "True", "str", "None"])
def test_bad_search_sizes_are_refused(name: str, value: Any) -> None:
    model = _trained_small_net()
    state = _state(model)
    with pytest.raises(autodac.AutodacError, match=f"`{name} >= \\d` must hold .* but got {name}={re.escape(repr(value))}$"):
        autodac.optimize(model, BUDGET, data=torch.randn(8, 3, 8, 8), **{**SEARCH, name: value})
    assert _same_state(_state(model), state)


def test_a_probe_size_of_one_is_refused() -> None:
    with pytest.raises(autodac.AutodacError, match="`probe_size >= 2` must hold .* but got probe_size=1$"):
        autodac.optimize(_trained_small_net(), BUDGET, data=torch.randn(8, 3, 8, 8), **{**SEARCH, "probe_size": 1})


@pytest.mark.parametrize("prefers", ["dense", "random"])
def test_no_trial_leaves_the_budget(prefers: str) -> None:
    """An ``evaluate`` that rewards dense layers (or is noise) still only ever sees plans within the budget."""
    model = _trained_small_net()
    x = torch.randn(1, 3, 8, 8)
    rng = random.Random(0)
    seen: list[int] = []

    def evaluate(candidate: nn.Module) -> float:
        seen.append(count_flops(candidate, (x,)).total)
        if prefers == "dense":
            return -float(sum(isinstance(m, autodac.FactorizedLayer) for m in candidate.modules()))
        return rng.random()

    result = autodac.optimize(model, 0.4, example_inputs=x, evaluate=evaluate, **{**SEARCH, "n_trials": 6})
    target = math.floor(0.4 * result.original_flops)
    assert len(result.trials) == 6
    assert all(t.cost + _fixed_cost(result) <= target for t in result.trials)
    assert seen[0] == result.original_flops and all(flops <= target for flops in seen[1:])
    assert count_flops(result.model, (x,)).total == result.flops <= target


class _Denoiser(nn.Module):
    """An image-to-image net: its input plus a correction (a denoiser's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_an_image_to_image_model_is_searched_on_squared_error_and_reported_as_r_squared() -> None:
    """Not a softmax over its colour channels, not the top-1 channel per pixel: the error of the image, and its R^2."""
    from autodac.probes import r_squared

    model = seeded(_Denoiser(), 0).eval()
    x = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    result = autodac.optimize(model, 0.4, data=[x], **SEARCH)
    notes = " ".join(result.plan.notes)
    assert "probe objective: relative squared error" in notes and "probe metric: R^2 of the outputs" in notes
    held_out = x[1::2]
    assert result.metrics["probe_original"] == pytest.approx(1.0)
    assert result.metrics["probe"] == pytest.approx(r_squared(predict(result.model, held_out), predict(model, held_out)), abs=1e-6)
    assert result.metrics["probe"] < 1.0 and all(t.value < 0 for t in result.trials)


def test_output_kind_overrides_what_the_outputs_look_like_and_refuses_what_they_cannot_be() -> None:
    model = _trained_small_net()
    _, data = _probe_data(model, labeled=False)
    state = _state(model)
    result = autodac.optimize(model, BUDGET, data=data, output_kind="values", **SEARCH)
    assert any(n.startswith("probe objective: relative squared error") for n in result.plan.notes)
    assert any(n.startswith("probe metric: R^2") for n in result.plan.notes)
    with pytest.raises(autodac.AutodacError, match=r"output_kind='distribution' needs outputs in \[0, 1\].*range over \["):
        autodac.optimize(model, BUDGET, data=data, output_kind="distribution", **SEARCH)
    with pytest.raises(autodac.AutodacError, match=r"`output_kind` must be one of 'auto', 'scores', .*but got output_kind='logits'"):
        autodac.optimize(model, BUDGET, data=data, output_kind="logits", **SEARCH)
    assert _same_state(_state(model), state)


@pytest.mark.parametrize("pareto", [False, True])
def test_a_shared_search_adds_the_plain_allocation_finished_instead_of_queueing_it(
    pareto: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
) -> None:
    """An SQLite storage has no row locks, so two workers can pop one queued trial and the second fails telling it.

    The shared search must therefore queue nothing: the plain allocation is added as a finished trial.
    """
    import optuna

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a shared search queued a trial")

    monkeypatch.setattr(optuna.Study, "enqueue_trial", refuse)
    layers, budget = _instance(0)
    directions = ["maximize", "minimize"] if pareto else ["maximize"]
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/search.db", directions=directions)
    value = ADVERSARIES[next(iter(ADVERSARIES))](layers)
    minimum = min(sum(int(o.costs.min()) for o in layers), budget) if pareto else None
    result = refine(layers, budget, value, n_trials=4, seed=0, study=study, min_budget=minimum)
    first = study.trials[0]
    assert len(study.trials) == 4 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert tuple(first.user_attrs["selection"]) == tuple(solve(layers, budget)) == result.trials[0].selection
    assert all(v == 1.0 for k, v in first.params.items() if k.startswith("w"))


@pytest.mark.parametrize("reestimate_bn", [False, True])
def test_every_pareto_front_plan_rebuilds_with_apply_the_model_its_trial_scored(reestimate_bn: bool) -> None:
    # front plans lacked the probe's size (apply fitted on every example given) and the re-estimation trials were scored with
    from autodac.api import _ProbeRunner
    from autodac.probes import collect_probe

    g = torch.Generator().manual_seed(0)
    model = SmallConvNet(seed=0).eval()
    data = [torch.randn(64, 3, 8, 8, generator=g) for _ in range(2)]
    result = autodac.optimize(model, 0.6, data=data, probe_size=64, n_trials=6, pareto=True, sequential_fit=False,
                              reestimate_bn=reestimate_bn, progress=False)
    assert result.pareto
    runner = _ProbeRunner(model, collect_probe(data, 64), None)
    for plan in result.pareto:
        assert plan.flops_ratio <= 0.6 and plan.metrics["probe_examples"] == 64
        assert plan.notes[0].startswith(f"a plan of the Pareto front (trial {int(plan.metrics['trial'])})")
        rebuilt = autodac.apply(model, plan, data)
        assert runner.score(rebuilt)[0] == pytest.approx(plan.metrics["probe_objective"], rel=1e-5, abs=1e-7)
