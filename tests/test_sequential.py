"""Interaction-aware (sequential) re-fits: the least-squares target, paired covariances, execution order,
lower output error than independent fits, and plans that record and replay the re-fit."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import autodac
from autodac.factorize import get_method, output_matching_weight
from autodac.layers import build_factorized
from autodac.probes import cross_covariances, input_covariances
from autodac.sequential import Refit, execution_order, refit_in_order
from autodac.surgery import replace_layers
from autodac.testing import SharedConvNet, SmallConvNet, seeded

F64 = torch.float64


# ----------------------------------------------------------------------------- the least-squares target


def test_target_is_the_weight_itself_when_inputs_did_not_change() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, generator=generator, dtype=F64)
    rows = torch.randn(500, 36, generator=generator, dtype=F64)
    gram = rows.T @ rows / 500
    assert torch.allclose(output_matching_weight(weight, gram, gram, damping=0.0), weight, atol=1e-9)


def test_target_undoes_a_known_change_of_the_inputs() -> None:
    """Inputs changed by an invertible map ``x_c = A x_o``: the target is ``W A^-1``, which maps ``x_c`` back to ``W x_o``."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 12, generator=generator, dtype=F64)
    original = torch.randn(400, 12, generator=generator, dtype=F64)
    change = torch.eye(12, dtype=F64) + 0.3 * torch.randn(12, 12, generator=generator, dtype=F64)
    changed = original @ change.T
    target = output_matching_weight(weight, original.T @ changed / 400, changed.T @ changed / 400, damping=0.0)
    assert torch.allclose(target, weight @ torch.linalg.inv(change), atol=1e-8)
    assert torch.allclose(changed @ target.T, original @ weight.T, atol=1e-8)


def test_target_is_the_least_squares_solution() -> None:
    """Under a noisy change no weight does better on the data than the target (the normal equations hold)."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 9, generator=generator, dtype=F64)
    original = torch.randn(300, 9, generator=generator, dtype=F64)
    changed = original + 0.5 * torch.randn(300, 9, generator=generator, dtype=F64)
    target = output_matching_weight(weight, original.T @ changed / 300, changed.T @ changed / 300, damping=0.0)

    def error(w: torch.Tensor) -> float:
        return float((original @ weight.T - changed @ w.T).pow(2).sum())

    assert error(target) < error(weight)
    for _ in range(5):
        assert error(target) <= error(target + 1e-3 * torch.randn(4, 9, generator=generator, dtype=F64))


def test_target_keeps_shape_and_dtype() -> None:
    weight = torch.randn(3, 2, 3, 3)
    gram = torch.eye(18, dtype=F64)
    target = output_matching_weight(weight, gram, gram)
    assert target.shape == weight.shape and target.dtype == torch.float32


# ----------------------------------------------------------------------------- paired covariances and order


def test_cross_covariances_of_a_model_with_itself_are_its_input_covariance() -> None:
    """Same positions drawn as ``input_covariances`` draws them (cap in effect), so the pair repeats it exactly."""
    model = SmallConvNet(seed=0).eval()
    x = torch.randn(20, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    cross, gram = cross_covariances(model, copy.deepcopy(model), "conv2", x, max_positions=50)
    expected = input_covariances(model, {"conv2": model.conv2}, x, max_positions=50)["conv2"]
    assert torch.equal(cross, gram) and torch.equal(gram, expected)


def test_cross_covariances_pair_the_original_and_the_changed_inputs() -> None:
    model = SmallConvNet(seed=0).eval()
    changed = replace_layers(model, {"conv1": build_factorized(model.conv1, "dac", 1)})
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    cross, gram = cross_covariances(model, changed, "conv2", x)
    original = input_covariances(model, {"conv2": model.conv2}, x)["conv2"]
    now = input_covariances(changed, {"conv2": changed.conv2}, x)["conv2"]
    assert torch.allclose(gram, now) and not torch.allclose(cross, original) and not torch.allclose(cross, gram)


def test_execution_order_follows_the_forward_pass_and_names_shared_layers() -> None:
    model = SmallConvNet(seed=0)
    order, repeated = execution_order(model, ["fc", "conv3", "conv1"], torch.randn(1, 3, 8, 8))
    assert order == ["conv1", "conv3", "fc"] and repeated == set()
    assert execution_order(SharedConvNet(seed=0), ["conv"], torch.randn(1, 6, 8, 8)) == (["conv"], {"conv"})


# ----------------------------------------------------------------------------- re-fitting a chain


class _Chain(nn.Module):
    """Three 3x3 convs on strongly correlated channels: truncating the first changes what the others see."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1)
        self.conv3 = nn.Conv2d(12, 6, 3, padding=1)
        seeded(self, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def _chain_inputs(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 10, 10, generator=generator)
    return base.repeat(1, 4, 1, 1) + 0.2 * torch.randn(n, 4, 10, 10, generator=generator)


@pytest.mark.parametrize("method", ["lowrank", "dac", "spatial"])
def test_refit_brings_the_output_closer_to_the_original(method: str) -> None:
    """On examples it was not fitted to, the re-fitted chain's output is closer to the original's than
    the chain of independent data-aware fits it started from."""
    model = _Chain().eval()
    fit, check = _chain_inputs(64, 0), _chain_inputs(64, 1)
    names = ["conv1", "conv2", "conv3"]
    rank = 2
    covariances = input_covariances(model, {n: model.get_submodule(n) for n in names}, fit)
    independent = replace_layers(model, {
        n: build_factorized(model.get_submodule(n), method, rank, get_method(method).decompose(model.get_submodule(n).weight, None, covariances[n]))
        for n in names
    })
    refitted, order = refit_in_order(model, independent, {n: Refit(method, rank) for n in names}, fit)
    assert order == names
    with torch.no_grad():
        reference = model(check)
        before = (independent(check) - reference).pow(2).mean().item()
        after = (refitted(check) - reference).pow(2).mean().item()
    assert after < 0.9 * before, (before, after)
    first = [p for p in refitted.conv1.parameters()], [p for p in independent.conv1.parameters()]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*first))  # nothing before the first layer changed


def test_refit_leaves_both_models_alone_and_skips_shared_layers() -> None:
    model = SharedConvNet(seed=0).eval()
    changed = replace_layers(model, {"conv": build_factorized(model.conv, "dac", 1)})
    state = {k: v.clone() for k, v in changed.state_dict().items()}
    refitted, order = refit_in_order(model, changed, {"conv": Refit("dac", 1)}, torch.randn(4, 6, 8, 8))
    assert order == [] and all(torch.equal(v, state[k]) for k, v in refitted.state_dict().items())
    assert refitted is not changed and all(torch.equal(v, state[k]) for k, v in changed.state_dict().items())


# ----------------------------------------------------------------------------- optimize and apply


# the re-fit of factorised layers: hidden widths (which it does not re-fit) are off so the plans factorise
SEARCH = {"probe_size": 96, "profile_size": 16, "n_trials": 2, "progress": False, "widths": False}


def _data(seed: int = 5, n: int = 96) -> list[torch.Tensor]:
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return [x[i : i + 32] for i in range(0, n, 32)]


@functools.lru_cache(maxsize=None)
def _optimized(sequential_fit: bool) -> tuple[nn.Module, autodac.Result]:
    model = SmallConvNet(seed=0).eval()
    return model, autodac.optimize(model, 0.4, data=_data(), sequential_fit=sequential_fit, **SEARCH)


def _fresh_copy(model: nn.Module) -> nn.Module:
    fresh = SmallConvNet(seed=1)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def test_a_kept_refit_is_recorded_and_judged_on_the_held_out_probe() -> None:
    _, result = _optimized(True)
    refitted = [n for n, c in result.plan.factorized.items() if c.fit.startswith("seq+")]
    notes = " ".join(result.plan.notes)
    if refitted:
        assert "re-fitted in execution order" in notes and "probe_before_sequential_fit" in result.plan.metrics
        metrics = result.plan.metrics
        assert metrics["probe_without_bn_reestimate"] >= metrics["probe_before_sequential_fit"] or metrics.get("bn_reestimated")
    else:
        assert "sequential re-fit tried and rejected" in notes
    assert autodac.Plan.from_json(result.plan.to_json()).layers == result.plan.layers


def test_sequential_fit_false_records_no_refit() -> None:
    _, result = _optimized(False)
    assert result.plan.factorized and not any(c.fit.startswith("seq+") for c in result.plan.layers.values())
    assert not any("sequential" in note for note in result.plan.notes)


def test_apply_replays_a_refit_plan_exactly() -> None:
    """A plan whose layers say ``seq+`` (forced on every factorised layer) rebuilds the same model from the same data."""
    model, result = _optimized(False)
    plan = autodac.Plan.from_json(result.plan.to_json())
    forced = autodac.Plan.from_json(plan.to_json().replace('"fit": "data', '"fit": "seq+data'))
    assert all(c.fit.startswith("seq+") for c in forced.factorized.values())
    first = autodac.apply(_fresh_copy(model), forced, data=_data())
    again = autodac.apply(_fresh_copy(model), forced, data=iter(_data()))  # a one-shot iterator is read once
    plain = autodac.apply(_fresh_copy(model), plan, data=_data())
    state, expected, other = first.state_dict(), again.state_dict(), plain.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert any(not torch.equal(state[k], other[k]) for k in state)  # the re-fit changed something
    with pytest.raises(autodac.PlanError, match=r"`data` must be given"):
        autodac.apply(_fresh_copy(model), forced)


def test_apply_rebuilds_the_optimized_model_on_the_shipped_resnet() -> None:
    """On the shipped ResNet-20 at 0.3 the re-fit is kept (checked) and ``apply`` gives ``result.model`` again."""
    from autodac.datasets import fashion_mnist_slice
    from autodac.zoo import pretrained

    x, y = fashion_mnist_slice("train")
    data = [(x[:256], y[:256])]
    result = autodac.optimize(pretrained("resnet20"), 0.3, data=data, n_trials=1, profile_size=16, profile_points=2, progress=False)
    assert any(c.fit.startswith("seq+") for c in result.plan.factorized.values())
    applied = autodac.apply(pretrained("resnet20"), autodac.Plan.from_json(result.plan.to_json()), data=data)
    state, expected = applied.state_dict(), result.model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_a_refit_plan_fit_is_validated() -> None:
    _, result = _optimized(False)
    text = result.plan.to_json()
    with pytest.raises(autodac.PlanError, match=r"optionally after 'seq\+'"):
        autodac.Plan.from_json(text.replace('"fit": "data', '"fit": "seq+seq+data', 1))


def test_the_ridge_pulls_toward_the_original_weight() -> None:
    """With inputs that excite only some directions, the damped target keeps ``W`` in the others."""
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(3, 6, generator=generator, dtype=F64)
    rows = torch.zeros(200, 6, dtype=F64)
    rows[:, :3] = torch.randn(200, 3, generator=generator, dtype=F64)
    gram = rows.T @ rows / 200
    target = output_matching_weight(weight, gram, gram, damping=1e-3)
    assert torch.allclose(target, weight, atol=1e-9)


class _DilatedNet(nn.Module):
    """A dilated 3x3 conv, a 5x1 conv with 'same' padding (reflect) and a 1x1 conv: kernels other than square 3x3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3, padding=2, dilation=2)
        self.conv2 = nn.Conv2d(10, 10, (5, 1), padding="same", padding_mode="reflect")
        self.conv3 = nn.Conv2d(10, 6, 1)
        seeded(self, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def _conv1d_net() -> nn.Module:
    from autodac.testing import Conv1dNet

    return Conv1dNet(seed=0).eval()


def _linear_head_net() -> nn.Module:
    from autodac.testing import LinearHeadNet

    return LinearHeadNet(seed=0).eval()


@pytest.mark.parametrize(
    "build, shape, layers",
    [
        (_conv1d_net, (4, 16), {"conv1": Refit("dac", 1), "conv2": Refit("lowrank", 2), "fc": Refit("lowrank", 1)}),
        (_linear_head_net, (2, 6, 6), {"conv": Refit("spatial", 1), "fc1": Refit("lowrank", 3), "fc2": Refit("lowrank", 2)}),
        (lambda: _DilatedNet().eval(), (3, 9, 9), {"conv1": Refit("dac", 1), "conv2": Refit("dac", 1), "conv3": Refit("lowrank", 2)}),
    ],
    ids=["conv1d", "linear-head", "dilated-and-5x1"],
)
def test_refit_holds_for_other_layer_kinds(build, shape, layers) -> None:
    """Conv1d, Linear, dilation, non-square kernels, 'same' reflect padding: the re-fit runs in order and
    brings the final output closer to the original's on held-out inputs."""
    model = build()
    fit = torch.randn(96, *shape, generator=torch.Generator().manual_seed(12))
    check = torch.randn(64, *shape, generator=torch.Generator().manual_seed(13))
    changed = replace_layers(model, {n: build_factorized(model.get_submodule(n), r.method, r.rank) for n, r in layers.items()})
    refitted, order = refit_in_order(model, changed, layers, fit)
    assert sorted(order) == sorted(layers)
    with torch.no_grad():
        reference = model(check)
        assert (refitted(check) - reference).pow(2).mean() < 0.9 * (changed(check) - reference).pow(2).mean()


def test_refit_is_judged_by_evaluate_when_given() -> None:
    """With a caller's metric (no labels, not classification) the keep-or-reject decision is that metric's."""
    model = SmallConvNet(seed=0).eval()
    calls = []

    def evaluate(candidate: nn.Module) -> float:
        calls.append(1)
        with torch.no_grad():
            return -float((candidate(_data()[0]) - model(_data()[0])).pow(2).mean())

    result = autodac.optimize(model, 0.4, data=_data(), evaluate=evaluate, **SEARCH)
    notes = " ".join(result.plan.notes)
    assert "re-fitted in execution order" in notes or "sequential re-fit tried and rejected" in notes
    assert calls


def test_refit_candidates_rescore_the_search_s_best_plans_after_the_refit() -> None:
    """With ``refit_candidates=3`` the kept plan is the best re-fitted one on the held-out half: never worse
    there than the one-candidate plan, still within budget, recorded, and replayed by ``apply``."""
    model = SmallConvNet(seed=0).eval()
    options = dict(SEARCH, n_trials=6)
    one = autodac.optimize(model, 0.4, data=_data(), **options)
    three = autodac.optimize(model, 0.4, data=_data(), refit_candidates=3, **options)
    assert three.flops_ratio <= 0.4
    notes = " ".join(three.plan.notes)
    assert any(c.fit.startswith("seq+") for c in three.plan.factorized.values())  # on this net and probe the re-fit is kept
    assert "best plans, each re-fitted" in notes
    assert three.metrics["probe_without_bn_reestimate"] >= one.metrics["probe_without_bn_reestimate"] or three.metrics.get("bn_reestimated")
    applied = autodac.apply(_fresh_copy(model), autodac.Plan.from_json(three.plan.to_json()), data=_data())
    state, expected = applied.state_dict(), three.model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    with pytest.raises(autodac.AutodacError, match=r"`refit_candidates >= 1` must hold"):
        autodac.optimize(model, 0.4, data=_data(), refit_candidates=0, **SEARCH)


@pytest.mark.parametrize("impl", ["grouped", "split"])
def test_refit_builds_the_implementation_the_plan_chose(impl: str) -> None:
    from autodac.layers import SplitDepthwise

    model = _Chain().eval()
    layers = {n: Refit("dac", 2, impl) for n in ("conv1", "conv2", "conv3")}
    changed = replace_layers(model, {n: build_factorized(model.get_submodule(n), "dac", 2, impl=impl) for n in layers})
    refitted, order = refit_in_order(model, changed, layers, _chain_inputs(32, 0))
    assert order == list(layers)
    for name in layers:
        layer = refitted.get_submodule(name)
        assert layer.impl == impl and isinstance(layer.depthwise, SplitDepthwise) == (impl == "split")


def test_a_runner_up_that_wins_the_refit_is_counted_as_itself_under_a_params_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # the counts after the re-fit read the search's own selection: a runner-up kept under Params(...) failed the final check
    from autodac import api

    def runner_up_wins(model, pool, plan, candidates, *_args):
        trial, decomposed = pool[-1]
        plan.layers = api._choices(candidates, trial.selection)
        return decomposed, trial

    monkeypatch.setattr(api, "_refit_best", runner_up_wins)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = autodac.optimize(seeded(SmallConvNet(), 0), [autodac.Flops(0.5), autodac.Params(0.6)], data=[x], n_trials=10,
                              refit_candidates=4, progress=False)
    assert result.params_ratio <= 0.6 and result.flops_ratio <= 0.5
    assert result.plan.metrics["params_ratio"] == pytest.approx(result.params_ratio)


def test_refit_candidates_without_the_refit_says_it_did_nothing() -> None:
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = autodac.optimize(SmallConvNet(), 0.6, data=[x], n_trials=2, sequential_fit=False, refit_candidates=3, progress=False)
    assert "refit_candidates=3 had nothing to do: sequential_fit=False re-fits no plan" in result.plan.notes
