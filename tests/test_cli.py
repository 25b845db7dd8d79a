"""The ``autodac`` command line, driven as users drive it: arguments, files, exit codes, both streams.

Commands run through ``autodac.cli.main`` in this process (``tests/cli_runs.py``); the first test
checks that a fresh interpreter, as users start it, prints the same. Tiny models from
``autodac.testing`` saved with ``torch.save`` keep each command cheap. Every refusal must exit
non-zero with exactly one line on stderr, ``autodac: error: ...``, and no traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import autodac
from cli_runs import refused, run_cli, succeeded
from autodac.testing import Conv1dNet, SmallConvNet

PNG = b"\x89PNG\r\n\x1a\n"
SHAPE = "1,3,8,8"


_cli, _ok, _refused = run_cli, succeeded, refused


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a saved tiny model, its state dict, a Conv1d model, and probe data as .npz (labels) and .pt (none)."""
    folder = tmp_path_factory.mktemp("cli")
    torch.save(SmallConvNet(), folder / "small.pt")
    torch.save(SmallConvNet(seed=1).state_dict(), folder / "small_seed1_state.pt")
    torch.save(Conv1dNet(), folder / "conv1d.pt")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 5, (64,), generator=g)
    np.savez(folder / "probe.npz", x=x.numpy(), y=y.numpy())
    torch.save({"x": x}, folder / "unlabelled.pt")
    return folder


@pytest.fixture(scope="module")
def data_free(work: Path) -> dict:
    """`autodac optimize` without data: the plan, the model and the JSON summary."""
    done = _ok(_cli("optimize", "small.pt", "--flops-budget", "0.5", "--input-shape", SHAPE, "--out", "free.json",
                    "--save-model", "free.pt", "--json", cwd=work))
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def with_data(work: Path) -> dict:
    """`autodac optimize --data`: a plan fitted to the labelled probe, with its measured metrics."""
    done = _ok(_cli("optimize", "small.pt", "--flops-budget", "0.6", "--data", "probe.npz", "--n-trials", "2",
                    "--out", "probe_plan.json", "--save-model", "probe_model.pt", "--json", "--quiet", cwd=work))
    return json.loads(done.stdout)


def test_the_command_runs_in_a_fresh_interpreter(work: Path, data_free: dict) -> None:
    """``python -m autodac.cli`` as users start it prints what the in-process runs print, for work done and for a refusal."""
    refusal = ("optimize", "small.pt", "--flops-budget", "2", "--input-shape", SHAPE, "--out", "x.json")
    for args in (("compare", "free.json", "free.json", "--format", "json"), refusal):
        here = _cli(*args, cwd=work) if args[0] != "compare" else _ok(_cli(*args, cwd=work))
        fresh = _cli(*args, cwd=work, fresh=True)
        assert (fresh.returncode, fresh.stdout, fresh.stderr) == (here.returncode, here.stdout, here.stderr)
    _refused(fresh, "flops_budget")


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)))


# ----------------------------------------------------------------------------- what the commands promise


def test_optimize_writes_the_plan_the_model_and_a_json_summary(work: Path, data_free: dict) -> None:
    plan = autodac.Plan.load(work / "free.json")
    assert data_free["plan"] == "free.json" and data_free["model"] == "free.pt"
    assert data_free["flops_ratio"] == pytest.approx(plan.flops_ratio) and 0.4 < data_free["flops_ratio"] <= 0.5
    assert data_free["flops"] == plan.flops and data_free["factorized"] == len(plan.factorized) >= 1
    saved = torch.load(work / "free.pt", weights_only=False)
    assert torch.equal(_outputs(saved), _outputs(autodac.apply(SmallConvNet(), plan)))  # the saved model is the plan's


def test_optimize_text_output_is_the_summary_table(work: Path) -> None:
    done = _ok(_cli("optimize", "small.pt", "--flops-budget", "0.7", "--input-shape", SHAPE, "--methods", "dac", "--no-widths",
                    "--exclude", "fc", "--out", "dac.json", cwd=work))
    assert done.stdout.splitlines()[0].split()[:3] == ["layer", "weight", "method"]
    assert "(ratio 0." in done.stdout and "wrote dac.json" in done.stdout
    plan = autodac.Plan.load(work / "dac.json")
    assert {c.method for c in plan.factorized.values()} == {"dac"} and plan.skipped["fc"] == "excluded by the caller"


def test_optimize_with_data_then_apply_rebuilds_the_same_model(work: Path, with_data: dict) -> None:
    assert {"probe_original", "probe"} <= set(with_data["metrics"]) and with_data["flops_ratio"] <= 0.6
    done = _ok(_cli("apply", "small.pt", "probe_plan.json", "--data", "probe.npz", "--out", "applied.pt", "--json", cwd=work))
    report = json.loads(done.stdout)
    assert report["model"] == "applied.pt" and report["factorized"] == with_data["factorized"]
    assert report["params"] == with_data["params"]
    rebuilt, original = (torch.load(work / f, weights_only=False) for f in ("applied.pt", "probe_model.pt"))
    assert torch.equal(_outputs(rebuilt), _outputs(original))


def test_a_factory_with_weights_plans_like_the_same_model_in_python(work: Path) -> None:
    _ok(_cli("optimize", "autodac.testing:SmallConvNet", "--weights", "small_seed1_state.pt", "--flops-budget", "0.5",
             "--input-shape", SHAPE, "--out", "factory.json", "--quiet", cwd=work))
    expected = autodac.optimize(SmallConvNet(seed=1), 0.5, example_inputs=torch.zeros(1, 3, 8, 8), progress=False).plan
    assert autodac.Plan.load(work / "factory.json").to_dict() == expected.to_dict()


def test_compare_as_table_markdown_and_json(work: Path, data_free: dict, with_data: dict) -> None:
    table = _ok(_cli("compare", "free.json", "probe_plan.json", cwd=work)).stdout.splitlines()
    assert table[0].split() == ["layer", "free", "probe_plan"]
    assert [line.split()[0] for line in table[2:6]] == ["conv1", "conv2", "conv3", "fc"]
    assert any(line.startswith("FLOPs ratio") for line in table) and any(line.startswith("probe ") for line in table)
    markdown = _ok(_cli("compare", "free.json", "probe_plan.json", "--format", "markdown", cwd=work)).stdout
    assert markdown.startswith("| layer") and "|--" in markdown
    data = json.loads(_ok(_cli("compare", "free.json", "probe_plan.json", "--format", "json", cwd=work)).stdout)
    assert data["columns"] == ["free", "probe_plan"] and list(data["layers"]) == ["conv1", "conv2", "conv3", "fc"]
    assert data["totals"]["free"]["flops_ratio"] == pytest.approx(data_free["flops_ratio"])
    assert data["totals"]["probe_plan"]["metrics"]["probe"] == pytest.approx(with_data["metrics"]["probe"])
    cell = data["layers"]["conv1"]["free"]
    assert cell["flops_after"] <= cell["flops_before"] and {"method", "rank"} <= set(cell)
    assert data["same_model"] is True and data["totals"]["free"]["structure"] == data["totals"]["probe_plan"]["structure"]


def test_compare_json_says_when_plans_are_for_different_models_or_inputs(work: Path, data_free: dict) -> None:
    _ok(_cli("optimize", "small.pt", "--flops-budget", "0.5", "--input-shape", "1,3,12,12", "--out", "free12.json", cwd=work))
    data = json.loads(_ok(_cli("compare", "free.json", "free12.json", "--format", "json", cwd=work)).stdout)
    assert data["same_model"] is False  # the table's `model (structure)` and `input shapes` rows, for scripts
    assert data["totals"]["free"]["input_shapes"] == [[1, 3, 8, 8]] and data["totals"]["free12"]["input_shapes"] == [[1, 3, 12, 12]]
    pytest.importorskip("matplotlib")
    done = _ok(_cli("report", "free.json", "free12.json", "--out", "report_mixed", "--json", cwd=work))
    payload = json.loads(done.stdout)
    assert payload["pareto"] == [] and payload["same_model"] is False  # no trade-off across two networks' costs and errors
    assert "no Pareto front: the plans are of 2 different models" in _ok(_cli("report", "free.json", "free12.json", "--out",
                                                                             "report_mixed", cwd=work)).stdout


def test_profile_prints_the_sweep_and_writes_the_heat_map(work: Path) -> None:
    done = _ok(_cli("profile", "small.pt", "--data", "unlabelled.pt", "--points", "3", "--out", "profile", cwd=work))
    assert "sensitivity: KL of the softmax over dim 1 (class scores, logits) of the outputs" in done.stdout
    assert [line.split()[0] for line in done.stdout.splitlines()[3:7]] == ["conv1", "conv2", "conv3", "fc"]
    saved = json.loads((work / "profile" / "sensitivity.json").read_text())
    assert list(saved["layers"]) == ["conv1", "conv2", "conv3", "fc"]
    for options in saved["layers"].values():
        # --points per layer; a width unit's layer adds one point for its factorisations and one for its producer's
        assert 1 <= len(options) <= 3 + 2 and all(o["divergence"] >= 0 and 0 < o["params_kept"] < 1.01 for o in options)
    assert (work / "profile" / "sensitivity.png").read_bytes()[:8] == PNG
    assert saved["measure"].startswith("KL of the softmax")
    values = _ok(_cli("profile", "small.pt", "--data", "unlabelled.pt", "--points", "2", "--output-kind", "values", cwd=work))
    assert "sensitivity: relative squared error" in values.stdout  # the header names what the figures are, not always KL


def test_report_writes_markdown_and_pictures(work: Path, data_free: dict, with_data: dict) -> None:
    if not (work / "profile" / "sensitivity.json").exists():
        _ok(_cli("profile", "small.pt", "--data", "unlabelled.pt", "--points", "2", "--out", "profile", cwd=work))
    done = _ok(_cli("report", "free.json", "probe_plan.json", "--out", "report", "--profile", "profile/sensitivity.json",
                    "--json", cwd=work))
    written = json.loads(done.stdout)
    assert written["pareto"] == ["probe_plan"]  # the only plan with a measured quality
    markdown = (work / "report" / "report.md").read_text()
    for name in ("flops_vs_quality.png", "ranks_per_layer.png", "flops_per_layer.png", "sensitivity.png"):
        assert f"]({name})" in markdown and (work / "report" / name).read_bytes()[:8] == PNG
    assert "| free" in markdown and "probe_plan" in markdown


def test_profile_says_when_it_ran_on_fewer_examples_than_asked(work: Path) -> None:
    done = _ok(_cli("profile", "small.pt", "--data", "unlabelled.pt", "--points", "2", "--profile-size", "100", "--json", cwd=work))
    # 64 probe examples: a held-out half of 32, not the 100 asked, and the output says so
    assert json.loads(done.stdout)["samples"] == 32
    assert "profile_size=100: the sensitivity profile ran on 32 probe examples (the probe's held-out half holds 32)" in json.loads(done.stdout)["notes"]


def test_a_narrow_heat_map_wraps_its_title_inside_the_picture_and_names_its_measure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from autodac import plots

    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig))
    rows = {"conv1": [("dac", 1, 0.2, 0.5), ("dac", 3, 0.6, 0.01)], "fc": [("lowrank", 2, 0.3, 0.2), ("lowrank", 4, 0.6, 0.02)]}
    plots.sensitivity_heatmap(rows, tmp_path / "s.png", samples=32, measure="relative squared error (values)")
    fig = saved[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    title = fig.axes[0].title
    box, page = title.get_window_extent(renderer), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1, (box, page)  # two columns: the title wraps, no words cut off
    assert "relative squared error (values) from the original's outputs" in title.get_text().replace("\n", " ")


def test_report_refuses_the_profile_of_another_model(work: Path, data_free: dict, with_data: dict, tmp_path: Path) -> None:
    torch.save({"x": torch.randn(64, 3, 12, 12)}, tmp_path / "larger.pt")
    _ok(_cli("profile", "small.pt", "--data", str(tmp_path / "larger.pt"), "--points", "2", "--out", str(tmp_path / "p12"), cwd=work))
    done = _cli("report", "free.json", "probe_plan.json", "--out", str(tmp_path / "r"), "--profile", str(tmp_path / "p12" / "sensitivity.json"), cwd=work)
    _refused(done, "`--profile` must profile the plans' model at their input shapes")
    saved = json.loads((tmp_path / "p12" / "sensitivity.json").read_text())
    saved["layers"]["other.conv"] = saved["layers"].pop("conv2")
    (tmp_path / "renamed.json").write_text(json.dumps(saved))
    done = _cli("report", "free.json", "--out", str(tmp_path / "r"), "--profile", str(tmp_path / "renamed.json"), cwd=work)
    _refused(done, "has layers no plan has: ['other.conv']")


def test_report_without_matplotlib_says_how_to_install_it(work: Path, tmp_path: Path, data_free: dict) -> None:
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    done = _cli("report", "free.json", "--out", str(tmp_path / "report"), cwd=work, pythonpath=str(tmp_path))
    _refused(done, "pip install autodac[plots]")


def test_export_applies_the_plan_and_writes_a_file_that_loads_as_the_plans_model(work: Path, data_free: dict, tmp_path: Path) -> None:
    done = _ok(_cli("export", "small.pt", "free.json", "--format", "torchscript", "--out", str(tmp_path / "m.ts"), "--json", cwd=work))
    payload = json.loads(done.stdout)
    assert payload["format"] == "torchscript" and payload["input_shapes"] == [[1, 3, 8, 8]]
    assert 0 <= payload["max_difference"] <= payload["allowed"]
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    torch.testing.assert_close(_outputs(loaded), _outputs(autodac.apply(SmallConvNet(), autodac.Plan.load(work / "free.json"))))


def test_export_takes_its_plan_after_the_options_too(work: Path, data_free: dict, tmp_path: Path) -> None:
    # the README writes `export MODEL --pretrained PLAN ...`; argparse alone leaves an optional PLAN there unread
    done = _ok(_cli("export", "small.pt", "--format", "pt", "--out", str(tmp_path / "m.pt"), "free.json", cwd=work))
    assert "weights: from the model file small.pt" in done.stdout  # as every command that takes MODEL says
    saved = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(_outputs(saved), _outputs(autodac.apply(SmallConvNet(), autodac.Plan.load(work / "free.json"))))
    _refused(_cli("export", "small.pt", "--format", "pt", "--out", str(tmp_path / "n.pt"), "free.json", "other.json", cwd=work),
             "unrecognized arguments: other.json")


def test_export_of_a_model_without_plan_needs_an_input_shape(work: Path, data_free: dict, tmp_path: Path) -> None:
    _refused(_cli("export", "free.pt", "--format", "pt", "--out", str(tmp_path / "m.pt"), cwd=work), "--input-shape")
    _ok(_cli("export", "free.pt", "--format", "pt", "--out", str(tmp_path / "m.pt"), "--input-shape", SHAPE, cwd=work))
    saved = torch.load(tmp_path / "m.pt", weights_only=False)
    assert not any(type(m).__module__.startswith("autodac") for m in saved.modules())
    torch.testing.assert_close(_outputs(saved), _outputs(torch.load(work / "free.pt", weights_only=False)), rtol=0, atol=0)


# ----------------------------------------------------------------------------- refusals: one line, no traceback


def test_runtime_onnxruntime_without_it_says_how_to_install_it(work: Path, tmp_path: Path) -> None:
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    done = _cli("optimize", "small.pt", "--latency-budget", "0.8", "--runtime", "onnxruntime", "--input-shape", SHAPE,
                "--out", str(tmp_path / "p.json"), cwd=work, pythonpath=str(tmp_path))
    _refused(done, "runtime='onnxruntime'", "pip install 'autodac[deploy]'")


@pytest.mark.parametrize("budget", ["0", "1.5", "nan", "abc"])
def test_a_budget_out_of_range_is_refused(work: Path, budget: str) -> None:
    done = _cli("optimize", "small.pt", "--flops-budget", budget, "--input-shape", SHAPE, "--out", "x.json", cwd=work)
    _refused(done, "budget", budget)
    assert not (work / "x.json").exists()


def test_a_missing_model_file_is_refused(work: Path) -> None:
    _refused(_cli("optimize", "no_such_model.pt", "--flops-budget", "0.5", "--input-shape", SHAPE, "--out", "x.json", cwd=work),
             "'no_such_model.pt'", "no such file")


def test_a_missing_data_file_is_refused(work: Path) -> None:
    _refused(_cli("optimize", "small.pt", "--flops-budget", "0.5", "--data", "no_such.npz", "--out", "x.json", cwd=work),
             "`--data`", "'no_such.npz' does not exist")


def test_an_input_shape_the_model_cannot_take_is_refused(work: Path) -> None:
    line = _refused(_cli("optimize", "small.pt", "--flops-budget", "0.5", "--input-shape", "1,1,8,8", "--out", "x.json", cwd=work),
                    "(1, 1, 8, 8)")
    assert "3 channels" in line


def test_a_torchscript_model_is_refused_with_the_way_round(work: Path) -> None:
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; users still have such files
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(SmallConvNet()), work / "scripted.ts")
    _refused(_cli("optimize", "scripted.ts", "--flops-budget", "0.5", "--input-shape", SHAPE, "--out", "x.json", cwd=work),
             "TorchScript", "--weights scripted.ts")


def test_a_state_dict_as_model_is_refused(work: Path) -> None:
    _refused(_cli("optimize", "small_seed1_state.pt", "--flops-budget", "0.5", "--input-shape", SHAPE, "--out", "x.json", cwd=work),
             "state dict", "package.module:factory")


def test_a_plan_that_does_not_fit_the_model_is_refused(work: Path, data_free: dict) -> None:
    _refused(_cli("apply", "conv1d.pt", "free.json", "--out", "wrong.pt", cwd=work), "made for", "layer 'conv1': plan has Conv2d(3->8")
    assert not (work / "wrong.pt").exists()


def test_optimize_under_a_latency_budget_reports_the_measured_ratio(tmp_path: Path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(48, 48, 3, padding=1), torch.nn.BatchNorm2d(48), torch.nn.ReLU(), torch.nn.Conv2d(48, 48, 3, padding=1)
    ).eval()
    torch.save(model, tmp_path / "wide.pt")
    done = _ok(_cli("optimize", "wide.pt", "--latency-budget", "0.8", "--input-shape", "1,48,40,40", "--out", "lat.json",
                    "--json", "--quiet", cwd=tmp_path))
    payload = json.loads(done.stdout)
    assert payload["budget"] == {"latency": 0.8}
    assert 0 < payload["metrics"]["latency_ratio"] <= 0.8
    plan = autodac.Plan.load(tmp_path / "lat.json")
    assert all(c.latency_before is not None for c in plan.layers.values())


def test_optimize_with_synthesize_plans_without_data(work: Path) -> None:
    done = _ok(_cli("optimize", "small.pt", "--flops-budget", "0.6", "--synthesize", "32", "--n-trials", "1",
                    "--input-shape", SHAPE, "--out", "synthetic.json", "--json", "--quiet", cwd=work))
    payload = json.loads(done.stdout)
    assert payload["flops_ratio"] <= 0.6
    assert autodac.Plan.load(work / "synthetic.json").probe["source"] == "synthetic"
    _refused(_cli("optimize", "small.pt", "--flops-budget", "0.6", "--synthesize", "32", "--data", "probe.npz",
                  "--out", "x.json", cwd=work), "alternatives")


def test_optimize_can_skip_or_widen_the_sequential_refit(work: Path, with_data: dict) -> None:
    """`--no-sequential-fit` gives a plan with no re-fitted layer; `--refit-candidates` reaches optimize (and is checked)."""
    _ok(_cli("optimize", "small.pt", "--flops-budget", "0.6", "--data", "probe.npz", "--n-trials", "2", "--no-sequential-fit",
             "--out", "plain_plan.json", "--quiet", cwd=work))
    plan = autodac.Plan.load(work / "plain_plan.json")
    assert plan.factorized and not any(c.fit.startswith("seq+") for c in plan.layers.values())
    assert not any("sequential" in note for note in plan.notes)
    _ok(_cli("optimize", "small.pt", "--flops-budget", "0.6", "--data", "probe.npz", "--n-trials", "3", "--refit-candidates", "2",
             "--out", "wide_plan.json", "--quiet", cwd=work))
    notes = " ".join(autodac.Plan.load(work / "wide_plan.json").notes)
    assert any(said in notes for said in ("sequential re-fit tried and rejected", "re-fitted in execution order", "sequential re-fit skipped"))
    refused = _cli("optimize", "small.pt", "--flops-budget", "0.6", "--data", "probe.npz", "--refit-candidates", "0", "--out", "x.json", cwd=work)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr


def test_a_params_budget_alone_and_with_flops_is_held_recorded_and_compared(work: Path) -> None:
    alone = json.loads(_ok(_cli("optimize", "small.pt", "--params-budget", "0.5", "--input-shape", SHAPE, "--out", "params.json",
                                "--json", cwd=work)).stdout)
    assert alone["params"] / alone["original_params"] == pytest.approx(alone["params_ratio"]) and alone["params_ratio"] <= 0.5
    assert alone["budget"] == {"params": 0.5}
    both = json.loads(_ok(_cli("optimize", "small.pt", "--params-budget", "0.5", "--flops-budget", "0.6", "--input-shape", SHAPE,
                               "--out", "params_flops.json", "--json", cwd=work)).stdout)
    assert both["budget"] == {"flops": 0.6, "params": 0.5} and both["params_ratio"] <= 0.5 and both["flops_ratio"] <= 0.6
    assert autodac.Plan.load(work / "params_flops.json").budget == {"flops": 0.6, "params": 0.5}
    table = _ok(_cli("compare", "params.json", "params_flops.json", cwd=work)).stdout.splitlines()
    assert any(line.split()[:3] == ["params", "budget", "0.5"] for line in table)
    assert any(line.startswith("params_ratio") for line in table)
    data = json.loads(_ok(_cli("compare", "params.json", "params_flops.json", "--format", "json", cwd=work)).stdout)
    assert data["totals"]["params"]["params_ratio"] == pytest.approx(alone["params_ratio"])


@pytest.mark.parametrize("budget", ["0", "1.5"])
def test_a_params_budget_out_of_range_is_refused(work: Path, budget: str) -> None:
    _refused(_cli("optimize", "small.pt", "--params-budget", budget, "--input-shape", SHAPE, "--out", "x.json", cwd=work), "budget", budget)


def test_optimize_distill_trains_the_plan_and_apply_replays_it(work: Path) -> None:
    done = _ok(_cli("optimize", "small.pt", "--flops-budget", "0.4", "--data", "unlabelled.pt", "--n-trials", "1", "--distill", "2",
                    "--out", "distilled.json", "--save-model", "distilled.pt", "--json", "--quiet", cwd=work))
    notes = json.loads(done.stdout)["notes"]
    assert any(note.startswith(("distilled from the original", "distillation tried and rejected")) for note in notes), notes
    plan = autodac.Plan.load(work / "distilled.json")
    assert not plan.distilled or plan.distilled["epochs"] == 2
    _ok(_cli("apply", "small.pt", "distilled.json", "--data", "unlabelled.pt", "--out", "distilled_applied.pt", cwd=work))
    rebuilt, original = (torch.load(work / f, weights_only=False) for f in ("distilled_applied.pt", "distilled.pt"))
    assert torch.equal(_outputs(rebuilt), _outputs(original))
    _refused(_cli("optimize", "small.pt", "--flops-budget", "0.4", "--input-shape", SHAPE, "--distill", "0", "--out", "x.json", cwd=work),
             "--distill")


# ----------------------------------------------------------------------------- sweep: shapes, output paths, help, compare

HUGE = "1,3,10000000,10000000"  # 1.2 PB of float32: no machine allocates it


@pytest.mark.parametrize("command", ["optimize", "export"])
def test_an_input_shape_too_large_to_allocate_is_refused_naming_it(work: Path, tmp_path: Path, command: str) -> None:
    budget = ["--flops-budget", "0.5"] if command == "optimize" else ["--format", "pt"]
    line = _refused(_cli(command, "small.pt", *budget, "--input-shape", HUGE, "--out", str(tmp_path / "x.out"), cwd=work),
                    "`--input-shape`", HUGE, "fits in memory")
    assert "Traceback" not in line and list(tmp_path.iterdir()) == []


def test_export_on_an_input_shape_the_model_cannot_take_is_refused_naming_it(work: Path, data_free: dict, tmp_path: Path) -> None:
    line = _refused(_cli("export", "small.pt", "free.json", "--format", "pt", "--out", str(tmp_path / "m.pt"),
                         "--input-shape", "1,1,8,8", cwd=work), "the model must run on its example inputs", "(1, 1, 8, 8)")
    assert "3 channels" in line and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [
    ["optimize", "small.pt", "--flops-budget", "0.5", "--input-shape", SHAPE, "--out", "{folder}"],
    ["optimize", "small.pt", "--flops-budget", "0.5", "--input-shape", SHAPE, "--out", "x.json", "--save-model", "{folder}"],
    ["worker", "--storage", "sqlite:///never.db", "--study", "s", "small.pt", "--flops-budget", "0.5", "--input-shape", SHAPE,
     "--out", "{folder}"],
    ["apply", "small.pt", "free.json", "--out", "{folder}"],
    ["export", "small.pt", "free.json", "--format", "pt", "--out", "{folder}"],
], ids=["optimize", "save-model", "worker", "apply", "export"])
def test_an_output_file_that_is_a_folder_is_refused_before_any_work(work: Path, data_free: dict, tmp_path: Path,
                                                                   command: list[str]) -> None:
    folder = str(tmp_path)
    # before any work: with a MODEL that cannot even be loaded, the output path is still what is refused
    argv = ["no_such_model.pt" if a == "small.pt" else folder if a == "{folder}" else a for a in command]
    option = "`--save-model`" if "--save-model" in argv else "`--out`"
    _refused(_cli(*argv, cwd=work), option, "must name a file, not a folder", repr(folder), "is a folder")
    assert not (work / "never.db").exists() and not (work / "x.json").exists()


@pytest.mark.parametrize("command", [["profile", "no_such_model.pt", "--data", "unlabelled.pt"], ["report", "free.json"]])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(work: Path, data_free: dict, command: list[str]) -> None:
    _refused(_cli(*command, "--out", "free.json", cwd=work), "`--out` must be a folder", "'free.json' is a file")


def test_export_help_says_the_input_shape_is_where_the_file_is_checked(work: Path) -> None:
    text = " ".join(_ok(_cli("export", "--help", cwd=work)).stdout.split())
    assert "input shape the exported file is checked on" in text and "FLOPs are counted at" not in text
    assert "FLOPs are counted at" in " ".join(_ok(_cli("optimize", "--help", cwd=work)).stdout.split())


def test_compare_refuses_what_is_not_plans_naming_the_rule_and_the_value(work: Path, data_free: dict) -> None:
    plan = autodac.Plan.load(work / "free.json")
    rule = r"`plans` must be a non-empty mapping of titles to autodac.Plan, or a list of them"
    with pytest.raises(autodac.AutodacError, match=rule + ", but got NoneType: None"):
        autodac.compare(None)
    with pytest.raises(autodac.AutodacError, match=rule + r", but got a single Plan; pass \[plan\]"):
        autodac.compare(plan)  # the docstring promises a mapping or a list: one plan is refused, with the way round
    with pytest.raises(autodac.AutodacError, match=rule + ", but got an empty list$"):
        autodac.compare([])
    with pytest.raises(autodac.AutodacError, match=rule + ", but got an empty dict$"):
        autodac.compare({})
    with pytest.raises(autodac.AutodacError, match=rule + r", but plans\[1\] is str, not a Plan"):
        autodac.compare([plan, "free.json"])
    with pytest.raises(autodac.AutodacError, match=rule + r", but plans\['b'\] is NoneType, not a Plan"):
        autodac.compare({"a": plan, "b": None})
    assert autodac.compare([plan]).splitlines()[0].split() == ["layer", "plan", "1"]  # a one-plan list is a one-column table


@pytest.mark.parametrize("tablefmt", ["no_such_format", None, "GitHub"])
def test_compare_and_plan_table_refuse_a_table_format_tabulate_does_not_know(work: Path, data_free: dict, tablefmt) -> None:
    from tabulate import tabulate_formats

    from autodac.report import plan_table

    plan = autodac.Plan.load(work / "free.json")
    message = rf"`tablefmt` must be one of tabulate's formats \[.*'github'.*\], but got tablefmt={tablefmt!r}"
    with pytest.raises(autodac.AutodacError, match=message):
        autodac.compare([plan], tablefmt=tablefmt)
    with pytest.raises(autodac.AutodacError, match=message):
        plan_table(plan, tablefmt=tablefmt)
    assert all(autodac.compare([plan], tablefmt=f) for f in tabulate_formats)  # every format tabulate names is taken


# ----------------------------------------------------------------------------- outputs: refused before the work, never replaced


def test_the_plan_and_the_saved_model_cannot_be_one_file(work: Path) -> None:
    _refused(_cli("optimize", "small.pt", "--flops-budget", "0.5", "--input-shape", SHAPE, "--out", "same.json",
                  "--save-model", "same.json", cwd=work), "`--out` (the plan) and `--save-model` must be different files")


def test_a_model_that_cannot_be_pickled_leaves_the_file_there_before_whole(tmp_path: Path) -> None:
    """torch.save wrote a truncated zip over the old file and its pickling error came out as a traceback."""
    from autodac.cli import CLIError, _save_model

    path = tmp_path / "keep.pt"
    path.write_bytes(b"the model saved yesterday")
    model = SmallConvNet()
    model.post = lambda t: t  # pickle cannot take it
    with pytest.raises(CLIError, match=r"must be written to .*keep\.pt.*cannot be pickled: the plan is in"):
        _save_model(model, str(path), "the plan is in 'x.json'")
    assert path.read_bytes() == b"the model saved yesterday" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.pt"]
    _save_model(SmallConvNet(), str(path))  # a model that pickles replaces it, with the permissions open() gives
    umask = os.umask(0)
    os.umask(umask)
    assert isinstance(torch.load(path, weights_only=False), SmallConvNet) and (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    path.chmod(0o640)
    link = tmp_path / "link.pt"
    link.symlink_to(path)
    _save_model(SmallConvNet(), str(link))  # through the link, into the file, whose mode stays
    assert link.is_symlink() and (path.stat().st_mode & 0o777) == 0o640 and isinstance(torch.load(path, weights_only=False), SmallConvNet)


def test_a_model_that_cannot_be_pickled_still_leaves_the_run_s_plan(tmp_path: Path) -> None:
    """The plan is written first: a pickling failure of --save-model lost the whole optimize run."""
    (tmp_path / "lambda_net.py").write_text(
        "from autodac.testing import SmallConvNet\n\ndef net():\n    m = SmallConvNet().eval()\n    m.post = lambda t: t\n    return m\n"
    )
    message = _refused(_cli("optimize", "lambda_net:net", "--flops-budget", "0.8", "--input-shape", SHAPE, "--out", "plan.json",
                            "--save-model", "m.pt", cwd=tmp_path, pythonpath=str(tmp_path)), "cannot be pickled: the plan is in 'plan.json'")
    assert "Traceback" not in message and not (tmp_path / "m.pt").exists()
    assert autodac.Plan.load(tmp_path / "plan.json").factorized


def test_an_output_that_is_a_file_the_command_reads_is_refused_and_the_file_kept(work: Path, data_free: dict) -> None:
    plan_text, probe_bytes, model_bytes = (work / "free.json").read_text(), (work / "probe.npz").read_bytes(), (work / "small.pt").read_bytes()
    for argv, option in [
        (("apply", "small.pt", "free.json", "--out", "free.json"), "PLAN"),
        (("export", "small.pt", "free.json", "--format", "pt", "--out", "free.json"), "PLAN"),
        (("export", "small.pt", "free.json", "--format", "pt", "--data", "probe.npz", "--out", "probe.npz"), "`--data`"),
        (("optimize", "small.pt", "--flops-budget", "0.5", "--data", "probe.npz", "--out", "x.json", "--save-model", "probe.npz"),
         "`--data`"),
        (("apply", "small.pt", "free.json", "--out", "small.pt"), "MODEL"),
    ]:
        _refused(_cli(*argv, cwd=work), f"must not be a file this command reads, but it is also {option}")
    assert (work / "free.json").read_text() == plan_text and (work / "probe.npz").read_bytes() == probe_bytes
    assert (work / "small.pt").read_bytes() == model_bytes


def test_an_output_that_is_a_device_is_refused_not_replaced(work: Path, data_free: dict) -> None:
    # export writes a temporary file and renames it: as root that replaced /dev/full with a regular file
    _refused(_cli("export", "small.pt", "free.json", "--format", "pt", "--out", "/dev/null", cwd=work),
             "must name a regular file (or none yet)")
    assert Path("/dev/null").is_char_device()


def test_a_folder_this_process_cannot_write_is_refused_before_the_work(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import autodac.deploy

    def refused_here(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(autodac.deploy.tempfile, "NamedTemporaryFile", refused_here)  # root writes anywhere: stand in for a read-only folder
    _refused(_cli("optimize", "small.pt", "--flops-budget", "0.5", "--input-shape", SHAPE, "--out", "p.json", cwd=work),
             "`--out` must be in a folder this process can write, but got 'p.json', whose folder '.' refused a file: Permission denied")


def test_a_failed_save_is_one_line_not_a_traceback(work: Path, data_free: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args, **_kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos")

    monkeypatch.setattr(torch, "save", full)
    _refused(_cli("apply", "small.pt", "free.json", "--out", "m.pt", cwd=work),
             "the model must be written to 'm.pt', but torch.save raised RuntimeError")


def test_compare_front_needs_a_study_and_repeated_titles_stay_apart(work: Path, data_free: dict) -> None:
    from autodac.cli import _numbered

    _refused(_cli("compare", "free.json", "--front", cwd=work), "`--front` adds a pareto study's front, so it needs `--storage URL --study NAME`")
    titles = _numbered(["a.json", "a.json", "a.json (1)"])
    assert len(set(titles)) == 3 and titles[2] == "a.json (1)"  # a file already titled like a number keeps its name


def test_library_warnings_are_not_prefixed_twice(work: Path) -> None:
    done = _ok(_cli("optimize", "small.pt", "--flops-budget", "0.2", "--input-shape", SHAPE, "--out", "tiny.json", cwd=work))
    assert "autodac: warning: the plan is predicted to damage the model" in done.stderr
    assert "autodac: warning: autodac:" not in done.stderr


def test_a_factory_module_in_the_working_folder_is_found_as_python_m_finds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autodac import cli

    (tmp_path / "mynets_here.py").write_text("from autodac.testing import SmallConvNet\n\ndef small():\n    return SmallConvNet()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # as the console script starts
    assert type(cli._model_factory("mynets_here:small", None, False)).__name__ == "SmallConvNet"


def test_one_plan_compared_twice_keeps_two_columns_in_every_form(work: Path, data_free: dict) -> None:
    payload = json.loads(_ok(_cli("compare", "free.json", "free.json", "--json", cwd=work)).stdout)
    assert payload["columns"] == ["free.json (1)", "free.json (2)"] and len(payload["totals"]) == 2
