"""Deployment: each export format loads back and reproduces the model, saved models load where
autodac cannot be imported, and ``plain_torch`` keeps every layer's outputs and state-dict keys."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import autodac
from autodac.errors import AutodacError
from autodac.deploy import FORMATS, _pickled_modules
from autodac.layers import IMPLEMENTATIONS, FactorizedLayer, SplitDepthwise, build_factorized, plain_layer
from autodac.testing import conv_configs, linear_configs, method_cases
from autodac.zoo import pretrained

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths", "ignore::DeprecationWarning")

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx and onnxruntime are not installed (pip install 'autodac[deploy]')")
CONFIGS = conv_configs() + linear_configs()
CASES = method_cases(CONFIGS)


def _format_marks(fmt: str):
    return pytest.param(fmt, marks=needs_onnx) if fmt == "onnx" else fmt


ALL_FORMATS = [_format_marks(f) for f in FORMATS]


@pytest.mark.parametrize("index, method", [(i, m) for i, m, _ in CASES], ids=[case[2] for case in CASES])
def test_plain_layer_has_the_same_outputs_and_state_dict_with_only_torch_classes(index: int, method: str) -> None:
    config = CONFIGS[index]
    rank = max(1, get_rank(config.module, method))
    for impl in IMPLEMENTATIONS[method] if not isinstance(config.module, nn.Linear) else ("",):
        layer = build_factorized(config.module, method, rank, impl=impl)
        if not isinstance(config.module, nn.Linear):  # a padding subclass's layer: zeros before one half or both
            spatial = config.module.weight.dim() - 2
            layer.pad_first, layer.pad_second = [1, 2, 0, 1][: 2 * spatial], [2, 1][:1] * 2 * spatial
        x = torch.randn(config.input_shape)
        plain = plain_layer(layer)
        assert all(type(m).__module__.split(".")[0] != "autodac" for m in plain.modules())
        assert any(isinstance(m, torch.fx.GraphModule) for m in plain.modules()) == (impl == "split")
        assert list(plain.state_dict()) == list(layer.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(plain(x), layer(x), rtol=0, atol=0)


def get_rank(module: nn.Module, method: str) -> int:
    from autodac.factorize import get_method

    return get_method(method).max_rank(tuple(module.weight.shape)) // 2


@pytest.fixture(scope="module")
def resnet20_results() -> dict[str, autodac.Result]:
    """The shipped ResNet-20 at half its FLOPs, and the same plan with every DAC layer in the split form."""
    torch.manual_seed(0)
    model = pretrained("resnet20")
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    grouped = autodac.optimize(model, flops_budget=0.5, example_inputs=x, progress=False)
    layers = {n: dataclasses.replace(c, impl="split") if c.method == "dac" else c for n, c in grouped.plan.layers.items()}
    plan = dataclasses.replace(grouped.plan, layers=layers)
    split = dataclasses.replace(grouped, model=autodac.apply(model, plan), plan=plan)
    assert any(isinstance(m, SplitDepthwise) for m in split.model.modules())
    return {"grouped": grouped, "split": split}


def _load(fmt: str, path: Path):
    if fmt == "pt":
        return torch.load(path, weights_only=False)
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    if fmt == "pt2":
        return torch.export.load(path).module()
    from autodac.runtimes import onnx_feeds, onnx_session

    session = onnx_session(str(path))
    return lambda x: torch.from_numpy(session.run(None, onnx_feeds(session, (x,)))[0])


@pytest.mark.parametrize("form", ["grouped", "split"])
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_each_format_round_trips_resnet20_to_1e5(resnet20_results, tmp_path: Path, fmt: str, form: str) -> None:
    result = resnet20_results[form]
    before = copy.deepcopy(result.model.state_dict())
    exported = autodac.export(result, tmp_path / f"model.{fmt}", format=fmt)
    assert exported.path.is_file() and exported.format == fmt and exported.max_difference <= exported.allowed
    loaded = _load(fmt, exported.path)
    fresh = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(7))  # not the inputs the export checked on
    with torch.no_grad():
        expected = result.model.eval()(fresh)
        got = loaded(fresh)
    assert (got - expected).abs().max().item() <= 1e-5
    assert all(torch.equal(v, result.model.state_dict()[k]) for k, v in before.items())  # the caller's model is untouched
    assert any(isinstance(m, FactorizedLayer) for m in result.model.modules())


def test_pt_file_names_no_autodac_module_while_a_plain_torch_save_does(resnet20_results, tmp_path: Path) -> None:
    model = resnet20_results["split"].model
    torch.save(model, tmp_path / "naive.pt")
    assert any(m.startswith("autodac") for m in _pickled_modules(tmp_path / "naive.pt"))  # the failure
    autodac.export(resnet20_results["split"], tmp_path / "plain.pt", format="pt")
    assert not any(m.startswith("autodac") for m in _pickled_modules(tmp_path / "plain.pt"))


_BLOCKED_LOADER = textwrap.dedent(
    """
    import sys

    class _NoAutodac:  # a meta-path blocker: autodac is not installed here
        def find_spec(self, name, path=None, target=None):
            if name == "autodac" or name.startswith("autodac."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, _NoAutodac())
    for name in [n for n in sys.modules if n == "autodac" or n.startswith("autodac.")]:
        del sys.modules[name]
    try:
        import autodac  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("autodac was importable: the test proves nothing")
    sys.path.insert(0, sys.argv[1])  # the user's own model module, as a deployment would ship it
    import torch
    torch.set_num_threads(1)
    folder = sys.argv[2]
    x = torch.load(folder + "/x.pt")
    outputs = {}
    with torch.no_grad():
        for fmt in sys.argv[3].split(","):
            path = folder + "/model." + fmt
            if fmt == "pt":
                outputs[fmt] = torch.load(path, weights_only=False)(x)
            elif fmt == "torchscript":
                outputs[fmt] = torch.jit.load(path)(x)
            elif fmt == "pt2":
                outputs[fmt] = torch.export.load(path).module()(x)
            else:
                import onnxruntime
                session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
                outputs[fmt] = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert "autodac" not in sys.modules or sys.modules["autodac"] is None
    torch.save(outputs, folder + "/outputs.pt")
    """
)

_USER_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    class UserNet(nn.Module):  # a user's own model class: importable where the model is deployed
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            )
            self.head = nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean((2, 3)))
    """
)


def _run_blocked(tmp_path: Path, formats: list[str]) -> dict[str, torch.Tensor]:
    script = tmp_path / "load_without_autodac.py"
    script.write_text(_BLOCKED_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(tmp_path), ",".join(formats)], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt")


@pytest.mark.parametrize("model_kind", ["resnet20-split", "cifar-vgg", "user-class"])
def test_saved_models_load_and_match_in_a_process_where_autodac_cannot_be_imported(resnet20_results, tmp_path: Path, model_kind: str) -> None:
    if model_kind == "resnet20-split":  # autodac's own model classes: traced whole with torch.fx
        result = resnet20_results["split"]
        x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    elif model_kind == "cifar-vgg":  # its forward pads small inputs to 32 px: traced whole too (it once could not be)
        x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = autodac.optimize(pretrained("cifar_vgg"), 0.5, example_inputs=x, progress=False)
    else:  # the user's classes stay; only autodac's layers are rebuilt
        (tmp_path / "user_model.py").write_text(_USER_MODEL)
        sys.path.insert(0, str(tmp_path))
        try:
            spec = importlib.util.spec_from_file_location("user_model", tmp_path / "user_model.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules["user_model"] = module
            spec.loader.exec_module(module)
            model = module.UserNet().eval()
            x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
            result = autodac.optimize(model, flops_budget=0.5, example_inputs=x, progress=False, methods=["dac"])
        finally:
            sys.path.remove(str(tmp_path))
        layers = {n: dataclasses.replace(c, impl="split") if c.method == "dac" else c for n, c in result.plan.layers.items()}
        result = dataclasses.replace(result, model=autodac.apply(model, dataclasses.replace(result.plan, layers=layers)))
        assert any(isinstance(m, SplitDepthwise) for m in result.model.modules())
    formats = [f for f in FORMATS if f != "onnx" or HAS_ONNX]
    for fmt in formats:
        autodac.export(result, tmp_path / f"model.{fmt}", format=fmt)
    torch.save(x, tmp_path / "x.pt")
    outputs = _run_blocked(tmp_path, formats)
    with torch.no_grad():
        expected = result.model.eval()(x)
    assert sorted(outputs) == sorted(formats)
    for fmt, got in outputs.items():
        assert (got - expected).abs().max().item() <= 1e-5, fmt
    sys.modules.pop("user_model", None)


def test_export_refuses_what_it_cannot_check(resnet20_results, tmp_path: Path) -> None:
    model = resnet20_results["grouped"].model
    with pytest.raises(AutodacError, match=r"`format` must be one of .* but got format='tflite'"):
        autodac.export(resnet20_results["grouped"], tmp_path / "m", format="tflite")
    with pytest.raises(AutodacError, match="`example_inputs` must be given to export a bare model"):
        autodac.export(model, tmp_path / "m.pt", format="pt")
    with pytest.raises(AutodacError, match=r"`tolerance > 0` must hold .* but got tolerance=0"):
        autodac.export(resnet20_results["grouped"], tmp_path / "m.pt", format="pt", tolerance=0)
    exported = autodac.export(model, tmp_path / "m.pt", format="pt", example_inputs=torch.randn(1, 1, 28, 28))
    assert exported.max_difference == 0.0  # the same modules and kernels: bit for bit


def test_export_refuses_a_file_whose_outputs_drift_naming_the_tolerance(resnet20_results, tmp_path: Path, monkeypatch) -> None:
    from autodac import deploy as export_module

    writer = export_module._WRITERS["pt"]
    monkeypatch.setitem(export_module._WRITERS, "pt", lambda m, i, p: (lambda run: (lambda: run() + 1e-2))(writer(m, i, p)))
    with pytest.raises(AutodacError, match=r"max \|exported - model\| <= tolerance \* max\(1, max \|model\|\) = .* but got 0\.01"):
        autodac.export(resnet20_results["grouped"], tmp_path / "m.pt", format="pt")
    assert list(tmp_path.iterdir()) == []  # a refused export leaves no file behind, staged or final


def test_onnx_without_onnxruntime_is_refused_in_one_line_naming_the_extra(resnet20_results, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(AutodacError, match=r"format='onnx' needs onnxruntime, which is not installed: pip install 'autodac\[deploy\]'") as error:
        autodac.export(resnet20_results["grouped"], tmp_path / "m.onnx", format="onnx")
    assert "\n" not in str(error.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["pt", "torchscript", "pt2"])
def test_export_checks_a_cuda_model_on_the_gpu(resnet20_results, tmp_path: Path, fmt: str) -> None:
    result = dataclasses.replace(resnet20_results["split"], model=copy.deepcopy(resnet20_results["split"].model).cuda(), example_inputs=None)
    exported = autodac.export(result, tmp_path / f"m.{fmt}", format=fmt)
    assert exported.max_difference <= 1e-4


def _counted_model() -> tuple[nn.Module, list[int]]:
    """SmallConvNet and a list that grows by one on every forward pass of it (or of a copy of it)."""
    from autodac.testing import SmallConvNet

    calls: list[int] = []
    model = SmallConvNet()
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return model, calls


def test_export_on_inputs_the_model_cannot_take_raises_a_model_error_naming_the_shapes(tmp_path: Path) -> None:
    model, _ = _counted_model()
    with pytest.raises(autodac.ModelError, match=r"the model must run on its example inputs, but calling it on inputs of shape "
                                                 r"\[\(1, 1, 16, 16\)\] raised RuntimeError: .*3 channels") as error:
        autodac.export(model, tmp_path / "m.pt2", format="pt2", example_inputs=torch.randn(1, 1, 16, 16))
    assert isinstance(error.value.__cause__, RuntimeError)  # the model's own error is kept as the cause
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["pt", "pt2"])
def test_export_refuses_a_path_it_cannot_write_before_any_work(tmp_path: Path, fmt: str) -> None:
    model, calls = _counted_model()
    x = torch.randn(1, 3, 16, 16)
    missing = tmp_path / "no_such_folder" / f"m.{fmt}"
    with pytest.raises(AutodacError, match=rf"`path` must be in an existing folder, but got path={re.escape(repr(str(missing)))}, "
                                           rf"whose folder {re.escape(repr(str(missing.parent)))} does not exist"):
        autodac.export(model, missing, format=fmt, example_inputs=x)
    with pytest.raises(AutodacError, match=rf"`path` must name a file, not a folder, but got path={re.escape(repr(str(tmp_path)))}, which is a folder"):
        autodac.export(model, tmp_path, format=fmt, example_inputs=x)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(AutodacError, match=r"whose folder '.*a_file' is a file"):
        autodac.export(model, tmp_path / "a_file" / f"m.{fmt}", format=fmt, example_inputs=x)
    with pytest.raises(AutodacError, match=r"`path` must be a file path \(str or os.PathLike\), but got path=None"):
        autodac.export(model, None, format=fmt, example_inputs=x)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # refused before the model ran
