"""The command line and the models it is given: plans refused on another model, factory arguments, which weights."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import autodac
from cli_runs import refused, run_cli, succeeded
from autodac.cli import main
from autodac.testing import tiny_resnet18, tiny_resnet34



_cli, _ok = run_cli, succeeded


def _refused(done: subprocess.CompletedProcess, *words: str) -> str:
    return refused(done, *words, code=1)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18-shaped plan (and its version-1 form), resnet18/34-shaped model files and a resnet18 state dict."""
    folder = tmp_path_factory.mktemp("cli_models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = autodac.optimize(tiny_resnet18(), 0.5, example_inputs=torch.zeros(1, 3, 16, 16), progress=False).plan
    plan.save(folder / "r18.json")
    old = plan.to_dict()
    old.pop("structure")
    old["_version"] = 1
    (folder / "r18_v1.json").write_text(json.dumps(old, indent=1))
    torch.save(tiny_resnet18(), folder / "r18.pt")
    torch.save(tiny_resnet34(), folder / "r34.pt")
    torch.save(tiny_resnet18(num_classes=1000, seed=2).state_dict(), folder / "r18_1000_state.pt")
    return folder


def test_apply_refuses_a_plan_for_another_model(work: Path) -> None:
    _refused(_cli("apply", "r34.pt", "r18.json", "--out", "wrong.pt", cwd=work),
             "made for", "layer 'layer1.2.conv1' is in the model but not in the plan")
    assert not (work / "wrong.pt").exists()


def test_apply_says_the_structure_was_checked_or_could_not_be(work: Path) -> None:
    done = _ok(_cli("apply", "r18.pt", "r18.json", "--out", "ok.pt", cwd=work))
    assert "the model is the one the plan was made for (structure sha256:" in done.stdout
    done = _ok(_cli("apply", "r18.pt", "r18_v1.json", "--out", "old.pt", cwd=work))
    assert "records no model structure (plan version 1): not checked" in done.stdout


# ----------------------------------------------------------------------------- --model-args


def test_model_args_reach_the_factory_and_the_output_says_which_weights(work: Path) -> None:
    done = _ok(_cli("optimize", "autodac.testing:tiny_resnet18", "--model-args", '{"num_classes": 3}', "--flops-budget", "0.6",
                    "--input-shape", "1,3,16,16", "--out", "three.json", "--json", "--quiet", cwd=work))
    report = json.loads(done.stdout)
    assert report["weights"] == (
        "weights: random initialisation from factory autodac.testing:tiny_resnet18(num_classes=3) "
        "(unless it loads weights itself; --weights FILE loads a state dict)"
    )
    assert autodac.Plan.load(work / "three.json").structure["layers"]["fc"] == "Linear(32->3)"
    # the same factory without the arguments is another model: the plan is refused on it
    _refused(_cli("apply", "autodac.testing:tiny_resnet18", "three.json", "--out", "x.pt", cwd=work),
             "layer 'fc': plan has Linear(32->3), model has Linear(32->10)")
    done = _ok(_cli("apply", "autodac.testing:tiny_resnet18", "three.json", "--model-args", '{"num_classes": 3}', "--out", "three.pt", cwd=work))
    assert "weights: random initialisation from factory autodac.testing:tiny_resnet18(num_classes=3)" in done.stdout


def test_the_weights_line_names_a_state_dict_or_a_model_file(work: Path) -> None:
    # a resnet34-shaped factory call gets the resnet18 plan refused, naming the first extra layer
    _refused(_cli("apply", "autodac.testing:TinyResNet", "--model-args", '{"blocks": [3, 4, 6, 3]}', "r18.json", "--out", "x.pt", cwd=work),
             "layer 'layer1.2.conv1' is in the model but not in the plan")
    done = _ok(_cli("optimize", "autodac.testing:tiny_resnet18", "--model-args", '{"num_classes": 1000}', "--weights",
                    "r18_1000_state.pt", "--flops-budget", "0.9", "--input-shape", "1,3,16,16", "--out", "k.json", "--quiet", cwd=work))
    assert ("weights: from the state dict r18_1000_state.pt, loaded into factory "
            "autodac.testing:tiny_resnet18(num_classes=1000)") in done.stdout
    done = _ok(_cli("apply", "r18.pt", "r18.json", "--out", "f.pt", "--json", cwd=work))
    assert json.loads(done.stdout)["weights"] == "weights: from the model file r18.pt"


@pytest.mark.parametrize(
    "model, extra, words",
    [
        ("autodac.testing:tiny_resnet18", ["--model-args", "{num_classes: 3}"], ["JSON object of keyword arguments", "'{num_classes: 3}' is not JSON"]),
        ("autodac.testing:tiny_resnet18", ["--model-args", "[3]"], ["JSON object", "'[3]' is a JSON list"]),
        ("autodac.testing:tiny_resnet18", ["--model-args", '{"classes": 3}'],
         ["must build the model from `--model-args` {\"classes\": 3}", "tiny_resnet18(classes=3) raised TypeError", "unexpected keyword"]),
        ("autodac.testing:TinyResNet", ["--model-args", '{"blocks": "many"}'], ["TinyResNet(blocks='many') raised"]),
        ("r18.pt", ["--model-args", '{"num_classes": 3}'], ["need MODEL to be package.module:factory", "'r18.pt'"]),
        ("autodac.zoo:resnet20", ["--pretrained", "--model-args", '{"num_classes": 3}'], ["cannot go with `--pretrained`"]),
    ],
    ids=["not-json", "not-object", "rejected-by-factory", "factory-fails", "model-file", "pretrained"],
)
def test_bad_model_args_are_refused_in_one_line(
    work: Path, model: str, extra: list[str], words: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(work)  # in this process (each refusal comes before any work): a fresh interpreter each would cost seconds
    code = main(["apply", model, "r18.json", *extra, "--out", "x.pt"])
    captured = capsys.readouterr()
    _refused(subprocess.CompletedProcess([], code, captured.out, captured.err), *words)
    assert not (work / "x.pt").exists()


def test_profile_takes_model_args_too(work: Path) -> None:
    x = torch.randn(8, 3, 16, 16)
    np_path = work / "probe16.pt"
    torch.save({"x": x}, np_path)
    done = _ok(_cli("profile", "autodac.testing:tiny_resnet18", "--model-args", '{"num_classes": 4, "width": 2}', "--data", "probe16.pt",
                    "--points", "1", "--profile-size", "4", "--methods", "lowrank", "--json", "--quiet", cwd=work))
    assert json.loads(done.stdout)["weights"].startswith("weights: random initialisation from factory "
                                                         "autodac.testing:tiny_resnet18(num_classes=4, width=2)")
