"""optimize's stages run alone: each is a function of one ``_Run`` and can be tested (or reused) without the rest."""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings

import pytest
import torch

import autodac
from autodac import api
from autodac.cost import count_flops
from autodac.errors import AutodacError
from autodac.factorize import get_method
from autodac.plan import DENSE
from autodac.testing import SmallConvNet

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _scored(**options) -> api._Run:
    """A run of SmallConvNet through check, probe, count and score."""
    run = api._start(SmallConvNet(), 0.5, example_inputs=X, progress=False, **options)
    for stage in (api._probe, api._count, api._score):
        stage(run)
    return run


def test_the_score_stage_costs_every_option_in_closed_form_as_fvcore_counts_it() -> None:
    run = _scored(widths=False)  # one layer per candidate: its options' costs are the method's own formula
    assert run.candidates and run.original.total == count_flops(SmallConvNet(), (X,)).total
    for i, candidate in enumerate(run.candidates):
        geometry = candidate.layer.geometry
        assert candidate.options[0][:3] == (DENSE, None, geometry.dense_cost())
        assert geometry.dense_cost() == run.original.by_module[candidate.layer.name]  # the closed form is fvcore's count
        for j, (method, rank, cost, _) in enumerate(candidate.options[1:], start=1):
            assert cost == get_method(method).cost(geometry, rank), (candidate.layer.name, method, rank)
            if rank in (1, 2):  # and the model built with that option alone counts what the options sum to
                selection = [0] * len(run.candidates)
                selection[i] = j
                built = api._build(run.model, run.candidates, selection, run.factors)
                fixed = run.original.total - sum(c.dense_cost for c in run.candidates)
                assert count_flops(built, (X,)).total == fixed + sum(c.options[s][2] for c, s in zip(run.candidates, selection))


def test_a_budget_no_plan_meets_is_refused_while_scoring_and_the_reach_stage_checks_it_again() -> None:
    """Refused from the options' costs before any statistics (the score stage); the reach stage's exact check stays."""
    message = r"`flops_budget >= 0\.\d{4}` must hold .* but got flops_budget=0\.01"
    run = api._start(SmallConvNet(), 0.01, example_inputs=X, progress=False)
    for stage in (api._probe, api._count):
        stage(run)
    with pytest.raises(autodac.BudgetError, match=message):
        api._score(run)
    run = _scored()  # scored for 0.5; the same run asked for 0.01 is refused by the reach stage
    run.settings = dataclasses.replace(run.settings, flops=0.01)
    with pytest.raises(autodac.BudgetError, match=message):
        api._reach(run)


def _drafted() -> api._Run:
    """A data-free run of SmallConvNet through every stage before verify."""
    run = _scored()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a deep cut of a tiny model is flagged as predicted damage: not what these tests are about
        for stage in (api._reach, api._open_search, api._room, api._allocate, api._meet_budgets, api._draft_plan, api._refit, api._final_scores):
            stage(run)
    return run


def test_the_verify_stage_passes_the_plan_fvcore_agrees_with() -> None:
    run = _drafted()
    api._verify(run)
    assert run.flops == run.plan.flops <= run.target
    result = api._publish(run)
    assert result.flops == count_flops(result.model, (X,)).total and result.plan is run.plan


def test_the_verify_stage_refuses_a_plan_whose_fvcore_count_differs() -> None:
    run = _drafted()
    name, choice = next(iter(run.plan.factorized.items()))
    run.plan.layers[name] = dataclasses.replace(choice, flops_after=choice.flops_after - 1)  # a closed form one multiply-add off
    with pytest.raises(AutodacError, match=rf"internal check failed: fvcore counts \d+ FLOPs, plan predicts \d+, .*'{name}' \d+ vs \d+"):
        api._verify(run)


def test_the_verify_stage_refuses_a_model_that_is_not_the_plan() -> None:
    run = _drafted()
    run.decomposed = run.model  # the original, dense: fvcore counts more than the plan predicts
    with pytest.raises(AutodacError, match="internal check failed: fvcore counts"):
        api._verify(run)


def test_the_stages_up_to_the_profile_measure_what_optimize_measures() -> None:
    """What `autodac profile` runs (check, probe, count, score, profile) is the profile optimize makes on the same data."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g))]
    options = dict(example_inputs=X, data=data, profile_points=2, progress=False)
    run = api._start(SmallConvNet(), 1.0, **options)
    for stage in (api._probe, api._count, api._score, api._profile):
        stage(run)
    whole = autodac.optimize(SmallConvNet(), 1.0, n_trials=1, reestimate_bn=False, **options).profile
    assert run.profile.samples == whole.samples and run.profile.losses == whole.losses
    assert run.refined is None and run.plan is None  # nothing after the profile ran


def test_each_stage_logs_its_time_and_the_peak_memory_after_it(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage after which the process's peak rose is named with the rise, so a large call says where its memory went."""
    peaks = iter([1 << 30, 1 << 30, 1 << 30, 3 << 30])  # the first stage keeps the peak, the second raises it by 2 GiB
    monkeypatch.setattr(api, "peak_memory_bytes", lambda: next(peaks))
    with caplog.at_level(logging.INFO, logger="autodac"):
        with api._stage("first"):
            pass
        with api._stage("second"):
            pass
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"first: \d+\.\d s, process peak 1\.00 GiB", lines[1]), lines
    assert re.fullmatch(r"second: \d+\.\d s, process peak 3\.00 GiB \(\+2\.00 GiB in this stage\)", lines[3]), lines


def test_the_peak_memory_is_read_and_never_falls() -> None:
    from autodac._logging import peak_memory_bytes

    first = peak_memory_bytes()
    if first is None:
        pytest.skip("this platform reports no peak memory")
    block = torch.ones(64, 1 << 20)  # 256 MiB resident now
    second = peak_memory_bytes()
    assert 0 < first <= second and second >= block.numel() * block.element_size()


def test_a_search_ended_by_its_timeout_logs_how_many_trials_ran_and_the_final_scores_are_a_timed_stage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="autodac"):
        result = autodac.optimize(SmallConvNet(), 0.6, data=[x], n_trials=100000, timeout=1, progress=False)
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(r"search \(100000 trials, timeout 1 s\): \d+\.\d s.*", line) for line in lines), lines
    assert f"search: {len(result.trials)} trials run (100000 asked)" in lines and len(result.trials) < 100000
    assert any(re.fullmatch(r"final BatchNorm re-estimation and scores: \d+\.\d s.*", line) for line in lines), lines
