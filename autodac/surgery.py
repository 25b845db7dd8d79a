"""Module surgery: find the layers worth factorising, read their geometry, swap modules by dotted name.

Nothing here changes the caller's model: ``replace_layers`` works on a deep copy, and every
replacement is built and checked before the copy is touched.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from autodac.errors import AutodacError, ModelError
from autodac.factorize import Geometry
from autodac.layers import SUPPORTED_TYPES, FactorizedLayer

__all__ = ["TracedLayer", "trace_layers", "replace_layers", "run_model", "evaluating", "unfused_attention", "own_hooks"]


@dataclass
class TracedLayer:
    """One candidate layer as seen in one forward pass.

    ``functional`` names the call (e.g. ``"F.linear"``) through which its weight was used
    outside the layer's own forward: such a layer cannot be replaced by swapping the module. A
    bare Parameter used that way is listed too, under its own dotted name, with its owner as
    ``module`` and no geometry.
    """

    name: str
    module: nn.Module
    geometry: Geometry | None  # None when the layer never ran as a module
    followed_by: str | None = None  # dotted name of the BatchNorm that consumes its output, if any
    functional: str | None = None
    unsupported: str | None = None  # the type of a torch layer autodac does not factorise (Conv3d, ConvTranspose2d, ...) that ran
    shares_with: str | None = None  # another module holding one of its parameters (tied weights): replacing one unties them


# torch layers with a weight matrix that are not candidates: reported by type when they run, not as functional calls.
_UNSUPPORTED_TYPES = (nn.modules.conv._ConvNd, nn.Bilinear)

# Calls that read a weight matrix: a Parameter passed to one of them outside its module's forward is a functional layer.
_WEIGHT_CALLS = frozenset({
    "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "__matmul__", "__rmatmul__",
    "multi_head_attention_forward", "_native_multi_head_attention", "_transformer_encoder_layer_fwd",
})


# Calls that only read a tensor's metadata: a layer's weight may be looked at that way from anywhere.
_METADATA_CALLS = frozenset({
    "__get__", "dim", "size", "numel", "nelement", "ndimension", "stride", "storage_offset", "element_size", "is_contiguous",
    "is_floating_point", "is_complex", "data_ptr", "get_device", "__len__",
})


class _WeightUses(TorchFunctionMode):
    """Records, per watched Parameter, the first weight-reading call that took it other than from its own
    Conv/Linear's forward (a Parameter of any other module is always recorded: its use is the functional one).

    A candidate layer's own weight is followed through any other call too (``self.conv.weight.flip(-1)``,
    ``.t()``, indexing; metadata queries aside): the model computes with it outside the layer, and a
    replacement, which has no ``weight``, would break that code or leave it on the old values.
    """

    def __init__(self, watched: dict[int, nn.Parameter], owners: dict[int, nn.Module]) -> None:
        super().__init__()
        self.watched = watched  # id -> the Parameter (kept, so the id stays its own)
        self.owners = owners  # id -> the candidate module whose own forward may use it
        self.running: list[nn.Module] = []  # candidate modules whose forward is on the stack
        self.uses: dict[int, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        weight_call = name in _WEIGHT_CALLS
        if weight_call or name not in _METADATA_CALLS:
            for value in itertools.chain(args, kwargs.values()):
                for tensor in value if isinstance(value, (list, tuple)) else (value,):
                    key = id(tensor)
                    if key in self.watched and tensor is self.watched[key] and key not in self.uses:
                        owner = self.owners.get(key)
                        if not weight_call and owner is None:
                            continue  # a parameter of no candidate layer is followed into weight-reading calls only
                        if owner is None or not any(m is owner for m in self.running):
                            self.uses[key] = (f"Tensor.{name}" if not weight_call
                                              else f"F.{name}" if hasattr(F, name) else f"torch.{name.strip('_')}")
        return func(*args, **kwargs)


def outside_inference_mode(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` run with inference mode off, whatever the caller's: synthesis and distillation take gradients
    (which inference mode forbids, enable_grad or not), and the modules built are ordinary tensors a user can fine-tune."""

    @functools.wraps(function)
    def outside(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return function(*args, **kwargs)

    return outside


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode and no grad for the block; afterwards every module's own mode is restored
    (restoring only the root's would silently un-freeze a BatchNorm the caller froze)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def held_parametrizations(model: nn.Module):
    """Weight parametrisations (``torch.nn.utils.parametrize``) in eval mode for the block, the caller's modes restored after.

    Reading a parametrised weight runs its parametrisation, and some keep state they update in
    train mode: spectral norm takes a power-iteration step and rewrites its ``_u``/``_v`` buffers
    on every read. autodac reads weights many times; held in eval mode they are read as they are.
    Yields ``restore(copy)``, which gives a copy made inside the block (its modules at the same
    names) the caller's modes back, and returns it.
    """
    from torch.nn.utils import parametrize

    held = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            prefix = f"{name}.parametrizations" if name else "parametrizations"
            held.update({f"{prefix}.{sub}".rstrip("."): m.training for sub, m in module.parametrizations.named_modules() if m.training})
    modules = [model.get_submodule(name) for name in held]  # those in train mode: the only ones to hold
    for module in modules:
        module.training = False

    def restore(copy: nn.Module) -> nn.Module:
        for name, training in held.items():
            try:
                copy.get_submodule(name).training = training
            except AttributeError:  # replaced (a factorised layer has no parametrisation left)
                pass
        return copy

    try:
        yield restore
    finally:
        for module in modules:
            module.training = True


@contextlib.contextmanager
def unfused_attention():
    """Keep torch's fused attention kernels off for the block, so attention runs (and traces) as it
    does with autograd on: projections through ``F.linear``, products through ``bmm``/SDPA.

    torch >= 2.2 has a global switch; older torch decides per call, and takes the unfused path
    whenever grad is enabled and a projection requires grad, so grad is enabled there instead.
    """
    backend = getattr(torch.backends, "mha", None)
    if backend is not None and hasattr(backend, "set_fastpath_enabled"):
        previous = backend.get_fastpath_enabled()
        backend.set_fastpath_enabled(False)
        try:
            yield
        finally:
            backend.set_fastpath_enabled(previous)
    else:  # pragma: no cover - torch < 2.2
        with torch.enable_grad():
            yield


_READ_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)  # whose inputs autodac's hooks read


@contextlib.contextmanager
def positional_inputs(model: nn.Module):
    """Run ``model`` within the block: a ``ModelError`` when it ends, if a conv, linear or BatchNorm layer was called with
    its input as a keyword (``bn(input=x)``). autodac's hooks read a layer's input from its positional arguments, as
    nearly every model passes it; a failure inside the block propagates as it is."""
    names = {module: name for name, module in model.named_modules()}
    by_keyword: list[str] = []

    def positional(module, args, kwargs):
        if not args and kwargs and names[module] not in by_keyword:
            by_keyword.append(names[module])

    handles = [m.register_forward_pre_hook(positional, with_kwargs=True) for m in names if isinstance(m, _READ_LAYERS)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if by_keyword:
        listed = ", ".join(repr(n or "the model itself") for n in by_keyword[:5]) + (f" and {len(by_keyword) - 5} more" if len(by_keyword) > 5 else "")
        raise ModelError(
            f"every conv, linear and BatchNorm layer must be called with its input as a positional argument (autodac reads it "
            f"there), but {listed} {'is' if len(by_keyword) == 1 else 'are'} called with it as a keyword (`layer(input=x)`): "
            "call them as `layer(x)`"
        )


def run_model(model: nn.Module, example_inputs: tuple[Any, ...], hooked: bool = False) -> Any:
    """Run ``model`` in eval mode without grad, turning any failure into a ``ModelError``. ``hooked``: the caller's
    stages will read layers' inputs through hooks, so a layer called with its input as a keyword is refused too
    (``positional_inputs``)."""
    with positional_inputs(model) if hooked else contextlib.nullcontext():
        try:
            with evaluating(model):
                return model(*example_inputs)
        except Exception as error:
            shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
            raise ModelError(
                f"the model must run on its example inputs, but calling it on inputs of shape {shapes} "
                f"raised {type(error).__name__}: {error}"
            ) from error


def _inside_factorized(name: str, factorized_prefixes: list[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in factorized_prefixes)


def trace_layers(model: nn.Module, example_inputs: tuple[Any, ...]) -> list[TracedLayer]:
    """Every Conv1d/Conv2d/Conv3d/Linear of ``model`` with the shapes it saw in one forward pass.

    Also notes which BatchNorm (if any) reads a layer's output directly, by tensor identity,
    so the data-free error can weigh each output channel as that BatchNorm scales it, and
    which weights are used through functional calls (``F.linear(x, self.qkv.weight)``, a bare
    Parameter, ``F.multi_head_attention_forward``): swapping a module cannot change those uses.
    Torch's fused attention kernels are kept off, as when counting.
    """
    factorized = [name for name, module in model.named_modules() if isinstance(module, FactorizedLayer)]
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, SUPPORTED_TYPES) and not _inside_factorized(name, factorized)
    }
    calls: dict[str, list[tuple[int, tuple[int, ...], tuple[int, ...]]]] = {name: [] for name in candidates}
    outputs: dict[int, str] = {}
    consumers: dict[str, str] = {}
    keep_alive: list[torch.Tensor] = []
    handles = []

    def layer_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0]
            if isinstance(module, nn.Linear):
                batch = x.numel() // x.shape[-1]
                calls[name].append((batch, (), ()))
            else:
                unbatched = x.dim() == len(module.kernel_size) + 1
                batch = 1 if unbatched else x.shape[0]
                calls[name].append((batch, tuple(x.shape[-len(module.kernel_size):]), tuple(output.shape[-len(module.kernel_size):])))
            if isinstance(output, torch.Tensor):
                outputs[id(output)] = name
                keep_alive.append(output)

        return hook

    def norm_hook(norm_name: str):
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            producer = outputs.get(id(inputs[0])) if inputs and isinstance(inputs[0], torch.Tensor) else None
            if producer is not None:
                consumers.setdefault(producer, norm_name)

        return hook

    watched = {id(p): p for p in model.parameters() if p.dim() >= 2}
    layers = [m for m in model.modules() if isinstance(m, SUPPORTED_TYPES)]  # candidates and the halves of factorised layers
    owners = {id(p): m for m in layers for p in m.parameters(recurse=False)}
    uses = _WeightUses(watched, owners)

    def enter(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        uses.running.append(module)

    def leave(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if uses.running and uses.running[-1] is module:
            uses.running.pop()

    for module in layers:
        handles.append(module.register_forward_pre_hook(enter))
    for name, module in candidates.items():
        handles.append(module.register_forward_hook(layer_hook(name)))
    for module in layers:
        handles.append(module.register_forward_hook(leave))
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):  # any dimension, SyncBatchNorm too
            handles.append(module.register_forward_pre_hook(norm_hook(name)))
    try:
        with unfused_attention(), uses:
            run_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        keep_alive.clear()

    traced = []
    holders: dict[int, list[tuple[str, nn.Module]]] = {}  # id of a parameter -> every (name, module) holding it
    for holder_name, holder in model.named_modules(remove_duplicate=False):
        for parameter in holder.parameters(recurse=False):
            holders.setdefault(id(parameter), []).append((holder_name, holder))
    for name, module in candidates.items():
        geometry = None
        if calls[name]:
            weight = module.weight
            geometry = Geometry(
                in_channels=int(weight.shape[1]) * getattr(module, "groups", 1),
                out_channels=int(weight.shape[0]),
                kernel_size=tuple(int(k) for k in weight.shape[2:]),
                calls=tuple(calls[name]),
            )
        tied = next((other for p in module.parameters(recurse=False) for other, holder in holders.get(id(p), []) if holder is not module), None)
        traced.append(TracedLayer(name, module, geometry, consumers.get(name), uses.uses.get(id(module.weight)), shares_with=tied))
    owned = {id(module.weight) for module in candidates.values()}
    unsupported: set[str] = set()
    for name, parameter in model.named_parameters():
        if id(parameter) in uses.uses and id(parameter) not in owned:
            owner_name = name.rpartition(".")[0]
            owner = model.get_submodule(owner_name) if owner_name else model
            if weight_hook(owner) is not None and any(owner is module for module in candidates.values()):
                continue  # its hook's reads: the layer is kept under its own name, saying why
            if isinstance(owner, _UNSUPPORTED_TYPES) and name.rpartition(".")[2] == "weight":
                if owner_name not in unsupported:  # torch's own layer, run by its own forward: named as the layer, not as a call
                    unsupported.add(owner_name)
                    traced.append(TracedLayer(owner_name, owner, None, None, unsupported=type(owner).__name__))
                continue
            traced.append(TracedLayer(name, owner, None, None, uses.uses[id(parameter)]))
    return traced


# The tables torch keeps a module's own hooks in (the ``*_with_kwargs``/``*_always_called`` ones are flags keyed like them).
HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
HOOK_FLAG_TABLES = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def weight_hook(module: nn.Module) -> str | None:
    """The torch utility whose pre-forward hook recomputes ``module``'s weight (``"weight_norm"`` or ``"spectral_norm"``
    in their legacy form, ``"prune"`` for ``torch.nn.utils.prune``), else None: a replacement would not run the hook."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in (getattr(module, "_forward_pre_hooks", None) or {}).values():
        if isinstance(hook, WeightNorm):
            return "weight_norm"
        if isinstance(hook, SpectralNorm):
            return "spectral_norm"
        if isinstance(hook, BasePruningMethod):
            return "prune"
    return None


def global_hooks() -> int:
    """How many process-wide forward and pre-forward module hooks are registered (``register_module_forward_hook``
    and its kin): they run on every module, a replacement's convs too."""
    from torch.nn.modules import module as torch_module

    tables = ("_global_forward_hooks", "_global_forward_pre_hooks")
    return sum(len(getattr(torch_module, table, None) or {}) for table in tables)


def own_hooks(module: nn.Module) -> int:
    """How many forward, pre-forward and backward hooks are registered on ``module`` itself: a replacement would not run them."""
    return sum(len(getattr(module, table, None) or {}) for table in HOOK_TABLES)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by weight dimensions: 2-D and 3-D convs


def _in_layout_of(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` with its conv weights channels-last (2-D or 3-D) when ``old``'s weight is (and that differs from contiguous)."""
    weight = getattr(old, "weight", None)
    layout = _CHANNELS_LAST.get(weight.dim()) if isinstance(weight, torch.Tensor) else None
    if layout is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=layout):
        return new.to(memory_format=layout)
    return new


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, also of one holding a computed tensor as a plain attribute.

    torch's legacy ``nn.utils.weight_norm``/``spectral_norm`` keep the weight their hook computed
    (a tensor with a history, which ``deepcopy`` refuses) on the module; its hook computes it
    again at every forward, so the copy takes it detached.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def replace_layers(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with each named submodule swapped for its replacement.

    A module registered under several names (``self.a = self.b = conv``) is swapped under every
    one of them: it is one layer, and leaving an alias behind would run the old layer there. A
    replacement for a conv whose weight is channels-last is made channels-last too, so a model
    kept in that layout for speed does not convert its activations back and forth.
    """
    result = copy_model(model)
    for name in replacements:
        try:
            result.get_submodule(name)
        except AttributeError:
            raise AutodacError(f"every replaced layer must exist in the model, but {name!r} does not") from None
    if "" in replacements:  # the model is the layer itself (a bare Conv/Linear): it has no parent to set it on
        return replacements[""]
    aliases: dict[int, list[str]] = {}
    for name, module in result.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    targets = {name: result.get_submodule(name) for name in replacements}
    for name, new in replacements.items():
        new = _in_layout_of(targets[name], new)
        for alias in aliases.get(id(targets[name]), [name]):
            parent_name, _, child = alias.rpartition(".")
            parent = result.get_submodule(parent_name) if parent_name else result
            setattr(parent, child, new)
    return result
