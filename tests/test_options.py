"""optimize's options as values: one source (``autodac.options``) for the defaults the signature, the CLI,
the README and a shared search's fingerprint read; each group checks its values; flat and grouped calls agree."""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import autodac
from autodac import api, cli
from autodac.options import GROUPS, FitOptions, ProbeOptions, SearchOptions, StudyOptions, markdown_table, option_fields
from autodac.search import storage as shared_storage
from autodac.testing import SmallConvNet, seeded

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
_g = torch.Generator().manual_seed(0)
DATA = [(torch.randn(16, 3, 8, 8, generator=_g), torch.randint(0, 5, (16,), generator=_g))]
README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_option_belongs_to_one_group_and_optimize_takes_it_flat_and_each_group_by_its_keyword() -> None:
    names = [f.name for group in GROUPS for f in dataclasses.fields(group)]
    assert len(names) == len(set(names)) == len(option_fields())
    parameters = inspect.signature(autodac.optimize).parameters
    assert set(names) <= set(parameters)
    assert all(parameters[group.keyword].default is None for group in GROUPS)


def test_the_signature_defaults_are_the_dataclass_defaults() -> None:
    parameters = inspect.signature(autodac.optimize).parameters
    for name, (group, option) in option_fields().items():
        assert parameters[name].default == option.default == getattr(group(), name), name


def test_the_cli_defaults_are_the_dataclass_defaults() -> None:
    parser = cli.build_parser()
    commands = {
        "optimize": ["optimize", "m:f", "--flops-budget", "0.5", "--out", "p.json"],
        "worker": ["worker", "m:f", "--storage", "sqlite:///s.db", "--study", "s"],
        "profile": ["profile", "m:f", "--data", "d.npz"],
    }
    seen = set()
    for command, argv in commands.items():
        args = vars(parser.parse_args(argv))
        for name, (_, option) in option_fields().items():
            if name in args and name not in ("storage", "study_name"):  # the worker's two are required
                default = list(option.default) if isinstance(option.default, tuple) and name == "exclude" else option.default
                assert args[name] == default, (command, name)
                seen.add(name)
    assert seen == {"synthesize", "methods", "exclude", "n_trials", "seed", "sequential_fit", "widths", "refit_candidates",
                    "profile_points", "profile_size", "output_kind", "probe_size", "pareto"}  # pareto: the worker's


def test_the_cli_help_is_the_option_help() -> None:
    text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["optimize"].format_help().split())
    for name in ("n_trials", "refit_candidates", "synthesize"):
        _, option = option_fields()[name]
        assert f"{option.metadata['help']} (default {option.default})" in text


def test_the_cli_forwards_its_option_flags_to_optimize_by_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    received: dict[str, Any] = {}

    class Called(Exception):
        pass

    def fake_optimize(model, **kwargs):
        received.update(kwargs)
        raise Called

    monkeypatch.setattr(autodac, "optimize", fake_optimize)
    with pytest.raises(Called):
        cli.main(["optimize", "autodac.testing:SmallConvNet", "--input-shape", "1,3,8,8", "--flops-budget", "0.5",
                  "--out", str(tmp_path / "p.json"), "--n-trials", "3", "--no-sequential-fit", "--exclude", "conv1*",
                  "--methods", "dac", "--quiet"])
    assert received["n_trials"] == 3 and received["sequential_fit"] is False and received["exclude"] == ["conv1*"]
    assert received["methods"] == ("dac",) and received["seed"] == SearchOptions.seed and received["synthesize"] == 0
    assert received["probe_size"] == ProbeOptions.probe_size and "pareto" not in received
    with pytest.raises(Called):  # more than the default probe holds, as the refusal without --probe-size says to do
        cli.main(["optimize", "autodac.testing:SmallConvNet", "--input-shape", "1,3,8,8", "--flops-budget", "0.5",
                  "--out", str(tmp_path / "p.json"), "--synthesize", "4096", "--probe-size", "4096", "--quiet"])
    assert received["synthesize"] == received["probe_size"] == 4096
    with pytest.raises(Called):  # a pareto front is read back by `compare --front`, from a study: a worker's flag
        cli.main(["worker", "autodac.testing:SmallConvNet", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--study", "s",
                  "--input-shape", "1,3,8,8", "--flops-budget", "0.5", "--synthesize", "4", "--pareto", "--quiet"])
    assert received["pareto"] is True


def test_the_cli_refuses_an_empty_method_name_and_a_pretrained_net_autodac_ships_no_weights_for() -> None:
    with pytest.raises(Exception, match="must be factorisation names separated by single commas, like dac,spatial, but got 'dac,,spatial'"):
        cli.build_parser().parse_args(["optimize", "m:f", "--flops-budget", "0.5", "--out", "p.json", "--methods", "dac,,spatial"])
    with pytest.raises(cli.CLIError, match=r"`--pretrained` needs MODEL autodac.zoo:NAME with NAME one of \['cifar_vgg', 'resnet20'\]"):
        cli._load_model("autodac.zoo:resnet50_shaped", pretrained=True)


BAD_VALUES = [
    ("n_trials", 0, "`n_trials >= 1` must hold (an integer)"),
    ("n_trials", True, "`n_trials >= 1` must hold (an integer)"),
    ("probe_size", 1, "`probe_size >= 2` must hold (an integer)"),
    ("profile_size", 0, "`profile_size >= 1` must hold (an integer)"),
    ("profile_points", 2.0, "`profile_points >= 1` must hold (an integer)"),
    ("refit_candidates", 0, "`refit_candidates >= 1` must hold (an integer)"),
    ("max_layer_error", 0, "`max_layer_error > 0` must hold (a relative output error)"),
    ("weighting", "bn", "`weighting` must be 'batchnorm' or 'none'"),
    ("synthesize", 1, "`synthesize` must be 0 (off) or an integer >= 2 (inputs to synthesise)"),
    ("methods", (), "`methods` must name at least one of"),
    ("methods", 5, "`methods` must be one factorisation name or a list of them (strings)"),
    ("exclude", 5, "`exclude` must be one glob pattern of layer names or a list of them (strings)"),
    ("exclude", ["conv1*", 3], "`exclude` must be one glob pattern of layer names or a list of them (strings)"),
    ("widths", "False", "`widths` must be True or False (a switch)"),
    ("sequential_fit", None, "`sequential_fit` must be True or False (a switch)"),
    ("fit_to_data", 2, "`fit_to_data` must be True or False (a switch)"),
    ("reestimate_bn", "no", "`reestimate_bn` must be True or False (a switch)"),
    ("pareto", "yes", "`pareto` must be True or False (a switch)"),
    ("timeout", float("inf"), "`timeout` must be None or a positive finite number"),
]


@pytest.mark.parametrize(("name", "value", "rule"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES])
def test_a_bad_value_is_refused_by_its_rule_and_value_flat_and_grouped(name: str, value: Any, rule: str) -> None:
    expected = f"{rule}, but got {name}={value!r}" if name != "methods" else f"but got {name}={value!r}"
    with pytest.raises(autodac.AutodacError) as flat:
        autodac.optimize(SmallConvNet(), 0.5, example_inputs=X, progress=False, **{name: value})
    group, _ = option_fields()[name]
    with pytest.raises(autodac.AutodacError) as grouped:
        group(**{name: value})
    assert expected in str(flat.value) and str(flat.value) == str(grouped.value)
    assert str(flat.value).startswith(rule)


def test_progress_must_be_a_switch_and_numpy_booleans_count_as_switches() -> None:
    with pytest.raises(autodac.AutodacError, match=r"`progress` must be True or False \(a switch\), but got progress='x'"):
        autodac.optimize(SmallConvNet(), 0.5, example_inputs=X, progress="x")
    assert FitOptions(widths=np.bool_(False)).widths is False and SearchOptions(pareto=np.True_).pareto is True
    autodac.optimize(SmallConvNet(), 0.9, example_inputs=X, progress=np.False_)  # as the flag took it before it was checked


def test_an_unknown_method_is_refused_by_the_registry_in_a_group_too() -> None:
    with pytest.raises(autodac.AutodacError, match="nosuch"):
        FitOptions(methods=("dac", "nosuch"))


def test_a_group_normalises_what_the_flat_keywords_always_took() -> None:
    assert FitOptions(methods="dac", exclude="conv1*") == FitOptions(methods=["dac"], exclude=["conv1*"])
    assert FitOptions(methods="dac").methods == ("dac",) and FitOptions(exclude="conv1*").exclude == ("conv1*",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SearchOptions().n_trials = 3  # type: ignore[misc]


def _plan(**options) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deep cuts of a tiny model are flagged as predicted damage: not what this is about
        result = autodac.optimize(seeded(SmallConvNet(), 0), 0.5, example_inputs=X, progress=False, **options)
    data = result.plan.to_dict()
    data["notes"] = [n for n in data.get("notes", []) if "s)" not in n]  # stage timings, if any, differ between runs
    return data


def test_flat_and_grouped_data_free_calls_give_the_same_plan() -> None:
    flat = _plan(methods=("dac", "lowrank"), weighting="none", widths=False, max_layer_error=0.3)
    grouped = _plan(fit=FitOptions(methods=("dac", "lowrank"), weighting="none", widths=False, max_layer_error=0.3))
    mixed = _plan(methods=("dac", "lowrank"), fit=FitOptions(weighting="none", widths=False, max_layer_error=0.3))
    assert flat == grouped == mixed
    assert flat != _plan()  # the options took effect


def test_flat_and_grouped_calls_with_a_probe_give_the_same_plan() -> None:
    flat = _plan(data=DATA, n_trials=2, seed=3, profile_points=2, profile_size=8, reestimate_bn=False, sequential_fit=False)
    grouped = _plan(data=DATA, search=SearchOptions(n_trials=2, seed=3),
                    probe=ProbeOptions(profile_points=2, profile_size=8, reestimate_bn=False), fit=FitOptions(sequential_fit=False))
    assert flat == grouped


def test_one_option_given_flat_and_grouped_with_different_values_is_refused_naming_both() -> None:
    with pytest.raises(autodac.AutodacError, match=r"`n_trials` must be given once, flat or in `search`, but got n_trials=3 and "
                                                   r"search=SearchOptions\(n_trials=4\)"):
        autodac.optimize(SmallConvNet(), 0.5, example_inputs=X, progress=False, n_trials=3, search=SearchOptions(n_trials=4))
    with pytest.raises(autodac.AutodacError, match=r"but got methods=\('dac',\) and fit=FitOptions\(methods=\('lowrank',\)\)"):
        autodac.optimize(SmallConvNet(), 0.5, example_inputs=X, progress=False, methods="dac", fit=FitOptions(methods=["lowrank"]))


def test_a_group_and_flat_options_combine_when_they_agree() -> None:
    run = api._start(SmallConvNet(), 0.5, example_inputs=X, progress=False, n_trials=3, timeout=5.0,
                     search=SearchOptions(n_trials=3, seed=1))
    assert run.settings.search == SearchOptions(n_trials=3, seed=1, timeout=5.0)
    assert run.settings.probe == ProbeOptions() and run.settings.study == StudyOptions()


def test_a_group_of_another_kind_is_refused() -> None:
    with pytest.raises(autodac.AutodacError, match="`search` must be an autodac.SearchOptions, but got FitOptions"):
        autodac.optimize(SmallConvNet(), 0.5, example_inputs=X, progress=False, search=FitOptions())


# What the code before the option groups recorded for these two studies (the model's and probe's hashes aside):
# studies made then must still accept the same call.
OLD_FINGERPRINTS = [
    ({}, {
        "version": 1, "flops_budget": 0.5, "latency_budget": None, "input_shapes": [[1, 3, 8, 8]], "methods": ["dac", "spatial", "lowrank"],
        "exclude": [], "weighting": "batchnorm", "fit_to_data": True, "sequential_fit": True, "refit_candidates": 1, "profile_size": 128,
        "profile_points": 4, "reestimate_bn": True, "evaluate": False, "pareto": False,
    }),
    (dict(flops_budget=[autodac.Flops(0.5), autodac.Params(0.6)], methods=("dac", "lowrank"), exclude="conv1*", weighting="none",
          fit_to_data=False, sequential_fit=False, refit_candidates=2, profile_size=8, profile_points=2, reestimate_bn=False,
          pareto=True, n_trials=3, seed=4, timeout=9.0, widths=False, max_layer_error=0.3, probe_size=12), {
        "version": 1, "flops_budget": 0.5, "latency_budget": None, "input_shapes": [[1, 3, 8, 8]], "methods": ["dac", "lowrank"],
        "exclude": ["conv1*"], "weighting": "none", "fit_to_data": False, "sequential_fit": False, "refit_candidates": 2,
        "profile_size": 8, "profile_points": 2, "reestimate_bn": False, "evaluate": False, "params_budget": 0.6, "pareto": True,
        # since 0.1.0's third sweep: widths off is recorded (a study made with it off before cannot tell, and a worker with
        # widths on read its profile and failed); studies with widths on, the default, keep their fingerprint
        "widths": False,
    }),
]


def _fingerprint(monkeypatch: pytest.MonkeyPatch, **options) -> dict[str, Any]:
    """The fingerprint a shared search would record for this call (storage's own ``fingerprint``, no storage opened)."""
    records = []

    def record(storage, study_name, model, probe, searches, settings, pareto):
        tensors = [] if probe is None else [probe.inputs, probe.labels]
        records.append(shared_storage.fingerprint(model, tensors, dict(settings, pareto=pareto)))

    monkeypatch.setattr(api, "open_search", record)
    options.setdefault("flops_budget", 0.5)
    run = api._start(seeded(SmallConvNet(), 0), example_inputs=X, data=DATA, progress=False, **options)
    for stage in (api._probe, api._count, api._score, api._reach, api._open_search):
        stage(run)
    (fingerprint,) = records
    return {key: value for key, value in fingerprint.items() if key not in ("model", "probe")}


@pytest.mark.parametrize(("options", "expected"), OLD_FINGERPRINTS, ids=["defaults", "every-option"])
def test_the_fingerprint_of_a_study_is_what_it_was_before_the_groups(monkeypatch, options: dict, expected: dict) -> None:
    assert _fingerprint(monkeypatch, **options) == expected


def test_the_fingerprint_records_exactly_the_flagged_options_and_reads_a_grouped_call_alike(monkeypatch) -> None:
    flagged = {name for name, (_, option) in option_fields().items() if option.metadata["fingerprint"]}
    extras = {"version", "flops_budget", "latency_budget", "input_shapes", "evaluate"}
    assert set(OLD_FINGERPRINTS[0][1]) == flagged | extras
    grouped = _fingerprint(monkeypatch, flops_budget=[autodac.Flops(0.5), autodac.Params(0.6)], probe_size=12,
                           fit=FitOptions(methods=("dac", "lowrank"), exclude="conv1*", weighting="none", fit_to_data=False,
                                          sequential_fit=False, refit_candidates=2, widths=False, max_layer_error=0.3),
                           probe=ProbeOptions(profile_size=8, profile_points=2, reestimate_bn=False),
                           search=SearchOptions(pareto=True, n_trials=3, seed=4, timeout=9.0), study=StudyOptions())
    assert json.dumps(grouped, sort_keys=True) == json.dumps(OLD_FINGERPRINTS[1][1], sort_keys=True)


def test_the_readme_table_of_options_is_the_one_the_options_make() -> None:
    text = README.read_text()
    start = text.index("<!-- options table: made by autodac.options.markdown_table() -->\n")
    end = text.index("<!-- end of options table -->")
    committed = text[text.index("\n", start) + 1:end].strip()
    assert committed == markdown_table(), "regenerate the README's table with autodac.options.markdown_table()"
    for name in option_fields():
        assert f"| `{name}` |" in committed


def test_a_study_records_output_kind_only_when_it_is_not_read_off_the_outputs(monkeypatch) -> None:
    assert "output_kind" not in _fingerprint(monkeypatch)  # studies made before the option keep their fingerprint
    assert _fingerprint(monkeypatch, output_kind="values")["output_kind"] == "values"
