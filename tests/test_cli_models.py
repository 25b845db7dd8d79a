"""The command line and the models it is given: plans refused on another model, factory arguments, which weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import autodac
from autodac.testing import tiny_resnet18, tiny_resnet34

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "autodac.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return done


def _refused(done: subprocess.CompletedProcess, *words: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stdout
    assert len(lines) == 1 and lines[0].startswith("autodac: error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert done.stdout == ""
    return lines[0]


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
