"""Distillation (autodac.distill): it repairs a damaged plan on examples it never trained on, touches nothing it was given,
keeps an epoch only when the held-out score says so, and is deterministic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autodac
from autodac.datasets import fashion_mnist_slice
from autodac.batches import Inputs
from autodac.distill import distill, output_loss
from autodac.options import DistillOptions
from autodac.errors import AutodacError, ModelError
from autodac.probes import divergence, predict, top1_match
from autodac.testing import TwoInputNet
from autodac.zoo import pretrained


def _checksum(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def damaged():
    """ResNet-20 (trained on Fashion-MNIST) cut data-free to 0.3 of its FLOPs, and probe / held-out images."""
    images, _ = fashion_mnist_slice("train")
    teacher = pretrained("resnet20").eval()
    with pytest.warns(UserWarning):  # a deep data-free cut is flagged as damaging
        student = autodac.optimize(teacher, 0.3, example_inputs=images[:1], progress=False).model
    return teacher, student, images[:256], images[256:512]


def _scorer(teacher: nn.Module, held_out: torch.Tensor):
    reference = predict(teacher, held_out)

    def score(model: nn.Module) -> tuple[float, float]:
        outputs = predict(model, held_out)
        return -divergence(outputs, reference), top1_match(outputs, reference.argmax(1))

    return score


def test_distillation_repairs_a_damaged_plan_on_held_out_examples_and_changes_nothing_it_was_given(damaged):
    teacher, student, train, held_out = damaged
    score = _scorer(teacher, held_out)
    teacher_sum, student_sum = _checksum(teacher), _checksum(student)
    model, report = distill(student, teacher, train, score, DistillOptions(epochs=3, lr=1e-3))
    assert report.kept and model is not student
    assert report.epochs[report.best_epoch - 1] == max(report.epochs)  # the last accepted epoch is the best scored
    before, after = score(student), score(model)
    assert after[0] > before[0] + 0.05, (before, after)  # the held-out divergence falls clearly
    assert after[1] >= before[1]
    assert _same(_checksum(teacher), teacher_sum) and _same(_checksum(student), student_sum)
    assert not teacher.training and not student.training  # modes restored
    # BatchNorm statistics are not trained: the running means of the copy are the student's
    for (name, a), (_, b) in zip(student.named_buffers(), model.named_buffers()):
        if "running" in name:
            assert torch.equal(a, b), name
    assert all(p.requires_grad == q.requires_grad for p, q in zip(student.parameters(), model.parameters()))


def test_distillation_is_deterministic_for_a_seed(damaged):
    teacher, student, train, held_out = damaged
    score = _scorer(teacher, held_out)
    first, report = distill(student, teacher, train, score, DistillOptions(epochs=1, seed=3))
    second, _ = distill(student, teacher, train, score, DistillOptions(epochs=1, seed=3))
    other, _ = distill(student, teacher, train, score, DistillOptions(epochs=1, seed=4))
    assert report.kept
    assert _same(_checksum(first), _checksum(second))
    assert not _same(_checksum(first), _checksum(other))


def test_no_epoch_better_than_the_start_returns_the_student_itself(damaged):
    teacher, student, train, _ = damaged
    calls = []

    def worse_each_time(model: nn.Module) -> tuple[float, float]:
        calls.append(model)
        return -float(len(calls)), 0.5  # the first call (the student) scores best

    model, report = distill(student, teacher, train[:64], worse_each_time, DistillOptions(epochs=2))
    assert model is student and not report.kept and report.best_epoch == 0 and len(report.epochs) == 2


def test_a_better_objective_with_a_lower_metric_is_not_kept(damaged):
    teacher, student, train, _ = damaged
    scores = iter([(-1.0, 0.9), (-0.5, 0.8)])
    model, report = distill(student, teacher, train[:64], lambda m: next(scores), DistillOptions(epochs=1))
    assert model is student and not report.kept


def test_several_inputs_are_mixed_alike_and_distilled():
    teacher = TwoInputNet(seed=0).eval()
    student = TwoInputNet(seed=1).eval()
    g = torch.Generator().manual_seed(0)
    x = Inputs((torch.randn(64, 3, 16, 16, generator=g), torch.randn(64, 1, 16, 16, generator=g)))
    held = Inputs((torch.randn(32, 3, 16, 16, generator=g), torch.randn(32, 1, 16, 16, generator=g)))
    reference = predict(teacher, held)

    def score(model):
        out = predict(model, held)
        return -divergence(out, reference), top1_match(out, reference.argmax(1))

    model, report = distill(student, teacher, x, score, DistillOptions(epochs=4, lr=3e-3))
    assert report.kept and score(model)[0] > score(student)[0]


def test_the_loss_covers_every_floating_output_and_refuses_outputs_without_one():
    t = {"logits": torch.randn(4, 10), "box": torch.randn(4, 1), "index": torch.arange(4)}
    s = {"logits": t["logits"].clone(), "box": t["box"] + 1, "index": torch.arange(4)}
    assert float(output_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(output_loss(s, t)) > 0  # the regression output's error counts
    with pytest.raises(ModelError, match="floating tensors"):
        output_loss(torch.arange(4), torch.arange(4))


@pytest.mark.parametrize("field, value, rule", [
    ("epochs", 0, ">= 1"), ("epochs", 2.5, ">= 1"), ("lr", 0.0, "positive"), ("lr", float("nan"), "positive"),
    ("batch_size", -1, ">= 0"), ("mixup", -0.1, ">= 0"), ("features", float("inf"), ">= 0"), ("seed", "0", "integer"),
])
def test_bad_settings_are_refused_naming_the_rule_and_the_value(field, value, rule):
    with pytest.raises(AutodacError, match=rule) as caught:
        DistillOptions(**{field: value})
    assert field in str(caught.value) and repr(value) in str(caught.value)


def test_mixing_uses_one_weight_and_one_partner_for_every_argument_of_an_example():
    from autodac.distill import _mixed

    image = torch.randn(16, 3, 8, 8)
    mixed = _mixed(Inputs((image, image[:, :1].clone(), torch.arange(16))), torch.Generator().manual_seed(0), 0.5)
    a, b, index = mixed.parts
    assert torch.allclose(a[:, :1], b) and not torch.allclose(a, image)
    assert torch.equal(index, torch.arange(16))  # integer arguments are not mixed
    assert _mixed(image, torch.Generator().manual_seed(0), 0.0) is image


def test_an_epoch_that_scores_worse_is_undone_and_the_rate_divided(damaged):
    from autodac.distill import replay

    teacher, student, train, _ = damaged
    settings = DistillOptions(epochs=4, seed=1)
    # before, then epochs 1-4: 1 better, 2 worse (undone), 3 best, 4 worse (undone)
    scores = iter([(-1.0, 0.5), (-0.9, 0.5), (-2.0, 0.1), (-0.2, 0.6), (-0.5, 0.7)])
    model, report = distill(student, teacher, train[:128], lambda m: next(scores), settings)
    assert report.accepted == [True, False, True] and report.best_epoch == 3
    rebuilt = replay(student, teacher, train[:128], settings, report.accepted)
    assert _same(_checksum(model), _checksum(rebuilt))  # the same decisions give the same weights
    ignoring = replay(student, teacher, train[:128], settings, [True, True, True])
    assert not _same(_checksum(model), _checksum(ignoring))  # the undone epoch mattered: its decision is part of the record
    undone = replay(student, teacher, train[:128], settings, [True, False, False, True])
    assert not _same(_checksum(undone), _checksum(model))
    for bad in ([], [True, False], [True] * 5, [1, True]):
        with pytest.raises(AutodacError, match="accept/reject decisions"):
            replay(student, teacher, train[:128], settings, bad)


def test_a_rate_too_high_for_the_network_costs_epochs_not_the_model(damaged):
    teacher, student, train, held_out = damaged
    score = _scorer(teacher, held_out)
    model, report = distill(student, teacher, train, score, DistillOptions(epochs=6, lr=0.1))  # a rate that wrecks this net
    assert report.accepted[:1] == [False]  # the first epoch at 0.1 is undone ...
    assert report.kept and score(model)[0] > score(student)[0]  # ... and a divided rate still gets somewhere


# ----------------------------------------------------------------------------- through optimize and apply


@pytest.fixture(scope="module")
def distilled_run():
    """ResNet-20 at 0.3 of its FLOPs planned on 256 labelled probe images, with and without distillation."""
    x, y = fashion_mnist_slice("train")
    data = [(x[:256], y[:256])]
    common = dict(data=data, n_trials=1, profile_size=16, profile_points=2, sequential_fit=False, progress=False)
    plain = autodac.optimize(pretrained("resnet20"), 0.3, **common)
    distilled = autodac.optimize(pretrained("resnet20"), 0.3, distill=DistillOptions(epochs=3, lr=1e-3), **common)
    return data, plain, distilled


def test_optimize_keeps_a_distillation_that_the_held_out_probe_prefers_and_records_it(distilled_run):
    data, plain, distilled = distilled_run
    assert distilled.plan.layers == plain.plan.layers  # the same plan, other weights
    record = distilled.plan.distilled
    assert record["epochs"] == 3 and 1 <= record["epoch"] <= 3 and record["inputs"] == "calibration"
    assert record["output_kind"] == "scores"  # what the probe compared (class scores), so apply trains on the same loss
    assert len(record["accepted"]) == record["epoch"] and record["accepted"][-1]
    assert distilled.metrics["probe"] > plain.metrics["probe"]  # held-out accuracy, 128 images
    assert distilled.metrics["probe_before_distillation"] == pytest.approx(plain.metrics["probe_without_bn_reestimate"])
    assert any(note.startswith("distilled from the original") for note in distilled.plan.notes)
    assert distilled.flops == plain.flops  # training changes weights, never costs
    x_test, y_test = fashion_mnist_slice("test")
    accuracy = {name: float((r.model(x_test[:1000]).argmax(1) == y_test[:1000]).float().mean()) for name, r in
                (("plain", plain), ("distilled", distilled))}
    assert accuracy["distilled"] > accuracy["plain"], accuracy  # on test images neither saw


def test_apply_with_the_same_data_rebuilds_the_distilled_model_exactly(distilled_run):
    data, _, distilled = distilled_run
    plan = autodac.Plan.from_json(distilled.plan.to_json())
    assert plan.distilled == distilled.plan.distilled
    applied = autodac.apply(pretrained("resnet20"), plan, data=data)
    state, expected = applied.state_dict(), distilled.model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    with pytest.raises(autodac.PlanError, match=r"distilled.*`data` must be given.*data=None"):
        autodac.apply(pretrained("resnet20"), plan)


def test_a_plan_with_a_broken_distillation_record_is_refused(distilled_run):
    _, _, distilled = distilled_run
    good = distilled.plan.to_dict()
    for broken, match in (({**good["distilled"], "epoch": 9}, "epoch=9"), ({**good["distilled"], "lr": -1}, "lr"),
                          ({"epoch": 1}, "inputs"), ({**good["distilled"], "extra": 1}, "extra"),
                          ({**good["distilled"], "accepted": [False] * good["distilled"]["epoch"]}, "accepted"),
                          ({**good["distilled"], "output_kind": "logits"}, "output_kind='logits'")):
        with pytest.raises(autodac.PlanError, match=match):
            autodac.Plan.from_dict({**good, "distilled": broken})


def test_a_distillation_record_from_before_output_kind_reads_back_as_it_was(distilled_run):
    _, _, distilled = distilled_run
    old = distilled.plan.to_dict()
    old["distilled"] = {k: v for k, v in old["distilled"].items() if k != "output_kind"}
    assert "output_kind" not in autodac.Plan.from_dict(old).distilled


def test_distillation_compares_outputs_as_the_probe_decided(monkeypatch: pytest.MonkeyPatch) -> None:
    """Told the outputs are values, every training batch's loss is their squared error, not a kind read off the batch."""
    import autodac.distill

    kinds: list[str | None] = []
    real = autodac.distill.divergence_tensor

    def spy(student: torch.Tensor, teacher: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        kinds.append(kind)
        return real(student, teacher, kind)

    monkeypatch.setattr(autodac.distill, "divergence_tensor", spy)
    x, _ = fashion_mnist_slice("train")
    result = autodac.optimize(pretrained("resnet20"), 0.3, data=[x[:64]], output_kind="values", distill=DistillOptions(epochs=1),
                              n_trials=1, profile_size=16, profile_points=2, sequential_fit=False, progress=False)
    assert kinds and set(kinds) == {"values"}
    assert any("probe metric: R^2" in note for note in result.plan.notes)


def test_distill_needs_a_probe_and_a_valid_value():
    model = pretrained("resnet20")
    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(AutodacError, match=r"`distill` trains on probe inputs.*neither"):
        autodac.optimize(model, 0.5, example_inputs=x, distill=True, progress=False)
    with pytest.raises(AutodacError, match=r"`distill` must be True, False or an autodac.DistillOptions, but got int"):
        autodac.optimize(model, 0.5, example_inputs=x, data=[x.repeat(4, 1, 1, 1)], distill=3, progress=False)


def test_summary_and_compare_say_which_plan_was_distilled(distilled_run):
    _, plain, distilled = distilled_run
    assert "distilled on the probe: epoch" in distilled.summary() and "distilled" not in plain.summary()
    table = autodac.compare({"plain": plain.plan, "distilled": distilled.plan})
    row = next(line for line in table.splitlines() if line.startswith("distilled"))
    assert f"epoch {distilled.plan.distilled['epoch']} of 3" in row
    assert "distilled" not in autodac.compare([plain.plan, plain.plan])


def test_the_default_batch_keeps_the_students_largest_layer_output_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backward keeps every layer output of a step: SmallConvNet's largest is 512 elements an 8x8 example."""
    import autodac.probes
    from autodac.distill import _Trainer
    from autodac.testing import SmallConvNet

    student, teacher, inputs = SmallConvNet(seed=0), SmallConvNet(seed=0), torch.randn(64, 3, 8, 8)
    assert _Trainer(student, teacher, inputs, DistillOptions()).batch == 32
    monkeypatch.setattr(autodac.probes, "ACTIVATION_ELEMENTS", 4 * 512)
    assert _Trainer(student, teacher, inputs, DistillOptions()).batch == 4
    assert _Trainer(student, teacher, inputs, DistillOptions(batch_size=16)).batch == 16  # asked for: as given
