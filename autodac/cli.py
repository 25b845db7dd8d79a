"""The ``autodac`` command line: one command per step (optimize, worker, apply, compare, profile, report).

The command line parses, loads models and data, calls the public API and writes files; it is
the only part of autodac that prints. Every refusal is one line ``autodac: error: ...`` on
stderr with a non-zero exit code (2 for a malformed command, 1 for anything refused later),
never a Python traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["main", "build_parser", "CLIError"]

PROG = "autodac"
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_MAX_MESSAGE = 600
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CLIError(Exception):
    """A refusal by the command line itself: a file that does not hold what the option needs, options that clash."""


class _UsageError(Exception):
    """A malformed command (argparse's complaint), reported on one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and exits from inside parse_args; here it raises, so main() reports it on one line
    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


# ----------------------------------------------------------------------------- output


def _say(text: str) -> None:
    """The command's result, on stdout."""
    print(text, flush=True)


def _fail(message: str) -> None:
    """One line on stderr: the rule that was broken and the value (newlines and colour codes folded, long messages cut)."""
    line = " ".join(_ANSI.sub("", str(message)).split())
    if len(line) > _MAX_MESSAGE:
        line = line[: _MAX_MESSAGE - 3] + "..."
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split()).removeprefix(f"{PROG}: ")  # the library's warnings name autodac already
    print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, text: str, payload: Mapping[str, Any]) -> None:
    _say(json.dumps(payload, indent=1) if args.json else text)


# ----------------------------------------------------------------------------- argument types


def _shape(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, like 1,3,224,224, but got {text!r}")
    return shape


def _budget(text: str) -> float:
    try:
        return float(text)  # the range (0, 1] is the library's rule, checked and worded there
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number with 0 < budget <= 1, like 0.5, but got {text!r}") from None


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be factorisation names separated by single commas, like dac,spatial, but got {text!r}")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, but got {text!r}")
    return value


def _existing(what: str, path: str | Path) -> Path:
    """``path`` as a Path, or a one-line refusal naming the option when no such file exists."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{what} must be an existing file, but {str(path)!r} " + ("is a folder" if path.is_dir() else "does not exist"))
    return path


# ----------------------------------------------------------------------------- loading


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _load_model(spec: str, weights: str | None = None, pretrained: bool = False, model_args: Mapping[str, Any] | None = None):
    """An eval-mode ``nn.Module`` from a ``torch.save(model)`` file or ``package.module:factory(**model_args)`` (+ weights)."""
    from torch import nn

    if Path(spec).exists():
        if weights or pretrained or model_args is not None:
            raise CLIError(
                f"`--weights`, `--pretrained` and `--model-args` need MODEL to be package.module:factory, but MODEL is the file {spec!r}"
            )
        model = _model_file(_existing("MODEL", spec))
    elif _FACTORY.match(spec):
        if pretrained and model_args is not None:
            raise CLIError(f"`--model-args` cannot go with `--pretrained` (the shipped weights fit the shipped architecture), but got {spec!r} with both")
        model = _model_factory(spec, weights, pretrained, model_args)
    else:
        raise CLIError(
            f"MODEL must be a model file (torch.save(model)) or package.module:factory, but {spec!r} is neither (no such file)"
        )
    if not isinstance(model, nn.Module):
        raise CLIError(f"MODEL must give a torch.nn.Module, but {spec!r} gave a {type(model).__name__}")
    return model.eval()


def _model_file(path: Path):
    import pickle
    from collections.abc import Mapping as MappingABC

    import torch

    if _is_torchscript(path):
        raise CLIError(
            f"{str(path)!r} is a TorchScript file, which hides the Conv/Linear layers autodac replaces; give MODEL as "
            f"package.module:factory --weights {path} (its state dict is used) or save the model with torch.save(model)"
        )
    try:
        # a full pickle (weights_only=False) is what torch.save(model) writes: load only model files you trust
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ImportError) as error:
        raise CLIError(
            f"{str(path)!r} must unpickle, which needs the model's class importable under the name it was saved with, "
            f"but: {error} (or give MODEL as package.module:factory --weights STATE_DICT)"
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CLIError(f"{str(path)!r} must be a file written by torch.save(model), but loading it failed: {error}") from None
    if isinstance(loaded, MappingABC):
        raise CLIError(f"{str(path)!r} holds a state dict, not a model: give MODEL as package.module:factory --weights {path}")
    return loaded


def _model_args(text: str | None) -> dict[str, Any] | None:
    """``--model-args``: a JSON object of keyword arguments for the MODEL factory (None when not given)."""
    if text is None:
        return None
    rule = "`--model-args` must be a JSON object of keyword arguments for the MODEL factory, like '{\"num_classes\": 10}'"
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise CLIError(f"{rule}, but {text!r} is not JSON ({error})") from None
    if not isinstance(parsed, dict):
        raise CLIError(f"{rule}, but {text!r} is a JSON {type(parsed).__name__}")
    return parsed


def _call_text(spec: str, model_args: Mapping[str, Any] | None) -> str:
    """How the factory was called, as Python: ``pkg.mod:fn(num_classes=10)``."""
    return f"{spec}({', '.join(f'{k}={v!r}' for k, v in (model_args or {}).items())})"


_WEIGHT_ARGS = ("weights", "pretrained", "checkpoint", "weights_path")  # factory arguments that usually load weights


def _weights_source(args: argparse.Namespace) -> str:
    """The line that says which weights the command used: a model file, a state dict, the shipped ones, or the factory's."""
    model_args = _model_args(getattr(args, "model_args", None))
    if Path(args.model).exists():
        return f"weights: from the model file {args.model}"
    if args.pretrained:
        return f"weights: shipped with autodac ({args.model} --pretrained)"
    call = _call_text(args.model, model_args)
    if args.weights:
        return f"weights: from the state dict {args.weights}, loaded into factory {call}"
    if any(key in _WEIGHT_ARGS for key in (model_args or {})):
        return f"weights: as factory {call} loaded them"
    return f"weights: random initialisation from factory {call} (unless it loads weights itself; --weights FILE loads a state dict)"


def _load_model_from(args: argparse.Namespace):
    """The command's MODEL, built from its ``--weights``, ``--pretrained`` and ``--model-args``."""
    return _load_model(args.model, args.weights, args.pretrained, _model_args(getattr(args, "model_args", None)))


def _model_factory(spec: str, weights: str | None, pretrained: bool, model_args: Mapping[str, Any] | None = None):
    module_name, attribute = spec.split(":")
    weights_path = _existing("`--weights`", weights) if weights else None
    if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m autodac.cli` finds it: the command's own path lacks it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CLIError(f"MODEL {spec!r} names a module that must be importable, but: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        found = "does not exist" if factory is None else f"is a {type(factory).__name__}"
        raise CLIError(f"MODEL {spec!r} must name a callable in {module_name}, but {module_name}.{attribute} {found}")
    if pretrained:
        if module_name != "autodac.zoo":
            raise CLIError(f"`--pretrained` loads the weights autodac ships, so MODEL must be autodac.zoo:NAME, but got {spec!r}")
        from autodac.zoo import SHIPPED_WEIGHTS, pretrained as shipped

        if attribute not in SHIPPED_WEIGHTS:
            raise CLIError(f"`--pretrained` needs MODEL autodac.zoo:NAME with NAME one of {sorted(SHIPPED_WEIGHTS)} (the nets autodac "
                           f"ships weights for), but got {spec!r}")
        return shipped(attribute)
    if model_args is not None:
        try:
            model = factory(**model_args)
        except Exception as error:  # a factory may refuse its arguments with any error; never a traceback
            raise CLIError(
                f"MODEL {spec!r} must build the model from `--model-args` {json.dumps(model_args)}, but calling "
                f"{_call_text(spec, model_args)} raised {type(error).__name__}: {error}"
            ) from None
    else:
        try:
            model = factory()
        except TypeError as error:
            raise CLIError(f"MODEL {spec!r} must build the model when called with no arguments (or give `--model-args`), but: {error}") from None
    if weights_path is not None:
        _load_weights(model, weights_path, spec)
    return model


def _load_weights(model, path: Path, spec: str) -> None:
    import pickle
    from collections.abc import Mapping as MappingABC

    import torch

    try:
        if _is_torchscript(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only=True met something other than tensors and containers
        raise CLIError(
            f"`--weights` must hold a state dict (tensors only), but {str(path)!r} holds other objects "
            f"(a whole model saved with torch.save(model)? give that file as MODEL instead)"
        ) from None
    except (RuntimeError, EOFError, ValueError) as error:
        raise CLIError(f"`--weights` must be a state dict saved with torch.save, but loading {str(path)!r} failed: {error}") from None
    if not isinstance(state, MappingABC):
        raise CLIError(f"`--weights` must hold a state dict (a mapping of tensors), but {str(path)!r} holds a {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CLIError(f"`--weights` {str(path)!r} must match the parameters of {spec}, but: {error}") from None


def _numbered_inputs(names: Sequence[str]) -> list[str] | None:
    """``x0, x1, ...`` in order when ``names`` hold them (a model of several inputs), else None."""
    numbered = sorted((n for n in names if n[:1] == "x" and n[1:].isdigit()), key=lambda n: int(n[1:]))
    if not numbered:
        return None
    expected = [f"x{i}" for i in range(len(numbered))]
    if numbered != expected:
        raise CLIError(f"`--data` inputs of a model of several inputs must be numbered {expected} from x0 on, but got {numbered}")
    return numbered


def _load_data(path_text: str, model) -> list[Any]:
    """``[(x, y)]`` or ``[x]`` from an .npz (arrays ``x``, optional ``y``) or a .pt (a tensor, ``{"x", "y"}`` or ``(x, y)``).

    A model of several inputs takes arrays (or dict keys) ``x0``, ``x1``, ... instead of ``x``:
    ``[((x0, x1, ...), y)]`` or ``[((x0, x1, ...),)]``.
    """
    import numpy as np
    import torch

    path = _existing("`--data`", path_text)
    suffix = path.suffix.lower()
    rule = (
        "`--data` must be an .npz with arrays x (inputs; x0, x1, ... for a model of several inputs) and optional y (labels), "
        "or a .pt holding x, {'x': ..., 'y': ...} (or {'x0': ..., 'x1': ..., 'y': ...}) or (x, y)"
    )
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as arrays:
                numbered = _numbered_inputs(arrays.files)
                if "x" not in arrays.files and numbered is None:
                    raise CLIError(f"{rule}, but {str(path)!r} holds the arrays {arrays.files}")
                xs = [arrays["x"]] if numbered is None else [arrays[n] for n in numbered]
                y = arrays["y"] if "y" in arrays.files else None
        except (ValueError, zipfile.BadZipFile, EOFError) as error:
            raise CLIError(f"{rule}, but reading {str(path)!r} failed: {error}") from None
    elif suffix in (".pt", ".pth"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a file that is not a tensor archive
            raise CLIError(f"{rule}, but reading {str(path)!r} failed: {type(error).__name__}: {error}") from None
        numbered = _numbered_inputs(list(loaded)) if isinstance(loaded, dict) and "x" not in loaded else None
        if isinstance(loaded, torch.Tensor):
            xs, y = [loaded], None
        elif isinstance(loaded, dict) and ("x" in loaded or numbered is not None):
            xs, y = ([loaded["x"]] if numbered is None else [loaded[n] for n in numbered]), loaded.get("y")
        elif isinstance(loaded, (tuple, list)) and len(loaded) == 2:
            xs, y = [loaded[0]], loaded[1]
        else:
            raise CLIError(f"{rule}, but {str(path)!r} holds a {type(loaded).__name__}")
    else:
        raise CLIError(f"{rule}, but got a {suffix or 'suffix-less'} file {str(path)!r}")
    names = ["x"] if len(xs) == 1 else [f"x{i}" for i in range(len(xs))]
    tensors = []
    for name, x in zip(names, xs):
        x = torch.as_tensor(x)
        if x.dim() < 1 or x.shape[0] == 0 or (tensors and x.shape[0] != tensors[0].shape[0]):
            raise CLIError(
                f"`--data` inputs must be N x ... with one N >= 1 for all, but {str(path)!r} has {name} of shape {tuple(x.shape)}"
                + (f" and x0 of shape {tuple(tensors[0].shape)}" if tensors else "")
            )
        tensors.append(x.to(_dtype_of(model)) if x.is_floating_point() else x)
    inputs = tensors[0] if len(tensors) == 1 else tuple(tensors)
    if y is None:
        return [inputs] if len(tensors) == 1 else [(inputs,)]
    y = torch.as_tensor(y)
    n = tensors[0].shape[0]
    if y.dim() != 1 or y.shape[0] != n or y.is_floating_point():
        raise CLIError(
            f"`--data` labels y must be one integer class per input ({n}), but {str(path)!r} has y of shape "
            f"{tuple(y.shape)} and dtype {y.dtype}"
        )
    return [(inputs, y.long())]


def _dtype_of(model):
    import torch

    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _input_tensor(shape: tuple[int, ...], dtype, generator=None):
    """Zeros (or, given ``generator``, seeded random values) of ``--input-shape``, refused on one line when they cannot be allocated."""
    import torch

    try:
        if generator is None:
            return torch.zeros(shape, dtype=dtype)
        return torch.randn(*shape, generator=generator, dtype=dtype)
    except (RuntimeError, MemoryError, OverflowError) as error:  # torch's allocator refuses with a RuntimeError
        count = 1
        for size in shape:
            count *= size
        raise CLIError(
            f"`--input-shape` must give an input tensor that fits in memory, but {','.join(map(str, shape))} is {count:,} "
            f"values ({count * dtype.itemsize / 2**30:,.1f} GiB of {str(dtype).removeprefix('torch.')}) and allocating it failed: "
            f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        ) from None


def _example_inputs(args: argparse.Namespace, model, has_data: bool):
    if args.input_shape is not None:
        return _input_tensor(args.input_shape, _dtype_of(model))
    if not has_data:
        raise CLIError("`--input-shape` (like 1,3,224,224) must be given when `--data` is not: FLOPs are counted at that shape")
    return None  # optimize counts FLOPs on the first probe example


def _load_plan(path_text: str):
    from autodac.plan import Plan

    return Plan.load(_existing("PLAN", path_text))  # a file that is not a plan: a PlanError naming it


def _check_writable(what: str, path_text: str | None) -> None:
    """Refuse an output file path that is a folder, or whose folder does not exist, before any long work, not after it."""
    from autodac.deploy import unwritable

    problem = None if path_text is None else unwritable(Path(path_text))
    if problem is not None:
        raise CLIError(f"{what} {problem[0]}, but got {path_text!r}, {problem[1]}")


def _check_output(what: str, path_text: str | None, args: argparse.Namespace) -> None:
    """``_check_writable``, and refuse an output that is one of the files the command reads (it would be overwritten)."""
    _check_writable(what, path_text)
    if path_text is None:
        return
    out = Path(path_text).resolve()
    read = (("MODEL", getattr(args, "model", None)), ("PLAN", getattr(args, "plan", None)), ("`--data`", getattr(args, "data", None)),
            ("`--weights`", getattr(args, "weights", None)))
    for option, given in read:
        if isinstance(given, str) and given and Path(given).resolve() == out:
            raise CLIError(f"{what} must not be a file this command reads, but it is also {option} ({path_text!r}): it would be "
                           "overwritten; write elsewhere")


def _check_folder(what: str, path_text: str | None) -> None:
    """Refuse an output folder that is an existing file, or one this process cannot make or write, before any long work."""
    if path_text is None:
        return
    if Path(path_text).exists() and not Path(path_text).is_dir():
        raise CLIError(f"{what} must be a folder (made if missing), but {path_text!r} is a file")
    from autodac.deploy import unwritable

    try:
        Path(path_text).mkdir(parents=True, exist_ok=True)  # made now rather than after the work
    except OSError as error:
        raise CLIError(f"{what} must be a folder this process can make, but making {path_text!r} raised: {error.strerror or error}") from None
    problem = unwritable(Path(path_text) / ".autodac-check")
    if problem is not None:
        raise CLIError(f"{what} {problem[0]}, but got {path_text!r}, {problem[1]}")


def _titles(paths: Sequence[str]) -> list[str]:
    """A column title per plan file: its stem, its path where stems repeat, numbered where a path is given more than once."""
    stems = [Path(p).stem for p in paths]
    return _numbered(stems if len(set(stems)) == len(stems) else list(paths))


def _numbered(titles: Sequence[str]) -> list[str]:
    """``titles`` with every repeated one numbered in order (``st (1)``, ``st (2)``), the others as they are."""
    counts = {title: titles.count(title) for title in titles}
    seen: dict[str, int] = {}
    result: list[str] = []
    for title in titles:
        seen[title] = seen.get(title, 0) + 1
        numbered = f"{title} ({seen[title]})" if counts[title] > 1 else title
        while numbered in result or (numbered != title and numbered in counts):  # a title that already reads like a number
            seen[title] += 1
            numbered = f"{title} ({seen[title]})"
        result.append(numbered)
    return result


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet


def _save_model(model, path_text: str, instead: str = "") -> None:
    """``torch.save(model)`` to a temporary file beside ``path_text``, moved into place once whole: a model that cannot
    be pickled, or a full disk, leaves what was there before (never a truncated file)."""
    import tempfile

    import torch

    target = os.path.realpath(path_text)  # a link is written through, as open() would
    try:
        handle, partial = tempfile.mkstemp(prefix=".autodac-", suffix=".pt", dir=os.path.dirname(target))
    except OSError as error:
        raise CLIError(f"the model must be written to {path_text!r}, but its folder cannot take a file: {error}") from None
    os.close(handle)
    if os.path.exists(target):
        mode = os.stat(target).st_mode & 0o777  # the file's own mode, kept
    else:
        umask = os.umask(0o022)  # read it (os has no getter); the CLI runs one thread
        os.umask(umask)
        mode = 0o666 & ~umask  # as open() would have made it (mkstemp's is private to the user)
    try:
        torch.save(model, partial)
        os.chmod(partial, mode)
        os.replace(partial, target)
    except Exception as error:  # noqa: BLE001 - OSError, torch's RuntimeError, and pickling's AttributeError/TypeError/PicklingError
        hint = ("; a model whose class is defined inside a function, or that holds a lambda, cannot be pickled"
                + (f": {instead}" if instead else "")) if not isinstance(error, OSError) else ""
        raise CLIError(f"the model must be written to {path_text!r}, but torch.save raised {type(error).__name__}: {error}{hint}") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _metric_lines(metrics: Mapping[str, float], notes: Sequence[str]) -> list[str]:
    lines = list(notes)
    if metrics:
        lines.append("metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return lines


# ----------------------------------------------------------------------------- commands


def _cmd_optimize(args: argparse.Namespace) -> int:
    import autodac

    if args.flops_budget is None and args.latency_budget is None and args.params_budget is None:
        raise _UsageError("one of `--flops-budget`, `--latency-budget` or `--params-budget` must be given (see `autodac optimize --help`)")
    if args.synthesize and args.data:
        raise _UsageError("`--data` and `--synthesize` are alternatives (synthesised inputs stand in for missing data); give one")
    _check_output("`--out`", args.out, args)
    _check_output("`--save-model`", args.save_model, args)
    if args.save_model is not None and args.out is not None and Path(args.save_model).resolve() == Path(args.out).resolve():
        raise CLIError(f"`--out` (the plan) and `--save-model` must be different files, but both are {args.out!r}")
    model = _load_model_from(args)
    data = _load_data(args.data, model) if args.data else None
    kwargs: dict[str, Any] = {"example_inputs": _example_inputs(args, model, data is not None), "data": data,
                              "progress": _progress(args)}
    if args.params_budget is not None:  # budgets as values: FLOPs and parameters together in one list
        kwargs["flops_budget"] = [autodac.Params(args.params_budget)] + ([] if args.flops_budget is None else [autodac.Flops(args.flops_budget)])
    elif args.flops_budget is not None:
        kwargs["flops_budget"] = args.flops_budget
    if args.latency_budget is not None:
        kwargs["latency_budget"] = args.latency_budget
    for name in ("device", "runtime"):  # passed only when given: the latency budget's own defaults stay the defaults
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "distill", None) is not None:
        kwargs["distill"] = autodac.DistillOptions(epochs=args.distill)
    result = autodac.optimize(model, **kwargs, **_given_options(args))
    if args.out:  # first: the plan holds the whole run, whatever becomes of the model's pickle
        result.plan.save(args.out)
    if args.save_model:
        _save_model(result.model, args.save_model, (
            f"the plan is in {args.out!r}; `autodac apply` rebuilds the model from it wherever its class can be imported"
            if args.out else "give --out to keep the plan, from which `autodac apply` rebuilds the model"
        ))
    written = [path for path in (args.out, args.save_model) if path]
    payload = {
        "plan": args.out, "model": args.save_model, "budget": result.plan.budget, "original_flops": result.original_flops,
        "flops": result.flops, "flops_ratio": result.flops_ratio, "original_params": result.original_params,
        "params": result.params, "params_ratio": result.params_ratio, "layers": len(result.plan.layers), "factorized": len(result.plan.factorized),
        "skipped": result.plan.skipped, "metrics": result.plan.metrics, "notes": result.plan.notes, "runtime": result.plan.runtime,
        "weights": _weights_source(args),
    }
    if getattr(args, "storage", None) is not None:
        payload.update(study=args.study_name, trials=len(result.trials))
    summary = result.summary()
    notes = [note for note in result.plan.notes if note not in summary]  # the summary's own warning is not said twice
    text = "\n".join([summary, _weights_source(args), *_metric_lines(result.plan.metrics, notes),
                      *([f"wrote {', '.join(written)}"] if written else [])])
    _emit(args, text, payload)
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    import autodac

    _check_output("`--out`", args.out, args)
    plan = _load_plan(args.plan)
    model = _load_model_from(args)
    data = _load_data(args.data, model) if args.data else None
    decomposed = autodac.apply(model, plan, data=data)
    _save_model(decomposed, args.out)
    params = [sum(p.numel() for p in m.parameters()) for m in (model, decomposed)]
    replayed_bn = bool(plan.metrics.get("bn_reestimated")) and data is not None
    payload = {
        "model": args.out, "plan": args.plan, "factorized": len(plan.factorized), "planned_flops_ratio": plan.flops_ratio,
        "original_params": params[0], "params": params[1], "bn_reestimated": replayed_bn,
        "structure": None if plan.structure is None else plan.structure["fingerprint"], "weights": _weights_source(args),
    }
    checked = (
        f"the model is the one the plan was made for (structure {plan.structure['fingerprint']})" if plan.structure is not None
        else "the plan records no model structure (plan version 1): not checked against the model"
    )
    text = (
        f"applied {len(plan.factorized)} factorised layers of {args.plan} (planned FLOPs ratio {plan.flops_ratio:.4f}); "
        f"parameters {params[0]:,} -> {params[1]:,}{'; BatchNorm re-estimated on --data' if replayed_bn else ''}\n"
        f"{checked}\n{_weights_source(args)}\nwrote {args.out}"
    )
    _emit(args, text, payload)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    import autodac

    _check_output("`--out`", args.out, args)
    plan = _load_plan(args.plan) if args.plan else None
    model = _load_model_from(args)
    if plan is not None:
        model = autodac.apply(model, plan, data=_load_data(args.data, model) if args.data else None)
    elif args.data:
        raise _UsageError("`--data` replays a plan fitted to data, so it needs PLAN")
    shapes = [args.input_shape] if args.input_shape is not None else (plan.input_shapes if plan is not None else [])
    if not shapes:
        raise CLIError("`--input-shape` (like 1,3,224,224) must be given when there is no PLAN: the file is checked on inputs of that shape")
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(_input_tensor(tuple(shape), _dtype_of(model), generator) for shape in shapes)
    exported = autodac.export(model, args.out, format=args.format, example_inputs=inputs)
    weights = _weights_source(args)
    payload = {"file": str(exported.path), "format": exported.format, "plan": args.plan, "input_shapes": [list(s) for s in shapes],
               "max_difference": exported.max_difference, "allowed": exported.allowed, "weights": weights}
    text = (
        f"wrote {exported.path} ({exported.format}); loaded back and run on inputs {[list(s) for s in shapes]}: "
        f"max |difference| {exported.max_difference:.3g} (allowed {exported.allowed:.3g})\n{weights}"
    )
    _emit(args, text, payload)
    return 0


def _compare_payload(titles: Sequence[str], paths: Sequence[str], plans: Sequence[Any]) -> dict[str, Any]:
    from autodac.report import layer_names, models_of, sliced_by

    layers = layer_names(list(plans))
    rows: dict[str, dict[str, Any]] = {}
    for name in layers:
        rows[name] = {}
        for title, plan in zip(titles, plans):
            choice = plan.layers.get(name)
            if choice is None and sliced_by(plan, name) is not None:
                rows[name][title] = {"method": "sliced", "by": sliced_by(plan, name)}
            elif choice is None:
                rows[name][title] = {"method": "skipped", "reason": plan.skipped[name]} if name in plan.skipped else None
            else:
                rows[name][title] = {"method": choice.method, "rank": choice.rank, "flops_before": choice.flops_before,
                                     "flops_after": choice.flops_after}
    totals = {
        title: {"file": path, "budget": plan.budget, "flops_ratio": plan.flops_ratio, "flops": plan.flops,
                "original_flops": plan.original_flops,
                "params_saved": sum(c.params_before - c.params_after for c in plan.layers.values()),
                **({"params_ratio": plan.metrics["params_ratio"]} if "params_ratio" in plan.metrics else {}), "metrics": plan.metrics,
                "runtime": plan.runtime, "structure": (plan.structure or {}).get("fingerprint"),
                "input_shapes": [list(s) for s in plan.input_shapes]}
        for title, path, plan in zip(titles, paths, plans)
    }
    # as the table's model rows: a script must not merge layers of different models (or inputs) that share a name
    return {"columns": list(titles), "same_model": models_of(plans) <= 1, "layers": rows, "totals": totals}


def _cmd_compare(args: argparse.Namespace) -> int:
    import autodac

    if bool(args.storage) != bool(args.study):
        raise _UsageError("`--storage` and `--study` go together: the study's best plan is read from the storage")
    if not args.plans and not args.study:
        raise _UsageError("give PLAN files, or `--storage URL --study NAME`, to compare (see `autodac compare --help`)")
    if args.front and not args.study:
        raise _UsageError("`--front` adds a pareto study's front, so it needs `--storage URL --study NAME`")
    plans = [_load_plan(p) for p in args.plans]
    titles = _titles(args.plans)
    sources = list(args.plans)
    if args.study:
        from autodac.search.storage import study_plans

        for name in args.study:
            for title, plan in study_plans(args.storage, name, front=args.front).items():
                titles.append(title)
                plans.append(plan)
                sources.append(f"{args.storage}#{title}")
        titles = _numbered(titles)  # a study's plan titled like a file's, or a study given twice: both columns stay
    if args.json or args.format == "json":
        _say(json.dumps(_compare_payload(titles, sources, plans), indent=1))
    else:
        _say(autodac.compare(dict(zip(titles, plans)), tablefmt="github" if args.format == "markdown" else "simple"))
    return 0


def _profile_rows(model, profile) -> dict[str, list[tuple[str, int, float, float]]]:
    """``{layer: [(method, rank, share of the layer's parameters kept, divergence)]}``, fewest parameters first."""
    import autodac

    rows = {}
    for name, by_option in profile.losses.items():
        layer = model.get_submodule(name)
        dense = sum(p.numel() for p in layer.parameters())
        options = []
        for (method, rank), loss in by_option.items():
            if method == "width":  # a hidden width: the share of the layer's input channels kept
                kept = rank / layer.weight.shape[1]
            else:
                kept = sum(p.numel() for p in autodac.decompose_conv(layer, rank, method).parameters()) / dense
            options.append((method, int(rank), kept, float(loss)))
        rows[name] = sorted(options, key=lambda o: o[2])
    return rows


def _cmd_profile(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from autodac import api
    from autodac.structure import model_structure

    _check_folder("`--out`", args.out)
    model = _load_model_from(args)
    data = _load_data(args.data, model)
    # the profile is optimize's stages up to its sensitivity profile (check, probe, count, score, profile), and no further
    run = api._start(model, 1.0, example_inputs=_example_inputs(args, model, True), data=data, progress=_progress(args), **_given_options(args))
    for stage in (api._probe, api._count, api._score, api._profile):
        stage(run)
    profile = run.profile
    rows = _profile_rows(model, profile)
    measure = api._probes.OUTPUT_KINDS[run.runner.kind] if run.runner.kind else "divergence"  # as the probe compares outputs
    payload = {
        "weights": _weights_source(args), "samples": profile.samples, "seconds": round(profile.seconds, 2), "measure": measure,
        "notes": list(run.notes), "structure": model_structure(model, api._input_shapes(run.inputs))["fingerprint"],
        "layers": {name: [{"method": m, "rank": r, "params_kept": round(k, 4), "divergence": v} for m, r, k, v in options]
                   for name, options in rows.items()},
    }
    written = []
    if args.out:
        from autodac import plots

        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sensitivity.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        plots.sensitivity_heatmap(rows, folder / "sensitivity.png", samples=profile.samples, measure=measure)
        written = [str(folder / "sensitivity.json"), str(folder / "sensitivity.png")]
    table = tabulate(
        [[name, *(f"{m} r{r} ({k:.0%}): {v:.4g}" for m, r, k, v in options)] for name, options in rows.items()],
        headers=["layer", *(f"option {j + 1}" for j in range(max(len(o) for o in rows.values())))], disable_numparse=True,
    )
    text = (
        f"sensitivity: {measure} of the outputs from the original's on {profile.samples} probe examples, "
        f"one layer factorised at a time (method, rank, parameters kept: divergence); {profile.seconds:.1f} s\n{table}"
    )
    text += f"\n{_weights_source(args)}" + "".join(f"\nnote: {note}" for note in run.notes)
    if written:
        text += f"\nwrote {', '.join(written)}"
    _emit(args, text, payload)
    return 0


def _report_markdown(titles: Sequence[str], paths: Sequence[str], plans: Mapping[str, Any], figures: Mapping[str, str],
                     front: Sequence[str], quality: tuple[str, Mapping[str, float]]) -> str:
    from tabulate import tabulate

    import autodac

    label, values = quality
    rows = []
    for title, path in zip(titles, paths):
        plan = plans[title]
        budget = ", ".join(f"{k} {v:g}" for k, v in plan.budget.items())
        rows.append([title, path, budget, f"{plan.flops_ratio:.4f}", f"{plan.flops:,}", f"{len(plan.factorized)}/{len(plan.layers)}",
                     f"{values[title]:.4f}" if title in values else "not measured", "yes" if title in front else ""])
    summary = tabulate(rows, headers=["plan", "file", "budget", "FLOPs ratio", "FLOPs", "factorised", label, "Pareto"],
                       tablefmt="github", disable_numparse=True)
    parts = [
        "# autodac report", "",
        "FLOPs are fvcore multiply-adds at each plan's input shape; ratios are of the plan's count to the original's.", "",
        summary, "",
        "## FLOPs against quality", "", f"![FLOPs against quality]({figures['quality']})", "",
        "## Ranks per layer", "",
        "Bar height: the share of the layer's full rank the plan keeps (full rank is exact); the number is the rank.", "",
        f"![ranks per layer]({figures['ranks']})", "",
        "## FLOPs per layer", "", f"![FLOPs per layer]({figures['flops']})", "",
    ]
    if "sensitivity" in figures:
        parts += ["## Sensitivity", "", f"![sensitivity heat map]({figures['sensitivity']})", ""]
    parts += ["## Layers side by side", "", autodac.compare(dict(plans), tablefmt="github"), ""]
    for title in titles:
        if plans[title].notes:
            parts += [f"Notes on {title}: " + "; ".join(plans[title].notes), ""]
    return "\n".join(parts)


def _check_profile_matches(path: str, profile: Mapping[str, Any], plans: Mapping[str, Any]) -> None:
    """A sensitivity file must be of the plans' model: its layers theirs, and its structure one of theirs where both record one."""
    layers = {name for plan in plans.values() for name in [*plan.layers, *(plan.structure or {}).get("layers", {})]}
    foreign = [name for name in profile["layers"] if name not in layers]
    recorded = {plan.structure["fingerprint"] for plan in plans.values() if plan.structure}
    if foreign:
        raise CLIError(f"`--profile` must profile the plans' model, but {path} has layers no plan has: {foreign[:3]}")
    if profile.get("structure") and recorded and profile["structure"] not in recorded:
        raise CLIError(f"`--profile` must profile the plans' model at their input shapes, but {path} is of structure "
                       f"{profile['structure'].split(':')[-1][:12]} and the plans of {sorted(r.split(':')[-1][:12] for r in recorded)}")


def _cmd_report(args: argparse.Namespace) -> int:
    from autodac import plots

    _check_folder("`--out`", args.out)
    loaded = [_load_plan(p) for p in args.plans]
    titles = _titles(args.plans)
    plans = dict(zip(titles, loaded))
    profile = None
    if args.profile:
        try:
            profile = json.loads(_existing("`--profile`", args.profile).read_text(encoding="utf-8"))
            profile_rows = {name: [(o["method"], int(o["rank"]), float(o["params_kept"]), float(o["divergence"])) for o in options]
                            for name, options in profile["layers"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise CLIError(f"`--profile` must be the sensitivity.json `autodac profile --out` writes, but reading it failed: {error}") from None
        _check_profile_matches(args.profile, profile, plans)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"quality": "flops_vs_quality.png", "ranks": "ranks_per_layer.png", "flops": "flops_per_layer.png"}
    front = plots.flops_vs_quality(plans, folder / figures["quality"])
    plots.ranks_per_layer(plans, folder / figures["ranks"])
    plots.flops_per_layer(plans, folder / figures["flops"])
    if profile is not None:
        figures["sensitivity"] = "sensitivity.png"
        plots.sensitivity_heatmap(profile_rows, folder / figures["sensitivity"], samples=profile.get("samples"),
                                 measure=profile.get("measure", "divergence"))
    label, values, _ = plots.plan_quality(plans)
    from autodac.report import models_of

    models = models_of(loaded)
    if models > 1:  # costs and errors of different networks are not one trade-off: no front across them
        front = []
    report = folder / "report.md"
    report.write_text(_report_markdown(titles, args.plans, plans, figures, front, (label, values)), encoding="utf-8")
    written = [str(report), *(str(folder / f) for f in figures.values())]
    payload = {"report": str(report), "figures": written[1:], "pareto": front, "quality": {"label": label, "values": values},
               "same_model": models <= 1}
    heading = (f"Pareto front ({label}): {', '.join(front)}" if models <= 1 else
               f"no Pareto front: the plans are of {models} different models or input shapes (see the table's model rows)")
    _emit(args, f"{heading}\nwrote {', '.join(written)}", payload)
    return 0


# ----------------------------------------------------------------------------- parser


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a torch.save(model) file (unpickled: load only files you trust) or package.module:factory")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="FILE", help="state dict (torch.save or a TorchScript file) for a package.module:factory MODEL")
    source.add_argument("--pretrained", action="store_true", help="the weights autodac ships, for MODEL autodac.zoo:resnet20 or autodac.zoo:cifar_vgg")
    parser.add_argument("--model-args", metavar="JSON",
                        help='keyword arguments for a package.module:factory MODEL, as a JSON object, like \'{"num_classes": 10}\'')


def _add_shape(parser: argparse.ArgumentParser, required_text: str, what: str = "input shape FLOPs are counted at") -> None:
    parser.add_argument("--input-shape", type=_shape, metavar="N,C,H,W", help=f"{what}, like 1,3,224,224 ({required_text})")


def _add_option(parser: argparse.ArgumentParser, name: str, *flags: str, context: str = "", **kwargs: Any) -> None:
    """A flag for ``optimize``'s option ``name`` (``--name`` unless ``flags`` are given), stored under that name.

    Its default and help are the option's own in ``autodac.options``, so neither can drift from the
    library; ``context`` says when the flag matters on the command line.
    """
    from autodac.options import option_fields

    _, option = option_fields()[name]
    default, text = option.default, option.metadata["help"]
    if kwargs.get("action") == "store_false":  # a --no-... flag: on by default
        text = f"do not {text}"
    elif kwargs.get("action") == "append":  # argparse appends to a copy of the default
        default = list(default)
    elif default is not None and not kwargs.get("required"):
        text += f" (default {','.join(default) if isinstance(default, tuple) else default})"
    parser.add_argument(*(flags or (f"--{name.replace('_', '-')}",)), dest=name, default=default, help=context + text, **kwargs)


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The values of the flags ``_add_option`` made, by option name (as ``autodac.optimize`` takes them)."""
    from autodac.options import option_fields

    return {name: value for name, value in vars(args).items() if name in option_fields()}


def _distill_default() -> int:
    from autodac.options import DistillOptions

    return DistillOptions.epochs


def _output_kinds() -> tuple[str, ...]:
    from autodac.probes import OUTPUT_KIND_CHOICES

    return OUTPUT_KIND_CHOICES


def _methods_text() -> str:
    """The registered factorisations, read from the registry."""
    from autodac.factorize import METHODS

    return f"any of {','.join(METHODS)}: "


def _add_optimize_options(optimize: argparse.ArgumentParser) -> None:
    """MODEL, the budgets, the data and the search options that `optimize` and `worker` share."""
    _add_model(optimize)
    optimize.add_argument("--flops-budget", type=_budget, metavar="RATIO", help="at most this fraction of the fvcore FLOPs, 0 < RATIO <= 1")
    optimize.add_argument("--latency-budget", type=_budget, metavar="RATIO", help="at most this fraction of the measured latency")
    optimize.add_argument("--params-budget", type=_budget, metavar="RATIO",
                          help="at most this fraction of the parameters (model size), alone or with the others")
    _add_shape(optimize, "required without --data; with --data the first example's shape")
    optimize.add_argument("--data", metavar="FILE", help="probe: .npz with x (inputs) and optional y (labels), or a .pt")
    _add_option(optimize, "synthesize", type=_positive, metavar="N")
    _add_option(optimize, "probe_size", type=_positive, metavar="N", context="with --data/--synthesize: ")
    optimize.add_argument("--device", metavar="DEVICE", help="where --latency-budget is timed (default: where the model is; e.g. cuda:0)")
    optimize.add_argument("--runtime", choices=("torch", "onnxruntime"),
                          help="what --latency-budget is timed in: eager torch (default) or onnxruntime (needs autodac[deploy])")
    _add_option(optimize, "methods", type=_methods, metavar="M[,M...]", context=_methods_text())
    _add_option(optimize, "exclude", action="append", metavar="GLOB", context="repeatable, one GLOB each: ")
    _add_option(optimize, "n_trials", type=_positive, metavar="N", context="with --data/--synthesize: ")
    _add_option(optimize, "seed", type=int, metavar="S")
    _add_option(optimize, "sequential_fit", "--no-sequential-fit", action="store_false",
                context="with --data/--synthesize (faster on deep nets): ")
    _add_option(optimize, "widths", "--no-widths", action="store_false", context="for a plan of the given --methods only: ")
    _add_option(optimize, "refit_candidates", type=_positive, metavar="K")
    _add_option(optimize, "output_kind", choices=_output_kinds(), context="with --data/--synthesize: ")
    optimize.add_argument("--distill", type=_positive, nargs="?", const=_distill_default(), metavar="EPOCHS",
                          help="with --data/--synthesize: then train the decomposed model towards the original's outputs on the probe "
                               f"for EPOCHS epochs (default {_distill_default()}), kept only if the held-out probe improves")
    optimize.add_argument("--save-model", metavar="FILE.pt", help=f"also write the decomposed model ({_TORCH_SAVE})")


_TORCH_SAVE = "torch.save: loads where autodac is installed; `autodac export` writes files that load without it"


def build_parser() -> argparse.ArgumentParser:
    """The ``autodac`` parser: a sub-command per step; each sets ``run`` to the function that does it."""
    from autodac import __version__

    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of tables")

    parser = _Parser(prog=PROG, description="Make trained PyTorch CNNs cheaper by per-layer factorisation under a budget.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    optimize = commands.add_parser("optimize", parents=[common], help="plan (and build) a decomposition under a budget",
                                   description="Plan a decomposition of MODEL under a budget; write the plan (and the model).")
    _add_optimize_options(optimize)
    optimize.add_argument("--out", required=True, metavar="PLAN.json", help="where to write the plan")
    optimize.set_defaults(run=_cmd_optimize)

    worker = commands.add_parser(
        "worker", parents=[common], help="join a search kept in an Optuna storage (many processes or machines)",
        description="Add --n-trials trials to the search kept as study NAME in the storage URL (sqlite:///search.db, "
                    "postgresql://user@host/db, or a .journal file), then print the best plan found by every worker so far. "
                    "Every worker must give the same MODEL, budget and probe as the study was made for.",
    )
    _add_option(worker, "storage", required=True, metavar="URL", context="sqlite:///FILE.db, postgresql://..., or FILE.journal: ")
    _add_option(worker, "study_name", "--study", required=True, metavar="NAME")
    _add_optimize_options(worker)
    _add_option(worker, "pareto", action="store_true", context="with --data/--synthesize (then `compare --front`): ")
    worker.add_argument("--out", metavar="PLAN.json", help="also write the best plan so far")
    worker.set_defaults(run=_cmd_optimize)

    apply = commands.add_parser("apply", parents=[common], help="replay a saved plan on a model",
                                description="Build the decomposed copy of MODEL that PLAN describes and save it.")
    _add_model(apply)
    apply.add_argument("plan", metavar="PLAN", help="plan JSON written by `autodac optimize`")
    apply.add_argument("--data", metavar="FILE", help="the probe the plan was made with (needed for plans fitted or re-fitted to data)")
    apply.add_argument("--out", required=True, metavar="FILE.pt", help=f"where to write the decomposed model ({_TORCH_SAVE})")
    apply.set_defaults(run=_cmd_apply)

    from autodac.deploy import FORMATS

    export = commands.add_parser(
        "export", parents=[common], help="write a deployable file (pt, torchscript, pt2, onnx), checked by loading it back",
        description="Write MODEL (decomposed by PLAN when given) as FORMAT; the file is loaded back and its outputs checked "
                    "against the model's. Every format loads without autodac ('pt': torch.load(path, weights_only=False)).",
    )
    _add_model(export)
    export.add_argument("plan", nargs="?", metavar="PLAN", help="plan JSON to apply first (omit when MODEL is already decomposed)")
    export.add_argument("--format", required=True, choices=FORMATS,
                        help="pt (plain torch pickle), torchscript, pt2 (torch.export), onnx (needs autodac[deploy])")
    export.add_argument("--out", required=True, metavar="FILE", help="where to write it")
    export.add_argument("--data", metavar="FILE", help="the probe the plan was made with (plans fitted to data)")
    _add_shape(export, "required without PLAN; default: the plan's input shape",
               what="input shape the exported file is checked on (random inputs, the same for the model and the file)")
    export.set_defaults(run=_cmd_export)

    compare = commands.add_parser("compare", parents=[common], help="plans side by side, a row per layer",
                                  description="Plans side by side: a row per layer, a column per plan, then totals and metrics.")
    compare.add_argument("plans", nargs="*", metavar="PLAN")
    compare.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    compare.add_argument("--storage", metavar="URL", help="an Optuna storage holding searches (with --study)")
    compare.add_argument("--study", action="append", metavar="NAME", help="add the best plan of this study (repeatable)")
    compare.add_argument("--front", action="store_true", help="with --study: also the Pareto-front plans of a pareto search")
    compare.set_defaults(run=_cmd_compare)

    profile = commands.add_parser("profile", parents=[common], help="per-layer sensitivity sweep (table and heat map)",
                                  description="Each layer alone factorised at a few options along its cost/error front; "
                                              "the divergence of the outputs from the original's on the probe, as the search measures it.")
    _add_model(profile)
    profile.add_argument("--data", required=True, metavar="FILE", help="probe: .npz with x (and optional y), or a .pt")
    _add_shape(profile, "default: the first example's shape", what="input shape the layers are traced at")
    _add_option(profile, "profile_points", "--points", type=_positive, metavar="K")
    _add_option(profile, "profile_size", type=_positive, metavar="N")
    _add_option(profile, "methods", type=_methods, metavar="M[,M...]", context=_methods_text())
    _add_option(profile, "output_kind", choices=_output_kinds())
    profile.add_argument("--out", metavar="DIR", help="write DIR/sensitivity.json and the heat map DIR/sensitivity.png")
    profile.set_defaults(run=_cmd_profile)

    report = commands.add_parser("report", parents=[common], help="markdown report with pictures of plans",
                                 description="Write DIR/report.md with FLOPs-vs-quality (Pareto front), ranks and FLOPs per layer.")
    report.add_argument("plans", nargs="+", metavar="PLAN")
    report.add_argument("--out", required=True, metavar="DIR")
    report.add_argument("--profile", metavar="FILE", help="a sensitivity.json from `autodac profile --out` to add its heat map")
    report.set_defaults(run=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 done, 1 refused, 2 malformed command)."""
    from autodac.errors import AutodacError

    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and getattr(args, "plan", "") is None and not extra[0].startswith("-"):
            args.plan = extra.pop(0)  # an optional PLAN after options (`export MODEL --pretrained PLAN`): argparse leaves it over
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except _UsageError as error:
        _fail(str(error))
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.run(args)
        except _UsageError as error:
            _fail(str(error))
            return 2
        except BrokenPipeError:  # the reader left (`autodac ... | head`): nothing to report, nowhere to write
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except (AutodacError, CLIError, OSError) as error:
            _fail(str(error))
            return 1
        except KeyboardInterrupt:
            _fail("interrupted")
            return 130


if __name__ == "__main__":
    sys.exit(main())
