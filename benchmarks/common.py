"""Shared helpers of the autodac benchmarks: data, accuracy, baselines, results files.

Nothing here is part of the library. The baselines are the yardsticks the benchmarks hold
autodac's plans against:

* ``uniform_dac``: every eligible conv decomposed by DAC at one rank (the DAC paper's setting).
* ``aimet_style_greedy``: AIMET's greedy per-layer compression-ratio selection, reimplemented
  (AIMET cannot be installed here): an eval table of probe accuracy with one layer compressed
  at each candidate ratio, then a bisection on an accuracy threshold to meet the FLOPs budget.

``write_results`` writes ``benchmarks/results/<name>.md`` (for people; the README quotes it)
and ``benchmarks/results/<name>.json`` (for scripts).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

import autodac
from autodac.cost import count_flops
from autodac.datasets import fashion_mnist
from autodac.factorize import METHODS, get_method
from autodac.layers import build_factorized
from autodac.probes import predict, top1_match
from autodac.surgery import TracedLayer, replace_layers, trace_layers

__all__ = [
    "RESULTS", "NETS", "load_data", "load_net", "weights_info", "warm_up", "test_accuracy", "set_threads", "eligible_layers",
    "uniform_dac", "uniform_dac_ratio", "smallest_uniform_rank", "GreedyResult", "aimet_style_greedy", "write_results",
    "log",
]

RESULTS = Path(__file__).resolve().parent / "results"
NETS = ("resnet20", "cifar_vgg")
AIMET_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_START = time.perf_counter()


def log(message: str) -> None:
    """One progress line on stdout, stamped with seconds since the script started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def set_threads(threads: int) -> None:
    """Intra-op threads for every timing in the run (inter-op once, before any parallel work)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set, or parallel work has started: intra-op is what matters here
        pass


# ----------------------------------------------------------------------------- data and models


def load_data(probe_size: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probe_x, probe_y, test_x, test_y)``: a fixed-seed random draw of ``probe_size`` train images, and the full 10k test set."""
    train_x, train_y = fashion_mnist("train")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(train_y), generator=generator)[:probe_size]
    test_x, test_y = fashion_mnist("test")
    return train_x[index].contiguous(), train_y[index].contiguous(), test_x, test_y


def _weights_path(name: str) -> Path:
    return Path(autodac.__file__).resolve().parent / "weights" / f"{name}_fashion_mnist.pt"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_net(name: str, attempts: int = 5) -> nn.Module:
    """``autodac.zoo.pretrained(name)``, retried if the weights file changes (or is half written) while it loads.

    The reference nets may be (re)trained while a benchmark runs; the training script rewrites
    the file each epoch, so a load is accepted only when the file's hash is the same before and after.
    """
    from autodac.zoo import pretrained

    path = _weights_path(name)
    for attempt in range(attempts):
        before = _sha256(path)
        try:
            model = pretrained(name)
        except Exception:  # a half-written file: wait for the writer to finish
            if attempt == attempts - 1:
                raise
            time.sleep(2.0)
            continue
        if _sha256(path) == before:
            return model
        time.sleep(2.0)
    raise RuntimeError(f"the weights file {path} kept changing while it was loaded ({attempts} attempts)")


def weights_info(name: str) -> str:
    """Which checkpoint a row came from: file mtime, hash prefix, and whether training had finished."""
    path = _weights_path(name)
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
    log_file = path.with_suffix(".json")
    finished = "training log present" if log_file.exists() else "NO training log: training may still be running"
    return f"{path.name} (mtime {stamp}, sha256 {_sha256(path)[:12]}, {finished})"


def test_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, batched, in eval mode without grad (the model's modes are restored)."""
    return top1_match(predict(model, x, batch_size=batch_size), y)


def warm_up(model: nn.Module, example_inputs: Any) -> None:
    """One untimed data-free ``optimize`` so first-call costs (imports, fvcore's JIT tracer) stay out of the timings."""
    autodac.optimize(model, 0.9, example_inputs=example_inputs, methods=("dac",), progress=False)


# ----------------------------------------------------------------------------- eligible layers


def eligible_layers(model: nn.Module, example_inputs: tuple[Any, ...], method: str, convs_only: bool = True) -> list[TracedLayer]:
    """Traced convs (and Linears unless ``convs_only``) that ran, have ``groups == 1`` and that ``method`` applies to."""
    factorization = get_method(method)
    kinds = (nn.Conv1d, nn.Conv2d) if convs_only else (nn.Conv1d, nn.Conv2d, nn.Linear)
    layers = []
    for layer in trace_layers(model, example_inputs):
        module = layer.module
        if layer.geometry is None or not isinstance(module, kinds) or getattr(module, "groups", 1) != 1:
            continue
        if factorization.applies_to(tuple(module.weight.shape)):
            layers.append(layer)
    return layers


def _as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


# ----------------------------------------------------------------------------- uniform DAC


def _uniform_layers(model: nn.Module, rank: int, inputs: tuple[Any, ...]) -> list[TracedLayer]:
    """DAC-eligible convs where ``rank`` is a valid rank and cheaper than the dense conv."""
    dac = METHODS["dac"]
    chosen = []
    for layer in eligible_layers(model, inputs, "dac"):
        if rank <= dac.max_rank(tuple(layer.module.weight.shape)) and dac.cost(layer.geometry, rank) < layer.geometry.dense_cost():
            chosen.append(layer)
    return chosen


def uniform_dac_ratio(model: nn.Module, rank: int, example_inputs: Any) -> float:
    """Closed-form FLOPs ratio of ``uniform_dac(model, rank, ...)`` (no model is built)."""
    inputs = _as_inputs(example_inputs)
    dac = METHODS["dac"]
    total = count_flops(model, inputs).total
    saved = sum(layer.geometry.dense_cost() - dac.cost(layer.geometry, rank) for layer in _uniform_layers(model, rank, inputs))
    return (total - saved) / total


def uniform_dac(model: nn.Module, rank: int, example_inputs: Any) -> tuple[nn.Module, float]:
    """A copy of ``model`` with every DAC-eligible conv (groups 1, kernel > 1) where ``rank`` is
    cheaper than dense decomposed at ``rank``; returns ``(model, fvcore FLOPs ratio)``."""
    inputs = _as_inputs(example_inputs)
    replacements = {layer.name: build_factorized(layer.module, "dac", rank) for layer in _uniform_layers(model, rank, inputs)}
    decomposed = replace_layers(model, replacements)
    return decomposed, count_flops(decomposed, inputs).total / count_flops(model, inputs).total


def smallest_uniform_rank(model: nn.Module, budget: float, example_inputs: Any, max_rank: int = 64) -> tuple[int, float]:
    """The smallest uniform DAC rank whose FLOPs ratio is ``>= budget``, and that ratio (closed form).

    A rank cheaper than dense nowhere leaves the model dense (ratio 1.0), so one always exists.
    """
    for rank in range(1, max_rank + 1):
        ratio = uniform_dac_ratio(model, rank, example_inputs)
        if ratio >= budget - 1e-12:
            return rank, ratio
    raise RuntimeError(f"no uniform DAC rank up to {max_rank} reaches FLOPs ratio {budget}")


# ----------------------------------------------------------------------------- AIMET-style greedy


@dataclass
class GreedyResult:
    """What ``aimet_style_greedy`` returns; ``seconds`` includes building the eval table (even when cached)."""

    model: nn.Module
    flops_ratio: float  # fvcore's count of ``model`` over the original's
    evals: int  # probe evaluations in the eval table (one per distinct (layer, rank))
    seconds: float
    meets_budget: bool
    threshold: float | None  # the accuracy threshold the bisection settled on
    ratios: dict[str, float | None] = field(default_factory=dict)  # per layer: chosen compression ratio (None: dense)
    ranks: dict[str, int] = field(default_factory=dict)
    table_seconds: float = 0.0


def _eval_table(model, layers, probe_x, probe_y, method, ratios):
    """AIMET's per-layer eval table: probe accuracy with only that layer compressed at each ratio."""
    factorization = get_method(method)
    table: dict[str, dict[float, tuple[int, int, float]]] = {}  # layer -> ratio -> (rank, cost, accuracy)
    evals = 0
    start = time.perf_counter()
    for layer in layers:
        module, geometry = layer.module, layer.geometry
        shape = tuple(module.weight.shape)
        dense = geometry.dense_cost()
        decomposition = factorization.decompose(module.weight)
        costs = [factorization.cost(geometry, r) for r in range(1, factorization.max_rank(shape) + 1)]
        by_rank: dict[int, float] = {}
        table[layer.name] = {}
        for ratio in ratios:
            fitting = [r for r, c in enumerate(costs, start=1) if c <= ratio * dense]
            if not fitting:
                continue  # no rank is this cheap: the ratio is not a candidate for this layer
            rank = max(fitting)
            if rank not in by_rank:
                candidate = replace_layers(model, {layer.name: build_factorized(module, method, rank, decomposition)})
                by_rank[rank] = test_accuracy(candidate, probe_x, probe_y)
                evals += 1
            table[layer.name][ratio] = (rank, costs[rank - 1], by_rank[rank])
    return table, evals, time.perf_counter() - start


def aimet_style_greedy(
    model: nn.Module,
    budget: float,
    probe_x: torch.Tensor,
    probe_y: torch.Tensor,
    example_inputs: Any,
    method: str = "spatial",
    ratios: Sequence[float] = AIMET_RATIOS,
    cache: dict | None = None,
) -> GreedyResult:
    """AIMET's greedy compression-ratio selection (``aimet_torch`` GreedyCompRatioSelectAlgo), reimplemented.

    1. Eval table: for each conv ``method`` applies to (spatial SVD skips 1x1 convs and every
       Linear, as AIMET does) and each candidate ratio, the largest rank whose FLOPs are at most
       ``ratio`` times the dense conv's; probe accuracy with only that layer compressed.
    2. Bisection on an accuracy threshold: each layer takes the smallest ratio whose accuracy is
       at least the threshold (dense if none); the highest threshold whose plan meets the FLOPs
       budget wins. Thresholds are searched over the table's own values, so the bisection is exact.

    Total FLOPs are closed form (fvcore's count of the original minus what each layer saves);
    the chosen model is counted with fvcore once and must agree. If even the most compressed
    plan misses the budget, that plan is returned with ``meets_budget=False``. Pass the same
    ``cache`` dict across budgets to build the (budget-independent) eval table once.
    """
    inputs = _as_inputs(example_inputs)
    start = time.perf_counter()
    key = (id(model), id(probe_x), method, tuple(ratios))
    fresh = cache is None or key not in cache
    if not fresh:
        layers, table, evals, table_seconds = cache[key]
    else:
        layers = eligible_layers(model, inputs, method)
        table, evals, table_seconds = _eval_table(model, layers, probe_x, probe_y, method, ratios)
        if cache is not None:
            cache[key] = (layers, table, evals, table_seconds)
    original = count_flops(model, inputs).total
    dense = {layer.name: layer.geometry.dense_cost() for layer in layers}
    target = budget * original

    def plan(threshold: float) -> tuple[dict[str, tuple[float, int, int] | None], int]:
        chosen: dict[str, tuple[float, int, int] | None] = {}
        total = original
        for name, by_ratio in table.items():
            pick = None
            for ratio in sorted(by_ratio):
                rank, cost, accuracy = by_ratio[ratio]
                if accuracy >= threshold:
                    pick = (ratio, rank, cost)
                    break
            chosen[name] = pick
            if pick is not None:
                total -= dense[name] - pick[2]
        return chosen, total

    thresholds = sorted({acc for by_ratio in table.values() for (_, _, acc) in by_ratio.values()})
    # A higher threshold keeps more layers at larger ratios, so FLOPs never fall as it rises: bisect.
    low, high, best = 0, len(thresholds) - 1, None
    while low <= high:
        middle = (low + high) // 2
        chosen, total = plan(thresholds[middle])
        if total <= target:
            best = (thresholds[middle], chosen, total)
            low = middle + 1
        else:
            high = middle - 1
    meets = best is not None
    if best is None:  # unreachable: return the most compressed plan and say so
        chosen, total = plan(-math.inf)
        best = (None, chosen, total)
    threshold, chosen, predicted = best
    by_name = {layer.name: layer.module for layer in layers}
    replacements = {name: build_factorized(by_name[name], method, pick[1]) for name, pick in chosen.items() if pick is not None}
    compressed = replace_layers(model, replacements)
    counted = count_flops(compressed, inputs).total
    if counted != predicted:
        raise AssertionError(f"closed-form FLOPs {predicted} != fvcore's {counted}: the greedy baseline's cost model is wrong")
    elapsed = time.perf_counter() - start
    selection_seconds = elapsed - (table_seconds if fresh else 0.0)
    return GreedyResult(
        model=compressed, flops_ratio=counted / original, evals=evals, seconds=table_seconds + selection_seconds,
        meets_budget=meets, threshold=threshold,
        ratios={name: (None if pick is None else pick[0]) for name, pick in chosen.items()},
        ranks={name: pick[1] for name, pick in chosen.items() if pick is not None}, table_seconds=table_seconds,
    )


# ----------------------------------------------------------------------------- results files


def _machine() -> dict[str, Any]:
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}), nproc {os.cpu_count()}, load average "
        + ", ".join(f"{v:.2f}" for v in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "autodac": getattr(autodac, "__version__", "?"),
        "threads": torch.get_num_threads(),
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"  # 4 significant digits: ratios 0.4998, accuracies 86.83, seconds 12.94
    return str(value)


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Mapping[str, Any]]], header_text: str) -> Path:
    """Write ``benchmarks/results/<name>.md`` (header + markdown table) and ``<name>.json``; return the .md path.

    ``rows`` is a list of dicts (one table) or a dict ``{section title: list of dicts}`` (one table each).
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = _machine()
    sections = dict(rows) if isinstance(rows, Mapping) else {"": list(rows)}
    parts = [f"# {name}", "", header_text.strip(), ""]
    parts += [f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}" for key, value in meta.items()]
    for title, section in sections.items():
        parts += ["", f"## {title}" if title else "", "", _table(section)]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(parts).replace("\n\n\n", "\n\n") + "\n")
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"name": name, "meta": meta, "header": header_text, "rows": sections}, indent=1, default=str) + "\n"
    )
    return md
