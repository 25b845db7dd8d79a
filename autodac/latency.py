"""Wall-clock latency on the user's device: per-layer tables, side-by-side ratios, an on-disk cache.

Fewer FLOPs is not lower latency (a DAC pair can run slower than the dense conv it replaces),
so a latency budget is planned on what is measured. Every figure is a median after warm-up;
model-to-model ratios come from interleaved runs, so a machine that slows down mid-measurement
slows both sides alike. CUDA timings synchronise before reading the clock.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # numpy is imported where the costs are computed
    import numpy as np

import torch
from torch import nn

from autodac.errors import AutodacError
from autodac.factorize import Geometry
from autodac.runtimes import TORCH, Runtime
from autodac.surgery import evaluating

__all__ = [
    "LatencyCache", "median_seconds", "side_by_side", "layer_inputs", "layer_latencies", "LatencyTable", "measure_table", "device_key",
    "describe_device", "resolve_device",
]

_WARMUP = 3
Part = tuple[nn.Module, tuple[tuple[int, ...], ...]]  # a module an option runs, and the input shape of each of its calls


def resolve_device(device: Any, model: nn.Module) -> torch.device:
    """``device`` as a ``torch.device`` (default: where the model's parameters live), checked usable."""
    if device is None:
        parameter = next(iter(model.parameters()), None)
        return parameter.device if parameter is not None else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise AutodacError(f"`device` must name a torch device such as 'cpu' or 'cuda:0', but got device={device!r}") from None
    if resolved.type not in ("cpu", "cuda"):  # meta runs nothing, mps/xpu have no synchronisation here: no honest timing
        raise AutodacError(f"latency is timed on a 'cpu' or 'cuda' device, but got device={device!r} (a {resolved.type!r} device)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AutodacError(f"`device` must be available on this machine, but got device={device!r} and CUDA is not available")
    return resolved


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], Any], device: torch.device, repeats: int = 7, warmup: int = _WARMUP) -> float:
    """Median wall time of ``run()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    with torch.no_grad():
        for _ in range(warmup):
            run()
        _synchronize(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            _synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def side_by_side(
    reference: nn.Module, candidate: nn.Module, inputs: tuple[Any, ...], device: torch.device, rounds: int = 15,
    runtime: Runtime = TORCH,
) -> tuple[float, float, float]:
    """``(median ratio candidate/reference, reference median s, candidate median s)`` from interleaved runs on ``runtime``."""
    def once(run: Callable[[], Any]) -> float:
        start = time.perf_counter()
        run()
        _synchronize(device)
        return time.perf_counter() - start

    with torch.no_grad():
        runs = {"reference": runtime.runner(reference, [inputs]), "candidate": runtime.runner(candidate, [inputs])}
        for _ in range(_WARMUP):
            runs["reference"]()
            runs["candidate"]()
        _synchronize(device)
        ratios, first, second = [], [], []
        for i in range(rounds):
            pair = ("reference", "candidate") if i % 2 == 0 else ("candidate", "reference")  # alternate who runs first
            times = {name: once(runs[name]) for name in pair}
            first.append(times["reference"])
            second.append(times["candidate"])
            ratios.append(second[-1] / first[-1])
    return statistics.median(ratios), statistics.median(first), statistics.median(second)


def layer_inputs(module: nn.Module, geometry: Geometry, device: torch.device, generator: torch.Generator) -> list[torch.Tensor]:
    """One random input per call the layer made in the traced forward pass, at that call's shape."""
    dtype = module.weight.dtype
    if isinstance(module, nn.Linear):
        return [torch.randn(batch, geometry.in_channels, generator=generator).to(device, dtype) for batch, _, _ in geometry.calls]
    return [
        torch.randn(batch, geometry.in_channels, *spatial, generator=generator).to(device, dtype)
        for batch, spatial, _ in geometry.calls
    ]


def device_key(device: torch.device, runtime: Runtime = TORCH) -> str:
    """What a timing depends on beyond the layer: the device model, the thread count, the torch build
    (and a runtime other than eager torch, with its version)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        name = f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip()
    key = f"{device.type}|{name}|torch {torch.__version__}"
    return key if runtime.name == "torch" else f"{key}|{runtime.key}"  # eager keys as before: caches stay valid


def describe_device(device: torch.device, runtime: Runtime = TORCH) -> str:
    """The device in words, as plans and errors report it (with the runtime when it is not eager torch)."""
    if device.type == "cuda":
        described = f"{device} ({torch.cuda.get_device_name(device)}, torch {torch.__version__})"
    else:
        threads = torch.get_num_threads()
        described = f"cpu ({threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__})"
    return described if runtime.name == "torch" else f"{described} in {runtime.key}"


@dataclass
class LatencyCache:
    """Per-layer timings on disk (JSON), keyed by device, torch version, layer and input shapes.

    The default location is ``$AUTODAC_CACHE_DIR/latency.json`` or
    ``~/.cache/autodac/latency.json``; ``path=None`` keeps the cache in memory only.
    """

    path: Path | None
    entries: dict[str, float]

    @classmethod
    def open(cls, path: str | os.PathLike | None | bool = True) -> "LatencyCache":
        if path is False or path is None:
            return cls(None, {})
        owned = path is True  # autodac's own per-user file; any other is the caller's
        if path is True:
            root = os.environ.get("AUTODAC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "autodac")
            path = os.path.join(root, "latency.json")
        path = Path(path).expanduser()  # "~/x.json" is the user's home, not a folder named "~" made in the working directory
        try:
            raw = path.read_bytes()
        except OSError:  # not there yet (or unreadable): start afresh
            return cls(path, {})
        try:
            entries = {str(k): float(v) for k, v in json.loads(raw.decode("utf-8")).items()}
        except (ValueError, TypeError, AttributeError) as error:  # UnicodeDecodeError is a ValueError
            if not owned and raw.strip():  # a plan, a config, notes: saving the timings would write over them
                raise AutodacError(
                    f"`latency_cache` must name a file of autodac's timings (a JSON object of seconds by key) or one not there yet, "
                    f"but {str(path)!r} holds something else ({type(error).__name__}: {str(error)[:80]}); it is left as it is: give another path"
                ) from None
            entries = {}  # autodac's own file, damaged, or an empty one: start afresh
        return cls(path, entries)

    @staticmethod
    def key(device: torch.device, module: nn.Module, geometry: Geometry, option: Sequence[Any], runtime: Runtime = TORCH) -> str:
        described = json.dumps(
            [device_key(device, runtime), repr(module), str(module.weight.dtype), [list(map(list, c[1:])) + [c[0]] for c in geometry.calls],
             list(option)],
        )
        return hashlib.sha1(described.encode()).hexdigest()

    @staticmethod
    def parts_key(device: torch.device, parts: Sequence[tuple[nn.Module, torch.dtype, Sequence[Sequence[int]]]], runtime: Runtime = TORCH) -> str:
        """The key of an option timed by its parts (``layer_latencies``' ``parts``): each module as it is, its dtype and input shapes."""
        described = json.dumps(["parts", device_key(device, runtime),
                                [[repr(module), str(dtype), [list(shape) for shape in shapes]] for module, dtype, shapes in parts]])
        return hashlib.sha1(described.encode()).hexdigest()

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def put(self, key: str, seconds: float) -> None:
        self.entries[key] = float(seconds)

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(self.entries), encoding="utf-8")
            os.replace(temporary, self.path)  # atomic: a concurrent reader sees the old or the new file, never half
        except OSError:
            pass  # a read-only home must not fail the plan; the next call re-measures


def _spread(ranks: Sequence[int], count: int) -> list[int]:
    """At most ``count`` of ``ranks`` (sorted), always the first and the last, evenly spaced between."""
    if len(ranks) <= count:
        return list(ranks)
    positions = {round(i * (len(ranks) - 1) / (count - 1)) for i in range(count)}
    return [ranks[p] for p in sorted(positions)]


def layer_latencies(
    module: nn.Module,
    geometry: Geometry,
    options: Sequence[tuple[str, int | None]],
    build: Callable[[str, int, str], nn.Module],
    implementations: Mapping[str, Sequence[str]],
    device: torch.device,
    cache: LatencyCache,
    points: int = 16,
    repeats: int = 7,
    seed: int = 0,
    runtime: Runtime = TORCH,
    parts: Callable[[str, int | None, str], Sequence[Part]] | None = None,
) -> tuple[list[float], list[str]]:
    """Seconds and fastest implementation for every ``(method, rank)`` option of one layer.

    Option ``(DENSE, None)`` is the layer itself. Per method, up to ``points`` ranks are timed
    (each implementation of it, on inputs of the traced shapes): all of them when there are
    that few (speed is not smooth in rank where a narrow conv misses the fast kernels), else ``points`` ranks spread evenly with linear interpolation between.
    Each is timed on ``runtime`` (onnxruntime: the layer exported alone, one session per input shape).
    With ``parts`` (``(method, rank, impl)`` -> the modules an option runs, each with its input
    shapes; rank None for the layer as it is) an option's time is that of its parts run together
    in one call, one session (a width unit: producer, chain and consumer, all at the option's
    width; see ``_parts_seconds``), not ``build``'s layer's.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = layer_inputs(module, geometry, device, generator) if parts is None else []

    def timed(method: str, rank: int | None, impl: str) -> float:
        if parts is not None:
            return _parts_seconds(parts(method, rank, impl), device, cache, runtime, repeats, generator)
        option = ("dense",) if rank is None else (method, rank, impl)
        key = LatencyCache.key(device, module, geometry, option, runtime)
        cached = cache.get(key)
        if cached is not None:
            return cached
        layer = module if rank is None else build(method, rank, impl)
        if any(p.device != device for p in layer.parameters()):
            layer = copy.deepcopy(layer).to(device)  # never move the caller's own layer (convs and linears have no mode)
        seconds = median_seconds(runtime.runner(layer, [(x,) for x in inputs]), device, repeats=repeats)
        cache.put(key, seconds)
        return seconds

    seconds: list[float] = [0.0] * len(options)
    impls: list[str] = [""] * len(options)
    by_method: dict[str, list[tuple[int, int]]] = {}
    for index, (method, rank) in enumerate(options):
        if rank is None:
            seconds[index] = timed(method, None, "")
        else:
            by_method.setdefault(method, []).append((rank, index))
    for method, entries in by_method.items():
        entries.sort()
        ranks = [rank for rank, _ in entries]
        measured = _spread(ranks, points)  # every rank when there are few: speed is not smooth in rank at small widths
        best = {impl: [] for impl in implementations.get(method, ("",))}
        for impl in best:
            best[impl] = [timed(method, rank, impl) for rank in measured]
        for rank, index in entries:
            estimates = {impl: _interpolate(rank, measured, times) for impl, times in best.items()}
            impl = min(estimates, key=lambda name: (estimates[name], name))
            seconds[index], impls[index] = estimates[impl], impl
    return seconds, impls


def _dtype_of(module: nn.Module) -> torch.dtype:
    tensor = next(iter(module.parameters()), None)
    tensor = tensor if tensor is not None else next((b for b in module.buffers() if b.is_floating_point()), None)
    return tensor.dtype if tensor is not None else torch.get_default_dtype()


class _Together(nn.Module):
    """Modules an option runs, as one module whose forward runs each on its own inputs (one call, one runtime session:
    the per-call overhead is paid once, as in the model, not once per part)."""

    def __init__(self, modules: Sequence[nn.Module], calls: Sequence[int]) -> None:
        super().__init__()
        self.members = nn.ModuleList(modules)
        self.calls = list(calls)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs, start = [], 0
        for member, count in zip(self.members, self.calls):
            outputs.extend(member(x) for x in inputs[start : start + count])
            start += count
        return tuple(outputs)


def _folded(before: nn.Module, module: nn.Module) -> bool:
    """Whether a graph-optimising runtime folds ``module`` into ``before``: a BatchNorm right after a conv (or after a
    factorised pair whose last layer is a conv)."""
    last = [m for m in before.modules() if not list(m.children())][-1:] or [before]
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(last[0], nn.modules.conv._ConvNd)


def _parts_seconds(parts: Sequence[Part], device: torch.device, cache: LatencyCache, runtime: Runtime, repeats: int,
                   generator: torch.Generator) -> float:
    """Seconds of one option's parts, every call of each on a random input of its shape, run together; cached by the
    modules and the shapes. A runtime that optimises the graph (onnxruntime) folds a BatchNorm into the conv just
    before it: such BatchNorm parts are not timed there (one after a Linear still runs, and is timed)."""
    if runtime.name != "torch":
        parts = [part for i, part in enumerate(parts) if not (i > 0 and _folded(parts[i - 1][0], part[0]))]
    key = LatencyCache.parts_key(device, [(module, _dtype_of(module), shapes) for module, shapes in parts], runtime)
    cached = cache.get(key)
    if cached is not None:
        return cached
    together = _Together([module for module, _ in parts], [len(shapes) for _, shapes in parts])
    if any(p.device != device for p in itertools.chain(together.parameters(), together.buffers())):
        together = copy.deepcopy(together).to(device)  # the caller's own modules stay where they are
    inputs = tuple(torch.randn(shape, generator=generator).to(device, _dtype_of(module)) for module, shapes in parts for shape in shapes)
    with evaluating(together):  # a BatchNorm timed in training mode would move its running statistics
        seconds = median_seconds(runtime.runner(together, [inputs]), device, repeats=repeats)
    cache.put(key, seconds)
    return seconds


def _interpolate(rank: int, ranks: Sequence[int], times: Sequence[float]) -> float:
    if len(ranks) == 1:
        return times[0]
    for low, high, t_low, t_high in zip(ranks[:-1], ranks[1:], times[:-1], times[1:]):
        if low <= rank <= high:
            return t_low + (t_high - t_low) * (rank - low) / (high - low)
    return times[-1]


@dataclass
class LatencyTable:
    """Measured latency of the original model and of every option of every candidate layer.

    ``seconds[i][j]`` / ``impls[i][j]``: layer ``i`` at option ``j`` (option 0 dense). The model's
    time is predicted as ``original - sum(dense) + sum(chosen)``: what the layers do not account
    for (activations, pooling, the head) is ``fixed``.
    """

    device: torch.device
    original: float
    seconds: list[list[float]]
    impls: list[list[str]]
    runtime: str = "torch"  # where it was timed (``autodac.runtimes``)
    _costs: list | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def fixed(self) -> float:
        return max(self.original - sum(row[0] for row in self.seconds), 0.0)

    def costs(self) -> list["np.ndarray"]:
        """Integer nanoseconds per option, the knapsack's cost unit (computed once; every re-plan reads them)."""
        if self._costs is None:
            import numpy as np

            self._costs = [np.array([max(1, round(s * 1e9)) for s in row], dtype=np.int64) for row in self.seconds]
        return self._costs

    def fastest(self) -> list[int]:
        """Each layer's quickest option: the fastest plan the tables know."""
        return [int(row.argmin()) for row in self.costs()]

    def capacity(self, ratio: float) -> int:
        """Nanoseconds the candidate layers may take for the model to run in ``ratio`` of the original time."""
        return int((ratio * self.original - self.fixed) * 1e9)


def measure_table(
    model: nn.Module,
    inputs: tuple[Any, ...],
    layers: Sequence[tuple[nn.Module, Geometry, Sequence[tuple[str, int | None]], Callable[[str, int, str], nn.Module], Any]],
    implementations: Mapping[str, Sequence[str]],
    device: torch.device,
    cache: LatencyCache,
    progress: bool = False,
    runtime: Runtime = TORCH,
) -> LatencyTable:
    """Time the original model end to end, then every layer's options (see ``layer_latencies``: the last of each
    layer's entries is its ``parts``, or None), on ``runtime``."""
    original = median_seconds(runtime.runner(model, [inputs]), device, repeats=11)
    iterator = layers
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(layers, desc="autodac: timing layers", unit="layer", disable=None, leave=False)
    seconds, impls = [], []
    for module, geometry, options, build, parts in iterator:
        row, chosen = layer_latencies(module, geometry, options, build, implementations, device, cache, runtime=runtime, parts=parts)
        seconds.append(row)
        impls.append(chosen)
    cache.save()
    return LatencyTable(device, original, seconds, impls, runtime.name)
