"""Every architecture a user brings: ``optimize(model, budget, example_inputs=x)`` on a zoo at 224 px, one call per row.

    python benchmarks/bm_zoo.py                                   # torchvision's zoo where it imports, else the families
    python benchmarks/bm_zoo.py --zoo families --budget 0.5       # autodac.testing's self-contained families at 224 px
    python benchmarks/bm_zoo.py --models googlenet --update       # re-run some rows of an existing results file
    /path/to/venv-with-torchvision/bin/python benchmarks/bm_zoo.py --zoo torchvision

torchvision does not import beside this project's pinned CPU torch (its only wheel here needs CUDA
libraries); a second venv with ``torch==2.14.1 torchvision==0.29.1`` (both on this machine's disk,
the CUDA build runs on the CPU) and ``pip install -e .`` runs the torchvision sweep. Random weights
(no hub downloads): the budget, the counts, time and memory are what is measured here, not quality.

Each row is ONE ``autodac.optimize`` call in a fresh subprocess (peak RSS is that call's alone:
``VmHWM`` reset just before it). Per row: time, autodac's reported FLOPs ratio, fvcore's ratio
counted independently as a user counts (eval mode, autograd on, so torch takes no fused inference
path), layers factorised, methods, and the reasons layers were left dense. A refused budget is a
row too (with the smallest reachable ratio). Writes ``benchmarks/results/zoo.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TORCHVISION = (
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf",
    "densenet121", "googlenet", "squeezenet1_1", "vgg16_bn", "vit_b_16", "swin_t", "shufflenet_v2_x1_0",
)
FAMILIES = ("InvertedResidualNet", "DenseNetLike", "InceptionLike", "ConvNeXtLike", "ShuffleNetLike")


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return math.nan


def build(zoo: str, name: str):
    import torch

    torch.manual_seed(0)
    if zoo == "torchvision":
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        return torchvision.models.get_model(name, weights=None, **kwargs).eval()
    import autodac.testing

    return getattr(autodac.testing, name)().eval()


def fvcore_flops(model, inputs) -> int:
    """fvcore's count as a user makes it: eval mode, autograd on."""
    import torch
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model.eval(), inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.enable_grad():
        return int(analysis.total())


def child(spec_path: str) -> None:
    """One ``optimize`` call on one model, its row written to ``spec["result"]``."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    import autodac

    model = build(spec["zoo"], spec["name"])
    x = torch.randn(1, 3, spec["size"], spec["size"], generator=torch.Generator().manual_seed(0))
    row: dict[str, Any] = {"params (M)": sum(p.numel() for p in model.parameters()) / 1e6}
    original = fvcore_flops(model, (x,))
    row["GFLOPs"] = original / 1e9
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    try:
        result = autodac.optimize(model, spec["budget"], example_inputs=x, progress=False)
    except Exception as error:
        row.update({"optimize s": time.perf_counter() - start, "peak RSS (GiB)": _status("VmHWM"),
                    "error": f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"[:300],
                    "traceback": traceback.format_exc()})
        Path(spec["result"]).write_text(json.dumps(row, default=str))
        return
    row["optimize s"] = time.perf_counter() - start
    row["peak RSS (GiB)"] = _status("VmHWM")
    factorized = result.plan.factorized
    counts = collections.Counter(choice.method for choice in factorized.values())
    reasons = collections.Counter(reason.split(";")[0].split(" (")[0] for reason in result.plan.skipped.values())
    row.update({
        "reported ratio": result.flops_ratio,
        "fvcore ratio": fvcore_flops(result.model, (x,)) / original,
        "factorised": len(factorized),
        "methods": ", ".join(f"{m} {n}" for m, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "kept dense": ", ".join(f"{n}x {r}" for r, n in reasons.most_common(3)),
        "damage warned": any("predicted to damage" in note for note in result.plan.notes),
    })
    with torch.no_grad():
        row["outputs match shape"] = tuple(result.model(x).shape) == tuple(model(x).shape)
    Path(spec["result"]).write_text(json.dumps(row, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", choices=("auto", "torchvision", "families"), default="auto")
    parser.add_argument("--models", nargs="+", default=None, help="a subset of the zoo's names")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds one call may take")
    parser.add_argument("--out", default="zoo", help="results name under benchmarks/results/")
    parser.add_argument("--update", action="store_true", help="re-run --models and replace their rows in an existing results file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    zoo = args.zoo
    if zoo == "auto":
        try:
            import torchvision  # noqa: F401

            zoo = "torchvision"
        except Exception:  # not importable beside the pinned CPU torch: the self-contained families
            zoo = "families"
    names = args.models or (TORCHVISION if zoo == "torchvision" else FAMILIES)
    sys.path.insert(0, str(HERE))
    from common import RESULTS, write_results

    rows = []
    kept: dict[str, dict[str, Any]] = {}
    if args.update and (RESULTS / f"{args.out}.json").exists():  # the other models' rows stay as they were measured
        kept = {row["model"]: row for row in json.loads((RESULTS / f"{args.out}.json").read_text())["rows"][""]}
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            spec = {"zoo": zoo, "name": name, "budget": args.budget, "size": args.size, "threads": args.threads,
                    "result": str(Path(work) / f"{name}.json")}
            spec_path = Path(work) / f"{name}.spec.json"
            spec_path.write_text(json.dumps(spec))
            started = time.perf_counter()
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            try:
                done = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], env=env, capture_output=True,
                                      text=True, timeout=args.timeout)
                row = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).exists() else {
                    "error": f"child exited {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:300]}"}
            except subprocess.TimeoutExpired:
                row = {"error": f"over the {args.timeout} s limit"}
            row.pop("traceback", None)
            rows.append({"model": name, **row})
            kept[name] = rows[-1]
            print(f"[{time.perf_counter() - started:6.1f}s] {name}: " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            write_results(args.out, list(kept.values()) if args.update else rows, HEADER.format(zoo=zoo, budget=args.budget, size=args.size))


HEADER = """
`autodac.optimize(model, {budget}, example_inputs=x)` on the {zoo} zoo, random weights, one
`1x3x{size}x{size}` input, each call in its own process (`python benchmarks/bm_zoo.py`). `reported
ratio` is autodac's `result.flops_ratio`; `fvcore ratio` is fvcore's count of `result.model` over
its count of the model, made independently as a user makes it (eval mode, autograd on). `kept
dense`: the most frequent reasons layers were not candidates. `peak RSS` is the call's own
(VmHWM reset before it). Random weights have flat spectra: the plans say nothing of quality here.
"""


if __name__ == "__main__":
    main()
