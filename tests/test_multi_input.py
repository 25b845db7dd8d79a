"""Models of several inputs, planned with data end to end: optimize, save, apply with the same data, the CLI's x0, x1 files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fvcore.nn import FlopCountAnalysis

import autodac
from cli_runs import run_cli, succeeded
from autodac.batches import Inputs
from autodac.errors import AutodacError
from autodac.probes import collect_probe
from autodac.testing import TwoInputNet



def _data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image, depth = torch.randn(n, 3, 12, 12, generator=g), torch.randn(n, 1, 12, 12, generator=g)
    labels = torch.randint(0, 5, (n,), generator=g)
    return image, depth, labels


def _fvcore(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    analysis = FlopCountAnalysis(model.eval(), inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total())


@pytest.fixture(scope="module")
def planned():
    image, depth, labels = _data()
    model = TwoInputNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [((image[i : i + 32], depth[i : i + 32]), labels[i : i + 32]) for i in range(0, 96, 32)]
    result = autodac.optimize(model, 0.5, data=batches, n_trials=3, progress=False)
    return model, before, batches, result


def test_probe_batches_of_several_inputs_are_collected_together() -> None:
    image, depth, labels = _data(10)
    probe = collect_probe([((image[:6], depth[:6]), labels[:6]), ((image[6:], depth[6:]), labels[6:])], max_samples=8)
    assert isinstance(probe.inputs, Inputs) and len(probe) == 8
    assert torch.equal(probe.inputs.parts[0], image[:8]) and torch.equal(probe.inputs.parts[1], depth[:8])
    assert torch.equal(probe.labels, labels[:8])
    unlabelled = collect_probe([((image, depth),)])
    assert unlabelled.labels is None and len(unlabelled) == 10


def test_a_two_input_model_is_planned_on_its_data_within_the_budget(planned) -> None:
    model, before, _, result = planned
    image, depth, _ = _data(2)
    assert result.plan.factorized, "half the FLOPs of a conv net must factorise something"
    assert result.plan.input_shapes == [[1, 3, 12, 12], [1, 1, 12, 12]]
    assert _fvcore(result.model, image, depth) <= 0.5 * _fvcore(TwoInputNet(), image, depth)
    assert result.metrics["probe_original"] > 0 and "probe" in result.metrics  # scored on the labelled held-out half
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the caller's model is untouched


def test_a_saved_two_input_plan_applied_with_the_same_data_rebuilds_the_model(planned, tmp_path: Path) -> None:
    _, _, batches, result = planned
    result.plan.save(tmp_path / "plan.json")
    rebuilt = autodac.apply(TwoInputNet(), autodac.Plan.load(tmp_path / "plan.json"), data=batches)
    image, depth, _ = _data(8, seed=3)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(image, depth), result.model.eval()(image, depth))


def test_inputs_of_different_batch_sizes_are_refused_by_the_rule() -> None:
    image, depth, labels = _data(8)
    with pytest.raises(AutodacError, match=r"must share their first \(batch\) dimension.*\(8, 3, 12, 12\), \(5, 1, 12, 12\)"):
        collect_probe([((image, depth[:5]), labels)])


def test_a_second_input_passed_where_labels_go_names_the_form_for_several_inputs() -> None:
    image, depth, _ = _data(8)
    with pytest.raises(AutodacError, match=r"must be labels.*\(\(x0, x1, \.\.\.\), y\)"):
        autodac.optimize(TwoInputNet(), 0.5, data=[[image, depth]], progress=False)


def test_the_cli_plans_and_applies_a_two_input_model_from_numbered_arrays(tmp_path: Path) -> None:
    image, depth, labels = _data(48)
    np.savez(tmp_path / "probe.npz", x0=image.numpy(), x1=depth.numpy(), y=labels.numpy())
    def cli(*args: str):
        return succeeded(run_cli(*args, cwd=tmp_path))

    planned = json.loads(cli("optimize", "autodac.testing:TwoInputNet", "--flops-budget", "0.6", "--data", "probe.npz",
                             "--n-trials", "2", "--out", "plan.json", "--save-model", "planned.pt", "--json", "--quiet").stdout)
    assert planned["flops_ratio"] <= 0.6 and planned["factorized"] >= 1
    cli("apply", "autodac.testing:TwoInputNet", "plan.json", "--data", "probe.npz", "--out", "applied.pt")
    planned_model, applied = (torch.load(tmp_path / f, weights_only=False).eval() for f in ("planned.pt", "applied.pt"))
    with torch.no_grad():
        assert torch.equal(applied(image[:4], depth[:4]), planned_model(image[:4], depth[:4]))


def test_numbered_inputs_must_start_at_x0(tmp_path: Path) -> None:
    from autodac.cli import CLIError, _load_data

    image, depth, _ = _data(4)
    np.savez(tmp_path / "gap.npz", x0=image.numpy(), x2=depth.numpy())
    with pytest.raises(CLIError, match=r"numbered \['x0', 'x1'\] from x0 on, but got \['x0', 'x2'\]"):
        _load_data(str(tmp_path / "gap.npz"), TwoInputNet())


class _ImageAndTokens(torch.nn.Module):
    """A conv-BN image branch and an embedding of integer tokens, summed: one input float, one integer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(32)
        self.conv2 = torch.nn.Conv2d(32, 32, 1)  # a width unit whose moments the BatchNorm before it implies
        self.bn2 = torch.nn.BatchNorm2d(32)
        self.embed = torch.nn.Embedding(50, 32)
        self.fc = torch.nn.Linear(32, 5)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(image))))))
        return self.fc(h.mean((2, 3)) + self.embed(tokens).mean(1))


class _MaskedAttention(torch.nn.Module):
    """Conv-BN features read as a sequence by attention under a causal ``T x T`` mask: an argument with no batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)
        return self.fc(self.attn(h, h, h, attn_mask=mask, need_weights=False)[0].mean(1))


def test_a_data_free_plan_of_an_image_and_token_model_replays_with_apply() -> None:
    # apply rebuilds example inputs from the plan's shapes in the model's float dtype: integer tokens cannot come back
    torch.manual_seed(0)
    model = autodac.testing.seeded(_ImageAndTokens(), 0).eval()
    example = (torch.randn(1, 3, 8, 8), torch.randint(0, 50, (1, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # damage at 0.5 on random weights is not what is tested here
        result = autodac.optimize(model, 0.5, example_inputs=example, progress=False)
    assert result.plan.factorized
    rebuilt = autodac.apply(model, autodac.Plan.from_json(result.plan.to_json()))
    x = (torch.randn(4, 3, 8, 8), torch.randint(0, 50, (4, 6)))
    torch.testing.assert_close(rebuilt(*x), result.model(*x), rtol=0, atol=0)


def test_an_unbatched_mask_argument_does_not_break_the_data_free_pass() -> None:
    model = autodac.testing.seeded(_MaskedAttention(), 0).eval()
    mask = torch.triu(torch.full((16, 16), float("-inf")), 1)
    x = torch.randn(1, 3, 4, 4)
    result = autodac.optimize(model, 0.7, example_inputs=(x, mask), progress=False)
    assert result.flops_ratio <= 0.7
    assert torch.isfinite(result.model(torch.randn(3, 3, 4, 4), mask)).all()


def test_a_batch_of_three_tensors_is_refused_with_the_grouped_form() -> None:
    # DataLoader(TensorDataset(image, depth, labels)) yields [image, depth, labels]: read as (x, y) the labels were dropped
    image, depth, labels = _data(8)
    rule = r"batch 0 holds 3 items whose second, of shape \(8, 1, 12, 12\), is not labels .*: group the inputs, \(\(x0, x1, \.\.\.\), y\)"
    with pytest.raises(AutodacError, match=rule):
        collect_probe([[image, depth, labels]])
