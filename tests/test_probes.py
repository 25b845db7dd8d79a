"""Probe plumbing: what ``collect_probe`` accepts and refuses, exact BatchNorm re-estimation, and the probe metrics."""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autodac
from autodac.batches import Inputs
from autodac.probes import (
    check_output_kind, collect_probe, divergence, has_batchnorm, output_kind, r_squared, reestimate_batchnorm, top1_match,
)
from autodac.testing import seeded

_BN = nn.modules.batchnorm._BatchNorm


def _batches(sizes: list[int], labeled: bool, seed: int = 0) -> list[Any]:
    """Batches of ``N x 3 x 4 x 4`` inputs (numbered by example, so order shows) with integer labels if asked."""
    generator = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for size in sizes:
        x = torch.randn(size, 3, 4, 4, generator=generator)
        x[:, 0, 0, 0] = torch.arange(start, start + size, dtype=torch.float32)
        start += size
        out.append((x, torch.randint(0, 5, (size,), generator=generator)) if labeled else x)
    return out


def _concat(batches: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batches[0], torch.Tensor):
        return torch.cat(batches), None
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


# ----------------------------------------------------------------------------- collect_probe: accepted forms


@pytest.mark.parametrize("labeled", [False, True], ids=["tensors", "pairs"])
@pytest.mark.parametrize("container", [list, tuple, iter], ids=["list", "tuple", "iterator"])
def test_batches_are_concatenated_in_order(labeled: bool, container: Any) -> None:
    batches = _batches([5, 7, 3], labeled)
    x, y = _concat(batches)
    probe = collect_probe(container(batches), 100)
    assert torch.equal(probe.inputs, x)
    assert (probe.labels is None) == (not labeled)
    if labeled:
        assert torch.equal(probe.labels, y)
    assert len(probe) == 15 and probe.reference is None


def test_batches_as_lists_and_with_extra_fields() -> None:
    """A batch may be a list ``[x, y]`` or carry more fields after the labels (e.g. indices)."""
    (x1, y1), (x2, y2) = _batches([4, 6], labeled=True)
    probe = collect_probe([[x1, y1], (x2, y2, torch.arange(6))], 100)
    assert torch.equal(probe.inputs, torch.cat([x1, x2])) and torch.equal(probe.labels, torch.cat([y1, y2]))


@pytest.mark.parametrize("pair", [tuple, list], ids=["tuple", "list"])
def test_single_pair(pair: Any) -> None:
    ((x, y),) = _batches([9], labeled=True)
    probe = collect_probe(pair([x, y]), 100)
    assert torch.equal(probe.inputs, x) and torch.equal(probe.labels, y)


def test_single_tensor() -> None:
    (x,) = _batches([9], labeled=False)
    probe = collect_probe(x, 100)
    assert torch.equal(probe.inputs, x) and probe.labels is None


@pytest.mark.parametrize("cap", [1, 4, 5, 6, 11, 12, 15, 16, 100])
@pytest.mark.parametrize("labeled", [False, True], ids=["tensors", "pairs"])
def test_probe_size_cap_is_exact(cap: int, labeled: bool) -> None:
    """Exactly ``min(cap, available)`` examples, the first ones, and no batch is read past the cap."""
    batches = _batches([5, 6, 4], labeled)
    x, y = _concat(batches)
    pulled = []

    def stream() -> Iterator[Any]:
        for i, batch in enumerate(batches):
            pulled.append(i)
            yield batch

    probe = collect_probe(stream(), cap)
    expected = min(cap, 15)
    assert len(probe) == expected
    assert torch.equal(probe.inputs, x[:expected])
    if labeled:
        assert torch.equal(probe.labels, y[:expected])
    needed = int(np.searchsorted(np.cumsum([5, 6, 4]), expected)) + 1  # batches holding the first `expected`
    assert len(pulled) == min(needed, 3)


def test_single_tensor_is_capped() -> None:
    (x,) = _batches([9], labeled=False)
    assert torch.equal(collect_probe(x, 4).inputs, x[:4])
    ((x, y),) = _batches([9], labeled=True)
    probe = collect_probe((x, y), 4)
    assert torch.equal(probe.inputs, x[:4]) and torch.equal(probe.labels, y[:4])


@pytest.mark.parametrize(
    "make_targets",
    [
        lambda n: torch.rand(n),  # regression targets
        lambda n: torch.rand(n, 5),  # soft labels
        lambda n: torch.randint(0, 5, (n,)).float() - 0.5,  # not whole numbers
    ],
    ids=["float", "soft", "halves"],
)
def test_float_targets_that_are_not_class_labels_mean_unlabeled_with_one_warning(make_targets: Any) -> None:
    batches = [(x, make_targets(x.shape[0])) for x in _batches([4, 6], labeled=False)]
    with pytest.warns(UserWarning, match=r"targets in `data` are not class labels \(float, shape .*top-1 agreement") as caught:
        probe = collect_probe(batches, 100)
    assert len([w for w in caught if "not class labels" in str(w.message)]) == 1  # once per probe, not per batch
    assert probe.labels is None
    assert torch.equal(probe.inputs, torch.cat([b[0] for b in batches]))


@pytest.mark.parametrize(
    "make_targets, message",
    [
        (lambda n: torch.randint(0, 5, (n,)).float(), r"class labels must be an integer tensor \(pass y\.long\(\)\), but batch 0 .*float32"),
        (lambda n: torch.randint(0, 5, (n + 1,)), r"one entry per input, but batch 0 of `data` has 4 inputs and labels of shape \(5,\)"),
        (lambda n: torch.tensor(3), r"one entry per input, but batch 0 of `data` has 4 inputs and labels of shape \(\)"),
    ],
    ids=["float-indices", "wrong-length", "scalar"],
)
def test_labels_that_cannot_be_read_safely_are_refused(make_targets: Any, message: str) -> None:
    batches = [(x, make_targets(x.shape[0])) for x in _batches([4, 6], labeled=False)]
    with pytest.raises(autodac.AutodacError, match=message):
        collect_probe(batches, 100)


def test_single_pair_with_float_targets_is_unlabeled() -> None:
    (x,) = _batches([6], labeled=False)
    with pytest.warns(UserWarning, match="not class labels"):
        probe = collect_probe((x, torch.rand(6)), 100)
    assert probe.labels is None and torch.equal(probe.inputs, x)


# ----------------------------------------------------------------------------- collect_probe: refusals


@pytest.mark.parametrize(
    "data, message",
    [
        pytest.param([], "must hold at least one example, but it was empty", id="empty-list"),
        pytest.param(iter(()), "must hold at least one example, but it was empty", id="empty-iterator"),
        pytest.param([torch.zeros(0, 3, 4, 4)], "must hold at least one example", id="zero-rows"),
        pytest.param(42, "must be an iterable of batches .* but got int", id="int"),
        pytest.param(None, "must be an iterable of batches .* but got NoneType", id="None"),
        pytest.param([np.zeros((2, 3, 4, 4))], "batch 0 is ndarray", id="numpy-batch"),
        pytest.param([torch.zeros(2, 3), {"x": torch.zeros(2, 3)}], "batch 1 is dict", id="dict-batch"),
        pytest.param([(np.zeros((2, 3)), torch.zeros(2))], "batch 0 is tuple", id="tuple-of-arrays"),
        pytest.param([()], "batch 0 is tuple", id="empty-tuple"),
        pytest.param("abc", "batch 0 is str", id="string"),
        pytest.param([(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)), torch.zeros(2, 3)], "batch 1 differs", id="labeled-then-bare"),
        pytest.param([torch.zeros(2, 3), (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))], "batch 1 differs", id="bare-then-labeled"),
        pytest.param(
            [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)), (torch.zeros(2, 3), torch.rand(2))],
            "batch 1 differs", id="labeled-then-float",
        ),
        pytest.param([torch.zeros(2, 3), torch.zeros(2, 4)], r"one shape, but batch 1 has inputs of shape \(2, 4\) and batch 0 \(2, 3\)", id="shapes-differ"),
        pytest.param([torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)],
                     "one dtype, but batch 2 has float64 and batch 0 float32", id="dtypes-differ"),  # torch.cat promoted all, unsaid
        pytest.param(
            (torch.zeros(10, 3, 4, 4), torch.zeros(9, dtype=torch.long)), r"batch 1 has inputs of shape \(9,\)", id="labels-of-another-length",
        ),
        pytest.param([torch.tensor(1.0)], r"batch 0 has inputs of shape \(\)", id="0-d"),
    ],
)
def test_bad_data_is_refused(data: Any, message: str) -> None:
    with pytest.raises(autodac.AutodacError, match=message):
        collect_probe(data, 100)


# ----------------------------------------------------------------------------- BatchNorm re-estimation


class _BNNet(nn.Module):
    """BatchNorm2d twice, a Dropout between them, and a BatchNorm1d on ``N x C`` features; input ``N x 3 x 6 x 6``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(4, momentum=0.3)
        self.fc = nn.Linear(4, 5)
        self.bn3 = nn.BatchNorm1d(5)
        seeded(self, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean((2, 3))))


def _inputs(n: int) -> torch.Tensor:
    """Inputs whose mean drifts with the index, so batches differ (as in an unshuffled loader)."""
    generator = torch.Generator().manual_seed(7)
    return torch.randn(n, 3, 6, 6, generator=generator) * 2.0 + torch.linspace(-3, 3, n).view(n, 1, 1, 1)


def _true_statistics(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and unbiased variance of every BatchNorm's input over all ``inputs``, seen by hooks on a copy
    run batch by batch with the BatchNorms (only) normalising by batch statistics."""
    twin = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, module in twin.named_modules():
        if isinstance(module, _BN):
            module.train()
            module.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].detach().double()))
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            twin(inputs[start : start + batch_size])
    stats = {}
    for name, chunks in seen.items():
        x = torch.cat(chunks)
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        stats[name] = (flat.mean(1), flat.var(1, unbiased=True))
    return stats


@pytest.mark.parametrize("n, batch_size", [(40, 256), (64, 16), (70, 16), (45, 8)], ids=["one-batch", "equal", "short-last", "short-last-8"])
def test_reestimated_statistics_are_exact(n: int, batch_size: int) -> None:
    model = _BNNet()
    x = _inputs(n)
    expected = _true_statistics(model, x, batch_size)
    assert reestimate_batchnorm(model, x, batch_size=batch_size) is model
    assert set(expected) == {"bn1", "bn2", "bn3"}
    for name, (mean, var) in expected.items():
        norm = model.get_submodule(name)
        torch.testing.assert_close(norm.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm.running_var.double(), var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, batch_size", [(33, 32), (257, 256)])
def test_a_last_batch_of_one_is_accepted(n: int, batch_size: int) -> None:
    """A BatchNorm1d on ``N x C`` features cannot run in training mode on one example; the first
    BatchNorm's statistics (which no other BatchNorm shapes) are still those of all the inputs."""
    model = _BNNet()
    x = _inputs(n)
    reestimate_batchnorm(model, x, batch_size=batch_size)
    mean, var = _true_statistics(model, x, n)["bn1"]
    torch.testing.assert_close(model.bn1.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var.double(), var, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(model.bn3.running_var).all() and (model.bn3.running_var > 0).all()


def test_reestimation_depends_only_on_the_inputs() -> None:
    """Whatever the stored statistics were before, the same inputs give the same statistics."""
    first, second = _BNNet(), _BNNet()
    for module in second.modules():
        if isinstance(module, _BN):
            module.running_mean.fill_(5.0)
            module.running_var.fill_(9.0)
    x = _inputs(50)
    reestimate_batchnorm(first, x, batch_size=16)
    reestimate_batchnorm(second, x, batch_size=16)
    assert all(torch.equal(a, b) for a, b in zip(first.buffers(), second.buffers()))


def test_reestimation_moves_the_statistics() -> None:
    """A guard for the test above: the inputs really are far from the stored statistics."""
    model = _BNNet()
    before = model.bn1.running_mean.clone()
    reestimate_batchnorm(model, _inputs(50))
    assert (model.bn1.running_mean - before).abs().max() > 0.1


@pytest.mark.parametrize("root_training", [False, True])
def test_modes_and_momenta_are_restored(root_training: bool) -> None:
    model = _BNNet().train(root_training)
    model.bn2.train(not root_training)  # one BatchNorm in the other mode
    model.drop.train(not root_training)
    modes = [(name, m.training) for name, m in model.named_modules()]
    momenta = [(name, m.momentum) for name, m in model.named_modules() if isinstance(m, _BN)]
    assert {m for _, m in momenta} == {0.1, 0.3}
    reestimate_batchnorm(model, _inputs(20), batch_size=8)
    assert [(name, m.training) for name, m in model.named_modules()] == modes
    assert [(name, m.momentum) for name, m in model.named_modules() if isinstance(m, _BN)] == momenta
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_momenta_are_restored_when_the_model_fails() -> None:
    model = _BNNet().train()
    with pytest.raises(RuntimeError):
        reestimate_batchnorm(model, torch.randn(4, 5, 6, 6))  # wrong channel count
    assert [m.momentum for m in model.modules() if isinstance(m, _BN)] == [0.1, 0.3, 0.1]
    assert all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_model_without_batchnorm_is_unchanged() -> None:
    model = seeded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(64, 5)), 0).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = _inputs(10)
    assert not has_batchnorm(model)
    assert reestimate_batchnorm(model, x) is model
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), model(x))


def test_batchnorm_without_running_statistics_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert not has_batchnorm(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reestimate_batchnorm(model, _inputs(10))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- metrics


SHAPES = [(8, 10), (8, 1), (4, 5, 3, 3), (8,)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_divergence_is_zero_only_for_identical_outputs(shape: tuple[int, ...]) -> None:
    reference = torch.randn(shape) * 3
    assert divergence(reference.clone(), reference) == 0.0
    for scale in (1e-2, 1.0):
        assert divergence(reference + scale * torch.randn(shape), reference) > 0.0


def test_divergence_is_the_kl_divergence_for_class_scores() -> None:
    reference, outputs = torch.randn(16, 10) * 2, torch.randn(16, 10) * 2
    expected = F.kl_div(torch.log_softmax(outputs, 1), torch.log_softmax(reference, 1), log_target=True, reduction="batchmean")
    assert divergence(outputs, reference) == pytest.approx(float(expected), rel=1e-5)
    # logits shifted by a constant per row are the same distribution
    assert divergence(reference + torch.randn(16, 1) * 5, reference) == pytest.approx(0.0, abs=1e-5)


def test_divergence_is_the_relative_error_for_one_channel() -> None:
    reference = torch.randn(16, 1)
    assert divergence(2 * reference, reference) == pytest.approx(1.0, rel=1e-6)
    assert divergence(torch.zeros(16, 1), reference) == pytest.approx(1.0, rel=1e-6)


def test_output_kind_reads_what_the_outputs_are() -> None:
    logits = torch.randn(16, 10) * 2
    assert output_kind(logits) == "scores"
    assert output_kind(torch.softmax(logits, 1)) == "distribution"
    assert output_kind(torch.sigmoid(logits)) == "probabilities"
    assert output_kind(torch.softmax(torch.randn(4, 5, 3, 3), 1)) == "distribution"  # per position, over dim 1
    assert output_kind(torch.rand(16, 1)) == "values"


def test_divergence_of_distributions_is_their_kl_divergence() -> None:
    p, q = torch.softmax(torch.randn(16, 10) * 2, 1), torch.softmax(torch.randn(16, 10) * 2, 1)
    expected = F.kl_div(q.log(), p, reduction="batchmean")
    assert divergence(q, p) == pytest.approx(float(expected), rel=1e-5)
    # the same outputs taken as scores (a softmax of probabilities) hide most of it
    assert divergence(q, p, "scores") < 0.2 * divergence(q, p)


def test_divergence_of_independent_probabilities_is_the_bernoulli_kl() -> None:
    """A sigmoid head (CREPE's 360 pitch bins): each entry is a probability of its own."""
    p, q = torch.sigmoid(torch.randn(8, 6) * 2), torch.sigmoid(torch.randn(8, 6) * 2)
    expected = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(1).mean()
    assert divergence(q, p) == pytest.approx(float(expected), rel=1e-5)
    # a pitch peak moved by two bins is a large change, not the near-zero a softmax of the bins sees
    peak = torch.full((1, 360), 0.01)
    moved = peak.clone()
    peak[0, 100], moved[0, 102] = 0.95, 0.95
    assert divergence(moved, peak) > 5.0
    assert divergence(moved, peak, "scores") < 0.01
    # saturated outputs (exact 0 or 1) stay finite
    assert np.isfinite(divergence(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), "probabilities"))


def test_divergence_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        divergence(torch.rand(4, 3), torch.rand(4, 3), "logits")


@pytest.mark.parametrize("agree", [0, 1, 5, 8])
def test_top1_match_counts_agreements(agree: int) -> None:
    targets = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    predicted = torch.where(torch.arange(8) < agree, targets, (targets + 1) % 5)
    outputs = F.one_hot(predicted, 5).float() * 3 + torch.rand(8, 5)  # argmax is `predicted`
    assert top1_match(outputs, targets) == agree / 8
    assert top1_match(outputs, outputs.argmax(1)) == 1.0


def test_top1_match_over_positions() -> None:
    outputs = torch.randn(2, 4, 3, 3)
    targets = outputs.argmax(1)
    targets[0, 0, 0] = (targets[0, 0, 0] + 1) % 4
    assert top1_match(outputs, targets) == pytest.approx(17 / 18)


def test_top1_match_needs_a_class_dimension() -> None:
    with pytest.raises(autodac.ModelError, match=r"class dimension.*\(8,\)"):
        top1_match(torch.randn(8), torch.zeros(8, dtype=torch.long))


def test_outputs_laid_out_like_an_input_are_values_whatever_their_range() -> None:
    """A denoiser's or an upscaler's image is values (a softmax over its colour channels cannot see brightness);
    a segmenter's class scores (other channels than the input's) stay scores."""
    x = torch.randn(4, 3, 8, 8)
    assert output_kind(x * 5, x) == "values"
    assert output_kind(torch.rand(4, 3, 16, 16), x) == "values"  # an upscaler's [0, 1] image is not independent probabilities
    assert output_kind(torch.randn(4, 5, 8, 8) * 3, x) == "scores"
    assert output_kind(torch.randn(4, 3, 4, 4) * 3, x) == "scores"  # fewer positions than the input: a map of scores
    assert output_kind(x * 5, Inputs((torch.randn(4, 6, 8, 8), x))) == "values"  # any of several inputs


def test_r_squared_is_the_share_of_the_originals_variation_reproduced() -> None:
    torch.manual_seed(0)
    reference = torch.randn(8, 3, 5, 5) + torch.tensor([4.0, -2.0, 0.5]).reshape(1, 3, 1, 1)
    assert r_squared(reference, reference) == pytest.approx(1.0)
    channel_means = reference.mean((0, 2, 3), keepdim=True).expand_as(reference)
    assert r_squared(channel_means, reference) == pytest.approx(0.0, abs=1e-12)
    brighter = reference + 0.5  # what a softmax over the channels does not see
    assert divergence(brighter, reference, "scores") == pytest.approx(0.0, abs=1e-6)
    assert r_squared(brighter, reference) < 0.9 and divergence(brighter, reference, "values") > 1e-3


def test_r_squared_of_an_original_that_does_not_vary_falls_back_to_the_error_relative_to_its_energy() -> None:
    constant = torch.full((6, 2, 4, 4), 3.0)
    assert r_squared(constant, constant) == 1.0
    off = constant * 1.1  # 10% off everywhere: 1% of the energy
    assert r_squared(off, constant) == pytest.approx(0.99)
    assert math.isfinite(r_squared(off + torch.randn(off.shape), constant))
    zeros = torch.zeros(6, 2, 4, 4)
    assert r_squared(zeros, zeros) == 1.0 and r_squared(zeros + 1e-3, zeros) == 0.0


def test_a_forced_output_kind_the_outputs_cannot_have_is_refused() -> None:
    assert check_output_kind("values", torch.randn(4, 1)) is None and check_output_kind("scores", torch.randn(4, 3)) is None
    with pytest.raises(autodac.AutodacError, match=r"output_kind='scores' compares outputs over a class dimension .* shape \(4, 1\)"):
        check_output_kind("scores", torch.randn(4, 1))
    with pytest.raises(autodac.AutodacError, match=r"output_kind='probabilities' needs outputs in \[0, 1\] .* range over \[-"):
        check_output_kind("probabilities", torch.randn(4, 3))


@pytest.mark.parametrize("kind", ["values", "scores"])
def test_a_stopped_score_is_a_lower_bound_on_the_whole_divergence(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Chunk by chunk, the part summed so far never exceeds the whole probe's divergence, for squared errors too."""
    import autodac.api as api
    from autodac.probes import Probe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)).eval()
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight.mul_(0.9)
        changed[0].bias.add_(0.2)  # the same error on every example, large against the quiet first chunk's own outputs
    x = torch.randn(64, 3, 6, 6) * torch.where(torch.arange(64) < 4, 0.01, 10.0).reshape(64, 1, 1, 1)
    runner = api._ProbeRunner(model, Probe(x, None), None, kind)
    whole = runner.score(changed)[0]
    monkeypatch.setattr(api, "BATCH_ELEMENTS", 3 * 6 * 6 * 4)  # chunks of 4 examples
    for floor in (whole * 0.25, whole * 0.9, whole * 1.1):
        bound, metric = runner.score(changed, floor=floor)
        if math.isnan(metric):  # stopped: what it claims is no better than it is, and worse than the floor
            assert whole - 1e-6 * abs(whole) <= bound < floor
        else:
            assert bound == pytest.approx(whole)
    assert math.isnan(runner.score(changed, floor=whole * 0.25)[1]), "a floor 4x better than the model must stop it"


def test_a_float16_input_s_covariance_is_its_float32_values_covariance_when_scaled() -> None:
    """Activations far from 1 are scaled by a power of two before their product; a float16 input divided in its own
    dtype lost its small values (subnormals, zeros): 5,111 of 5,184 entries changed."""
    from autodac.probes import input_covariances

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3)).eval()
    x = torch.rand(8, 4, 10, 10) * 0.05
    x[0, 0, 0, 0] = 1000.0  # the scale is 512: 0.05 / 512 is below float16's normal range
    half = input_covariances(model.half(), {"0": model[0]}, x.half())["0"]
    model.float()
    assert torch.equal(half, input_covariances(model, {"0": model[0]}, x.half().float())["0"])
