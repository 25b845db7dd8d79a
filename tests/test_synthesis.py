"""Synthetic probes: inputs that match the stored BatchNorm statistics, deterministic, the model untouched,
clear refusals, and plans made on them that ``apply`` replays without data."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import autodac
from autodac.errors import AutodacError, ModelError
from autodac.probes import reestimate_batchnorm
from autodac.synthesis import statistics_mismatch, synthesize_inputs
from autodac.testing import SmallConvNet

SHAPE = (1, 3, 12, 12)


def _trained_like() -> nn.Module:
    """SmallConvNet whose BatchNorm statistics come from inputs far from unit noise (mean 2, std 0.5, correlated)."""
    model = SmallConvNet(seed=3)
    generator = torch.Generator().manual_seed(7)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(512, 3, 14, 14, generator=generator), 3, stride=1)
    reestimate_batchnorm(model, 2.0 + 1.5 * smooth)
    return model.eval()


def test_synthesised_inputs_match_the_stored_statistics_far_better_than_noise() -> None:
    model = _trained_like()
    noise = torch.randn(256, *SHAPE[1:], generator=torch.Generator().manual_seed(1))
    synthetic = synthesize_inputs(model, torch.zeros(SHAPE), 256, steps=60, progress=False)
    assert synthetic.shape == (256, *SHAPE[1:])
    assert torch.isfinite(synthetic).all()
    before, after = statistics_mismatch(model, noise), statistics_mismatch(model, synthetic)
    assert after < 0.1 * before, (before, after)


def test_more_steps_never_match_worse() -> None:
    model = _trained_like()
    short = synthesize_inputs(model, torch.zeros(SHAPE), 64, steps=5, progress=False)
    long = synthesize_inputs(model, torch.zeros(SHAPE), 64, steps=60, progress=False)
    assert statistics_mismatch(model, long) < statistics_mismatch(model, short)


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    model = _trained_like()
    first = synthesize_inputs(model, torch.zeros(SHAPE), 32, steps=5, seed=4, progress=False)
    again = synthesize_inputs(model, torch.zeros(SHAPE), 32, steps=5, seed=4, progress=False)
    other = synthesize_inputs(model, torch.zeros(SHAPE), 32, steps=5, seed=5, progress=False)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_the_model_is_left_exactly_as_it_was() -> None:
    model = _trained_like().train()
    state = copy.deepcopy(model.state_dict())
    synthesize_inputs(model, torch.zeros(SHAPE), 16, steps=3, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"count": 1}, "count >= 2"),
        ({"count": 2.5}, "count >= 2"),
        ({"steps": 0}, "steps >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, match) -> None:
    settings = {"count": 8, "steps": 2, **kwargs}
    with pytest.raises(AutodacError, match=match):
        synthesize_inputs(_trained_like(), torch.zeros(SHAPE), settings.pop("count"), progress=False, **settings)


def test_a_model_without_batchnorm_is_refused_with_the_reason() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ModelError, match="BatchNorm"):
        synthesize_inputs(model, torch.zeros(SHAPE), 8, steps=2, progress=False)
    with pytest.raises(ModelError, match="BatchNorm"):
        autodac.optimize(model, 0.7, example_inputs=torch.zeros(SHAPE), synthesize=8, progress=False)


def test_non_tensor_or_integer_example_inputs_are_refused() -> None:
    with pytest.raises(AutodacError, match="floating-point tensor"):
        synthesize_inputs(_trained_like(), torch.zeros(SHAPE, dtype=torch.long), 8, progress=False)
    with pytest.raises(AutodacError, match="floating-point tensor"):
        synthesize_inputs(_trained_like(), [torch.zeros(SHAPE)], 8, progress=False)


@pytest.mark.parametrize("value", [1, -3, 2.0, True])
def test_optimize_refuses_a_bad_synthesize(value) -> None:
    with pytest.raises(AutodacError, match="synthesize"):
        autodac.optimize(_trained_like(), 0.7, example_inputs=torch.zeros(SHAPE), synthesize=value, progress=False)


def test_a_synthetic_probe_larger_than_probe_size_is_refused_before_any_work() -> None:
    # a billion inputs of 1x28x28 would take terabytes: it started anyway, and probe_size was ignored
    with pytest.raises(AutodacError, match=r"`synthesize` must be at most `probe_size` .* synthesize=1000000000 and probe_size=2048"):
        autodac.optimize(_trained_like(), 0.7, example_inputs=torch.zeros(SHAPE), synthesize=10**9, progress=False)
    with pytest.raises(AutodacError, match=r"synthesize=300 and probe_size=100"):
        autodac.optimize(_trained_like(), 0.7, example_inputs=torch.zeros(SHAPE), synthesize=300, probe_size=100, progress=False)
    with pytest.raises(AutodacError, match=r"synthesize=300 and probe_size=100"):  # flat and grouped: judged merged
        autodac.optimize(_trained_like(), 0.7, example_inputs=torch.zeros(SHAPE), synthesize=300,
                         probe=autodac.ProbeOptions(probe_size=100), progress=False)


def test_synthesize_above_the_default_probe_size_is_taken_with_a_larger_probe_size_given_grouped() -> None:
    from autodac.api import _group

    given = {f.name: f.default for f in dataclasses.fields(autodac.ProbeOptions)}
    merged = _group(autodac.ProbeOptions, {**given, "synthesize": 3000, "probe": autodac.ProbeOptions(probe_size=4096)})
    assert (merged.synthesize, merged.probe_size) == (3000, 4096)  # the flat half alone (3000 > 2048) is not judged


def test_optimize_refuses_data_and_synthesize_together() -> None:
    with pytest.raises(AutodacError, match="alternatives"):
        autodac.optimize(
            _trained_like(), 0.7, example_inputs=torch.zeros(SHAPE), data=torch.zeros(4, *SHAPE[1:]), synthesize=8, progress=False
        )


def test_optimize_plans_on_a_synthetic_probe_and_apply_replays_it_without_data() -> None:
    model = _trained_like()
    state = copy.deepcopy(model.state_dict())
    result = autodac.optimize(model, 0.6, example_inputs=torch.zeros(SHAPE), synthesize=64, n_trials=2, progress=False)
    plan = autodac.Plan.from_json(result.plan.to_json())
    assert plan.probe["source"] == "synthetic" and plan.probe["examples"] == 64
    assert result.flops_ratio <= 0.6
    assert "probe" in result.metrics and result.metrics["probe_examples"] == 64
    assert any(c.fit.removeprefix("seq+").startswith("data") for c in plan.factorized.values())  # fitted to the synthetic inputs
    rebuilt = autodac.apply(model, plan)
    x = torch.randn(8, *SHAPE[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), result.model.eval()(x), rtol=1e-4, atol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
