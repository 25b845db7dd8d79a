"""The example scripts run as users run them (a fresh interpreter each) and print what they promise.

Each script gets cheap flags (few probe images and trials, one budget) so the file stays fast;
the full defaults are what users run. One thread per process, as in conftest (the machine is shared).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script: str, *args: str, timeout: float = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # the examples import autodac as an installed package would; make the checkout importable without installing it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    return done.stdout


def test_quickstart_replays_the_saved_plan() -> None:
    out = _run("quickstart.py")
    ratio = float(re.search(r"\(ratio (\d\.\d+)\)", out).group(1))  # fvcore's count, from result.summary()
    assert 0.45 < ratio <= 0.5
    assert "test accuracy:" in out and "outputs identical" in out


def test_demo_data_free() -> None:
    out = _run("demo.py", "--no-probe")
    assert "== data-free plan" in out
    assert "test accuracy after:" in out


def test_compare_plans_prints_three_columns() -> None:
    out = _run("compare_plans.py", "--probe", "64", "--n-trials", "2", "--test-images", "500")
    header = out.splitlines()[0].split()
    assert header[:1] == ["layer"] and "DAC" in header and "probe" in header
    for title in ("DAC only:", "all methods:", "all + probe:"):
        assert title in out and "cut deepest:" in out


def test_deploy_smallest_sweeps_up_stops_at_the_first_pass_and_rebuilds_it(tmp_path: Path) -> None:
    # a bar every plan passes: the smallest budget wins whatever the shipped weights, and 0.6 is never tried
    out = _run(
        "deploy_smallest.py", "--nets", "cifar_vgg", "--budgets", "0.6", "0.3", "--max-drop", "100",
        "--probe", "64", "--n-trials", "2", "--test-images", "500", "--out", str(tmp_path),
    )
    rows = [line.split() for line in out.splitlines() if line[:2] in ("0.", "1.")]
    assert [row[0] for row in rows] == ["0.3"] and rows[0][-1] == "PASS"
    assert "smallest passing budget 0.3" in out and "rebuilt and checked" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar_vgg.plan.json", "cifar_vgg.pt"]


def test_deploy_smallest_without_a_winner_saves_nothing(tmp_path: Path) -> None:
    out = _run(
        "deploy_smallest.py", "--nets", "resnet20", "--budgets", "0.1", "--max-drop", "0",
        "--probe", "32", "--n-trials", "1", "--test-images", "250", "--out", str(tmp_path),
    )  # a tenth of the FLOPs planned on 32 images loses test accuracy: no drop allowed, no winner
    assert "fail" in out and "resnet20: no budget passed" in out
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("argv", "refusal"), [
    (("--max-drop", "nan"), "argument --max-drop: must be a finite number of points >= 0, but got 'nan'"),
    (("--budgets", "0.5", "1.5"), "argument --budgets: must be a FLOPs ratio with 0 < budget <= 1, but got '1.5'"),
    (("--test-images", "0"), "argument --test-images: must be an integer >= 1, but got '0'"),
    (("--probe", "1"), "argument --probe: must be an integer >= 2, but got '1'"),
])
def test_deploy_smallest_refuses_a_bad_argument_naming_the_rule_and_the_value(argv: tuple[str, ...], refusal: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(EXAMPLES / "deploy_smallest.py"), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and refusal in done.stderr


def test_export_writes_every_format_and_checks_it() -> None:
    out = _run("export.py")
    for fmt in ("pt", "torchscript", "pt2"):
        assert re.search(rf"^{fmt}: [0-9.]+ MB, loaded back, max \|difference\| ", out, re.M), out
    assert re.search(r"^onnx: (skipped|[0-9.]+ MB, loaded back)", out, re.M), out


def test_the_readme_layout_names_every_module_of_the_package() -> None:
    """Someone new reads the architecture off the README's Layout: a module missing there is a module nobody finds."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    missing = [
        str(path.relative_to(root / "autodac")) for path in sorted((root / "autodac").rglob("*.py"))
        if path.name != "__init__.py" and path.name not in layout
    ]
    assert not missing, f"the README's Layout does not name {missing}"
