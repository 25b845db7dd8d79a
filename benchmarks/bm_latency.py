"""Latency budgets measured on this CPU: do plans meet them end to end, and which DAC form runs faster?

    python benchmarks/bm_latency.py                 # everything below, 2 threads (the README's figures)
    python benchmarks/bm_latency.py --quick         # the layer table and VGG-16 at 128x128 only

Sections (all timings: PyTorch eager, ``--threads`` intra-op threads, medians; ratios from
interleaved runs of the two models in one process, so machine noise hits both sides):

* ``dac_forms``: one conv per shape (random weights) and its DAC pair at rank 2, as one grouped
  conv (depthwise multiplier r) and as r multiplier-1 depthwise convs feeding one pointwise
  ("split"); latency relative to the dense conv.
* ``vgg16``: ``autodac.zoo.vgg16_shaped()`` (13 convs, random weights) at 1x3x224x224 and
  1x3x128x128 with ``latency_budget=0.7``: the ratio ``optimize`` measured, an independent
  re-measurement (more rounds), the FLOPs ratio, and a FLOPs-only plan at the same FLOPs ratio
  for contrast (same FLOPs, measured latency). Per-layer choices in ``vgg16_layers``.
* ``resnet20``: the shipped Fashion-MNIST ResNet-20 at batch 64: the best latency ratio it can
  reach (from the refusal of a budget below it), a plan just above it, and test accuracy.

Writes ``benchmarks/results/latency.md`` and ``.json`` (``latency_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import re
import time

import torch
from torch import nn

import autodac
from autodac.cost import count_flops
from autodac.latency import describe_device, side_by_side
from autodac.layers import build_factorized
from autodac.zoo import vgg16_shaped

try:
    from common import load_data, load_net, log, set_threads, test_accuracy, write_results
except ImportError:  # run as `python -m benchmarks.bm_latency`
    from benchmarks.common import load_data, load_net, log, set_threads, test_accuracy, write_results

CPU = torch.device("cpu")
SHAPES = [  # (channels, size, batch, channels_last): the latency issue's table
    (64, 56, 1, False), (128, 56, 1, True), (256, 28, 1, False), (512, 14, 1, False), (16, 28, 64, False),
]


def dac_forms(rounds: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for channels, size, batch, channels_last in SHAPES:
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
        x = torch.randn(batch, channels, size, size, generator=generator)
        pairs = {impl: build_factorized(conv, "dac", 2, impl=impl).eval() for impl in ("grouped", "split")}
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            conv = conv.to(memory_format=torch.channels_last)
            pairs = {k: v.to(memory_format=torch.channels_last) for k, v in pairs.items()}
        flops = count_flops(pairs["grouped"], (x,)).total / count_flops(conv, (x,)).total
        row = {"layer": f"{channels}->{channels} 3x3, {size}x{size}, batch {batch}" + (" (channels_last)" if channels_last else ""),
               "FLOPs at r=2": round(flops, 3)}
        for impl, pair in pairs.items():
            row[f"{impl} / dense"] = round(side_by_side(conv, pair, (x,), CPU, rounds=rounds)[0], 3)
        rows.append(row)
        log(f"dac forms: {row}")
    return rows


def vgg16(size: int, budget: float, rounds: int) -> tuple[dict, list[dict]]:
    model = vgg16_shaped().eval()
    x = torch.zeros(1, 3, size, size)
    start = time.perf_counter()
    result = autodac.optimize(model, latency_budget=budget, example_inputs=x, latency_cache=False, progress=False)
    seconds = time.perf_counter() - start
    recheck = side_by_side(model, result.model.eval(), (x,), CPU, rounds=rounds)[0]
    flops_only = autodac.optimize(model, result.flops_ratio, example_inputs=x, progress=False)
    flops_only_latency = side_by_side(model, flops_only.model.eval(), (x,), CPU, rounds=rounds)[0]
    row = {
        "net": f"VGG-16 shaped, 1x3x{size}x{size}", "latency budget": budget,
        "measured ratio (optimize)": round(result.latency_ratio, 3), "re-measured ratio": round(recheck, 3),
        "FLOPs ratio": round(result.flops_ratio, 3),
        "original ms": round(result.metrics["latency_original_ms"], 1), "planning s": round(seconds, 1),
        "FLOPs-only plan at that FLOPs ratio: latency ratio": round(flops_only_latency, 3),
    }
    layers = [
        {"input": f"{size}x{size}", "layer": name, "method": c.method, "rank": c.rank or "", "impl": c.impl,
         "FLOPs ratio": round(c.flops_after / c.flops_before, 3),
         "ms before": round(c.latency_before, 2), "ms after": round(c.latency_after, 2)}
        for name, c in result.plan.layers.items()
    ]
    log(f"vgg16 {size}: {row}")
    return row, layers


def resnet20(rounds: int) -> list[dict]:
    model = load_net("resnet20")
    _, _, test_x, test_y = load_data()
    x = test_x[:64].clone()
    rows = []
    try:
        autodac.optimize(model, latency_budget=0.05, example_inputs=x, latency_cache=False, progress=False)
        best = None
    except autodac.BudgetError as refusal:
        best = float(re.search(r"latency_budget >= ([0-9.]+)", str(refusal)).group(1))
        rows.append({"latency budget": 0.05, "outcome": f"refused: {refusal}"})
        log(f"resnet20 refusal: {refusal}")
    original = test_accuracy(model, test_x, test_y)
    rows.append({"latency budget": 1.0, "outcome": f"original, test acc {100 * original:.2f}%"})
    for budget in sorted({round(min(1.0, best + 0.05), 2), 0.9} if best is not None else {0.9}):
        result = autodac.optimize(model, latency_budget=budget, example_inputs=x, latency_cache=False, progress=False)
        recheck = side_by_side(model, result.model.eval(), (x,), CPU, rounds=rounds)[0]
        accuracy = test_accuracy(result.model, test_x, test_y)
        rows.append({
            "latency budget": budget,
            "outcome": f"measured ratio {result.latency_ratio:.3f} (re-measured {recheck:.3f}), FLOPs ratio "
                       f"{result.flops_ratio:.3f}, test acc {100 * accuracy:.2f}% (no data: reconstruction error only)",
        })
        log(f"resnet20 {budget}: {rows[-1]['outcome']}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds per side-by-side ratio (default 21)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    log(f"latency benchmark on {describe_device(CPU)}")
    sections = {"dac_forms": dac_forms(args.rounds)}
    vgg_rows, layer_rows = [], []
    for size in ((128,) if args.quick else (224, 128)):
        row, layers = vgg16(size, 0.7, args.rounds)
        vgg_rows.append(row)
        layer_rows += layers
    sections["vgg16"] = vgg_rows
    if not args.quick:
        sections["resnet20"] = resnet20(args.rounds)
    sections["vgg16_layers"] = layer_rows
    header = (
        f"Latency on {describe_device(CPU)}, PyTorch eager, batch as stated. Ratios are medians of {args.rounds} interleaved "
        "runs of the two models; `optimize`'s own ratio is the one it planned against (15 rounds), the re-measured one is a "
        "fresh side-by-side run after planning. Latency tables are measured afresh (no cache)."
    )
    path = write_results(args.name or ("latency_quick" if args.quick else "latency"), sections, header)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
