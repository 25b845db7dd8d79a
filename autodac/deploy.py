"""Deploy what was planned: the decomposed model as a file that loads without autodac, checked after writing.

Every format is loaded back right after it is written and run on the example inputs; the
export fails unless its outputs match the model's to ``tolerance`` (see ``export``). Formats:

* ``"pt"``: ``torch.save`` of ``plain_torch(model)``: only torch's own classes (and the
  model's own, which must be importable where it loads) are pickled; load with
  ``torch.load(path, weights_only=False)``. The file is also scanned: no pickled name may
  come from autodac.
* ``"torchscript"``: ``torch.jit.script`` (``torch.jit.trace`` on the example inputs when the
  model does not script); load with ``torch.jit.load(path)``, no Python classes needed.
* ``"pt2"``: ``torch.export.export`` + ``torch.export.save``; load with ``torch.export.load(path).module()``.
* ``"onnx"``: ONNX (see ``autodac.runtimes.onnx_bytes``), checked in onnxruntime; needs
  ``onnx`` and ``onnxruntime`` (``pip install 'autodac[deploy]'``).
"""

from __future__ import annotations

import copy
import io
import os
import pickletools
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from autodac._logging import get_logger
from autodac.batches import tensor_leaves
from autodac.errors import AutodacError, ModelError
from autodac.layers import FactorizedLayer, SplitDepthwise, plain_layer, traced
from autodac.runtimes import onnx_bytes, onnx_feeds, onnx_session, require_onnx
from autodac.surgery import run_model

__all__ = ["export", "plain_torch", "Exported", "FORMATS", "DEFAULT_TOLERANCE"]

logger = get_logger(__name__)

FORMATS = ("pt", "torchscript", "pt2", "onnx")
# The check after writing: max |exported - model| <= DEFAULT_TOLERANCE * max(1, max |model output|).
# ONNX kernels (fused conv + BatchNorm) round differently from eager torch: ResNet-20 differs by ~2e-6.
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote and how closely the file, loaded back, reproduced the model."""

    path: Path
    format: str
    max_difference: float  # largest |exported output - model output| on the example inputs
    allowed: float  # the check's bound: tolerance * max(1, max |model output|)


def _own_classes(model: nn.Module) -> list[str]:
    return sorted({type(m).__qualname__ for m in model.modules() if type(m).__module__.split(".")[0] == "autodac"})


def plain_torch(model: nn.Module) -> nn.Module:
    """A copy of ``model`` built without autodac's classes, with the same parameters and outputs.

    Each ``FactorizedLayer`` becomes an ``nn.Sequential`` of plain torch layers
    (``autodac.layers.plain_layer``; state-dict keys unchanged). A model whose own classes come
    from autodac (``autodac.zoo``) is traced whole with ``torch.fx`` into a ``GraphModule``, which
    pickles its generated code instead of a class. The caller's model is not changed.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}")
    plain = copy.deepcopy(model)
    if isinstance(plain, FactorizedLayer):
        plain = plain_layer(plain)
    layers = [(name, m) for name, m in plain.named_modules() if isinstance(m, FactorizedLayer)]
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        plain.get_submodule(parent).register_module(child, plain_layer(layer))
    for name, layer in [(n, m) for n, m in plain.named_modules() if isinstance(m, SplitDepthwise)]:  # one left bare
        parent, _, child = name.rpartition(".")
        plain.get_submodule(parent).register_module(child, traced(layer))
    left = _own_classes(plain)
    if left:
        try:
            plain = traced(plain)
        except Exception as error:  # noqa: BLE001 - any tracing failure is the same refusal
            raise ModelError(
                f"a model saved without autodac must not contain autodac's classes, but {left} remain and torch.fx "
                f"could not trace the model to remove them ({type(error).__name__}: {error}); use format 'torchscript', 'pt2' or 'onnx'"
            ) from error
    return plain


def _pickled_modules(path: Path) -> set[str]:
    """The Python modules a ``torch.save`` file names (its pickle's GLOBAL / STACK_GLOBAL references)."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        data = archive.read(name)
    modules: set[str] = set()
    strings: list[str] = []
    for opcode, argument, _ in pickletools.genops(io.BytesIO(data)):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(argument)
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            modules.add(strings[-2])
        elif opcode.name == "GLOBAL":
            modules.add(str(argument).split(" ")[0])
    return modules


def _write_pt(model: nn.Module, inputs: tuple[Any, ...], path: Path) -> Callable[[], Any]:
    torch.save(plain_torch(model), path)
    named = sorted(m for m in _pickled_modules(path) if m.split(".")[0] == "autodac")
    if named:
        raise AutodacError(f"internal check failed: a 'pt' file must not name autodac's modules, but {path} names {named}")
    loaded = torch.load(path, map_location=_device(model), weights_only=False)
    return lambda: loaded(*inputs)


def _write_torchscript(model: nn.Module, inputs: tuple[Any, ...], path: Path) -> Callable[[], Any]:
    try:
        compiled = torch.jit.script(model)
    except Exception as error:  # noqa: BLE001 - models that do not script are traced instead
        logger.info("torch.jit.script failed (%s: %s); tracing on the example inputs instead", type(error).__name__, error)
        with torch.no_grad():
            compiled = torch.jit.trace(model, inputs)
    torch.jit.save(compiled, str(path))
    loaded = torch.jit.load(str(path), map_location=_device(model))
    return lambda: loaded(*inputs)


def _write_pt2(model: nn.Module, inputs: tuple[Any, ...], path: Path) -> Callable[[], Any]:
    program = torch.export.export(model, inputs)
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    return lambda: loaded(*inputs)


def _write_onnx(model: nn.Module, inputs: tuple[Any, ...], path: Path) -> Callable[[], Any]:
    require_onnx("format='onnx'")
    path.write_bytes(onnx_bytes(model, inputs))
    session = onnx_session(str(path))
    feeds = onnx_feeds(session, inputs)
    return lambda: [torch.from_numpy(y) for y in session.run(None, feeds)]


_WRITERS = {"pt": _write_pt, "torchscript": _write_torchscript, "pt2": _write_pt2, "onnx": _write_onnx}


def _written_and_run(format: str, model: nn.Module, inputs: tuple[Any, ...], staged: Path) -> Any:
    """The outputs of the ``format`` file written for ``model``, loaded back and run on ``inputs``; what the exporter,
    the loader or the runtime cannot take (a parametrized layer in a pickle, float64 in onnxruntime, a dict output
    traced to TorchScript) is an AutodacError naming the format and the other formats to try."""
    try:
        return _WRITERS[format](model, inputs, staged)()
    except AutodacError:
        raise
    except Exception as error:  # noqa: BLE001 - torch.jit, torch.export, the pickler and onnxruntime raise their own kinds
        others = [f for f in FORMATS if f != format]
        reason = " ".join(str(error).split())[:400]
        raise ModelError(
            f"the model must be written as {format} and run from the file, but that raised {type(error).__name__}: {reason}; "
            f"another format ({', '.join(others)}) may take it"
        ) from error


def _device(model: nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _example_inputs(source: Any, model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is not None:
        return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    stored = getattr(source, "example_inputs", None)
    if stored is not None:
        return tuple(stored)
    shapes = getattr(getattr(source, "plan", None), "input_shapes", None)
    if shapes:  # the plan's shapes with seeded random values: what was planned, not what the caller may have changed
        generator = torch.Generator().manual_seed(0)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return tuple(torch.randn(*shape, generator=generator).to(_device(model), dtype) for shape in shapes)
    raise AutodacError("`example_inputs` must be given to export a bare model (a Result carries its plan's), but got example_inputs=None")


def unwritable(path: Path) -> tuple[str, str] | None:
    """Why a file cannot be written at ``path``, as ``(rule, what is wrong)``; None when it can (a file was made and
    removed in its folder to find out)."""
    if path.is_dir():
        return "must name a file, not a folder", "which is a folder"
    if path.exists() and not path.is_file():  # a device or a pipe: writing a temporary file and renaming would replace it
        return "must name a regular file (or none yet)", "which exists and is not a regular file (a device, a pipe, ...)"
    folder = path.parent
    if not folder.is_dir():
        return "must be in an existing folder", f"whose folder {str(folder)!r} {'is a file' if folder.exists() else 'does not exist'}"
    try:  # the folder's permissions as they are for this process (root on a read-only file system included): try it
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".autodac-write-check-"):
            pass
    except OSError as error:
        return "must be in a folder this process can write", f"whose folder {str(folder)!r} refused a file: {error.strerror or error}"
    return None


def _check_path(path: Any) -> Path:
    """``path`` as a Path, refused before any work unless it names a file (not a folder) in an existing folder."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise AutodacError(f"`path` must be a file path (str or os.PathLike), but got path={path!r}")
    path = Path(path)
    problem = unwritable(path)
    if problem is not None:
        raise AutodacError(f"`path` {problem[0]}, but got path={str(path)!r}, {problem[1]}")
    return path


def export(
    result_or_model: Any, path: str | Path, *, format: str, example_inputs: Any = None, tolerance: float = DEFAULT_TOLERANCE,
) -> Exported:
    """Write ``result.model`` (or a model) to ``path`` in ``format`` (one of ``FORMATS``), then load it back and check it.

    The check runs the loaded file on the example inputs (the ``Result``'s own, else random
    inputs of its plan's ``input_shapes``, else ``example_inputs``, which a bare model needs)
    and refuses the export unless ``max |exported - model| <= tolerance * max(1, max |model|)``
    over every output. The model is exported in eval mode from a copy; the caller's is not changed.
    ``path`` must name a file in an existing folder (checked before any work); inputs the model
    cannot take raise ``ModelError`` naming their shapes.
    """
    model = getattr(result_or_model, "model", result_or_model)
    if not isinstance(model, nn.Module):
        raise ModelError(f"`result_or_model` must be an autodac Result or a torch.nn.Module, but got {type(result_or_model).__name__}")
    if format not in _WRITERS:
        raise AutodacError(f"`format` must be one of {list(FORMATS)}, but got format={format!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise AutodacError(f"`tolerance > 0` must hold (a bound relative to the output's scale), but got tolerance={tolerance!r}")
    path = _check_path(path)
    model = copy.deepcopy(model).eval()
    inputs = _example_inputs(result_or_model, model, example_inputs)
    # written beside ``path`` and moved there only once checked: a refused export leaves no file behind
    staged = path.with_name(f".{path.stem}.autodac-unchecked{path.suffix}")
    try:
        with torch.no_grad():
            expected = tensor_leaves(run_model(model, inputs))  # inputs the model cannot take: a ModelError naming their shapes
            got = tensor_leaves(_written_and_run(format, model, inputs, staged))
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise AutodacError(
                f"the {format} file must give the model's outputs, but it gave shapes {[tuple(g.shape) for g in got]} "
                f"for {[tuple(e.shape) for e in expected]}"
            )
        scale = max([1.0, *(float(e.abs().max()) for e in expected if e.numel())])
        difference = max([0.0, *(float((g.to(e.device, e.dtype) - e).abs().max()) for g, e in zip(got, expected) if e.numel())])
        allowed = tolerance * scale
        if not difference <= allowed:
            raise AutodacError(
                f"`max |exported - model| <= tolerance * max(1, max |model|) = {allowed:.3g}` must hold for the {format} file "
                f"{str(path)!r} loaded back, but got {difference:.3g} (tolerance={tolerance!r}); nothing was written"
            )
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    logger.info("wrote %s (%s); loaded back, max |difference| %.3g (allowed %.3g)", path, format, difference, allowed)
    return Exported(path=path, format=format, max_difference=difference, allowed=allowed)
