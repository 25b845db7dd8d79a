"""Hidden widths as ranks: the channel math, the chains found by observation, slicing, and plans that use them."""

from __future__ import annotations


import re
import warnings

import pytest
import torch
from torch import nn

import autodac
from autodac.cost import count_flops
from autodac.factorize.channels import order_channels, refit_kept
from autodac.implied import affected_layers, batchnorm_noise
from autodac.testing import InvertedResidualNet, LinearHeadNet, SmallConvNet
from autodac.widths import find_width_units, input_moments, slice_unit


def _moments(x: torch.Tensor) -> torch.Tensor:
    z = torch.cat([x, torch.ones(x.shape[0], 1)], 1).double()
    return z.T @ z / x.shape[0]


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_greedy_errors_are_the_refit_errors_and_fall_to_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(4000, 10, generator=generator) @ torch.randn(10, 10, generator=generator) + 0.7)
    weight = torch.randn(6, 10, generator=generator).double()
    moments = _moments(x)
    order = order_channels(weight, moments)
    assert sorted(order.order.tolist()) == list(range(10))
    assert torch.all(order.errors[1:] <= order.errors[:-1] + 1e-12)
    assert order.errors[-1] == 0
    reference = x.double() @ weight.T
    spread = (reference - reference.mean(0)).pow(2).sum()
    for width in (1, 4, 9):
        kept = order.order[:width]
        fitted, bias = refit_kept(weight, moments, kept, damping=0.0)
        error = (reference - (x.double()[:, kept] @ fitted.T + bias)).pow(2).sum() / spread
        assert float(error) == pytest.approx(float(order.errors[width - 1]), rel=1e-6, abs=1e-9)
    # the first channel kept is the best single channel
    singles = []
    for j in range(10):
        fitted, bias = refit_kept(weight, moments, torch.tensor([j]), damping=0.0)
        singles.append(float((reference - (x.double()[:, [j]] @ fitted.T + bias)).pow(2).sum()))
    assert int(order.order[0]) == min(range(10), key=singles.__getitem__)


def test_keeping_every_channel_gives_the_weight_back() -> None:
    x = torch.randn(500, 7)
    weight = torch.randn(5, 7, 1, 1)
    fitted, bias = refit_kept(weight, _moments(x), torch.arange(7))
    assert torch.allclose(fitted, weight, atol=1e-5)
    assert torch.allclose(bias, torch.zeros(5), atol=1e-5)


@pytest.mark.parametrize("functional", [False, True], ids=["module-activations", "functional-activations"])
def test_inverted_residual_chains_are_found_and_residual_sums_are_not(functional: bool) -> None:
    model = InvertedResidualNet(functional=functional).eval()
    units = find_width_units(model, (torch.randn(2, 3, 32, 32),), _layers(model))
    assert units["blocks.1.project"].producer == "blocks.1.expand"
    assert units["blocks.1.project"].chain == ("blocks.1.bn0", "blocks.1.depthwise", "blocks.1.bn1")
    # block 1 adds its input to its output: slicing blocks.1.project's outputs would misalign the sum
    assert "blocks.2.expand" not in units
    assert units["classifier"].producer == "head"  # through F.relu6 and a spatial mean: still channel by channel


def test_a_chain_read_elsewhere_is_not_a_unit() -> None:
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand, self.bn, self.project = nn.Conv2d(4, 12, 1), nn.BatchNorm2d(12), nn.Conv2d(12, 4, 1)

        def forward(self, x):
            hidden = torch.relu(self.bn(self.expand(x)))
            return self.project(hidden) + hidden.mean(1, keepdim=True)  # the hidden width is read by another path

    model = Leaky().eval()
    assert find_width_units(model, (torch.randn(2, 4, 8, 8),), ["project"]) == {}


def test_a_channel_mixing_op_in_between_is_not_a_unit() -> None:
    class Shuffled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand, self.project = nn.Conv2d(4, 12, 1), nn.Conv2d(12, 4, 1)

        def forward(self, x):
            h = self.expand(x)
            h = h.reshape(h.shape[0], 3, 4, *h.shape[2:]).transpose(1, 2).reshape_as(h)  # channel shuffle
            return self.project(torch.relu(h))

    model = Shuffled().eval()
    assert find_width_units(model, (torch.randn(2, 4, 8, 8),), ["project"]) == {}


@pytest.mark.parametrize("norm", ["pixel", "normalize", "layer_norm"])
def test_a_parameter_free_norm_over_channels_in_between_is_not_a_unit(norm: str) -> None:
    """Such a norm takes any number of channels in any order, so slicing runs cleanly; but it mixes them:
    dropping one channel changes every kept one, which the width's re-fit assumes it does not."""

    class Normed(nn.Module):
        def __init__(self, normed: bool) -> None:
            super().__init__()
            self.normed = normed
            self.expand, self.bn, self.project = nn.Conv2d(4, 12, 1), nn.BatchNorm2d(12), nn.Conv2d(12, 4, 1)

        def forward(self, x):
            h = torch.relu(self.bn(self.expand(x)))
            if self.normed and norm == "pixel":
                h = h / torch.sqrt(h.pow(2).mean(1, keepdim=True) + 1e-3)
            elif self.normed and norm == "normalize":
                h = torch.nn.functional.normalize(h, dim=1)
            elif self.normed:
                h = torch.nn.functional.layer_norm(h.movedim(1, -1), (h.shape[1],)).movedim(-1, 1)
            return self.project(h)

    x = (torch.randn(2, 4, 8, 8),)
    assert set(find_width_units(Normed(False).eval(), x, ["project"])) == {"project"}  # the same block without the norm is one
    assert find_width_units(Normed(True).eval(), x, ["project"]) == {}


def test_sliced_unit_costs_what_the_plan_says_and_is_exact_at_full_width() -> None:
    model = InvertedResidualNet().eval()
    x = torch.randn(2, 3, 32, 32)
    unit = find_width_units(model, (x,), ["blocks.1.project"])["blocks.1.project"]
    weight = model.get_submodule(unit.consumer).weight
    full = torch.arange(unit.channels)
    exact = autodac.surgery.replace_layers(model, slice_unit(model, unit, full, weight, torch.zeros(weight.shape[0])))
    with torch.no_grad():
        assert torch.allclose(exact(x), model(x), atol=1e-5)
    before = count_flops(model, (x,)).by_module
    behind = sum(before[n] for n in (unit.consumer, unit.producer, *unit.chain))
    kept = torch.arange(0, unit.channels, 3)
    narrow = autodac.surgery.replace_layers(model, slice_unit(model, unit, kept, weight[:, kept], torch.zeros(weight.shape[0])))
    after = count_flops(narrow, (x,)).by_module
    assert sum(after[n] for n in (unit.consumer, unit.producer, *unit.chain)) == behind // unit.channels * len(kept)


def test_implied_noise_matches_the_batchnorm_and_spares_the_stem() -> None:
    model = InvertedResidualNet().eval()
    x = torch.zeros(64, 3, 16, 16)
    seen = {}
    with batchnorm_noise(model, seed=0), torch.no_grad():
        model.bn.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))  # after the noise: sees what it made
        model(x)
    out = seen["out"]
    assert torch.allclose(out.mean((0, 2, 3)), model.bn.bias, atol=0.05)
    assert torch.allclose(out.std((0, 2, 3)), model.bn.weight.abs(), rtol=0.05)
    layers = {n: model.get_submodule(n) for n in ("stem", "blocks.0.expand", "classifier")}
    assert affected_layers(model, layers, (x[:1],)) == {"blocks.0.expand", "classifier"}


def test_data_free_plan_uses_widths_holds_the_budget_and_replays() -> None:
    model = InvertedResidualNet().eval()
    x = torch.randn(1, 3, 32, 32)
    result = autodac.optimize(model, 0.6, example_inputs=x, progress=False)
    widths = {n: c for n, c in result.plan.factorized.items() if c.method == "width"}
    assert widths, result.summary()
    assert all(c.fit.startswith("implied") for c in widths.values())
    assert result.flops == result.plan.flops <= int(0.6 * result.original_flops)
    assert result.flops == count_flops(result.model, (x,)).total
    again = autodac.apply(model, autodac.Plan.from_json(result.plan.to_json()))
    with torch.no_grad():
        assert torch.equal(again(x), result.model(x))


def test_probe_plan_with_widths_replays_with_the_same_data() -> None:
    model = InvertedResidualNet().eval()
    data = torch.randn(64, 3, 32, 32)
    result = autodac.optimize(model, 0.6, data=[data], n_trials=2, profile_size=8, sequential_fit=False, progress=False)
    assert any(c.method == "width" and c.fit.startswith("data") for c in result.plan.factorized.values()), result.summary()
    again = autodac.apply(model, autodac.Plan.from_json(result.plan.to_json()), data=[data])
    with torch.no_grad():
        assert torch.equal(again(data[:4]), result.model(data[:4]))


def test_widths_off_leaves_plans_as_before() -> None:
    model = InvertedResidualNet().eval()
    result = autodac.optimize(model, 0.6, example_inputs=torch.randn(1, 3, 32, 32), progress=False, widths=False)
    assert all(c.method != "width" for c in result.plan.layers.values())


def test_chains_through_functional_activations_and_pooling() -> None:
    model = SmallConvNet().eval()  # conv2 -> bn2 -> F.relu -> conv3 -> F.relu -> mean -> fc
    units = find_width_units(model, (torch.randn(1, 3, 16, 16),), _layers(model))
    assert (units["conv3"].producer, units["conv3"].chain) == ("conv2", ("bn2",))
    assert (units["fc"].producer, units["fc"].chain) == ("conv3", ())


def test_moments_are_batch_independent() -> None:
    model = InvertedResidualNet().eval()
    layers = {"blocks.1.project": model.get_submodule("blocks.1.project")}
    data = torch.randn(10, 3, 16, 16)
    a = input_moments(model, layers, data, batch_size=3)["blocks.1.project"]
    b = input_moments(model, layers, data, batch_size=10)["blocks.1.project"]
    assert torch.allclose(a, b, atol=1e-6)
    assert float(a[-1, -1]) == pytest.approx(1.0)



def test_units_are_found_in_train_mode_too() -> None:
    model = InvertedResidualNet()  # train mode: BatchNorms would use batch statistics outside eval
    units = find_width_units(model, (torch.randn(2, 3, 32, 32),), _layers(model))
    assert "blocks.1.project" in units and model.training


def test_a_damaging_data_free_plan_is_flagged_with_the_budget_that_is_not() -> None:
    model = InvertedResidualNet().eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="predicted to damage the model"):
        result = autodac.optimize(model, 0.3, example_inputs=x, progress=False)
    note = next(n for n in result.plan.notes if n.startswith("the plan is predicted to damage"))
    assert "warning: the plan is predicted to damage" in result.summary()
    safe = float(re.search(r"from flops_budget >= (\d\.\d+)", note).group(1))
    assert 0.3 < safe <= 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at the budget the note names, the plan is predicted within the cap: no warning
        calm = autodac.optimize(model, safe, example_inputs=x, progress=False)
    planned = calm.plan.factorized.values()
    assert max(c.error for c in planned) <= 0.5 and sum(c.error for c in planned) <= 0.5


def test_an_excluded_producer_is_never_sliced() -> None:
    model = InvertedResidualNet().eval()
    result = autodac.optimize(model, 0.5, example_inputs=torch.randn(1, 3, 32, 32), exclude=["blocks.1.expand"], progress=False)
    assert all("blocks.1.expand" not in (c.sliced or ()) for c in result.plan.layers.values())
    assert result.model.get_submodule("blocks.1.expand").weight.shape == model.get_submodule("blocks.1.expand").weight.shape


def test_implied_moments_stop_at_a_spatial_pooling() -> None:
    """Independent noise averaged over positions would promise a pooled classifier far too little damage."""
    from autodac.api import _implied_consumers

    model = InvertedResidualNet().eval()
    x = torch.randn(1, 3, 32, 32)
    units = find_width_units(model, (x,), _layers(model))
    implied = _implied_consumers(model, (x,), units)
    assert "blocks.1.project" in implied and "classifier" not in implied
    result = autodac.optimize(model, 0.5, example_inputs=x, progress=False)
    for name, choice in result.plan.layers.items():
        if choice.method == "width":
            assert choice.fit.startswith("implied") == (name in implied), (name, choice.fit)


def _width_plan() -> tuple[nn.Module, torch.Tensor, dict]:
    """SmallConvNet at 0.5, data-free: conv1 factorised, conv3's width slicing conv2 and bn2 (checked)."""
    model, x = SmallConvNet().eval(), torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = autodac.optimize(model, 0.5, example_inputs=x, progress=False).plan.to_dict()
    assert plan["layers"]["conv3"]["method"] == "width" and plan["layers"]["conv3"]["sliced"] == ["conv2", "bn2"]
    assert plan["layers"]["conv1"]["method"] != "dense"
    return model, x, plan


def _as_width(plan: dict, **changes) -> dict:
    return {**plan["layers"]["conv3"], "fit": "plain", **changes}


def _width_on_a_3x3(plan: dict) -> None:
    """conv3's width moved onto conv2 (a 3x3 conv fed by conv1 and bn1)."""
    width = _as_width(plan, weight_shape=[16, 8, 3, 3], rank=4, channels=[0, 1, 2, 3], sliced=["conv1", "bn1"])
    del plan["layers"]["conv3"]
    plan["layers"]["conv2"] = width


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["layers"]["conv3"].update(fit="plain", sliced=["conv2"]),
         r"layer 'conv3': a width must slice the chain that feeds the layer channel by channel, but the plan lists \['conv2'\] "
         r"and its chain is \['conv2', 'bn2'\] in this model"),
        (lambda p: p["layers"].__setitem__("conv2", {**p["layers"]["conv1"], "weight_shape": [16, 8, 3, 3], "fit": "plain"}),
         r"layer 'conv3': a width may slice only layers no other choice changes, but 'conv2' is also factorised"),
        (_width_on_a_3x3,
         r"layer 'conv2': a width choice's layer must be a 1x1 conv or a Linear .* but it is Conv2d with weight shape \(16, 8, 3, 3\)"),
        (lambda p: p["layers"].__setitem__("fc", _as_width(p, weight_shape=[5, 16], rank=4, channels=[0, 1, 2, 3], sliced=["conv3"])),
         r"layer 'fc': a width may slice only layers no other choice changes, but 'conv3' is also factorised"),
        (lambda p: p["layers"].__setitem__("ghost", {**p["layers"]["conv1"], "method": "dense"}),
         r"the plan's layer 'ghost' must exist in the model, but it does not"),
    ],
    ids=["chain-without-its-batchnorm", "producer-also-factorised", "width-on-a-3x3", "width-slicing-a-factorised-layer", "dense-ghost"],
)
def test_apply_refuses_a_width_the_model_cannot_take_instead_of_returning_a_model_that_fails(edit, message) -> None:
    from autodac.plan import Plan

    model, x, plan = _width_plan()
    edited = {**plan, "layers": {k: dict(v) for k, v in plan["layers"].items()}}
    edit(edited)
    edited["flops"] = edited["original_flops"] - sum(c["flops_before"] - c["flops_after"] for c in edited["layers"].values())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(autodac.PlanError, match=message):
        autodac.apply(model, Plan.from_dict(edited))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(autodac.apply(model, Plan.from_dict(plan))(x), autodac.apply(model, Plan.from_dict(plan))(x))


def test_apply_refuses_a_plan_whose_rebuilt_model_does_not_run(monkeypatch) -> None:
    """The last guard: whatever slipped past the rules, a model that fails on the plan's inputs is not returned."""
    import autodac.api as api
    from autodac.plan import Plan

    model, x, plan = _width_plan()
    monkeypatch.setattr(api, "_check_widths", lambda *args: None)  # let a broken chain through the earlier rule
    broken = {**plan, "layers": {k: dict(v) for k, v in plan["layers"].items()}}
    broken["layers"]["conv3"].update(fit="plain", sliced=["conv2"])
    with pytest.raises(autodac.PlanError, match=r"the plan must give a model that runs on its inputs \[\(1, 3, 16, 16\)\], but the rebuilt "
                                                r"model fails: RuntimeError: running_mean should contain"):
        autodac.apply(model, Plan.from_dict(broken))


def test_moments_from_fewer_rows_than_channels_are_not_used_to_order_a_width() -> None:
    # 4 examples give fc2's 64 inputs moments of rank 4: keeping those 4 channels would read as exact
    model = LinearHeadNet(seed=0).eval()
    few, enough = torch.randn(4, 2, 6, 6), torch.randn(80, 2, 6, 6)
    assert "fc2" not in input_moments(model, {"fc2": model.fc2}, few)
    assert input_moments(model, {"fc2": model.fc2}, enough)["fc2"].shape == (65, 65)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = [torch.randn(8, 2, 6, 6)]
        result = autodac.optimize(model, 0.5, data=probe, n_trials=2, progress=False)
    assert any("width(s) ordered by their weights, not the probe (fc2)" in note for note in result.plan.notes)
    choice = result.plan.layers["fc2"]
    assert not choice.fit.removeprefix("seq+").startswith("data")  # and apply replays it without the probe's moments
    rebuilt = autodac.apply(model, result.plan, probe)
    x = torch.randn(3, 2, 6, 6)
    torch.testing.assert_close(rebuilt(x), result.model(x), rtol=0, atol=0)
