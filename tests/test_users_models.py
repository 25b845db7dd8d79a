"""Models as users hand them over: hooks, tied weights, lazy, scripted and compiled modules, other dtypes, odd data.

Each case was a silent wrong answer or a raw torch error before (found by sweeps on models not
in the repo); each is now the promised behaviour or a clear error naming the rule and the value.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import autodac
from autodac.cost import count_flops
from autodac.testing import InvertedResidualNet, SmallConvNet

X = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _quiet_optimize(model: nn.Module, *args, **kwargs) -> autodac.Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return autodac.optimize(model, *args, progress=False, **kwargs)


# ----------------------------------------------------------------------------- hooks


def test_a_layer_with_hooks_of_its_own_is_kept_with_them_and_says_why() -> None:
    model = SmallConvNet().eval()
    fired = []
    model.conv2.register_forward_hook(lambda m, i, o: fired.append(1) or o * 2.0)  # changes the output: dropping it is wrong
    result = _quiet_optimize(model, 0.6, example_inputs=X[:1])
    assert "hooks of its own" in result.plan.skipped["conv2"]
    assert "conv2" not in result.plan.factorized and type(result.model.conv2) is nn.Conv2d
    fired.clear()
    with torch.no_grad():
        result.model(X[:2])
    assert fired == [1]  # the copy's hook still runs
    assert len(model.conv2._forward_hooks) == 1  # and the caller's is where it was


def test_apply_refuses_a_plan_that_would_drop_a_hook() -> None:
    plan = _quiet_optimize(SmallConvNet(), 0.5, example_inputs=X[:1]).plan
    changed = next(name for name, choice in plan.factorized.items())
    model = SmallConvNet()
    model.get_submodule(changed).register_forward_pre_hook(lambda m, i: None)
    with pytest.raises(autodac.PlanError, match=rf"must have no hooks of their own .* but '{changed}' has 1"):
        autodac.apply(model, plan)


class _Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        raise RuntimeError("this model fails after its first layer")


def test_counting_that_fails_leaves_no_tracer_hooks_on_the_model() -> None:
    model = _Failing()
    with pytest.raises(autodac.ModelError, match="fvcore could not trace"):
        count_flops(model, (X[:1],))
    hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]
    assert hooks == [0, 0, 0]  # fvcore's scope hooks would fire on every later call


# ----------------------------------------------------------------------------- modules autodac cannot see into


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.stem, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(torch.relu(self.a(torch.relu(self.stem(x))))).mean((2, 3)))


def test_tied_weights_are_kept_and_named_as_tied() -> None:
    result = _quiet_optimize(_Tied(), 0.9, example_inputs=X[:1])
    assert result.plan.skipped["a"] == "shares a parameter with 'b' (tied weights): replacing one would untie them"
    assert "shares a parameter with 'a'" in result.plan.skipped["b"]
    assert result.model.a.weight is result.model.b.weight


def test_lazy_scripted_and_compiled_models_are_refused_naming_the_way_round() -> None:
    lazy = nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(autodac.ModelError, match=r"4 parameters and buffers are uninitialised \(lazy modules, e.g. '0.weight'\); run the model once"):
        autodac.optimize(lazy, 0.5, example_inputs=X[:1], progress=False)
    scripted = nn.Sequential(nn.Conv2d(3, 8, 3), torch.jit.script(nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU())))
    with pytest.raises(autodac.ModelError, match=r"but 3 are TorchScript \(1, 1.0, 1.1\)"):
        autodac.optimize(scripted, 0.5, example_inputs=X[:1], progress=False)
    compiled = torch.compile(SmallConvNet())  # wrapping compiles nothing yet: the refusal comes first
    with pytest.raises(autodac.ModelError, match=r"torch.compile wrapper \(OptimizedModule\).*pass model._orig_mod"):
        autodac.optimize(compiled, 0.5, example_inputs=X[:1], progress=False)


# ----------------------------------------------------------------------------- data and dtypes


def test_data_of_a_dtype_the_model_cannot_take_is_refused_naming_both_dtypes() -> None:
    for data in (X.double(), (X * 40 + 128).clamp(0, 255).to(torch.uint8)):
        with pytest.raises(autodac.ModelError, match=rf"`data`'s inputs, but on the first example \({str(data.dtype)[6:]} \(1, 3, 8, 8\); "
                                                     r"the model's weights are float32\) it raised RuntimeError"):
            autodac.optimize(SmallConvNet(), 0.5, example_inputs=X[:1], data=[data], n_trials=1, progress=False)


def test_non_tensor_arguments_in_data_are_refused_saying_so() -> None:
    with pytest.raises(autodac.AutodacError, match=r"must all be tensors .* bind them in a wrapper module\), but batch 0 holds int"):
        autodac.optimize(SmallConvNet(), 0.5, example_inputs=X[:1], data=[((X, 3),)], progress=False)


def test_an_unbatched_looking_example_is_explained_as_a_batch() -> None:
    model = nn.Sequential(nn.Conv1d(4, 8, 5), nn.ReLU(), nn.Conv1d(8, 8, 5))
    with pytest.raises(autodac.AutodacError, match=r"read as a batch of 4 example\(s\) of shape \(200,\)"):
        autodac.optimize(model, 0.5, example_inputs=torch.randn(4, 200), data=[torch.randn(8, 4, 200)], progress=False)


def test_synthesis_for_a_half_precision_model_gives_finite_inputs_of_its_dtype() -> None:
    model = SmallConvNet().half().eval()
    made = autodac.synthesize_inputs(model, X[:1].half(), 8, steps=20, progress=False)
    assert made.dtype == torch.float16 and bool(torch.isfinite(made).all())
    assert all(p.dtype == torch.float16 for p in model.parameters())  # the caller's model stays half


def test_numpy_integers_are_taken_as_integers() -> None:
    result = _quiet_optimize(SmallConvNet(), 0.6, data=[X], n_trials=np.int64(2), seed=np.uint32(3))
    same = _quiet_optimize(SmallConvNet(), 0.6, data=[X], n_trials=2, seed=3)
    assert result.plan.layers == same.plan.layers
    assert type(autodac.SearchOptions(n_trials=np.int64(2)).n_trials) is int  # stored as Python's: plans and studies take it


# ----------------------------------------------------------------------------- apply


class _Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())  # noqa: E731
        self.f = nn.Sequential(block(3, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 32))
        self.h = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.f(x).mean((2, 3)))


def test_apply_rebuilds_a_plan_made_with_evaluate_exactly() -> None:
    """With `evaluate=` every probe example calibrates (none is held out): apply re-estimates BatchNorm on all of them too."""
    torch.manual_seed(0)
    x = torch.randn(256, 3, 32, 40)
    y = torch.stack([x.mean((1, 2, 3)), x[:, 0].std((1, 2)), x[:, 1, :8].mean((1, 2))], 1)
    model = _Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(200):
        pick = torch.randint(0, 256, (16,))
        loss = nn.functional.mse_loss(model(x[pick]), y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        reference = model(x[:32])

    def evaluate(candidate: nn.Module) -> float:
        with torch.no_grad():
            return -float((candidate(x[:32]) - reference).pow(2).mean())

    data = [(x[i:i + 64],) for i in range(0, 256, 64)]
    result = _quiet_optimize(model, 0.5, example_inputs=x[:1], data=data, evaluate=evaluate, n_trials=3)
    assert result.plan.metrics.get("bn_reestimated") == 1.0  # the case under test: a kept re-estimation
    assert result.plan.probe["calibration"] == "all"
    rebuilt = autodac.apply(copy.deepcopy(model), autodac.Plan.from_json(result.plan.to_json()), data=data)
    with torch.no_grad():
        assert torch.equal(rebuilt(x[:32]), result.model(x[:32]))
    # without the data its statistics cannot be re-estimated: refused, even when no layer is fitted to data
    undone = autodac.Plan.from_dict({**result.plan.to_dict(), "layers": {
        name: {**layer, "fit": "plain"} if "fit" in layer else layer for name, layer in result.plan.to_dict()["layers"].items()}})
    with pytest.raises(autodac.PlanError, match=r"BatchNorm statistics were re-estimated on the probe, so `data` must be given"):
        autodac.apply(model, undone)


def test_apply_refuses_data_for_a_plan_fitted_to_synthesised_inputs() -> None:
    result = _quiet_optimize(SmallConvNet(), 0.6, example_inputs=X[:1], synthesize=16, n_trials=1)
    assert any(c.fit.removeprefix("seq+").startswith("data") for c in result.plan.factorized.values())
    with pytest.raises(autodac.PlanError, match=r"made with synthesize=16 is rebuilt from .* so `data` must be None"):
        autodac.apply(SmallConvNet(), result.plan, data=[X])


def test_apply_refuses_a_method_that_does_not_fit_the_layer_before_fitting() -> None:
    model = nn.Sequential(nn.Conv1d(1, 16, 64, stride=4), nn.BatchNorm1d(16), nn.ReLU(), nn.Conv1d(16, 16, 9))
    json_plan = _quiet_optimize(model, 0.5, example_inputs=torch.randn(1, 1, 1024), methods=("lowrank",), widths=False).plan.to_dict()
    layer = next(name for name, entry in json_plan["layers"].items() if entry["method"] == "lowrank")
    json_plan["layers"][layer]["method"] = "spatial"
    with pytest.raises(autodac.PlanError, match=rf"layer '{layer}': method 'spatial' does not apply to a Conv1d"):
        autodac.apply(model, autodac.Plan.from_dict(json_plan))


# ----------------------------------------------------------------------------- export


def test_export_turns_what_a_format_cannot_take_into_a_clear_error(tmp_path: Path) -> None:
    model = SmallConvNet().eval()
    torch.nn.utils.parametrizations.weight_norm(model.conv1)  # the pickler refuses parametrized modules
    with pytest.raises(autodac.ModelError, match=r"must be written as pt and run from the file, but that raised RuntimeError: "
                                                 r"Serialization of parametrized modules.*another format \(torchscript, pt2, onnx\)"):
        autodac.export(model, tmp_path / "m.pt", format="pt", example_inputs=X[:1])
    assert not list(tmp_path.iterdir())  # nothing written
    assert autodac.export(model, tmp_path / "m.pt2", format="pt2", example_inputs=X[:1]).max_difference <= 1e-5


# ----------------------------------------------------------------------------- parametrised, frozen and compiled parts


def _three_convs() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_a_spectral_norm_in_train_mode_is_read_not_stepped_and_keeps_its_mode_in_the_result() -> None:
    from torch.nn.utils.parametrizations import spectral_norm

    model = _three_convs()
    spectral_norm(model[3])
    spectral_norm(model[0])  # excluded below: kept as it is, parametrisation and all
    model.train()  # every read of the weight in train mode takes a power-iteration step on the caller's _u/_v
    x = torch.randn(1, 3, 16, 16)
    before = copy.deepcopy(model.state_dict())
    result = _quiet_optimize(model, 0.5, example_inputs=x, exclude=("0",))
    rebuilt = autodac.apply(model, result.plan)
    after = model.state_dict()
    assert "3" in result.plan.factorized
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert all(m.training for m in model.modules())  # the caller's modes, parametrisations included
    for built in (result.model, rebuilt):  # the kept layer's spectral norm still steps when the result is trained
        assert [m.training for m in built[0].parametrizations.modules()] == [True, True, True]


def test_a_frozen_layer_s_factors_stay_frozen_in_every_implementation() -> None:
    model = _three_convs().eval()
    for i in (0, 1, 3, 4, 6, 7):  # a frozen feature extractor, a trainable head
        model[i].requires_grad_(False)
    result = _quiet_optimize(model, 0.5, example_inputs=torch.randn(1, 3, 16, 16))
    convs = [n for n in result.plan.factorized if n in ("0", "3", "6")]
    assert convs, result.plan.factorized
    for name in convs:
        assert not any(p.requires_grad for p in result.model.get_submodule(name).parameters()), name
    layer = autodac.layers.build_factorized(model[3], "dac", 2, impl="split")
    assert not any(p.requires_grad for p in layer.parameters())
    assert all(p.requires_grad for p in result.model[11].parameters())  # the trainable head stays trainable, cut or not


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("method", ["dac", "spatial", "lowrank"])
def test_a_trainable_parametrised_layer_s_factors_train_and_a_frozen_one_s_do_not(norm, method) -> None:
    """The computed weight of a parametrised layer never requires grad (it is read under no_grad): its originals say."""
    from torch.nn.utils import parametrizations

    for frozen in (False, True):
        model = _three_convs().eval()
        getattr(parametrizations, norm)(model[3])
        model[3].requires_grad_(not frozen)
        result = _quiet_optimize(model, 0.85, example_inputs=torch.randn(1, 3, 16, 16), methods=[method], exclude=["0", "6", "11"], widths=False)
        assert "3" in result.plan.factorized
        for built in (result.model, autodac.apply(model, result.plan)):
            assert {p.requires_grad for p in built[3].parameters()} == {not frozen}, (frozen, dict(built[3].named_parameters()).keys())


@pytest.mark.parametrize("training", [{"synthesize": 32}, {"data": "made in inference mode", "distill": autodac.DistillOptions(epochs=1)}])
def test_a_call_under_inference_mode_trains_what_it_must_and_returns_an_ordinary_model(training) -> None:
    """Synthesis and distillation take gradients, which inference mode forbids even under enable_grad; the result is
    made of ordinary tensors (a model of inference tensors could not be fine-tuned)."""
    model = _three_convs().eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        if "data" in training:
            training = {**training, "data": [torch.randn(16, 3, 16, 16) for _ in range(4)]}
        result = _quiet_optimize(model, 0.6, example_inputs=x, n_trials=2, **training)
        rebuilt = autodac.apply(model, result.plan, training.get("data"))
    for built in (result.model, rebuilt):
        assert not any(t.is_inference() for t in [*built.parameters(), *built.buffers()])
    assert autodac.synthesize_inputs(model, x, 2, steps=1, progress=False).is_inference() is False


def test_a_weight_normed_producer_keeps_its_width_option_and_its_original() -> None:
    from torch.nn.utils.parametrizations import weight_norm

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.expand, self.bn1 = nn.Conv2d(16, 96, 1, bias=False), nn.BatchNorm2d(96)
            self.project, self.bn2 = nn.Conv2d(96, 16, 1, bias=False), nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn0(self.stem(x)))
            x = self.bn2(self.project(torch.nn.functional.relu6(self.bn1(self.expand(x))))) + x
            return self.fc(x.mean((2, 3)))

    def made() -> Block:
        torch.manual_seed(0)
        block = Block()
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.0, 1.5)
        return block.eval()

    plain, normed = made(), made()
    weight_norm(normed.expand)  # computes the same weight: the same plan is due
    x = torch.randn(8, 3, 16, 16)
    plans = [_quiet_optimize(m, 0.7, example_inputs=x[:1], exclude=("stem",)) for m in (plain, normed)]
    assert plans[1].plan.factorized["project"].method == "width"
    assert {n: (c.method, c.rank) for n, c in plans[1].plan.factorized.items()} == {n: (c.method, c.rank) for n, c in plans[0].plan.factorized.items()}
    torch.testing.assert_close(plans[1].model(x), plans[0].model(x))
    torch.testing.assert_close(normed(x), plain(x))  # the original still computes its weight (its class was not stripped)


def test_a_weight_read_outside_its_layer_through_a_derived_tensor_is_kept_and_says_so() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv3(torch.relu(self.conv1(x))))
            x = torch.relu(torch.nn.functional.conv2d(x[:, :16], self.conv3.weight.flip(-1), padding=1))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)  # with a probe this was a raw AttributeError from the model's own forward, mid-search
    result = _quiet_optimize(Net().eval(), 0.97, data=[(X.repeat(1, 1, 2, 2)[:16], torch.randint(0, 10, (16,)))], n_trials=2)
    assert "read outside its own forward (Tensor.flip)" in result.plan.skipped["conv3"]
    assert "conv3" not in result.plan.factorized


def test_a_compiled_part_is_refused_with_the_way_out() -> None:
    model = SmallConvNet().eval()
    model.conv2 = torch.compile(model.conv2)
    with pytest.raises(autodac.ModelError, match=r"'conv2' is a torch.compile wrapper .*set conv2 back to its ._orig_mod"):
        autodac.optimize(model, 0.5, example_inputs=X[:1], progress=False)


# ----------------------------------------------------------------------------- what a call leaves behind


def test_evaluate_is_handed_a_copy_of_the_caller_s_model_not_the_model_itself() -> None:
    model = SmallConvNet().train()  # a forward in train mode moves the BatchNorm statistics
    before = copy.deepcopy(model.state_dict())
    seen = []

    def evaluate(candidate: nn.Module) -> float:
        seen.append(candidate is model)
        candidate(X)  # as a user's evaluation loop may run it, train mode and all
        candidate.eval()
        return 0.5

    autodac.optimize(model, 0.6, data=[X], evaluate=evaluate, n_trials=2, progress=False)
    assert seen and not any(seen)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training


class _ReadsShapes(nn.Module):
    """A forward that reads its layers' shape attributes, as reshapes and scalings often do."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c1, self.fc = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(torch.relu(self.c0(x))))
        h = h.reshape(x.shape[0], self.c1.out_channels, -1).mean(2)
        return self.fc(h) * self.fc.in_features ** -0.5


@pytest.mark.parametrize("with_data", [False, True])
def test_a_forward_that_reads_a_layer_s_shape_attributes_runs_on_its_replacement(with_data: bool) -> None:
    model = _ReadsShapes().eval()
    kwargs = {"data": [X], "n_trials": 2} if with_data else {"example_inputs": X[:1]}
    result = _quiet_optimize(model, 0.5, **kwargs)
    assert "c1" in result.plan.factorized  # replaced, and still read by the forward
    layer = result.model.c1
    assert (layer.out_channels, layer.in_channels, layer.kernel_size) == (32, 32, (3, 3))
    with torch.no_grad():
        torch.testing.assert_close(autodac.plain_torch(result.model)(X), result.model(X))


def test_legacy_weight_and_spectral_norms_are_copied_kept_and_named_with_the_way_out() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(  # never run: the hooks' weights still carry their history, which deepcopy refuses
        nn.utils.weight_norm(nn.Conv1d(8, 16, 5, padding=2)), nn.ReLU(), nn.utils.spectral_norm(nn.Conv1d(16, 16, 5, padding=2)),
        nn.ReLU(), nn.Conv1d(16, 16, 5, padding=2),
    ).eval()
    result = _quiet_optimize(model, 0.95, example_inputs=torch.randn(1, 8, 64))
    assert sorted(result.plan.skipped) == ["0", "2"]  # the layers, not their weight_g / weight_orig parameters
    assert "torch.nn.utils.weight_norm (the legacy form)" in result.plan.skipped["0"]
    assert "use torch.nn.utils.parametrizations.spectral_norm" in result.plan.skipped["2"]
    assert list(result.plan.factorized) == ["4"]


def test_a_pruned_layer_is_kept_with_the_way_out_and_its_weight_orig_is_no_layer() -> None:
    """torch.nn.utils.prune's hook recomputes the weight; before, the plan named a parameter ('2.weight_orig') as a
    skipped layer, read 'outside its own forward', and the layer itself only as one with hooks."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 5, padding=2), nn.ReLU(),
                          nn.Conv1d(16, 16, 5, padding=2)).eval()
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    prune.l1_unstructured(model[4], "bias", amount=0.5)
    result = _quiet_optimize(model, 0.95, example_inputs=torch.randn(1, 8, 64))
    assert sorted(result.plan.skipped) == ["2", "4"]
    assert all("call torch.nn.utils.prune.remove(module, name)" in result.plan.skipped[n] for n in ("2", "4"))
    assert list(result.plan.factorized) == ["0"]
    prune.remove(model[2], "weight")  # as the reason says: then it is planned
    assert "2" not in _quiet_optimize(model, 0.95, example_inputs=torch.randn(1, 8, 64)).plan.skipped


def test_a_process_wide_module_hook_is_warned_of_at_the_caller_s_line_and_noted() -> None:
    """register_module_forward_hook runs on the replacements' convs too: a scaling one made result.model differ, unsaid."""
    from torch.nn.modules.module import register_module_forward_hook

    handle = register_module_forward_hook(lambda module, args, out: out * 1.1 if isinstance(module, nn.Conv2d) else None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = autodac.optimize(SmallConvNet(), 0.5, example_inputs=X[:1], progress=False)
            autodac.apply(SmallConvNet(), result.plan)
    finally:
        handle.remove()
    ours = [w for w in caught if "process-wide module hook" in str(w.message)]
    assert len(ours) == 2 and {Path(w.filename).name for w in ours} == {Path(__file__).name}
    assert any("process-wide module hook" in note for note in result.plan.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none once it is removed
        autodac.apply(SmallConvNet(), result.plan)


def test_an_evaluate_that_ends_in_train_mode_leaves_the_result_as_the_caller_s_model() -> None:
    model = SmallConvNet().eval()

    def evaluate(candidate: nn.Module) -> float:
        candidate.train()  # a training script's evaluation function hands the model back in train mode
        candidate(X)  # and may run it there, moving its BatchNorm statistics
        return 0.5

    result = autodac.optimize(model, 0.6, example_inputs=X[:1], evaluate=evaluate, n_trials=2, progress=False)
    assert not any(m.training for m in result.model.modules())
    rebuilt = autodac.apply(model, result.plan)
    with torch.no_grad():
        torch.testing.assert_close(result.model(X), rebuilt.eval()(X))  # no statistics moved by the evaluation either


class _Observed(nn.Module):
    """A model whose forward updates its own buffers in eval mode (an observer's range and a call counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallConvNet()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("low", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.low = torch.minimum(self.low, x.min().detach())
        return self.net(x)


def test_a_model_whose_forward_updates_its_buffers_is_never_run_by_optimize_or_apply() -> None:
    model = _Observed().eval()
    before = copy.deepcopy(model.state_dict())
    result = _quiet_optimize(model, 0.6, example_inputs=X[:1])
    _quiet_optimize(model, 0.6, data=[X], n_trials=2)
    autodac.apply(model, result.plan)
    autodac.synthesize_inputs(model, X[:1], 4, steps=2)
    assert int(model.calls) == 0 and float(model.low) == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_optimize_and_apply_leave_torch_s_global_random_state_as_they_found_it() -> None:
    model = SmallConvNet()
    torch.manual_seed(0)
    expected = torch.randn(3)
    torch.manual_seed(0)
    result = _quiet_optimize(model, 0.5, example_inputs=X[:1])
    assert torch.equal(torch.randn(3), expected)  # building the factorised modules drew their initial weights from it
    torch.manual_seed(0)
    autodac.apply(model, result.plan)
    assert torch.equal(torch.randn(3), expected)


def test_a_timeout_too_short_for_any_trial_still_returns_the_plain_allocation() -> None:
    result = _quiet_optimize(SmallConvNet(), 0.6, data=[X], n_trials=8, timeout=1e-9)
    assert result.flops_ratio <= 0.6  # was a bare ValueError from max() over no trials


def test_plans_are_saved_and_loaded_only_at_paths_that_work(tmp_path: Path) -> None:
    plan = _quiet_optimize(SmallConvNet(), 0.5, example_inputs=X[:1]).plan
    with pytest.raises(autodac.PlanError, match="a plan file must be writable, but got path=.*Is a directory"):
        plan.save(tmp_path)
    with pytest.raises(autodac.PlanError, match="a plan file must be writable, but got path=.*No such file"):
        plan.save(tmp_path / "missing" / "plan.json")
    with pytest.raises(autodac.PlanError, match=r"a plan file must be named by a path \(str or os.PathLike\), but got int: 3"):
        autodac.Plan.load(3)  # open(3) would have read, and closed, file descriptor 3


def test_warnings_point_at_the_caller_s_line_not_inside_autodac() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = autodac.optimize(SmallConvNet(), 0.2, data=[X], n_trials=2, progress=False)
        autodac.apply(SmallConvNet(), result.plan, data=[X.flip(0)])  # other examples than the plan's probe: warned
    ours = [w for w in caught if str(w.message).startswith("autodac:")]
    assert any("predicted to damage" in str(w.message) or "measured" in str(w.message) for w in ours)
    assert any("is not the probe the plan was fitted to" in str(w.message) for w in ours)
    assert {Path(w.filename).name for w in ours} == {Path(__file__).name}, [(w.filename, str(w.message)[:60]) for w in ours]


def test_a_dead_channel_in_half_precision_is_planned_not_a_linear_algebra_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    ).eval()
    with torch.no_grad():
        model[3].weight[0] = 0  # a dead output channel: its relative error weight was gamma^2 / 1e-308
    result = _quiet_optimize(model.half(), 0.5, example_inputs=X[:1].half())
    assert result.flops_ratio <= 0.5 and result.plan.factorized
    assert torch.isfinite(result.model(X[:4].half())).all()


class _DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = InvertedResidualNet()

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(batch["image"])


def test_a_data_free_plan_without_implied_moments_says_why() -> None:
    x = torch.randn(1, 3, 16, 16)
    plain = _quiet_optimize(InvertedResidualNet(), 0.7, example_inputs=x)
    assert any(c.fit.startswith("implied") for c in plain.plan.factorized.values())
    assert not any("not by the input moments the BatchNorms imply" in n for n in plain.plan.notes)
    wrapped = _quiet_optimize(_DictInput(), 0.7, example_inputs=({"image": x},))
    assert any(c.method == "width" for c in wrapped.plan.factorized.values())
    assert any("widths are ordered by their weights, not by the input moments the BatchNorms imply" in n and "a dict" in n
               for n in wrapped.plan.notes)


def test_widths_are_offered_whatever_methods_lists() -> None:
    x = torch.randn(1, 3, 16, 16)
    result = _quiet_optimize(InvertedResidualNet(), 0.7, example_inputs=x, methods=["dac"])  # DAC applies to no 1x1 conv
    widths = [name for name, c in result.plan.factorized.items() if c.method == "width"]
    assert widths and not any(name in result.plan.skipped for name in widths)
    assert {c.method for c in result.plan.factorized.values()} <= {"dac", "width"}
    off = _quiet_optimize(InvertedResidualNet(), 0.95, example_inputs=x, methods=["dac"], widths=False)
    assert "width" not in {c.method for c in off.plan.factorized.values()}


def test_an_unreachable_budget_names_only_layers_the_smallest_plan_leaves_as_they_are() -> None:
    with pytest.raises(autodac.BudgetError) as refused:
        _quiet_optimize(InvertedResidualNet(), 0.001, example_inputs=torch.randn(1, 3, 16, 16))
    message = str(refused.value)
    assert "the smallest reachable ratio" in message
    assert "depthwise" not in message  # each is inside a width unit: it narrows with its block


def test_a_legacy_weight_normed_layer_survives_distillation_and_evaluate_copies() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.weight_norm(nn.Conv2d(3, 16, 3, padding=1)), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()
    with torch.no_grad():
        reference = model(X).argmax(1)

    def evaluate(candidate: nn.Module) -> float:
        with torch.no_grad():
            return float((candidate(X).argmax(1) == reference).float().mean())

    # training runs the legacy hook with grad: the weight it leaves on the module has a history, which deepcopy refuses
    result = _quiet_optimize(model, 0.7, data=[X], evaluate=evaluate, n_trials=2,
                             distill=autodac.DistillOptions(epochs=2, lr=1e-3))
    assert "legacy form" in result.plan.skipped["0"]  # kept, and the call completed: copies of it were made after training
