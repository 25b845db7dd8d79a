"""Memory bounds of the probe search: statistics only for candidate layers, a per-layer covariance limit that
falls back to the plain fit with a note, and batches sized by their input rather than by count."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import autodac
import autodac.api
import autodac.probes
import autodac.sequential
from autodac.factorize import get_method
from autodac.factorize.base import covariance_for
from autodac.probes import (
    BATCH_ELEMENTS, batch_size_for, covariance_bytes, covariance_fits, cross_covariances, input_covariances, patch_size, predict,
    reconstruction_errors, reestimate_batchnorm,
)
from autodac.synthesis import synthesize_inputs
from autodac.testing import SmallConvNet, seeded

SEARCH = {"probe_size": 64, "profile_size": 16, "n_trials": 2, "progress": False}
FACTORISE = {**SEARCH, "widths": False}  # planned hidden widths are fitted to channel moments, not to patch covariances


class _DepthwiseNet(nn.Module):
    """Conv-BN, a depthwise 5x5 conv-BN (never a candidate), a 1x1 conv and a Linear head; input ``N x 3 x H x W``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 5, padding=2, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv(x)))
        x = torch.relu(self.bn2(self.depthwise(x)))
        return self.fc(torch.relu(self.project(x)).mean((2, 3)))


def _data(shape: tuple[int, ...] = (3, 8, 8), n: int = 64, seed: int = 5) -> list[torch.Tensor]:
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    return [x[i : i + 16] for i in range(0, n, 16)]


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[set[str]]:
    """Record the layer names of every call to ``module.name`` (a covariance function taking ``layers`` or ``name``)."""
    calls: list[set[str]] = []
    real = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        target = args[1] if len(args) > 1 else kwargs["layers"]
        calls.append(set(target) if isinstance(target, dict) else {args[2]})
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


# ----------------------------------------------------------------------------- batch sizes


@pytest.mark.parametrize(
    "shape, expected", [((1, 28, 28), 256), ((3, 32, 32), 256), ((10,), 256), ((3, 224, 224), 32), ((3, 1024, 1024), 1)]
)
def test_batch_size_keeps_a_batch_input_within_the_limit(shape: tuple[int, ...], expected: int) -> None:
    """Small inputs keep the batch of 256 their results were made with; large ones go a few at a time."""
    size = batch_size_for(shape)
    assert size == expected
    assert size == 1 or size * torch.Size(shape).numel() <= BATCH_ELEMENTS


def test_batch_size_respects_its_cap() -> None:
    assert batch_size_for((1, 28, 28), most=64) == 64
    assert batch_size_for((3, 224, 224), most=64) == 32
    assert batch_size_for((3, 224, 224), most=16) == 16
    assert batch_size_for((3, 224, 224), most=2) == 2


def test_predict_is_the_same_for_any_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    model = SmallConvNet(seed=0).eval()
    x = torch.randn(23, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    whole = predict(model, x)
    for batch_size in (1, 4, 23):
        torch.testing.assert_close(predict(model, x, batch_size), whole, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(autodac.probes, "BATCH_ELEMENTS", 3 * 10 * 10 * 3)  # the default now takes 3 at a time
    torch.testing.assert_close(predict(model, x), whole, rtol=1e-5, atol=1e-6)


def test_default_batches_follow_the_input_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """``predict``, ``reestimate_batchnorm`` and the covariance passes run the model on batches of ``batch_size_for``."""
    model = SmallConvNet(seed=0).eval()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    x = torch.randn(10, 3, 8, 8)
    monkeypatch.setattr(autodac.probes, "BATCH_ELEMENTS", 4 * 3 * 8 * 8)
    predict(model, x)
    assert seen == [1, 4, 4, 1]  # the first example alone (its largest layer output measured), then batches of 4
    seen.clear()
    reestimate_batchnorm(model, x)
    assert seen == [1, 4, 4, 2]  # one example measured before the statistics' own passes
    seen.clear()
    input_covariances(model, {"conv2": model.conv2}, x)
    assert seen == [4, 4, 2]
    # and no batch's largest layer output (conv1's: 8 x 8 x 8 = 512 elements an example) beyond ACTIVATION_ELEMENTS
    monkeypatch.setattr(autodac.probes, "ACTIVATION_ELEMENTS", 2 * 512)
    seen.clear()
    reestimate_batchnorm(model, x)
    assert seen == [1, 2, 2, 2, 2, 2]
    seen.clear()
    predict(model, x)
    assert seen == [1, 2, 2, 2, 2, 1]


def test_covariances_are_the_same_for_any_batch_size() -> None:
    """Without subsampling, covariance sums do not depend on how the inputs are batched."""
    model = SmallConvNet(seed=0).eval()
    x = torch.randn(9, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    layers = {"conv1": model.conv1, "conv2": model.conv2, "fc": model.fc}
    whole = input_covariances(model, layers, x, batch_size=9)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.conv1.weight.mul_(0.9)
    cross_whole = cross_covariances(model, changed, "conv2", x, batch_size=9)
    for batch_size in (None, 1, 4):
        batched = input_covariances(model, layers, x, batch_size=batch_size)
        for name in layers:
            torch.testing.assert_close(batched[name], whole[name], rtol=1e-5, atol=1e-5)  # float32 products per batch
        cross, gram = cross_covariances(model, changed, "conv2", x, batch_size=batch_size)
        torch.testing.assert_close(cross, cross_whole[0], rtol=1e-5, atol=1e-5)  # float32 products per batch
        torch.testing.assert_close(gram, cross_whole[1], rtol=1e-5, atol=1e-5)  # float32 products per batch


def test_synthesis_keeps_batches_of_256_for_small_inputs() -> None:
    """Batching changes synthesised inputs (statistics are matched per batch): small inputs keep their 256."""
    model = SmallConvNet(seed=3).eval()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    synthesize_inputs(model, torch.zeros(1, 3, 28, 28), 300, steps=1, progress=False)
    assert seen == [256, 44]


def test_synthesis_of_large_inputs_goes_a_few_at_a_time() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.BatchNorm2d(4)).eval()
    seeded(model, 0)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    out = synthesize_inputs(model, torch.zeros(1, 3, 224, 224), 65, steps=1, progress=False)
    assert out.shape == (65, 3, 224, 224)
    assert seen == [32, 33]  # a last batch of one is joined to the one before


# ----------------------------------------------------------------------------- covariances only where they are used


def test_patch_size_and_covariance_bytes() -> None:
    depthwise = nn.Conv2d(1152, 1152, 5, groups=1152)
    assert patch_size(depthwise) == 1152 * 25  # F.unfold's patches span every input channel
    assert covariance_bytes(depthwise) == 8 * 28800**2  # 6.6 GB: why it must never be computed for a skipped layer
    assert patch_size(nn.Linear(25088, 10)) == 25088
    assert not covariance_fits(nn.Linear(25088, 10))  # VGG's first classifier: 5 GB
    assert covariance_fits(nn.Conv2d(512, 512, 3))  # 3x3 over 512 channels: 170 MB
    assert patch_size(nn.Conv1d(4, 2, 7)) == 28


def test_covariances_are_computed_only_for_candidate_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, autodac.api, "input_covariances")
    model = _DepthwiseNet().eval()
    result = autodac.optimize(model, 0.7, data=_data(), exclude=("fc",), sequential_fit=False, **FACTORISE)
    assert "depthwise" in result.plan.skipped and "fc" in result.plan.skipped
    assert calls and all(names <= {"conv", "project"} for names in calls)
    assert {"conv", "project"} <= set().union(*calls)


def test_apply_and_the_refit_ask_only_for_the_layers_they_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _DepthwiseNet().eval()
    data = _data()
    result = autodac.optimize(model, 0.6, data=data, **FACTORISE)
    factorized = set(result.plan.factorized)
    data_fitted = {n for n, c in result.plan.factorized.items() if c.fit.removeprefix("seq+").startswith("data")}
    refitted = {n for n, c in result.plan.factorized.items() if c.fit.startswith("seq+")}
    covariances = _spy(monkeypatch, autodac.api, "input_covariances")
    crosses = _spy(monkeypatch, autodac.sequential, "cross_covariances")
    autodac.apply(model, result.plan, data=data)
    assert set().union(*covariances) == data_fitted
    assert set().union(*crosses) == refitted <= factorized


def test_a_layer_over_the_covariance_limit_falls_back_to_the_plain_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """``conv2`` (72-wide patches: 41,472 bytes) is over a 10,000-byte limit and its channel blocks are taken as over too:
    no covariance, no data fit, no re-fit, a note naming it; the other layers keep their data fits and ``apply`` rebuilds
    the same model."""
    model = SmallConvNet(seed=0).eval()
    data = _data()
    monkeypatch.setattr(autodac.probes, "MAX_COVARIANCE_BYTES", 10_000)
    monkeypatch.setattr(autodac.api, "blocks_fit", lambda module: False)
    covariances = _spy(monkeypatch, autodac.api, "input_covariances")
    crosses = _spy(monkeypatch, autodac.sequential, "cross_covariances")
    result = autodac.optimize(model, 0.5, data=data, exclude=("fc",), **FACTORISE)
    plan = result.plan
    assert "conv2" not in set().union(*covariances) and "conv2" not in set().union(*crosses)
    assert "conv2" in plan.factorized, "the test needs conv2 factorised to show its fit"
    assert not plan.layers["conv2"].fit.removeprefix("seq+").startswith("data")
    assert not plan.layers["conv2"].fit.startswith("seq+")
    assert any(c.fit.removeprefix("seq+").startswith("data") for n, c in plan.factorized.items() if n != "conv2")
    note = next(n for n in plan.notes if "MAX_COVARIANCE_BYTES" in n)
    assert "conv2 (72-wide patches" in note and "conv1" not in note
    applied = autodac.apply(SmallConvNet(seed=0).eval(), autodac.Plan.from_json(plan.to_json()), data=data)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(predict(applied, x), predict(result.model, x))


def test_a_layer_whose_channel_blocks_fit_gets_a_dac_data_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """At a 10,000-byte limit ``conv2``'s full covariance (41,472 bytes) is over and its channel blocks (5,184) within:
    they are collected instead, DAC fits to them, the note says so, and ``apply`` rebuilds the same model from them."""
    model = SmallConvNet(seed=0).eval()
    data = _data()
    monkeypatch.setattr(autodac.probes, "MAX_COVARIANCE_BYTES", 10_000)
    covariances = _spy(monkeypatch, autodac.api, "input_covariances")
    crosses = _spy(monkeypatch, autodac.sequential, "cross_covariances")
    result = autodac.optimize(model, 0.5, data=data, exclude=("fc",), methods=("dac",), **FACTORISE)
    plan = result.plan
    assert "conv2" in set().union(*covariances) and "conv2" not in set().union(*crosses)
    assert plan.layers["conv2"].method == "dac", "the test needs conv2 factorised by DAC to show its fit"
    assert plan.layers["conv2"].fit.startswith("data")
    note = next(n for n in plan.notes if "MAX_COVARIANCE_BYTES" in n)
    assert "1 of them (conv2) fitted by DAC to each input channel's own patch covariance" in note
    applied = autodac.apply(SmallConvNet(seed=0).eval(), autodac.Plan.from_json(plan.to_json()), data=data)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(predict(applied, x), predict(result.model, x))
    # the blocks fit is the full fit: DAC reads no more of the covariance than each channel's own block
    monkeypatch.setattr(autodac.probes, "MAX_COVARIANCE_BYTES", 2**28)
    full = autodac.apply(SmallConvNet(seed=0).eval(), autodac.Plan.from_json(plan.to_json()), data=data)
    torch.testing.assert_close(predict(full, x), predict(result.model, x), rtol=1e-4, atol=1e-5)


def test_methods_that_cannot_read_channel_blocks_get_their_own_loss_curve(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blocks layer's DAC errors are on the data's scale and its low-rank errors on the weights': the profile measures
    each family on its own curve, so neither borrows the other's losses. A layer with a full covariance keeps one curve."""
    monkeypatch.setattr(autodac.probes, "MAX_COVARIANCE_BYTES", 10_000)  # conv2's blocks fit, its full covariance does not
    seen: dict[str, dict[str, set[str]]] = {}
    real = autodac.api._families

    def spy(candidate: Any) -> dict[str, np.ndarray]:
        families = real(candidate)
        seen[candidate.layer.name] = {f: {candidate.options[i][0] for i in idx} for f, idx in families.items()}
        return families

    monkeypatch.setattr(autodac.api, "_families", spy)
    result = autodac.optimize(SmallConvNet(seed=0).eval(), 0.5, data=_data(), exclude=("fc",), methods=("dac", "lowrank"), **FACTORISE)
    assert seen["conv2"] == {"own": {"dac"}, "own (weights)": {"lowrank"}}
    assert seen["conv1"] == {"own": {"dac", "lowrank"}}
    assert {method for method, _rank in result.profile.losses["conv2"]} == {"dac", "lowrank"}, "each curve needs its own measured point"


def test_no_note_when_every_layer_fits() -> None:
    result = autodac.optimize(SmallConvNet(seed=0).eval(), 0.5, data=_data(), sequential_fit=False, **SEARCH)
    assert not any("MAX_COVARIANCE_BYTES" in n for n in result.plan.notes)


@pytest.mark.parametrize("count, expected", [(257, [257]), (513, [256, 257]), (3, [3])])
def test_synthesis_joins_a_last_batch_of_one_to_the_one_before(count: int, expected: list[int]) -> None:
    model = SmallConvNet(seed=3).eval()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    assert synthesize_inputs(model, torch.zeros(1, 3, 4, 4), count, steps=1, progress=False).shape[0] == count
    assert seen == expected


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 4, 3, padding=1, stride=2), nn.Conv1d(5, 3, 7, padding=3), nn.Conv2d(4, 4, (5, 1), dilation=2)],
                         ids=["2d", "1d", "dilated"])
def test_channel_blocks_are_the_diagonal_blocks_of_the_full_covariance(monkeypatch: pytest.MonkeyPatch, conv: nn.Module) -> None:
    """Unfolded a channel or two at a time (a tiny chunk), from the same positions: exactly the full covariance's own blocks."""
    torch.manual_seed(0)
    x = torch.randn(3, conv.in_channels, *([12] * (conv.weight.dim() - 2)))
    full = input_covariances(conv, {"": conv}, x, max_positions=10**6)[""]
    monkeypatch.setattr(autodac.probes, "MAX_COVARIANCE_BYTES", autodac.probes.blocks_bytes(conv))
    monkeypatch.setattr(autodac.probes, "_BLOCK_CHUNK_ELEMENTS", 1)
    assert autodac.probes.blocks_fit(conv) and not autodac.probes.covariance_fits(conv)
    blocks = input_covariances(conv, {"": conv}, x, max_positions=10**6)[""]
    c, k = conv.in_channels, math.prod(conv.kernel_size)
    assert blocks.shape == (c, k, k)
    expected = full.reshape(c, k, c, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    torch.testing.assert_close(blocks, expected, rtol=1e-5, atol=1e-6)


def test_only_dac_fits_to_channel_blocks_and_its_fit_is_the_full_ones() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 5, 3, 3)
    rows = torch.randn(400, 45) @ torch.randn(45, 45)  # correlated patches
    full = (rows.T @ rows / 400).double()
    blocks = full.reshape(5, 9, 5, 9).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
    dac, lowrank = get_method("dac"), get_method("lowrank")
    torch.testing.assert_close(dac.errors(weight, None, blocks), dac.errors(weight, None, full))
    torch.testing.assert_close(dac.truncate(dac.decompose(weight, None, blocks), 3).first, dac.truncate(dac.decompose(weight, None, full), 3).first)
    assert not torch.allclose(dac.errors(weight, None, blocks), dac.errors(weight))  # the data moved the fit
    # lowrank cannot use blocks: the library hands it none, so its fit is the weights'
    assert covariance_for(lowrank, blocks) is None and covariance_for(dac, blocks) is blocks and covariance_for(lowrank, full) is full
    conv = nn.Conv2d(5, 8, 3)
    with torch.no_grad():
        conv.weight.copy_(weight)
    np.testing.assert_array_equal(reconstruction_errors(conv, "lowrank", None, blocks), reconstruction_errors(conv, "lowrank"))
    assert not np.array_equal(reconstruction_errors(conv, "dac", None, blocks), reconstruction_errors(conv, "dac"))


class _Widening(nn.Module):
    """A 1x1 conv to 64 channels (64x its input) and back: the largest output is 64 elements a pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.wide, self.narrow = nn.Conv2d(1, 64, 1), nn.Conv2d(64, 1, 1)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.narrow(self.wide(x)).flatten(1)


def test_predict_keeps_the_largest_output_of_a_batch_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs of 16 elements, a 64x wider layer: at most ``ACTIVATION_ELEMENTS`` // 1024 examples a batch, same outputs."""
    model = seeded(_Widening(), 0).eval()
    x = torch.randn(100, 1, 4, 4)
    whole = predict(model, x, batch_size=100)
    monkeypatch.setattr(autodac.probes, "ACTIVATION_ELEMENTS", 10 * 64 * 16)
    model.batches.clear()
    torch.testing.assert_close(predict(model, x), whole)
    assert model.batches[0] == 1 and max(model.batches[1:]) == 10 and sum(model.batches) == 100  # one measured, then batches of 10
    monkeypatch.setattr(autodac.probes, "ACTIVATION_ELEMENTS", 2**26)
    model.batches.clear()
    predict(model, x)
    assert model.batches == [1, 99]  # a small network's batches are sized by their inputs


class _WidensWhenFactorised(nn.Module):
    """A 5x5 conv of 8 channels at 8x8 (512 elements an example) whose DAC at rank r makes ``8 r`` channels inside."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 5, padding=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.relu(self.stem(x)))).mean((2, 3)))


def test_the_profile_bounds_the_interior_of_the_layer_under_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """No layer output of any pass, inside a factorised replacement too, exceeds ``ACTIVATION_ELEMENTS``.

    The profile runs the layer under test as its replacement's bound ``forward``, which no hook on
    the model sees; its batches must still be sized by that replacement's interior (a DAC at rank 8
    here: 64 channels at 8x8, eight times the original's largest output).
    """
    model = seeded(_WidensWhenFactorised(), 0).eval()
    data = [torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    bound = 4 * 64 * 64  # four examples of the widest replacement, 32 of the original
    monkeypatch.setattr(autodac.probes, "ACTIVATION_ELEMENTS", bound)
    largest = [0]
    build = autodac.api.build_factorized

    def watched(*args: Any, **kwargs: Any) -> nn.Module:
        layer = build(*args, **kwargs)
        for module in layer.modules():
            module.register_forward_hook(lambda _m, _a, out: largest.__setitem__(0, max(largest[0], out.numel())))
        return layer

    monkeypatch.setattr(autodac.api, "build_factorized", watched)
    result = autodac.optimize(
        model, 0.6, data=data, methods=("dac",), exclude=["stem", "head"], probe_size=128, profile_size=64, n_trials=2,
        progress=False, seed=0,
    )
    assert result.plan.layers["conv"].method == "dac"
    assert 0 < largest[0] <= bound


def test_stand_ins_count_only_where_their_module_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in is run on the input its module got; one for a module the model never calls changes nothing."""
    model = seeded(_Widening(), 0).eval()
    x = torch.randn(100, 1, 4, 4)
    monkeypatch.setattr(autodac.probes, "ACTIVATION_ELEMENTS", 10 * 64 * 16)
    assert autodac.probes.activation_batch_size(model, x, 50) == 10  # the model's own 64-channel layer
    wider = nn.Sequential(nn.Conv2d(64, 256, 1), nn.Conv2d(256, 1, 1))
    assert autodac.probes.activation_batch_size(model, x, 50, {model.narrow: [wider]}) == 2  # 256 x 16 an example inside
    unused = nn.Conv2d(1, 1, 1)
    assert autodac.probes.activation_batch_size(model, x, 50, {unused: [wider]}) == 10
