"""Plans that know their model: the structure record, its fingerprint, and apply's refusal of another model."""

from __future__ import annotations

import functools
import json
import logging
import warnings

import pytest
import torch
from torch import nn

import autodac
from autodac.cost import count_flops
from autodac.plan import PLAN_VERSION, structure_fingerprint
from autodac.structure import describe_layer, model_layers
from autodac.testing import GroupedConvNet, SmallConvNet, tiny_resnet18, tiny_resnet34

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def _resnet18_plan() -> autodac.Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damage warning at 0.5 on random weights is not what is tested here
        return autodac.optimize(tiny_resnet18(), 0.5, example_inputs=X, progress=False)


def _as_version_1(plan: autodac.Plan) -> autodac.Plan:
    data = plan.to_dict()
    data.pop("structure")
    data["_version"] = 1
    return autodac.Plan.from_dict(data)


def test_the_plan_records_every_layer_dense_ones_too() -> None:
    plan = _resnet18_plan().plan
    model = tiny_resnet18()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert list(plan.structure["layers"]) == names  # every Conv/Linear, in module order
    assert len(plan.factorized) < len(names)  # so layers the plan keeps dense are recorded too
    assert plan.structure["layers"]["fc"] == "Linear(32->10)"
    assert plan.structure["layers"]["layer2.0.downsample.0"] == "Conv2d(4->8, kernel=(1, 1), stride=(2, 2), padding=(0, 0), bias=False)"
    assert plan.structure["fingerprint"] == structure_fingerprint(plan.structure["layers"], [[1, 3, 16, 16]])


def test_descriptions_name_what_fixes_shape_and_cost() -> None:
    assert describe_layer(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, padding_mode="reflect")) == (
        "Conv2d(8->8, kernel=(3, 3), stride=(1, 1), padding=(2, 2), dilation=(2, 2), groups=4, padding_mode='reflect')"
    )
    assert describe_layer(nn.Conv1d(4, 6, 5, padding="same", bias=False)) == "Conv1d(4->6, kernel=(5,), stride=(1,), padding='same', bias=False)"
    assert describe_layer(nn.Linear(5, 3, bias=False)) == "Linear(5->3, bias=False)"
    # a grouped conv that is never a candidate is recorded all the same
    assert model_layers(GroupedConvNet())["grouped"].endswith("groups=2)")


def test_fingerprint_changes_with_any_layer_or_the_input_shape() -> None:
    layers = model_layers(tiny_resnet18())
    base = structure_fingerprint(layers, [[1, 3, 16, 16]])
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 16
    assert structure_fingerprint(dict(layers), [[1, 3, 16, 16]]) == base
    assert structure_fingerprint(layers, [[1, 3, 32, 32]]) != base
    assert structure_fingerprint(model_layers(tiny_resnet18(num_classes=11)), [[1, 3, 16, 16]]) != base
    assert structure_fingerprint(dict(reversed(list(layers.items()))), [[1, 3, 16, 16]]) != base


def test_json_round_trip_keeps_the_structure() -> None:
    plan = _resnet18_plan().plan
    text = plan.to_json()
    data = json.loads(text)
    assert data["_version"] == PLAN_VERSION == 3
    assert set(data["structure"]) == {"fingerprint", "layers"}
    loaded = autodac.Plan.from_json(text)
    assert loaded == plan and loaded.to_json() == text
    assert '"fc": "Linear(32->10)"' in text  # readable: one line a layer


def test_a_resnet18_plan_on_a_resnet34_model_is_refused_naming_the_first_extra_layer() -> None:
    result = _resnet18_plan()
    model = tiny_resnet34()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(autodac.PlanError, match=r"layer 'layer1\.2\.conv1' is in the model but not in the plan.*37 Conv/Linear"):
        autodac.apply(model, result.plan)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_plan_for_a_10_class_head_is_refused_on_a_1000_class_model() -> None:
    plan = _resnet18_plan().plan
    with pytest.raises(autodac.PlanError, match=r"layer 'fc': plan has Linear\(32->10\), model has Linear\(32->1000\)"):
        autodac.apply(tiny_resnet18(num_classes=1000), plan)


def test_a_layer_missing_from_the_model_is_named() -> None:
    plan = _resnet18_plan().plan
    model = tiny_resnet18()
    model.layer4[1].conv2 = nn.Identity()
    with pytest.raises(autodac.PlanError, match=r"layer 'layer4\.1\.conv2' is in the plan but not in the model"):
        autodac.apply(model, plan)


def test_the_same_model_with_other_weights_is_accepted() -> None:
    result = _resnet18_plan()
    applied = autodac.apply(tiny_resnet18(seed=3), result.plan)
    assert count_flops(applied, (X,)).total == result.flops


def test_an_edited_structure_is_refused_on_load() -> None:
    data = _resnet18_plan().plan.to_dict()
    data["structure"]["layers"]["fc"] = "Linear(32->1000)"
    with pytest.raises(autodac.PlanError, match=r"fingerprint must be that of its recorded layers.*edited by hand"):
        autodac.Plan.from_dict(data)
    data["structure"] = {"layers": []}
    with pytest.raises(autodac.PlanError, match=r"`structure` must be an object"):
        autodac.Plan.from_dict(data)


class _VideoHead(nn.Module):
    """A Conv3d body (which plans before Conv3d support did not record) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv3d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3, 4)))


def _as_made_before_conv3d(plan: autodac.Plan, model: nn.Module, version: int) -> autodac.Plan:
    """``plan`` as autodac wrote it before Conv3d layers were candidates: its record names none of them."""
    data = plan.to_dict()
    layers = {name: kind for name, kind in data["structure"]["layers"].items() if not isinstance(model.get_submodule(name), nn.Conv3d)}
    data["structure"] = {"fingerprint": structure_fingerprint(layers, data["input_shapes"]), "layers": layers}
    data["layers"] = {name: entry for name, entry in data["layers"].items() if name in layers}
    data["_version"] = version
    return autodac.Plan.from_dict(data)


def test_a_version_2_plan_of_a_model_with_conv3d_layers_still_applies_and_is_written_back_as_version_2() -> None:
    model, x = _VideoHead(), torch.randn(1, 3, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = autodac.optimize(model, 1.0, example_inputs=x, progress=False).plan
    assert "body" in plan.structure["layers"]
    old = _as_made_before_conv3d(plan, model, 2)
    autodac.apply(model, old)  # the record lists what version 2 traced: the model's Conv3d layers are not held against it
    assert json.loads(old.to_json())["_version"] == 2 and autodac.Plan.from_json(old.to_json()) == old
    with pytest.raises(autodac.PlanError, match="layer 'body' is in the model but not in the plan"):
        autodac.apply(model, _as_made_before_conv3d(plan, model, 3))  # a version-3 record names every Conv3d


def test_a_version_1_plan_loads_and_applies_unchecked_with_a_note(caplog: pytest.LogCaptureFixture) -> None:
    result = _resnet18_plan()
    old = _as_version_1(result.plan)
    assert old.structure is None and old.layers == result.plan.layers
    with pytest.raises(autodac.PlanError, match="may only hold the fields"):  # the record is a version-2 field
        autodac.Plan.from_dict({**result.plan.to_dict(), "_version": 1})
    with caplog.at_level(logging.INFO, logger="autodac"):
        applied = autodac.apply(tiny_resnet18(), old)
    assert "cannot be checked" in caplog.text
    with torch.no_grad():
        assert torch.equal(applied.eval()(X), result.model.eval()(X))
    # what the record prevents by name: the old plan "fits" resnet34 layer by layer; only the count of the built
    # model, whose ratio it misses by far, refuses it
    stated = r"must have the FLOPs the plan states, but fvcore counts [\d,]+ and the plan says [\d,]+ \(ratio 1\.\d+ against 0\.4\d+"
    with pytest.raises(autodac.PlanError, match=stated):
        autodac.apply(tiny_resnet34(), old)


@functools.lru_cache(maxsize=None)
def _resnet34_plan() -> autodac.Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return autodac.optimize(tiny_resnet34(), 0.5, example_inputs=X, progress=False)


def test_compare_names_each_model_when_the_plans_are_for_different_ones() -> None:
    small, large = _resnet18_plan().plan, _resnet34_plan().plan
    rows = {line.split()[0]: line.split()[1:] for line in autodac.compare({"r18": small, "r34": large}).splitlines()[2:]}
    fingerprints = [small.structure["fingerprint"].split(":")[-1][:12], large.structure["fingerprint"].split(":")[-1][:12]]
    assert fingerprints[0] != fingerprints[1] and rows["model"] == ["(structure)", *fingerprints]
    same = autodac.compare({"a": small, "b": small}).splitlines()
    assert not any(line.startswith(("model", "input")) for line in same)  # one model: no such rows


def test_a_plan_applied_to_its_own_result_says_the_model_is_already_decomposed() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = autodac.optimize(SmallConvNet(), 0.5, example_inputs=torch.randn(1, 3, 8, 8), progress=False)
    name = next(n for n, c in result.plan.factorized.items() if c.method != "width")
    with pytest.raises(autodac.PlanError, match=f"not to a decomposed one, but '{name}' is already factorised here"):
        autodac.apply(result.model, result.plan)
