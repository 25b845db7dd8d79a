"""Plans as versioned JSON: exact round trip, exact replay on a fresh model, and refusals that change nothing."""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

import pytest
import torch
from torch import nn

import autodac
from autodac import zoo
from autodac.cost import count_flops, count_params
from autodac.plan import PLAN_VERSION
from autodac.testing import Conv1dNet, LinearHeadNet, SmallConvNet

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], float]] = {
    "small_conv": (lambda: SmallConvNet(seed=0), (2, 3, 8, 8), 0.5),  # plans DAC
    "conv1d": (lambda: Conv1dNet(seed=0), (2, 4, 16), 0.5),  # plans low-rank Conv1d
    "linear_head": (lambda: LinearHeadNet(seed=0), (2, 2, 6, 6), 0.3),  # plans low-rank Linear
    "resnet20": (lambda: zoo.resnet20(), (1, 1, 28, 28), 0.5),  # plans spatial
}


@functools.lru_cache(maxsize=None)
def _optimized(name: str) -> tuple[nn.Module, torch.Tensor, autodac.Result]:
    factory, shape, budget = MODELS[name]
    torch.manual_seed(1)
    model = factory().eval()
    x = torch.randn(shape)
    return model, x, autodac.optimize(model, budget, example_inputs=x, progress=False)


def _fresh_copy(name: str, model: nn.Module) -> nn.Module:
    """A newly built model (other initial weights) loaded with ``model``'s weights."""
    torch.manual_seed(12345)
    fresh = MODELS[name][0]()
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def _structure(model: nn.Module) -> list[tuple[Any, ...]]:
    """Every module's name, type, (method, rank) and own parameter shapes."""
    return [
        (
            name, type(module).__name__, getattr(module, "method", None), getattr(module, "rank", None),
            tuple((p, tuple(t.shape)) for p, t in module.named_parameters(recurse=False)),
        )
        for name, module in model.named_modules()
    ]


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    return {k: v.clone() for k, v in model.state_dict().items()}, _structure(model)


def _assert_unchanged(model: nn.Module, snapshot: tuple[dict[str, torch.Tensor], list]) -> None:
    state, structure = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert _structure(model) == structure


# ----------------------------------------------------------------------------- round trip and replay


@pytest.mark.parametrize("name", MODELS)
def test_json_round_trip_is_exact(name: str) -> None:
    _, _, result = _optimized(name)
    text = result.plan.to_json()
    loaded = autodac.Plan.from_json(text)
    assert loaded == result.plan
    assert loaded.to_json() == text
    data = json.loads(text)
    assert data["_version"] == PLAN_VERSION and data["format"] == "autodac.plan"
    assert data["flops"] == result.flops and data["original_flops"] == result.original_flops


@pytest.mark.parametrize("name", MODELS)
def test_replayed_plan_gives_the_same_model(name: str) -> None:
    model, x, result = _optimized(name)
    assert result.plan.factorized  # the replay has something to rebuild
    fresh = _fresh_copy(name, model)
    replayed = autodac.apply(fresh, autodac.Plan.from_json(result.plan.to_json())).eval()
    assert _structure(replayed) == _structure(result.model)
    with torch.no_grad():
        assert torch.equal(replayed(x), result.model.eval()(x))
    replayed_state, result_state = replayed.state_dict(), result.model.state_dict()
    assert replayed_state.keys() == result_state.keys()
    assert all(torch.equal(replayed_state[k], result_state[k]) for k in result_state)


def test_replay_covers_every_method() -> None:
    methods = {c.method for name in MODELS for c in _optimized(name)[2].plan.factorized.values()}
    assert methods == set(autodac.api.DEFAULT_METHODS) | {"width"}  # and the hidden widths of the models that have them


@pytest.mark.parametrize("name", MODELS)
def test_layer_figures_match_the_built_model(name: str) -> None:
    """Each choice's FLOPs and parameters are those fvcore and torch find in the decomposed model."""
    _, x, result = _optimized(name)
    by_module = count_flops(result.model, (x,)).by_module
    for layer, choice in result.plan.layers.items():
        module = result.model.get_submodule(layer)
        members = [layer, *(choice.sliced or ())]  # a width choice counts the layers it slices too
        assert choice.flops_after == sum(by_module[n] for n in members), layer
        assert choice.params_after == sum(count_params(result.model.get_submodule(n)) for n in members), layer
        if choice.is_dense:
            assert choice.flops_after == choice.flops_before and choice.error == 0.0
        elif choice.method == "width":  # the layer itself, narrowed to the channels kept
            assert module.weight.shape[1] == choice.rank == len(choice.channels)
        else:
            assert isinstance(module, autodac.FactorizedLayer)
            assert (module.method, module.rank) == (choice.method, choice.rank)
    assert result.plan.flops == result.flops


# ----------------------------------------------------------------------------- refusals


def _mutated(result: autodac.Result, change: Callable[[dict], Any]) -> str:
    data = json.loads(result.plan.to_json())
    change(data)
    return json.dumps(data)


def _first_factorized(data: dict) -> str:
    return next(name for name, entry in data["layers"].items() if entry["method"] != "dense")


def _rename_layer(data: dict) -> None:
    name = _first_factorized(data)
    data["layers"]["no_such.layer"] = data["layers"].pop(name)


def _set(field: str, value: Any) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        data["layers"][_first_factorized(data)][field] = value

    return change


def _raise_rank(data: dict) -> None:  # an edit by hand that leaves the layer's FLOPs figures as they were
    entry = data["layers"][_first_factorized(data)]
    entry["rank"] += 1


APPLY_REFUSALS = {
    "rank raised, FLOPs left stale": (
        _raise_rank, r"the model a plan builds must have the FLOPs the plan states, but fvcore counts .* \(fvcore vs plan\): 'conv1' \d+ vs \d+"),
    "missing layer": (_rename_layer, r"'no_such\.layer' must exist in the model"),
    "wrong weight shape": (_set("weight_shape", [7, 7, 3, 3]), r"'conv1' must have the weight shape the plan was made for, \(7, 7, 3, 3\)"),
    "rank too high": (_set("rank", 10_000), r"layer 'conv1'.*1 <= rank <= \d+.*rank=10000"),
    "unknown method": (_set("method", "tucker"), r"layer 'conv1'.*method='tucker'"),
}


@pytest.mark.parametrize("case", APPLY_REFUSALS)
def test_apply_refuses_a_plan_that_does_not_fit(case: str) -> None:
    change, message = APPLY_REFUSALS[case]
    model, _, result = _optimized("small_conv")
    assert _first_factorized(json.loads(result.plan.to_json())) == "conv1"
    plan = autodac.Plan.from_json(_mutated(result, change))
    fresh = _fresh_copy("small_conv", model)
    snapshot = _snapshot(fresh)
    with pytest.raises(autodac.PlanError, match=message):
        autodac.apply(fresh, plan)
    _assert_unchanged(fresh, snapshot)


def test_apply_refuses_a_method_that_does_not_apply_and_a_non_conv_layer() -> None:
    model, _, result = _optimized("small_conv")
    fresh = _fresh_copy("small_conv", model)
    snapshot = _snapshot(fresh)

    def lowrank_to_spatial_on_fc(data: dict) -> None:
        data["layers"]["fc"].update(method="spatial", rank=1)

    with pytest.raises(autodac.PlanError, match=r"layer 'fc'.*'spatial' does not apply"):
        autodac.apply(fresh, autodac.Plan.from_json(_mutated(result, lowrank_to_spatial_on_fc)))

    def point_at_batchnorm(data: dict) -> None:
        data["layers"]["bn1"] = data["layers"].pop("conv1")

    with pytest.raises(autodac.PlanError, match=r"'bn1' must be a Conv1d, Conv2d, Conv3d or Linear, but it is a BatchNorm2d"):
        autodac.apply(fresh, autodac.Plan.from_json(_mutated(result, point_at_batchnorm)))
    _assert_unchanged(fresh, snapshot)


def test_a_refused_layer_leaves_nothing_half_done() -> None:
    """A bad last layer must not leave the earlier, valid layers swapped in the caller's model."""
    model, _, result = _optimized("small_conv")
    fresh = _fresh_copy("small_conv", model)
    snapshot = _snapshot(fresh)

    def break_last(data: dict) -> None:
        data["layers"]["fc"].update(method="lowrank", rank=999)

    with pytest.raises(autodac.PlanError, match="layer 'fc'"):
        autodac.apply(fresh, autodac.Plan.from_json(_mutated(result, break_last)))
    _assert_unchanged(fresh, snapshot)


def _set_top(field: str, value: Any) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        data[field] = value

    return change


def _set_width(field: str, value: Any) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        entry = data["layers"]["conv3"]
        assert entry["method"] == "width" and entry["rank"] == 8 and entry["weight_shape"][1] == 16  # what the cases assume
        entry[field] = value

    return change


LOAD_REFUSALS = {
    "version 4": (_set_top("_version", 4), r"plan versions \[1, 2, 3\], but got _version=4"),
    "version a string": (_set_top("_version", "2"), r"_version='2'"),
    "no version": (lambda d: d.pop("_version"), r"_version=None"),
    "not a plan": (_set_top("format", "other"), r"format='autodac\.plan', but got format='other'"),
    "unknown field": (_set_top("extra", 1), r"may only hold the fields.*'extra'"),
    "rank zero": (_set("rank", 0), r"layer 'conv1'.*rank >= 1.*rank=0"),
    "rank string": (_set("rank", "8"), r"layer 'conv1': `rank` must be an integer >= 1.*rank='8' \(str\)"),
    "rank fraction": (_set("rank", 2.5), r"layer 'conv1': `rank` must be an integer >= 1.*rank=2\.5 \(float\)"),
    "rank bool": (_set("rank", True), r"layer 'conv1': `rank` must be an integer.*rank=True \(bool\)"),
    "missing field": (lambda d: d["layers"]["conv1"].pop("weight_shape"), r"layer 'conv1' must have the fields"),
    "layers not an object": (_set_top("layers", []), r"`layers` must be an object"),
    "bad original_flops": (_set_top("original_flops", "many"), r"`original_flops` must be a positive integer.*original_flops='many'"),
    "original_flops zero": (_set_top("original_flops", 0), r"`original_flops` must be a positive integer.*original_flops=0$"),
    "original_flops negative": (_set_top("original_flops", -1), r"`original_flops` must be a positive integer.*original_flops=-1$"),
    "original_flops fraction": (_set_top("original_flops", 12.7), r"`original_flops` must be a positive integer.*original_flops=12\.7$"),
    "original_flops bool": (_set_top("original_flops", True), r"`original_flops` must be a positive integer.*original_flops=True$"),
    "flops not what the layers imply": (_set_top("flops", 1), r"`flops` must be what its layers imply, original_flops - their savings = \d+, but got flops=1 "),
    "flops negative": (_set_top("flops", -5), r"`flops` must be a non-negative integer.*flops=-5$"),
    "flops a fraction": (_set_top("flops", 0.5), r"`flops` must be a non-negative integer.*flops=0\.5$"),
    "version 1 with structure": (
        _set_top("_version", 1),
        r"a version-1 plan may only hold the fields \[(?![^\]]*'structure')[^\]]*\] \(`structure` came with version 2\), but got _version=1",
    ),
    "sliced a string": (_set_width("sliced", "conv2"), r"layer 'conv3': a width choice's `sliced` must be a non-empty list of distinct module names.*='conv2'"),
    "sliced empty": (_set_width("sliced", []), r"layer 'conv3': a width choice's `sliced` must be a non-empty list.*sliced=\[\]"),
    "sliced not names": (_set_width("sliced", [1, 2]), r"layer 'conv3': a width choice's `sliced` must be.*sliced=\[1, 2\]"),
    "sliced missing": (lambda d: d["layers"]["conv3"].pop("sliced"), r"layer 'conv3': a width choice's `sliced` must be.*sliced=None"),
    "channels missing": (lambda d: d["layers"]["conv3"].pop("channels"), r"layer 'conv3': a width choice's `channels` must be a list.*channels=None"),
    "channel negative": (_set_width("channels", [-1, *range(1, 8)]), r"layer 'conv3': .*`channels` must be a list of distinct channel.*\(-1 is negative\)"),
    "channel repeated": (_set_width("channels", [*range(7), 3]), r"layer 'conv3': .*`channels` must be a list of distinct channel indices.*\(3 is repeated\)"),
    "channel beyond the layer": (
        _set_width("channels", [*range(7), 99]), r"layer 'conv3': .*below the layer's input width weight_shape\[1\]=16, but got channel 99",
    ),
    "width rank not len(channels)": (_set_width("rank", 17), r"layer 'conv3': a width choice's `rank` must equal len\(channels\)=8.*rank=17$"),
    "channels on a dense layer": (
        lambda d: d["layers"]["fc"].update(channels=[0], sliced=["conv3"]), r"layer 'fc': `channels` and `sliced` belong to width choices only.*method='dense'",
    ),
    "input_assumed a word": (_set_top("input_assumed", "no"), r"`input_assumed` must be true or false, but got input_assumed='no'$"),
    "input_assumed a number": (_set_top("input_assumed", 1), r"`input_assumed` must be true or false, but got input_assumed=1$"),
    "notes a string": (_set_top("notes", "abc"), r"`notes` must be a list of strings, but got notes='abc'$"),
    "notes not strings": (_set_top("notes", ["ok", 3]), r"`notes` must be a list of strings, but got notes=\['ok', 3\]$"),
    "budget an unknown kind": (
        _set_top("budget", {"flops": 0.5, "bogus": 1}),
        r"`budget` must be an object \{kind: ratio\} with kinds among \['flops', 'latency', 'params'\].*'bogus'",
    ),
    "budget ratio negative": (_set_top("budget", {"flops": -3}), r"`0 < budget\['flops'\] <= 1` must hold, but got budget\['flops'\]=-3"),
    "budget ratio above 1": (_set_top("budget", {"params": 1.5}), r"`0 < budget\['params'\] <= 1` must hold, but got budget\['params'\]=1\.5"),
    "budget ratio a word": (_set_top("budget", {"latency": "fast"}), r"`budget\['latency'\]` must be a real number.*budget\['latency'\]='fast'"),
    "budget ratio a bool": (_set_top("budget", {"flops": True}), r"`budget\['flops'\]` must be a real number.*budget\['flops'\]=True"),
    "error not finite": (_set("error", float("inf")), r"layer 'conv1'.*`error` must be a finite number >= 0"),
    "error negative": (_set("error", -5), r"layer 'conv1': `error` must be a finite number >= 0 \(a relative output error\), but got -5$"),
    "error a numeral string": (_set("error", "0.1"), r"layer 'conv1': `error` must be a finite number >= 0 .* but got '0\.1'$"),
    "error null": (_set("error", None), r"layer 'conv1': `error` must be a finite number >= 0 .* but got None$"),
    "weight_shape a number": (_set("weight_shape", 5), r"layer 'conv1': `weight_shape` must be a non-empty list of positive integers.*=5$"),
    "weight_shape with a zero": (_set("weight_shape", [8, 0, 3, 3]), r"layer 'conv1': `weight_shape` must be .*positive integers.*\[8, 0, 3, 3\]$"),
    "weight_shape of words": (_set("weight_shape", ["8", "3", "3", "3"]), r"layer 'conv1': `weight_shape` must be .*\['8', '3', '3', '3'\]$"),
    "flops a word": (_set("flops_before", "many"), r"layer 'conv1': `flops_before` must be a non-negative integer, but got flops_before='many'$"),
    "flops a numeral string": (_set("flops_after", "12"), r"layer 'conv1': `flops_after` must be a non-negative integer, but got flops_after='12'$"),
    "flops a fraction in a layer": (_set("flops_before", 3.7), r"layer 'conv1': `flops_before` must be a non-negative integer.*=3\.7$"),
    "params negative": (_set("params_after", -4), r"layer 'conv1': `params_after` must be a non-negative integer.*params_after=-4$"),
    "input_shapes of words": (_set_top("input_shapes", [["1", "3", "8", "8"]]), r"`input_shapes` must be a list of shapes, each a list of positive integers"),
    "input_shapes a fraction": (_set_top("input_shapes", [[1, 3, 8.5, 8]]), r"`input_shapes` must be .*8\.5"),
    "input_shapes flat": (_set_top("input_shapes", [1, 3, 8, 8]), r"`input_shapes` must be a list of shapes.*\[1, 3, 8, 8\]$"),
    "budget a list": (_set_top("budget", [1]), r"`budget` must be an object \{kind: ratio\}.*budget=\[1\]"),
    "metrics not numbers": (_set_top("metrics", {"accuracy": "high"}), r"`metrics`.*must have those types"),
    "notes a number": (_set_top("notes", 5), r"`notes` must be a list of strings, but got notes=5$"),
}


@pytest.mark.parametrize("case", LOAD_REFUSALS)
def test_loading_refuses_a_malformed_plan(case: str) -> None:
    change, message = LOAD_REFUSALS[case]
    _, _, result = _optimized("small_conv")
    with pytest.raises(autodac.PlanError, match=message):
        autodac.Plan.from_json(_mutated(result, change))


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "null", '"a string"'])
def test_loading_refuses_invalid_json(text: str) -> None:
    with pytest.raises(autodac.PlanError, match="JSON|format='autodac.plan'"):
        autodac.Plan.from_json(text)


def test_a_json_value_that_is_not_an_object_is_named_in_the_refusal() -> None:
    with pytest.raises(autodac.PlanError, match=r"format='autodac\.plan', but got a JSON list"):
        autodac.Plan.from_json("[1, 2]")


def test_loading_accepts_what_optimize_writes_and_old_readers_wrote() -> None:
    """The rules refuse nothing a plan ever held: no `flops` (a plan built by hand), an empty budget, an integral float."""
    _, _, result = _optimized("small_conv")
    data = json.loads(result.plan.to_json())
    del data["flops"]
    data.update(budget={}, original_flops=float(data["original_flops"]))
    loaded = autodac.Plan.from_dict(data)
    assert loaded.original_flops == result.plan.original_flops and isinstance(loaded.original_flops, int)
    assert loaded.budget == {} and loaded.layers == result.plan.layers


@pytest.mark.parametrize("given", [None, 5, {"format": "autodac.plan"}])
def test_from_json_refuses_what_is_not_text(given: Any) -> None:
    with pytest.raises(autodac.PlanError, match=rf"a plan's JSON must be given as a str, but got {type(given).__name__}$"):
        autodac.Plan.from_json(given)
    with pytest.raises(autodac.PlanError, match=r"must be UTF-8 text"):
        autodac.Plan.from_json(b'{"format": "\xff"}')


def test_load_refuses_a_file_that_is_not_a_plan_naming_it(tmp_path) -> None:
    missing, folder, binary, broken = tmp_path / "missing.json", tmp_path / "folder", tmp_path / "bad.bin", tmp_path / "broken.json"
    folder.mkdir()
    binary.write_bytes(b"\xff\xfe\x00garbage")
    broken.write_text('{"format": "autodac.plan", "_version": 9}')
    for path, message in [
        (missing, "a plan file must exist, but got path='.*missing.json', which does not"),
        (folder, "a plan file must be readable, but got path='.*folder'"),
        (binary, r"a plan file must be UTF-8 JSON text, but got path='.*bad\.bin', which is not \(invalid start byte at byte 0\)"),
        (broken, r"plan file '.*broken\.json': this autodac reads plan versions \[1, 2, 3\], but got _version=9"),
    ]:
        with pytest.raises(autodac.PlanError, match=message):
            autodac.Plan.load(path)
        with pytest.raises(autodac.PlanError, match=message):
            autodac.Plan.load(str(path))


def test_apply_refuses_non_plans_and_non_models() -> None:
    model, _, result = _optimized("small_conv")
    with pytest.raises(autodac.PlanError, match="must be an autodac.Plan, but got dict"):
        autodac.apply(model, result.plan.to_dict())  # type: ignore[arg-type]
    with pytest.raises(autodac.ModelError, match="must be a torch.nn.Module, but got str"):
        autodac.apply("model", result.plan)  # type: ignore[arg-type]


def test_apply_returns_a_copy() -> None:
    model, x, result = _optimized("small_conv")
    snapshot = _snapshot(model)
    applied = autodac.apply(model, result.plan)
    assert applied is not model
    _assert_unchanged(model, snapshot)
    assert not {p.data_ptr() for p in applied.parameters()} & {p.data_ptr() for p in model.parameters()}


def test_save_and_load(tmp_path) -> None:
    _, _, result = _optimized("resnet20")
    path = tmp_path / "plan.json"
    result.plan.save(path)
    assert autodac.Plan.load(path) == result.plan


def test_summary_names_every_factorised_layer() -> None:
    _, _, result = _optimized("resnet20")
    text = result.summary()
    assert all(name in text for name in result.plan.factorized)
    assert f"{result.original_flops:,} -> {result.flops:,}" in text and f"{result.flops_ratio:.4f}" in text
