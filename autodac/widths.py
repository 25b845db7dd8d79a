"""Hidden widths as a rank: find channel chains, collect their input moments, slice them.

In an inverted-residual block (``1x1`` expand -> BatchNorm -> activation -> depthwise ->
BatchNorm -> activation -> ``1x1`` project) or a bottleneck (``conv -> BN -> ReLU -> 1x1``),
the consumer's input channel ``j`` is made by one chain of per-channel operations from the
producer's output channel ``j``, and used nowhere else. Dropping it from the consumer makes
that whole channel of the chain dead, so a block's width is a rank to plan like any other,
with most of the block's cost behind it (these nets are mostly ``1x1`` convs that are nearly
full rank, where low-rank splits cannot pay).

Chains are found by observation, not by names: one forward pass follows the consumer's input
back through module outputs (tensor identity) to a producer conv, through BatchNorms,
depthwise convs and parameter-free modules only; then two perturbed passes prove that the
chain is channel-wise (noise on some producer channels reaches exactly those consumer
channels) and private (noise on every producer channel changes nothing once the consumer's
own input is restored). Anything else is left alone. The caller's model is never changed:
``slice_unit`` returns new modules.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from autodac.batches import Batch, call, count
from autodac.layers import trainable
from autodac.surgery import evaluating

__all__ = ["WidthUnit", "find_width_units", "consumable", "collecting_moments", "input_moments", "slice_unit", "plain_copy", "plain_parameters", "Gathered"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class WidthUnit:
    """A consumer layer whose ``channels`` input channels come one by one from ``producer`` through ``chain``."""

    consumer: str
    producer: str
    chain: tuple[str, ...]  # modules between producer and consumer that carry a per-channel state, in order
    channels: int


def _leaves(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules() if not list(m.children()) or isinstance(m, _CONVS + (nn.Linear,))}


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(b is not None for b in module.buffers(recurse=False))


def _depthwise(module: nn.Module, channels: int) -> bool:
    return (
        isinstance(module, _CONVS) and module.groups == channels == module.in_channels == module.out_channels
        and not getattr(module, "transposed", False)
    )


def _per_channel(module: nn.Module, channels: int) -> bool:
    """Modules whose state is one slice per channel: BatchNorms and depthwise convs (multiplier 1)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features == channels
    return _depthwise(module, channels)


def _producible(module: nn.Module, channels: int) -> bool:
    if isinstance(module, nn.Linear):
        return module.out_features == channels
    return isinstance(module, _CONVS) and module.groups == 1 and module.out_channels == channels and not getattr(module, "transposed", False)


def consumable(module: nn.Module) -> bool:
    """A layer that can consume a width: a Linear, or an ungrouped, untransposed ``1x1`` conv (it reads each input channel as it is)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, _CONVS) and module.groups == 1 and all(k == 1 for k in module.kernel_size) and not module.transposed


def _record(model: nn.Module, inputs: tuple[Any, ...]):
    """One pass: every leaf call in order as ``(module, id(first input), id(output))``, tensors kept alive, and the output."""
    leaves = _leaves(model)
    calls: list[tuple[nn.Module, int, int]] = []
    alive: list[Any] = []
    handles = []

    def hook(module, args, output):
        first = args[0] if args else None
        calls.append((module, id(first), id(output)))
        alive.extend([first, output])

    for module in leaves:
        handles.append(module.register_forward_hook(hook))
    try:
        with evaluating(model):
            output = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return leaves, calls, alive, output


class _Reached(BaseException):
    """Ends a pass at the consumer when only its input is wanted (a BaseException: a model's ``except Exception`` lets it by)."""


def _pass(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """The model's output in eval mode, or None when a hook ended the pass at the consumer."""
    try:
        with evaluating(model):
            return model(*inputs)
    except _Reached:
        return None


def _walk_back(leaves, calls, consumer: nn.Module) -> tuple[nn.Module, list[nn.Module]] | None:
    """The producer and the modules between, following the consumer's input back through module outputs.

    Where a tensor was made by a functional op (``F.relu``, ``x * y``), the walk cannot follow it:
    the producer is then the last conv or linear layer of the right width to run before, and the
    modules between are left to ``_between`` to find by perturbation.
    """
    positions = [i for i, call in enumerate(calls) if call[0] is consumer]
    if len(positions) != 1:
        return None
    channels = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
    index, tensor, between = positions[0], calls[positions[0]][1], []
    while True:
        earlier = [i for i in range(index - 1, -1, -1) if calls[i][2] == tensor]
        if not earlier:
            for i in range(index - 1, -1, -1):
                module = calls[i][0]
                if _producible(module, channels) and not _depthwise(module, channels):
                    if sum(1 for call in calls if call[0] is module) != 1:
                        return None
                    return module, None
            return None
        index = earlier[0]
        module = calls[index][0]
        if _producible(module, channels) and not _depthwise(module, channels):
            if sum(1 for call in calls if call[0] is module) != 1:
                return None
            return module, list(reversed(between))
        if _per_channel(module, channels) or not _has_state(module):
            between.append(module)
            tensor = calls[index][1]
            continue
        return None


def _output_of(model, inputs, module, noise=None, restore=None, stop: bool = False):
    """Model output, with ``noise(output)`` added at ``module`` and the consumer's input replaced by ``restore``.

    With ``stop`` the pass ends at the consumer (the output is then None): only its input was wanted,
    and the rest of a 224 px network is most of the pass.
    """
    captured = {}
    handles = []
    if noise is not None:
        handles.append(module.register_forward_hook(lambda m, a, out: out + noise(out)))
    if restore is not None:
        consumer, value = restore

        def grab_or_restore(m, args):
            captured["input"] = args[0]
            if stop:
                raise _Reached
            if value is not None:
                return (value,) + tuple(args[1:])
            return None

        handles.append(consumer.register_forward_pre_hook(grab_or_restore))
    try:
        out = _pass(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return out, captured.get("input")


def _flat(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output.detach().double().flatten()
    if isinstance(output, (tuple, list)):
        parts = [_flat(o) for o in output]
        parts = [p for p in parts if p is not None]
        return torch.cat(parts) if parts else None
    if isinstance(output, dict):
        return _flat(list(output.values()))
    return None


def _between(model, inputs, calls, producer, consumer, channels: int) -> list[nn.Module] | None:
    """Stateful modules that run between ``producer`` and ``consumer`` and see noise put on the producer's output.

    Each must be per-channel over the same ``channels`` (a BatchNorm or depthwise conv); otherwise None.
    """
    order = [call[0] for call in calls]
    start, stop = order.index(producer), order.index(consumer)
    middle = []
    for module in order[start + 1 : stop]:
        if _has_state(module) and module not in middle and not any(module in list(m.modules())[1:] for m in (producer, consumer)):
            middle.append(module)
    if not middle:
        return []

    def run(noise):
        captured: dict[nn.Module, torch.Tensor] = {}
        handles = [m.register_forward_pre_hook(lambda mod, args: captured.setdefault(mod, args[0].detach().clone())) for m in middle]
        if noise:
            generator = torch.Generator().manual_seed(1)
            handles.append(producer.register_forward_hook(
                lambda m, a, out: out + torch.randn(out.shape, generator=generator).to(out) * out.detach().abs().mean().clamp_min(1e-3)
            ))

        def reached(m, args):
            raise _Reached  # everything wanted ran before the consumer

        handles.append(consumer.register_forward_pre_hook(reached))
        try:
            _pass(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    clean, moved = run(False), run(True)
    chain = []
    for module in middle:
        a, b = clean.get(module), moved.get(module)
        if a is None or b is None or a.shape != b.shape or torch.equal(a, b):
            continue
        if not _per_channel(module, channels):
            return None
        chain.append(module)
    return chain


def _proves_private(model, inputs, producer, consumer, clean: torch.Tensor, clean_in, seed: int = 0) -> bool:
    """Noise on every producer channel changes nothing once the consumer's own input is restored:
    no other path reads the chain (channel correspondence is left to ``_slices_cleanly``)."""
    generator = torch.Generator().manual_seed(seed)

    def every(out):
        scale = out.detach().abs().mean().clamp_min(1e-3)
        return torch.randn(out.shape, generator=generator).to(out) * scale

    restored_out, _ = _output_of(model, inputs, producer, noise=every, restore=(consumer, clean_in))
    a, b = _flat(restored_out), clean
    return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)


def _proves_channelwise(model, inputs, producer, consumer, clean_in, channels: int, seed: int = 0) -> bool:
    """Noise on a random half of the producer's channels leaves the consumer's other input channels as they were.

    Catches what slicing cannot: an op between the two that mixes channels yet takes any number of
    them in any order (a parameter-free norm over channels, ``x / |x|``), whose every kept channel
    would change when one is dropped.
    """
    generator = torch.Generator().manual_seed(seed)
    moved = torch.randperm(channels, generator=generator)[: max(1, channels // 2)]
    mask = torch.zeros(channels, dtype=torch.bool)
    mask[moved] = True

    def axis(module: nn.Module, tensor: torch.Tensor) -> int:  # the channel axis, batched or not
        return -1 if isinstance(module, nn.Linear) else tensor.dim() - len(module.kernel_size) - 1

    def some(out):
        scale = out.detach().abs().mean().clamp_min(1e-3)
        noise = torch.randn(out.shape, generator=generator).to(out) * scale
        shape = [1] * out.dim()
        shape[axis(producer, out)] = channels
        return noise * mask.to(out.device).reshape(shape).to(out.dtype)

    try:
        _, moved_in = _output_of(model, inputs, producer, noise=some, restore=(consumer, None), stop=True)
    except Exception:  # a layout the proof cannot perturb: not proven, so not a unit
        return False
    if moved_in is None or moved_in.shape != clean_in.shape:
        return False
    still = (~mask).nonzero().flatten().to(clean_in.device)
    a, b = (t.index_select(axis(consumer, clean_in), still) for t in (moved_in, clean_in))
    return bool(torch.allclose(a, b, rtol=1e-6, atol=1e-6 * float(clean_in.abs().max().clamp_min(1e-12))))


def _slices_cleanly(model: nn.Module, inputs: tuple[Any, ...], unit: WidthUnit, clean: torch.Tensor) -> bool:
    """Slicing proven on the model itself: every channel kept in a shuffled order gives the same outputs,
    and one channel fewer still runs to outputs of the same shapes.

    This catches what the perturbation test cannot: a channel the chain shares with another
    tensor (``x + block(x)`` adds the producer's channel ``j`` to the input's channel ``j``, which
    slicing the producer would misalign or break), or a channel-mixing op in the chain.
    """
    consumer = model.get_submodule(unit.consumer)
    weight = consumer.weight.detach()
    permutation = torch.randperm(unit.channels, generator=torch.Generator().manual_seed(0))
    if torch.equal(permutation, torch.arange(unit.channels)):
        permutation = permutation.flip(0)
    zero = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    outputs = []
    for kept in (permutation, permutation[:-1]):
        try:
            with evaluating(model):  # sliced copies of eval-mode modules run in eval mode too
                replacements = slice_unit(model, unit, kept, weight.index_select(1, kept.to(weight.device)), zero)
                with _forwards_of(model, replacements):
                    outputs.append(_flat(model(*inputs)))
        except Exception:  # a shape the rest of the model cannot take: not a unit
            return False
    same, short = outputs
    if same is None or short is None or same.shape != clean.shape or short.shape != clean.shape:
        return False
    return bool(torch.allclose(same, clean, rtol=1e-4, atol=1e-5 * float(clean.abs().max().clamp_min(1e-12))))


@contextlib.contextmanager
def _forwards_of(model: nn.Module, replacements: dict[str, nn.Module]):
    """Within the block, each named module runs its replacement's forward (nothing is copied or swapped)."""
    patched = []
    try:
        for name, new in replacements.items():
            module = model.get_submodule(name)
            module.forward = new.forward  # a bound method: assigning a Module would register a child instead
            patched.append(module)
        yield model
    finally:
        for module in patched:
            del module.forward


def find_width_units(model: nn.Module, inputs: tuple[Any, ...], consumers: Sequence[str]) -> dict[str, WidthUnit]:
    """The width units among ``consumers`` (dotted names of ``1x1`` convs or linear layers), proven on inputs shaped like ``inputs``.

    Floating-point inputs are replaced by seeded Gaussian noise of their shape: the proofs need
    activations that move (an all-zero example can leave whole chains silent), and the units
    found must not depend on which example the caller happened to pass.
    """
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(
        torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        for x in inputs
    )
    leaves, calls, alive, clean_out = _record(model, inputs)  # the output no proof perturbs, shared by every consumer's
    clean = _flat(clean_out)
    names = {m: n for n, m in model.named_modules()}
    units: dict[str, WidthUnit] = {}
    try:
        for name in consumers:
            consumer = model.get_submodule(name)
            if not consumable(consumer):
                continue
            found = _walk_back(leaves, calls, consumer)
            if found is None:
                continue
            producer, between = found
            channels = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
            if between is None:
                between = _between(model, inputs, calls, producer, consumer, channels)
                if between is None:
                    continue
            if channels < 2:
                continue
            _, clean_in = _output_of(model, inputs, producer, restore=(consumer, None), stop=True)
            if clean_in is None or clean is None or not _proves_private(model, inputs, producer, consumer, clean, clean_in):
                continue
            if not _proves_channelwise(model, inputs, producer, consumer, clean_in.detach().clone(), channels):
                continue
            chain = tuple(names[m] for m in between if _has_state(m))
            unit = WidthUnit(name, names[producer], chain, channels)
            if _slices_cleanly(model, inputs, unit, clean):
                units[name] = unit
    finally:
        alive.clear()
    # a producer or chain module claimed twice (two consumers of one chain) cannot be sliced for both
    claimed: dict[str, int] = {}
    for unit in units.values():
        for member in (unit.producer, *unit.chain):
            claimed[member] = claimed.get(member, 0) + 1
    return {n: u for n, u in units.items() if all(claimed[m] == 1 for m in (u.producer, *u.chain))}


@contextlib.contextmanager
def collecting_moments(layers: dict[str, nn.Module], max_rows: int = 8192):
    """Within the block, every forward pass adds to ``E[z z^T]`` of ``z = [x; 1]`` at each layer's input;
    yields a function returning the moments so far (float64, ``(C + 1)^2``; layers that never ran are left out).

    Rows are positions (a ``1x1`` conv) or leading dims (a linear layer); at most ``max_rows`` per
    pass per layer, drawn with a per-layer fixed seed, so the result does not depend on which
    other layers are collected alongside. A layer that saw fewer rows than ``C + 1`` is left out
    too: its moments have rank below their size, and any width at that rank would reproduce the
    few rows seen exactly (a predicted error of 0 for keeping 4 of 64 channels after 4 images).
    """
    sums: dict[str, torch.Tensor] = {}
    counts = {name: 0 for name in layers}
    generators = {name: torch.Generator().manual_seed(0) for name in layers}

    def hook(name):
        def collect(module, args):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.transpose(0, 1).reshape(x.shape[1], -1).T
            rows = rows.float().cpu()
            if rows.shape[0] > max_rows:
                rows = rows[torch.randperm(rows.shape[0], generator=generators[name])[:max_rows]]
            z = torch.cat([rows, torch.ones(rows.shape[0], 1)], 1)
            sums[name] = sums.get(name, 0) + (z.T @ z).double()
            counts[name] += rows.shape[0]

        return collect

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        yield lambda: {name: sums[name] / counts[name] for name in layers if counts[name] >= sums[name].shape[0]}
    finally:
        for handle in handles:
            handle.remove()


def input_moments(model: nn.Module, layers: dict[str, nn.Module], inputs: Batch, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """``collecting_moments`` over one eval pass of ``model`` on ``inputs`` (in batches of ``batch_size``)."""
    device = next(iter(model.parameters())).device
    with collecting_moments(layers) as moments, evaluating(model):
        for start in range(0, count(inputs), batch_size):
            call(model, inputs[start : start + batch_size], device)
    return moments()


def _take(tensor: torch.Tensor | None, kept: torch.Tensor, dim: int = 0) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.detach().index_select(dim, kept.to(tensor.device)).clone()


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parametrised tensors (``torch.nn.utils.parametrize``: weight norm, spectral norm, ...) are
    plain parameters holding their current values: what slicing can cut (the sliced layer computes what the original did)."""
    new = copy.deepcopy(module)
    if parametrize.is_parametrized(module):
        # not ``remove_parametrizations`` on the copy: it deletes the property from the class the copy shares with the original
        values = {name: (getattr(module, name).detach().clone(), trainable(module, name)) for name in module.parametrizations}
        new.__class__ = type(module).__bases__[0]  # the class parametrize derived ParametrizedX from
        del new._modules["parametrizations"]
        for name, (value, requires_grad) in values.items():
            new.register_parameter(name, nn.Parameter(value, requires_grad=requires_grad))
    return new


def plain_parameters(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s own parameters as ``plain_copy`` makes them: a parametrised tensor counts as the tensor it computes."""
    own = list(module.parameters(recurse=False))
    if parametrize.is_parametrized(module):
        own += [getattr(module, name) for name in module.parametrizations]
    return own


def _sliced(module: nn.Module, kept: torch.Tensor) -> nn.Module:
    """A copy of a producer or per-channel chain module that keeps only output channels ``kept``."""
    new = plain_copy(module)
    k = len(kept)
    for pname, param in list(new.named_parameters(recurse=False)):
        setattr(new, pname, nn.Parameter(_take(param, kept), requires_grad=param.requires_grad))
    for bname, buffer in list(new.named_buffers(recurse=False)):
        if buffer is not None and buffer.dim() >= 1 and buffer.shape[0] == (module.num_features if hasattr(module, "num_features") else -1):
            setattr(new, bname, _take(buffer, kept))
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new.num_features = k
    elif isinstance(module, nn.Linear):
        new.out_features = k
    elif _depthwise(module, module.in_channels):
        new.in_channels = new.out_channels = new.groups = k
    else:
        new.out_channels = k
    return new


def slice_unit(
    model: nn.Module, unit: WidthUnit, kept: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> dict[str, nn.Module]:
    """Replacements (by dotted name) that run ``unit`` at the width of ``kept`` channels.

    The producer and chain keep channels ``kept`` (in that order); the consumer gets ``weight``
    (its own with ``len(kept)`` input channels) and ``bias`` added to its own. Subclasses keep
    their own ``forward``: only weights, buffers and channel counts change.
    """
    kept = kept.to(torch.int64)
    replacements = {unit.producer: _sliced(model.get_submodule(unit.producer), kept)}
    for name in unit.chain:
        replacements[name] = _sliced(model.get_submodule(name), kept)
    consumer = model.get_submodule(unit.consumer)
    new = plain_copy(consumer)
    new.weight = nn.Parameter(weight.detach().clone().to(consumer.weight), requires_grad=consumer.weight.requires_grad)
    total = bias.detach().to(consumer.weight) + (consumer.bias.detach() if consumer.bias is not None else 0)
    new.bias = nn.Parameter(total.clone(), requires_grad=consumer.weight.requires_grad)
    if isinstance(new, nn.Linear):
        new.in_features = len(kept)
    else:
        new.in_channels = len(kept)
    replacements[unit.consumer] = new
    return replacements


class Gathered(nn.Module):
    """The narrowed consumer fed the full input: picks the kept channels first (for one-layer probes)."""

    def __init__(self, kept: torch.Tensor, layer: nn.Module) -> None:
        super().__init__()
        self.register_buffer("kept", kept.to(torch.int64).clone())
        self.layer = layer
        self.axis = -1 if isinstance(layer, nn.Linear) else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.index_select(self.axis, self.kept))
