"""Latency budgets: every DAC implementation exact, tables cached, measured ratios that meet the budget,
both budgets together, clear refusals, plans that record and replay the implementation chosen."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

import autodac
from autodac import latency as latency_module
from autodac.cost import count_flops
from autodac.errors import AutodacError, BudgetError
from autodac.latency import LatencyCache, LatencyTable, layer_latencies, median_seconds, side_by_side
from autodac.layers import IMPLEMENTATIONS, SplitDepthwise, build_factorized
from autodac.runtimes import get_runtime
from autodac.testing import conv_configs

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths")

CONV_CONFIGS = [c for c in conv_configs() if c.module.weight.dim() > 2 and c.module.weight[0, 0].numel() > 1 and c.module.groups == 1]


@pytest.mark.parametrize("index", range(len(CONV_CONFIGS)), ids=[c.name for c in CONV_CONFIGS])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS["dac"])
def test_every_dac_implementation_is_exact_at_full_rank_and_counts_the_same_flops(index: int, impl: str) -> None:
    config = CONV_CONFIGS[index]
    conv = copy.deepcopy(config.module).double()
    x = torch.randn(config.input_shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
    full = min(conv.weight.shape[0], conv.weight[0, 0].numel())
    layer = build_factorized(conv, "dac", full, impl=impl)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-9, atol=1e-9)
    grouped = build_factorized(conv, "dac", max(1, full - 1), impl="grouped")
    other = build_factorized(conv, "dac", max(1, full - 1), impl=impl)
    with torch.no_grad():
        torch.testing.assert_close(other(x), grouped(x), rtol=1e-9, atol=1e-9)  # same factors, whatever the form
    assert count_flops(other, (x,)).total == count_flops(grouped, (x,)).total
    assert isinstance(other.depthwise, SplitDepthwise) == (impl == "split")


def test_an_unknown_implementation_is_refused() -> None:
    with pytest.raises(AutodacError, match="impl"):
        build_factorized(nn.Conv2d(4, 4, 3), "dac", 2, impl="fast")
    with pytest.raises(AutodacError, match="impl"):
        build_factorized(nn.Conv2d(4, 4, 3), "spatial", 2, impl="split")


class WideNet(nn.Module):
    """Two wide 3x3 convs on a large map: factorising them must pay off on any CPU."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        with torch.no_grad():  # a decaying spectrum, like a trained layer's
            for conv in (self.conv1, self.conv2):
                u = torch.randn(64, 64 * 9, generator=generator)
                conv.weight.copy_((u * torch.logspace(0, -3, 64 * 9)).reshape(64, 64, 3, 3) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


INPUT = torch.randn(1, 64, 48, 48, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def latency_result(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "latency.json"
    model = WideNet().eval()
    state = copy.deepcopy(model.state_dict())
    result = autodac.optimize(model, latency_budget=0.6, example_inputs=INPUT, latency_cache=cache, progress=False)
    return model, state, result, cache


def test_the_measured_latency_ratio_meets_the_budget(latency_result) -> None:
    model, _, result, _ = latency_result
    assert result.latency_ratio is not None and result.latency_ratio <= 0.6
    assert result.plan.budget == {"latency": 0.6}
    assert result.metrics["latency_ms"] < result.metrics["latency_original_ms"]
    # re-measured independently, side by side, the result is still faster than the original
    ratio, _, _ = side_by_side(model, result.model.eval(), (INPUT,), torch.device("cpu"), rounds=9)
    assert ratio < 1.0


def test_the_plan_records_latency_and_implementation_per_layer_and_replays(latency_result) -> None:
    model, state, result, _ = latency_result
    plan = autodac.Plan.from_json(result.plan.to_json())
    assert plan == result.plan
    factorised = plan.factorized
    assert factorised, "a 0.6 latency budget on two wide convs must factorise something"
    for name, choice in plan.layers.items():
        assert choice.latency_before is not None and choice.latency_before > 0
        assert choice.latency_after is not None and choice.latency_after > 0
        if choice.method == "dac":
            assert choice.impl in IMPLEMENTATIONS["dac"]
    rebuilt = autodac.apply(model, plan)
    for name, choice in factorised.items():
        assert rebuilt.get_submodule(name).impl == result.model.get_submodule(name).impl
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(INPUT), result.model.eval()(INPUT))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # the caller's model untouched


def test_a_second_call_reads_the_cache_instead_of_timing_layers_again(latency_result, monkeypatch) -> None:
    model, _, _, cache = latency_result
    entries = json.loads(cache.read_text())
    assert entries and all(v > 0 for v in entries.values())
    timed = []
    original = latency_module.median_seconds

    def counting(run, device, repeats=7, warmup=3):
        timed.append(repeats)
        return original(run, device, repeats, warmup)

    monkeypatch.setattr(latency_module, "median_seconds", counting)
    autodac.optimize(model, latency_budget=0.6, example_inputs=INPUT, latency_cache=cache, progress=False)
    assert len(timed) == 1  # the original model end to end only; every layer option came from the cache


def test_both_budgets_hold_together(tmp_path) -> None:
    model = WideNet().eval()
    result = autodac.optimize(model, 0.3, latency_budget=0.8, example_inputs=INPUT, latency_cache=tmp_path / "c.json", progress=False)
    assert result.flops_ratio <= 0.3
    assert result.latency_ratio <= 0.8
    assert result.plan.budget == {"flops": 0.3, "latency": 0.8}


def test_an_unreachable_latency_budget_is_refused_with_the_best_measured_ratio(tmp_path) -> None:
    model = WideNet().eval()
    with pytest.raises(BudgetError, match=r"latency_budget >= \d\.\d+` must hold .* but got latency_budget=0.001"):
        autodac.optimize(model, latency_budget=0.001, example_inputs=INPUT, latency_cache=tmp_path / "c.json", progress=False)


def _noisy_search(floor_ratio: float):
    """``_meet_latency`` where every plan but the fastest measures 0.9 of the original: noise the attempts cannot beat."""
    from autodac.api import _LATENCY_ATTEMPTS, _meet_latency

    timing = latency_module.LatencyTable(torch.device("cpu"), 1e-3, [[5e-3, 1e-3]], [["dense", "grouped"]])
    floor, capacity = 1_000_000, 10_000_000  # ns: the tables' overshoot steps cannot reach the floor within the attempts
    assert capacity - _LATENCY_ATTEMPTS * int(0.3 * 1e-3 * 1e9 * 1.25) > floor
    timed = []

    def measure(model):
        timed.append(model)
        return (floor_ratio if model == [floor] else 0.9, 1e-3, 1e-3)

    def plan_at(room):
        return [room]

    found = _meet_latency(0.6, capacity, floor, [capacity], [capacity], timing, plan_at=plan_at, build=list, measure=measure)
    return found, timed


def test_a_latency_search_that_runs_out_of_attempts_keeps_the_fastest_plan_when_it_meets_the_budget() -> None:
    (selection, model, measured), timed = _noisy_search(floor_ratio=0.2)
    assert selection == model == [1_000_000] and measured[0] == 0.2  # timed once more at the floor, and kept
    assert timed[-1] == [1_000_000] and timed.count([1_000_000]) == 1


def test_a_latency_search_whose_fastest_plan_misses_is_refused_with_that_ratio() -> None:
    with pytest.raises(BudgetError, match=r"latency_budget >= 0\.700` must hold .* but got latency_budget=0\.6"):
        _noisy_search(floor_ratio=0.7)


@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), "0.5", True])
def test_bad_latency_budgets_are_refused(value) -> None:
    with pytest.raises(BudgetError, match="latency_budget"):
        autodac.optimize(WideNet(), latency_budget=value, example_inputs=INPUT, progress=False)


def test_no_budget_at_all_is_refused() -> None:
    with pytest.raises(BudgetError, match="at least one budget"):
        autodac.optimize(WideNet(), example_inputs=INPUT, progress=False)


@pytest.mark.parametrize("device, match", [
    ("gpu:7", "torch device"), ("cuda:0", "available"),
    # meta computes nothing (every option "took" 0.1 ms); mps/xpu raised torch's own errors
    ("meta", r"latency is timed on a 'cpu' or 'cuda' device, but got device='meta'"), ("mps", "device='mps'"),
])
def test_a_bad_or_missing_device_is_refused(device, match) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(AutodacError, match=match):
        autodac.optimize(WideNet(), latency_budget=0.5, example_inputs=INPUT, device=device, progress=False)


def test_layer_tables_time_every_option_once_and_pick_the_faster_implementation() -> None:
    conv = nn.Conv2d(16, 16, 3, padding=1)
    geometry = autodac.surgery.trace_layers(conv, (torch.randn(2, 16, 20, 20),))[0].geometry
    options = [("dense", None)] + [("dac", r) for r in range(1, 5)]
    built = []

    def build(method, rank, impl):
        built.append((method, rank, impl))
        return build_factorized(conv, method, rank, impl=impl)

    seconds, impls = layer_latencies(conv, geometry, options, build, IMPLEMENTATIONS, torch.device("cpu"), LatencyCache(None, {}))
    assert len(seconds) == len(options) and all(s > 0 for s in seconds)
    assert sorted(built) == sorted((m, r, i) for m, r in options[1:] for i in IMPLEMENTATIONS["dac"])
    assert impls[0] == "" and all(i in IMPLEMENTATIONS["dac"] for i in impls[1:])


def test_median_seconds_is_a_median_of_the_timed_runs() -> None:
    calls = []
    value = median_seconds(lambda: calls.append(1), torch.device("cpu"), repeats=5, warmup=2)
    assert len(calls) == 7 and value >= 0


def test_a_damaged_or_empty_cache_of_autodac_s_own_starts_afresh(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AUTODAC_CACHE_DIR", str(tmp_path))
    for text in ("not json", "{\"k\": {}}", "", b"\xff\xfe binary"):
        (tmp_path / "latency.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        cache = LatencyCache.open(True)
        assert cache.entries == {}
        cache.put("k", 1.5)
        cache.save()
        assert LatencyCache.open(True).entries == {"k": 1.5}
    empty = tmp_path / "empty.json"
    empty.write_text("")  # as mktemp makes one
    assert LatencyCache.open(empty).entries == {}


@pytest.mark.parametrize("text", ["not json", '{"version": 3, "layers": {"conv1": {"method": "dac"}}}', "[1, 2]", b"\x89PNG\xff"])
def test_a_file_of_the_caller_s_that_is_not_a_cache_is_refused_and_left_as_it_is(tmp_path, text) -> None:
    """A plan or notes given as latency_cache were written over with timings once the search was done."""
    path = tmp_path / "plan.json"
    text = text if isinstance(text, bytes) else text.encode()
    path.write_bytes(text)
    with pytest.raises(autodac.AutodacError, match=r"`latency_cache` must name a file of autodac's timings.*plan\.json.*left as it is"):
        autodac.optimize(WideNet(), latency_budget=0.6, example_inputs=INPUT, latency_cache=path, progress=False)
    assert path.read_bytes() == text


def test_a_cache_path_under_home_is_expanded_not_made_as_a_folder_named_tilde(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cache = LatencyCache.open("~/timings/latency.json")
    cache.put("k", 2.0)
    cache.save()
    assert (tmp_path / "home" / "timings" / "latency.json").exists() and not (tmp_path / "~").exists()


def test_tables_show_latency_beside_flops(latency_result) -> None:
    _, _, result, _ = latency_result
    table = result.summary()
    assert "ms before" in table and "impl" in table
    name, choice = next(iter(result.plan.factorized.items()))
    side = autodac.compare({"latency": result.plan})
    ratio = choice.latency_after / choice.latency_before
    assert f"{choice.method} r{choice.rank} ({choice.flops_after / choice.flops_before:.2f}, latency {ratio:.2f})" in side  # a ratio, not ms
    assert "latency_ratio" in side


def test_a_latency_plan_with_data_keeps_its_implementations_through_the_refit(tmp_path) -> None:
    """The sequential re-fit rebuilds each layer in the form the latency table chose; apply replays both."""
    model = WideNet().eval()
    x = torch.randn(32, 64, 48, 48, generator=torch.Generator().manual_seed(2))
    result = autodac.optimize(
        model, latency_budget=0.7, example_inputs=INPUT, data=[x], probe_size=32, profile_size=8, n_trials=2,
        refit_candidates=3, latency_cache=tmp_path / "c.json", progress=False,
    )
    assert result.plan.factorized
    refitted = [n for n, c in result.plan.factorized.items() if c.fit.startswith("seq+")]
    assert refitted or any("sequential re-fit tried and rejected" in n for n in result.plan.notes)
    assert not any("best plans, each re-fitted" in n for n in result.plan.notes)  # a latency plan is never swapped
    for name, choice in result.plan.factorized.items():
        layer = result.model.get_submodule(name)
        assert choice.impl == layer.impl and isinstance(layer.depthwise if choice.method == "dac" else layer, nn.Module)
        if choice.method == "dac":
            assert isinstance(layer.depthwise, SplitDepthwise) == (choice.impl == "split")
    fresh = WideNet().eval()
    fresh.load_state_dict(model.state_dict())  # WideNet's biases are not seeded
    applied = autodac.apply(fresh, autodac.Plan.from_json(result.plan.to_json()), data=[x])
    state, expected = applied.state_dict(), result.model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


# ----------------------------------------------------------------------------- the runtime a budget is timed on

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx and onnxruntime are not installed (pip install 'autodac[deploy]')")


@pytest.fixture(scope="module")
def onnx_result(latency_result):
    _, _, _, cache = latency_result  # the eager tables are in this cache already: onnxruntime must not read them
    model = WideNet().eval()
    eager_keys = set(json.loads(cache.read_text()))
    result = autodac.optimize(model, latency_budget=0.6, runtime="onnxruntime", example_inputs=INPUT, latency_cache=cache, progress=False)
    return model, result, eager_keys, set(json.loads(cache.read_text()))


@needs_onnx
def test_a_float64_model_timed_in_onnxruntime_is_refused_before_any_timing() -> None:
    # onnxruntime's CPU provider has no float64 Conv: the search used to end in its raw NotImplemented error
    with pytest.raises(AutodacError, match=r"runtime='onnxruntime' times float32 models .* parameters are float64; time it with runtime='torch'"):
        autodac.optimize(WideNet().double(), latency_budget=0.8, runtime="onnxruntime", example_inputs=INPUT.double(),
                         latency_cache=False, progress=False)


@needs_onnx
def test_a_budget_timed_in_onnxruntime_holds_when_remeasured_there(onnx_result) -> None:
    model, result, _, _ = onnx_result
    assert result.latency_ratio is not None and result.latency_ratio <= 0.6
    ratio, _, _ = side_by_side(model, result.model.eval(), (INPUT,), torch.device("cpu"), rounds=9, runtime=get_runtime("onnxruntime"))
    assert ratio < 1.0  # re-timed independently in onnxruntime (shared CPUs are too noisy to test the budget itself here)


@needs_onnx
def test_the_plan_records_the_runtime_and_compare_shows_it(onnx_result, latency_result) -> None:
    _, result, _, _ = onnx_result
    import onnxruntime

    plan = autodac.Plan.from_json(result.plan.to_json())
    assert plan.runtime["name"] == "onnxruntime" and plan.runtime["version"] == onnxruntime.__version__
    assert plan == result.plan
    assert latency_result[2].plan.runtime["name"] == "torch"
    table = autodac.compare({"eager": latency_result[2].plan, "onnx": plan})
    row = next(line for line in table.splitlines() if line.startswith("timed on"))
    assert f"torch {torch.__version__}" in row and f"onnxruntime {onnxruntime.__version__}" in row


@needs_onnx
def test_onnxruntime_timings_are_cached_apart_from_eager_ones(onnx_result) -> None:
    _, _, eager_keys, all_keys = onnx_result
    assert eager_keys < all_keys  # new entries were timed, none overwritten
    assert latency_module.device_key(torch.device("cpu")).count("|") == 2  # eager keys unchanged: old caches stay valid
    assert latency_module.device_key(torch.device("cpu"), get_runtime("onnxruntime")).endswith(f"|onnxruntime {get_runtime('onnxruntime').version}")


@needs_onnx
def test_an_unreachable_budget_in_onnxruntime_is_refused_naming_the_runtime_and_the_best_ratio(onnx_result, latency_result) -> None:
    cache = latency_result[3]  # the onnxruntime tables are cached there by now: only the end-to-end checks run
    with pytest.raises(BudgetError, match=r"latency_budget >= \d\.\d+` must hold for this model on cpu .* in onnxruntime .* but got latency_budget=0.001"):
        autodac.optimize(WideNet().eval(), latency_budget=0.001, runtime="onnxruntime", example_inputs=INPUT, latency_cache=cache, progress=False)


def test_plans_without_a_runtime_still_load_and_are_written_as_before() -> None:
    plan = autodac.Plan(layers={}, original_flops=10)
    data = json.loads(plan.to_json())
    assert "runtime" not in data  # a FLOPs plan reads as it did for older autodac versions
    assert autodac.Plan.from_dict(data).runtime == {}
    assert "timed on" not in autodac.compare([plan])


def test_onnxruntime_missing_is_refused_in_one_line_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(AutodacError, match=r"runtime='onnxruntime' needs .*onnxruntime.* not installed: pip install 'autodac\[deploy\]'") as error:
        autodac.optimize(WideNet(), latency_budget=0.6, runtime="onnxruntime", example_inputs=INPUT, progress=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"latency_budget": 0.6, "runtime": "tensorrt"}, r"`runtime` must be one of \['onnxruntime', 'torch'\], but got runtime='tensorrt'"),
        ({"flops_budget": 0.5, "runtime": "onnxruntime"},
         r"`device` and `runtime` say where a latency budget is timed, so they need one .* runtime='onnxruntime' and no latency budget"),
    ],
)
def test_a_runtime_that_cannot_apply_is_refused(kwargs, match) -> None:
    with pytest.raises(AutodacError, match=match):
        autodac.optimize(WideNet(), example_inputs=INPUT, progress=False, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_onnxruntime_timing_on_cuda_is_refused_naming_the_device() -> None:
    with pytest.raises(AutodacError, match=r"device must be 'cpu', but got device='cuda:0'"):
        autodac.optimize(WideNet(), latency_budget=0.6, runtime="onnxruntime", device="cuda:0", example_inputs=INPUT, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_latency_budget_on_cuda_is_met_when_remeasured_on_the_gpu(tmp_path) -> None:
    model = WideNet().eval()
    x = torch.randn(8, 64, 96, 96, generator=torch.Generator().manual_seed(2))
    result = autodac.optimize(model, latency_budget=0.8, device="cuda:0", example_inputs=x, latency_cache=tmp_path / "c.json", progress=False)
    assert result.latency_ratio is not None and result.latency_ratio <= 0.8
    assert "cuda" in result.plan.runtime["device"]
    gpu = torch.device("cuda:0")
    ratio, _, _ = side_by_side(copy.deepcopy(model).to(gpu), copy.deepcopy(result.model).to(gpu).eval(), (x.to(gpu),), gpu, rounds=15)
    assert ratio < 1.0


def test_a_latency_refusal_never_asks_for_a_budget_above_one() -> None:
    from autodac.api import _refuse_latency  # timing noise decides when a real model hits it: the message is checked here

    table = LatencyTable(torch.device("cpu"), 2.5e-3, [[1e-3, 9e-4]], [["", ""]])
    with pytest.raises(BudgetError, match=r"`latency_budget >= 1` must hold .*: no plan measured faster than the original .* measured 1\.009\)"):
        _refuse_latency(0.99, 1.0093, table)
    with pytest.raises(BudgetError, match=r"`latency_budget >= 0\.731` must hold .* \(the best latency ratio measured"):
        _refuse_latency(0.5, 0.7301, table)


def test_a_data_free_latency_plan_is_flagged_once_for_the_plan_it_returns(monkeypatch, tmp_path) -> None:
    import autodac.api as api

    real, seen = api._latency_ratio, []

    def first_plan_misses(original, candidate, inputs, timing):  # the first plan "misses": re-planned tighter, as noise can make it
        ratio, original_seconds, seconds = real(original, candidate, inputs, timing)
        seen.append(ratio)
        return (1.0 if len(seen) == 1 else ratio), original_seconds, seconds

    monkeypatch.setattr(api, "_latency_ratio", first_plan_misses)
    with pytest.warns(UserWarning, match="predicted to damage") as caught:
        result = autodac.optimize(WideNet().eval(), latency_budget=0.6, example_inputs=INPUT, max_layer_error=0.01,
                                  latency_cache=tmp_path / "latency.json", progress=False)
    assert len(seen) >= 2
    summed = sum(c.error for c in result.plan.factorized.values())
    worst = max(c.error for c in result.plan.factorized.values())
    flags = [n for n in result.plan.notes if n.startswith("the plan is predicted to damage")]
    assert flags == [f"the plan is predicted to damage the model: its layers' predicted output errors sum to {summed:.2f} and reach "
                     f"{worst:.2f} in one layer (max_layer_error=0.01 is the most either should be)"]
    assert [str(w.message) for w in caught if "predicted to damage" in str(w.message)] == [f"autodac: {flags[0]}"]


def test_options_the_damage_cap_forbids_stay_forbidden_in_nanoseconds() -> None:
    import numpy as np

    from autodac.api import _UNREACHABLE, _capped, _costed
    from autodac.search.knapsack import LayerOptions

    table = LatencyTable(torch.device("cpu"), 2.5e-3, [[1e-3, 6e-4, 3e-4]], [["", "", ""]])
    scores = [LayerOptions(np.array([900, 500, 200]), np.array([0.0, 0.05, 0.4]))]
    costed = _costed(_capped(scores, 0.1), table)  # the cheapest option's error 0.4 is above the cap
    assert costed[0].costs.tolist() == [1_000_000, 600_000, _UNREACHABLE]


def test_a_latency_budget_plans_hidden_widths_timed_as_whole_units(tmp_path, monkeypatch) -> None:
    """An inverted-residual net's hidden widths are options under a latency budget too, and a width's time is its
    whole unit's (producer, chain and consumer at that width), not the narrowed consumer's alone."""
    from autodac.testing import InvertedResidualNet

    parts_of = {}  # (method, rank) -> the parts timed for it, of every unit
    original = latency_module.layer_latencies

    def spy(module, geometry, options, build, *args, parts=None, **kwargs):
        def recording(method, rank, impl):
            found = parts(method, rank, impl)
            parts_of.setdefault((method, rank), []).append(found)
            return found

        return original(module, geometry, options, build, *args, parts=None if parts is None else recording, **kwargs)

    monkeypatch.setattr(latency_module, "layer_latencies", spy)
    model = InvertedResidualNet().eval()
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    result = autodac.optimize(model, latency_budget=0.75, example_inputs=x, latency_cache=tmp_path / "c.json", progress=False)
    assert result.latency_ratio <= 0.75
    widths = {name: c for name, c in result.plan.factorized.items() if c.method == "width"}
    assert widths, "the hidden widths are the lever of an inverted-residual net"
    cache = LatencyCache.open(tmp_path / "c.json")
    for name, choice in widths.items():
        members = [model.get_submodule(m) for m in (*choice.sliced, name)]  # the caller's; optimize timed its copy's
        dense = next(parts for parts in parts_of[("dense", None)] if torch.equal(parts[-1][0].weight, members[-1].weight))
        assert [repr(module) for module, _ in dense] == [repr(m) for m in members]
        seconds = cache.get(LatencyCache.parts_key(torch.device("cpu"), [(m, torch.float32, shapes) for m, shapes in dense]))
        assert choice.latency_before == pytest.approx(seconds * 1e3)  # producer, chain and consumer, not the consumer alone
    timed_widths = [(rank, parts) for (method, rank), found in parts_of.items() if method == "width" for parts in found]
    assert timed_widths
    for rank, parts in timed_widths:
        (producer, producer_shapes), *rest = parts
        assert (producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels) == rank
        for module, shapes in rest:  # the chain and the consumer read ``rank`` channels
            axis = -1 if isinstance(module, nn.Linear) else 1
            assert all(shape[axis] == rank for shape in shapes)


def test_timing_a_part_leaves_a_training_batchnorm_s_statistics_as_they_were() -> None:
    norm = nn.BatchNorm2d(8).train()
    before = (norm.running_mean.clone(), norm.running_var.clone(), int(norm.num_batches_tracked))
    conv = nn.Conv2d(8, 8, 1)
    geometry = autodac.surgery.trace_layers(conv, (torch.randn(1, 8, 6, 6),))[0].geometry
    seconds, _ = layer_latencies(conv, geometry, [("dense", None)], None, IMPLEMENTATIONS, torch.device("cpu"), LatencyCache(None, {}),
                                 parts=lambda method, rank, impl: [(norm, ((1, 8, 6, 6),)), (conv, ((1, 8, 6, 6),))])
    assert seconds[0] > 0
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
    assert int(norm.num_batches_tracked) == before[2] and norm.training  # and its mode is the caller's again


class TokenMLP(nn.Module):
    """A transformer-style MLP on ``N x L x C`` tokens: its hidden width is a unit whose consumer reads the last axis."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(32, 128), nn.Linear(128, 32)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_a_unit_s_options_are_timed_at_their_own_shapes_on_tokens(monkeypatch) -> None:
    """Widths narrow the hidden axis (the last, for a Linear on tokens); every other option keeps the traced shapes
    (a factorised consumer once had its token axis set to the hidden width)."""
    recorded = []
    original = autodac.api._unit_parts

    def spy(candidate, factors, shapes, method, rank, impl):
        parts = original(candidate, factors, shapes, method, rank, impl)
        recorded.append((method, rank, [s for _, s in parts], shapes[candidate.unit.consumer]))
        return parts

    monkeypatch.setattr(autodac.api, "_unit_parts", spy)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    try:
        autodac.optimize(TokenMLP().eval(), latency_budget=0.9, example_inputs=x, latency_cache=False, progress=False)
    except BudgetError:
        pass  # a model this small may not reach the budget: the tables are what is checked
    methods = {method for method, *_ in recorded}
    assert "width" in methods and methods - {"width", "dense"}, methods
    for method, rank, (producer, consumer), traced in recorded:
        assert producer == ((2, 5, 32),)
        assert consumer == (((2, 5, rank),) if method == "width" else traced) and traced == ((2, 5, 128),)


def test_parts_run_together_in_one_call_and_onnxruntime_does_not_time_the_batchnorms_it_folds(monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    conv, norm, project = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
    runs = []
    for name in ("torch", "onnxruntime"):
        runtime = get_runtime(name)
        real = runtime.runner
        monkeypatch.setattr(type(runtime), "runner", lambda self, module, calls, real=real: runs.append((module, calls)) or real(module, calls))
        parts = [(conv, ((1, 4, 6, 6),)), (norm, ((1, 8, 6, 6),)), (project, ((1, 8, 6, 6), (1, 8, 3, 3)))]
        seconds = latency_module._parts_seconds(parts, torch.device("cpu"), LatencyCache(None, {}), runtime, 3, torch.Generator())
        assert seconds > 0
        monkeypatch.undo()
    (eager, eager_calls), (onnx, onnx_calls) = runs
    assert list(eager.members) == [conv, norm, project] and len(eager_calls) == 1 and len(eager_calls[0]) == 4
    assert list(onnx.members) == [conv, project] and [tuple(x.shape) for x in onnx_calls[0]] == [(1, 4, 6, 6), (1, 8, 6, 6), (1, 8, 3, 3)]
    runs.clear()  # a BatchNorm after a Linear is not folded: it is timed
    linear, norm1d, out = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)
    runtime = get_runtime("onnxruntime")
    real = runtime.runner
    monkeypatch.setattr(type(runtime), "runner", lambda self, module, calls: runs.append((module, calls)) or real(module, calls))
    latency_module._parts_seconds([(linear, ((2, 4),)), (norm1d, ((2, 8),)), (out, ((2, 8),))], torch.device("cpu"),
                                  LatencyCache(None, {}), runtime, 3, torch.Generator())
    assert list(runs[0][0].members) == [linear, norm1d, out]


class UnbatchedBlock(nn.Module):
    """A conv then a 1x1 conv on an unbatched ``C x H x W`` input: the hidden channels are axis 0 there."""

    def __init__(self) -> None:
        super().__init__()
        self.expand, self.project = nn.Conv2d(8, 64, 3, padding=1), nn.Conv2d(64, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.relu(self.expand(x)))


def test_a_unit_on_an_unbatched_input_is_timed_along_its_channel_axis(monkeypatch) -> None:
    recorded = []
    original = autodac.api._unit_parts

    def spy(candidate, factors, shapes, method, rank, impl):
        parts = original(candidate, factors, shapes, method, rank, impl)
        recorded.append((method, rank, [s for _, s in parts]))
        return parts

    monkeypatch.setattr(autodac.api, "_unit_parts", spy)
    x = torch.randn(8, 32, 32, generator=torch.Generator().manual_seed(0))
    try:  # the width was once put on axis 1 (the height): the timing crashed inside torch
        autodac.optimize(UnbatchedBlock().eval(), latency_budget=0.9, example_inputs=x, latency_cache=False, progress=False)
    except BudgetError:
        pass
    widths = [(rank, shapes) for method, rank, shapes in recorded if method == "width"]
    assert widths and all(shapes == [((8, 32, 32),), ((rank, 32, 32),)] for rank, shapes in widths)


def test_a_latency_study_records_that_it_plans_widths(tmp_path) -> None:
    """Latency studies made before widths were planned under a latency budget hold other options and tables: a worker
    of today must be refused there, not fail on a table of another shape."""
    import optuna

    from autodac.search import storage as shared_storage
    from autodac.testing import InvertedResidualNet

    url = str(tmp_path / "study.journal")
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    try:
        autodac.optimize(InvertedResidualNet().eval(), latency_budget=0.95, data=[x], n_trials=1, progress=False, latency_cache=False,
                         storage=url, study_name="lat", distill=False)
    except BudgetError:
        pass  # the fingerprint is recorded when the study opens
    study = optuna.load_study(study_name="lat", storage=shared_storage.open_storage(url))
    fingerprint = next(v for k, v in study.user_attrs.items() if k.endswith("fingerprint"))
    assert fingerprint.get("latency_widths") is True
