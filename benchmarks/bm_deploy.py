"""Latency budgets on the deployment runtime: plans timed in onnxruntime, against plans timed in eager torch.

    python benchmarks/bm_deploy.py                  # VGG-16 shaped at 224 and 128 px, ResNet-18 shaped at 224 (the README's figures)
    python benchmarks/bm_deploy.py --quick          # VGG-16 shaped at 128 px only

Needs ``autodac[deploy]`` (onnx, onnxruntime). For each net (random weights, batch 1) at
``latency_budget=0.7``:

* ``onnxruntime``-planned: ``optimize(..., runtime="onnxruntime")``, its own measured ratio, then
  re-measured side by side in onnxruntime (``--rounds`` interleaved runs, median), and in eager torch.
* eager-planned: the default ``optimize(...)``, re-measured the same two ways: what a user who plans
  in torch and deploys with onnxruntime gets.
* exports: the onnxruntime-planned model written in every ``autodac.export`` format, each loaded
  back and checked (largest output difference, file size, seconds).

The weights are random, so there is no accuracy to report; the plans' predicted output error
summed over layers (what the planner minimises) stands in for what each plan gives up.

All timings on the CPU with ``--threads`` intra-op threads (onnxruntime sessions get the same
count); every ratio is the median of interleaved runs of the two models in one process, so machine
noise hits both sides. Latency tables are measured afresh (no cache).

Writes ``benchmarks/results/deploy.md`` and ``.json`` (``deploy_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch
from torch import nn

import autodac
from autodac.deploy import FORMATS
from autodac.latency import describe_device, side_by_side
from autodac.runtimes import get_runtime
from autodac.zoo import BasicBlock, vgg16_shaped

try:
    from common import log, set_threads, write_results
except ImportError:  # run as `python -m benchmarks.bm_deploy`
    from benchmarks.common import log, set_threads, write_results

CPU = torch.device("cpu")
BUDGET = 0.7
TARGET = 0.735  # the bar for a re-measured onnxruntime plan at budget 0.7 (5% over: noise on a shared machine)


class ResNet18Shaped(nn.Module):
    """ResNet-18's ImageNet layout (7x7 stem, max-pool, 2 basic blocks per stage of 64..512 channels); random weights."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        blocks, channels = [], 64
        for stage, width in enumerate((64, 128, 256, 512)):
            for block in range(2):
                blocks.append(BasicBlock(channels, width, 2 if stage > 0 and block == 0 else 1))
                channels = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with a decaying spectrum per conv (like a trained layer's) and BatchNorm statistics that are not trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                n, rest = module.weight.shape[0], module.weight[0].numel()
                decay = torch.logspace(0, -2, min(n, rest))
                u, v = torch.randn(n, len(decay), generator=generator), torch.randn(len(decay), rest, generator=generator)
                weight = (u * decay) @ v
                module.weight.copy_((weight / weight.std() * (2 / rest) ** 0.5).reshape(module.weight.shape))
            elif isinstance(module, nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.running_mean.normal_(0, 0.1, generator=generator)
    return model.eval()


def _ratios(model: nn.Module, candidate: nn.Module, x: torch.Tensor, rounds: int) -> tuple[float, float, float]:
    """``(onnxruntime ratio, eager ratio, onnxruntime original ms)``: medians of interleaved runs in each runtime."""
    onnx = side_by_side(model, candidate.eval(), (x,), CPU, rounds=rounds, runtime=get_runtime("onnxruntime"))
    eager = side_by_side(model, candidate.eval(), (x,), CPU, rounds=rounds)
    return onnx[0], eager[0], onnx[1] * 1e3


def one_net(name: str, model: nn.Module, x: torch.Tensor, rounds: int) -> tuple[list[dict], list[dict], list[dict]]:
    rows, layers, exports = [], [], []
    results = {}
    for runtime in ("onnxruntime", "torch"):
        start = time.perf_counter()
        result = autodac.optimize(model, latency_budget=BUDGET, runtime=runtime, example_inputs=x, latency_cache=False, progress=False)
        seconds = time.perf_counter() - start
        results[runtime] = result
        onnx, eager, original_ms = _ratios(model, result.model, x, rounds)
        rows.append({
            "net": name, "planned on": runtime, "latency budget": BUDGET,
            "ratio measured by optimize": round(result.latency_ratio, 3),
            "re-measured in onnxruntime": round(onnx, 3), f"<= {TARGET} in onnxruntime": "yes" if onnx <= TARGET else "no",
            "re-measured in eager torch": round(eager, 3), "FLOPs ratio": round(result.flops_ratio, 3),
            "predicted error, summed over layers": round(sum(c.error for c in result.plan.layers.values()), 3),
            "onnxruntime original ms": round(original_ms, 1), "planning s": round(seconds, 1),
        })
        log(f"{name}, planned on {runtime}: {rows[-1]}")
        layers += [
            {"net": name, "planned on": runtime, "layer": layer, "method": c.method, "rank": c.rank or "", "impl": c.impl,
             "ms before": round(c.latency_before, 2), "ms after": round(c.latency_after, 2)}
            for layer, c in result.plan.layers.items()
        ]
    with tempfile.TemporaryDirectory() as folder:
        for fmt in FORMATS:
            start = time.perf_counter()
            exported = autodac.export(results["onnxruntime"], os.path.join(folder, f"model.{fmt}"), format=fmt)
            exports.append({
                "net": name, "format": fmt, "max abs(exported - model)": f"{exported.max_difference:.2g}",
                "allowed": f"{exported.allowed:.2g}", "MB": round(os.path.getsize(exported.path) / 2**20, 1),
                "write + check s": round(time.perf_counter() - start, 1),
            })
            log(f"{name} export: {exports[-1]}")
    return rows, layers, exports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads in torch and onnxruntime (default 1)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per re-measured ratio (default 15)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    get_runtime("onnxruntime").check(CPU)
    log(f"deploy benchmark on {describe_device(CPU, get_runtime('onnxruntime'))}")
    nets = [("VGG-16 shaped, 1x3x128x128", lambda: _seeded(vgg16_shaped()), 128)]
    if not args.quick:
        nets = [("VGG-16 shaped, 1x3x224x224", lambda: _seeded(vgg16_shaped()), 224), *nets,
                ("ResNet-18 shaped, 1x3x224x224", lambda: _seeded(ResNet18Shaped()), 224)]
    start = time.perf_counter()
    sections = {"latency": [], "exports": [], "layers": []}
    for name, build, size in nets:
        rows, layers, exports = one_net(name, build(), torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)), args.rounds)
        sections["latency"] += rows
        sections["exports"] += exports
        sections["layers"] += layers
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    header = (
        f"Latency budget {BUDGET} planned in onnxruntime and in eager torch, each plan re-measured in both, on "
        f"{describe_device(CPU, get_runtime('onnxruntime'))}, batch 1, random weights (decaying spectra). Re-measured ratios "
        f"are medians of {args.rounds} interleaved runs of the original and the plan (`optimize`'s own: 15 rounds); the "
        f"issue's bar is <= {TARGET} re-measured in onnxruntime. The machine (2 cores) was shared with other work while this "
        f"ran: single ratios move by a few hundredths between runs. Whole run {time.perf_counter() - start:.0f} s, "
        f"peak memory {peak:.1f} GiB (max RSS)."
    )
    path = write_results(args.name or ("deploy_quick" if args.quick else "deploy"), sections, header)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
