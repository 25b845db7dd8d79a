"""Cases that used to pass silently or end in a deep torch error: each is now a clear error or a stated warning."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import autodac
from autodac.testing import SmallConvNet

X = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _damage_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "predicted to damage" in str(w.message)]


def _smallest_budget(model: torch.nn.Module, x: torch.Tensor) -> float:
    with pytest.raises(autodac.BudgetError) as refused:
        autodac.optimize(model, 0.001, example_inputs=x, progress=False)
    return float(re.search(r"`flops_budget >= (\d\.\d+)`", str(refused.value)).group(1))


# ----------------------------------------------------------------------------- data against example_inputs


def test_data_at_another_shape_than_example_inputs_is_refused_naming_both() -> None:
    with pytest.raises(autodac.AutodacError, match=r"data has examples of shape \(3, 8, 8\) and example_inputs has shape \(1, 3, 16, 16\)"):
        autodac.optimize(SmallConvNet(), 0.5, data=[X], example_inputs=torch.zeros(1, 3, 16, 16), progress=False)


def test_data_at_the_shape_of_example_inputs_is_accepted_whatever_the_batch() -> None:
    result = autodac.optimize(SmallConvNet(), 0.9, data=[X], example_inputs=torch.zeros(2, 3, 8, 8), n_trials=1, progress=False)
    assert result.plan.input_shapes == [[2, 3, 8, 8]]


# ----------------------------------------------------------------------------- labels through optimize


def test_labels_of_another_length_are_refused_by_optimize() -> None:
    with pytest.raises(autodac.AutodacError, match=r"labels must hold one entry per input, but batch 0 .* 64 inputs .*\(63,\)"):
        autodac.optimize(SmallConvNet(), 0.5, data=[(X, torch.zeros(63, dtype=torch.long))], progress=False)


@pytest.mark.parametrize("labels, rule", [
    (torch.zeros(64, 1, dtype=torch.long), r"shape \(64,\), but batch 0 .* labels of shape \(64, 1\); pass y\.reshape\(-1\)"),
    (torch.zeros(64, 5, dtype=torch.long), r"labels of shape \(64, 5\); multi-hot .* pass batches of x alone"),
])
def test_integer_labels_of_more_than_one_dimension_are_refused_before_any_work(labels, rule) -> None:
    # (N, 1) labels broadcast against (N,) predictions into an N x N table: every accuracy was ~1/classes, silently
    with pytest.raises(autodac.AutodacError, match=rule):
        autodac.optimize(SmallConvNet(), 0.5, data=[(X, labels)], progress=False)


class _Scalar(torch.nn.Module):
    """A regressor of one value per example, shape (N,): no class dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.body = SmallConvNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).sum(1)


@pytest.mark.parametrize("model, rule", [
    (_Scalar, r"class labels need outputs with a class dimension .* shape \(N,\) .*; regression targets are not scored: pass batches of x alone"),
    (lambda: torch.nn.Sequential(SmallConvNet(), torch.nn.Linear(5, 1)), r"below the 1 classes .*; regression targets are not scored"),
])
def test_whole_number_regression_targets_are_told_the_way_out_not_sent_round(model, rule) -> None:
    counts = torch.randint(0, 3, (64,))
    with pytest.raises(autodac.AutodacError, match=r"pass y\.long\(\).*regression targets are not scored: pass batches of x alone"):
        autodac.optimize(model(), 0.5, data=[(X, counts.float())], progress=False)
    with pytest.raises(autodac.AutodacError, match=rule):  # and y.long(), as that says, is refused with the same way out
        autodac.optimize(model(), 0.5, data=[(X, counts)], progress=False)


def test_a_dense_target_is_refused_with_the_way_to_leave_it_out() -> None:
    with pytest.raises(autodac.AutodacError, match=r"shape \(64, 3, 8, 8\); a target the model is not scored on \(an image, a mask\) is left out"):
        autodac.optimize(SmallConvNet(), 0.5, data=[(X, X.clone())], progress=False)


def test_labels_score_a_fully_convolutional_classifier_per_example_and_refuse_dense_outputs() -> None:
    torch.manual_seed(0)
    fcn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1)).eval()  # N x 4 x 1 x 1
    x = torch.randn(64, 3, 8, 8) + 3 * torch.randn(64, 3, 1, 1)
    with torch.no_grad():
        y = fcn(x).flatten(1).argmax(1)  # its own predictions: its top-1 accuracy is exactly 1
    assert len(y.unique()) > 1
    result = autodac.optimize(fcn, 1.0, example_inputs=x[:1], data=[(x, y)], n_trials=1, progress=False)
    assert result.metrics["probe_original"] == 1.0  # broadcast against (N, 1, 1), it was the share of equal pairs
    segmenter = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()  # N x 4 x 8 x 8
    with pytest.raises(autodac.AutodacError, match=r"class labels \(one per example\) .* outputs are N x 4 x 8 x 8: a class at each of 64 positions"):
        autodac.optimize(segmenter, 0.7, example_inputs=x[:1], data=[(x, y)], n_trials=1, progress=False)


def test_soft_targets_are_ignored_with_a_warning_and_the_metric_says_agreement() -> None:
    soft = torch.softmax(torch.randn(64, 5), 1)
    with pytest.warns(UserWarning, match="not class labels"):
        result = autodac.optimize(SmallConvNet(), 0.9, data=[(X, soft)], n_trials=1, progress=False)
    assert any("top-1 agreement with the original" in note for note in result.plan.notes)


# ----------------------------------------------------------------------------- meta-device models


def test_a_meta_model_is_refused_clearly_with_or_without_inputs() -> None:
    with torch.device("meta"):
        model = SmallConvNet()
    for inputs in (None, torch.zeros(1, 3, 8, 8)):
        with pytest.raises(autodac.ModelError, match=r"weights must hold values .* on the 'meta' device \(e\.g\. 'conv1\.weight'\).*to_empty"):
            autodac.optimize(model, 0.5, example_inputs=inputs, progress=False)
    plan = autodac.optimize(SmallConvNet(), 0.5, example_inputs=torch.zeros(1, 3, 8, 8), progress=False).plan
    with pytest.raises(autodac.ModelError, match="'meta' device"):
        autodac.apply(model, plan)
    assert all(p.is_meta for p in model.parameters())  # and the caller's model is as it was


# ----------------------------------------------------------------------------- damaging budgets


def test_the_smallest_budget_is_allowed_but_warned_with_the_predicted_error_without_data() -> None:
    model = SmallConvNet()
    x = X[:1]
    smallest = _smallest_budget(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = autodac.optimize(model, smallest, example_inputs=x, progress=False)
    assert result.flops_ratio <= smallest
    worst = max(c.error for c in result.plan.factorized.values())
    (message,) = _damage_warnings(caught)
    assert worst > 0.5 and f"reach {worst:.2f} in one layer" in message
    assert "warning: the plan is predicted to damage" in result.summary()


def test_a_damaging_plan_made_with_data_is_warned_too_with_what_the_probe_measured(caplog: pytest.LogCaptureFixture) -> None:
    model = SmallConvNet()
    smallest = _smallest_budget(model, X[:1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = autodac.optimize(model, smallest, data=[X], n_trials=2, progress=False)
    worst = max(c.error for c in result.plan.factorized.values())
    (message,) = _damage_warnings(caught)
    assert worst > 0.5 and f"reach {worst:.2f} in one layer" in message
    assert f"top-1 agreement with the original {result.metrics['probe']:.4f}" in message
    assert message.removeprefix("autodac: ") in result.plan.notes and "predicted to damage" in caplog.text


def test_a_mild_plan_made_with_data_is_not_warned() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = autodac.optimize(SmallConvNet(), 0.95, data=[X], n_trials=1, progress=False)
    assert sum(c.error for c in result.plan.factorized.values()) <= 0.5
    assert not _damage_warnings(caught)


def test_an_empty_example_batch_is_refused_naming_the_rule() -> None:
    model = SmallConvNet()
    with pytest.raises(autodac.ModelError, match=r"`example_inputs` must hold at least one example .* shape \(0, 3, 8, 8\)"):
        autodac.optimize(model, 0.5, example_inputs=torch.zeros(0, 3, 8, 8), progress=False)


def test_a_plan_the_probe_measures_far_below_the_original_is_flagged_whatever_was_predicted() -> None:
    from autodac.api import _flag_measured_damage

    plan = autodac.optimize(SmallConvNet(), 0.95, data=[X], n_trials=1, progress=False).plan
    assert sum(c.error for c in plan.factorized.values()) <= 0.5  # nothing predicted
    plan.metrics.update(probe=0.30, probe_original=0.90)  # as a probe of a handful of examples can go
    with pytest.warns(UserWarning, match=r"measured to damage the model: on the probe, top-1 accuracy 0\.3000 against the original's 0\.9000"):
        _flag_measured_damage(plan, 0.5, "top-1 accuracy")
    quiet = autodac.optimize(SmallConvNet(), 0.95, data=[X], n_trials=1, progress=False).plan
    quiet.metrics.update(probe=-3.0, probe_original=-1.0)  # a caller's evaluate(model) may be on any scale: not judged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _flag_measured_damage(quiet, 0.5, "evaluate(model)")


@pytest.mark.parametrize("reduce", ["batch mean", "classes first", "sequence first", "one number"])
def test_outputs_without_the_batch_first_are_refused_before_the_probe_scores_them(reduce: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.fc(self.conv(x).mean((2, 3)))
            return {"batch mean": lambda: logits.mean(0), "classes first": lambda: logits.t(),
                    "sequence first": lambda: logits[None].expand(5, -1, -1), "one number": lambda: logits.logsumexp(1).mean()}[reduce]()

    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    # the batch mean was scored as if its 4 entries were examples (R^2 "of the outputs", ratio 0.47); the others crashed in torch.cat
    with pytest.raises(autodac.ModelError, match=r"must hold the batch first .* on 1 example the model returned shape"):
        autodac.optimize(Net().eval(), 0.5, data=[x], n_trials=2, progress=False)


def test_a_dataset_passed_as_data_is_told_to_go_in_a_data_loader() -> None:
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,)))
    with pytest.raises(autodac.AutodacError, match=r"labels of shape \(\) \(one example with its label: `data` must yield batches; "):
        autodac.optimize(SmallConvNet(), 0.5, data=dataset, progress=False)


def test_a_bare_layer_passed_as_the_model_is_named_as_the_model_itself() -> None:
    with pytest.raises(autodac.ModelError, match=r"none can \(the model itself: ConvTranspose2d is not a layer type"):
        autodac.optimize(nn.ConvTranspose2d(4, 4, 3), 0.5, example_inputs=torch.randn(1, 4, 8, 8), progress=False)
    result = autodac.optimize(nn.Conv2d(8, 8, 3), 0.5, example_inputs=torch.randn(1, 8, 8, 8), progress=False)
    assert "worst layer output error" in result.summary() and "(the model itself)" in result.summary()


# ----------------------------------------------------------------------------- a layer run more than once


class _RunTwice(nn.Module):
    """One conv run twice on the same input: the same function as ``_RunOnce``, with the conv's FLOPs and damage twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.conv(x)], 1)


class _RunOnce(_RunTwice):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([y, y], 1)


def test_a_layer_run_twice_counts_its_predicted_error_twice_and_says_so() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a deep cut of one small layer is flagged: not what this is about
        twice = autodac.optimize(_RunTwice(), 0.5, example_inputs=X[:1], progress=False).plan
        once = autodac.optimize(_RunOnce(), 0.5, example_inputs=X[:1], progress=False).plan
    assert (twice.layers["conv"].method, twice.layers["conv"].rank) == (once.layers["conv"].method, once.layers["conv"].rank)
    assert twice.layers["conv"].error == pytest.approx(2 * once.layers["conv"].error, rel=1e-6) and once.layers["conv"].error > 0
    assert any("conv (2 times)" in note for note in twice.notes) and not any("more than once" in note for note in once.notes)


class _TiedAutoencoder(nn.Module):
    """An encoder conv run as a module whose kernel the decoder reuses through ``F.conv_transpose2d`` (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encode = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.middle = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.middle(torch.relu(self.encode(x))))
        return torch.nn.functional.conv_transpose2d(h, self.encode.weight, stride=2, padding=1, output_padding=1)


def test_a_layer_whose_kernel_a_functional_call_also_reads_is_kept_saying_it_is_a_tied_use() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = autodac.optimize(_TiedAutoencoder(), 0.8, example_inputs=X[:1], progress=False).plan
    assert plan.skipped["encode"].startswith("its weight is also read by a functional call (F.conv_transpose2d) outside its own forward")
    assert "middle" in plan.layers


def test_a_conv_is_weighed_by_the_sync_batchnorm_after_it() -> None:
    """Nets trained with DDP carry SyncBatchNorm: it is a BatchNorm like the others for the fit's output weighting."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SyncBatchNorm(8), nn.ReLU()).eval()
    followed = {t.name: t.followed_by for t in autodac.surgery.trace_layers(model, (X[:1],))}
    assert followed == {"0": "1"}


# ----------------------------------------------------------------------------- outputs that are not class scores


class _Embedding(nn.Module):
    """An L2-normalised 16-d embedding (no class dimension, whatever labels come with its data), or ``finish`` of its 16 outputs."""

    def __init__(self, finish=lambda y: torch.nn.functional.normalize(y, dim=1)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc, self.finish = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 16), finish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.fc(torch.relu(self.conv(x)).mean((2, 3))))


def test_class_labels_beside_outputs_compared_as_values_are_refused_and_labels_the_original_misses_are_warned_of() -> None:
    model, labels = _Embedding(), torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(autodac.AutodacError, match=r"class labels are scored by top-1 over the outputs' dim 1, but output_kind='values'"):
        autodac.optimize(model, 0.7, data=[(X, labels)], output_kind="values", n_trials=1, progress=False)
    with torch.no_grad():
        labels = (model(X).argmax(1) + 1) % 16  # never the original's top-1: labels of something else
    with pytest.warns(UserWarning, match=r"the original model's own top-1 accuracy on the probe's labels is 0\.000, below half of chance"):
        autodac.optimize(model, 0.7, data=[(X, labels)], n_trials=1, progress=False)


def test_output_kind_distribution_is_refused_for_outputs_that_do_not_sum_to_one() -> None:
    sigmoid = _Embedding(finish=torch.sigmoid)  # in [0, 1], independent: not a distribution
    with pytest.raises(autodac.AutodacError, match=r"output_kind='distribution' needs outputs that sum to 1 over dim 1, but the original's sums"):
        autodac.optimize(sigmoid, 0.7, data=[X], output_kind="distribution", n_trials=1, progress=False)


def test_float_targets_are_ignored_with_a_warning_that_does_not_name_a_metric_the_probe_will_not_report() -> None:
    with pytest.warns(UserWarning, match=r"so they are ignored: the probe compares the outputs with the original model's"):
        autodac.optimize(_Embedding(), 0.7, data=[(X, torch.rand(64, 4))], n_trials=1, progress=False)


class KeywordCalledNorm(nn.Module):
    """An inverted-residual block whose BatchNorm is called as ``bn(input=t)``."""

    def __init__(self, keyword: bool = True) -> None:
        super().__init__()
        self.keyword = keyword
        self.stem, self.expand = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 64, 1, bias=False)
        self.bn0, self.project = nn.BatchNorm2d(64), nn.Conv2d(64, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.expand(self.stem(x))
        return self.project(torch.relu(self.bn0(input=hidden) if self.keyword else self.bn0(hidden)))


@pytest.mark.parametrize("budget", [0.5, autodac.Latency(0.9)], ids=["flops", "latency"])
def test_a_layer_called_with_its_input_as_a_keyword_is_refused_naming_it(budget) -> None:
    """autodac's hooks read a layer's input from its positional arguments: a keyword call once raised a bare IndexError
    from inside them (or a ModelError blaming the model's inputs, which the model runs on fine)."""
    model = KeywordCalledNorm().eval()
    x = torch.randn(2, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(autodac.ModelError, match=r"positional argument .* 'bn0' is called with it as a keyword"):
        autodac.optimize(model, budget, example_inputs=x, latency_cache=False, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_export_still_takes_a_model_that_calls_a_layer_with_a_keyword(tmp_path) -> None:
    """Only the stages that read layers' inputs through hooks need them positional: export does not."""
    exported = autodac.export(KeywordCalledNorm().eval(), tmp_path / "m.pt", format="pt", example_inputs=torch.randn(1, 3, 8, 8))
    assert exported.max_difference <= exported.allowed


def test_apply_with_data_refuses_a_layer_called_with_a_keyword_before_changing_anything() -> None:
    """The plan's widths are re-fitted to the data through hooks on the layers' inputs."""
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    positional = KeywordCalledNorm(keyword=False).eval()
    plan = autodac.optimize(positional, 0.6, data=[x[:16], x[16:]], n_trials=2, progress=False, distill=False).plan
    assert any(c.method == "width" for c in plan.factorized.values())
    model = KeywordCalledNorm().eval()
    model.load_state_dict(positional.state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(autodac.ModelError, match=r"'bn0' is called with it as a keyword"):
        autodac.apply(model, plan, data=[x[:16], x[16:]])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
