"""Data-free planning: does autodac's per-layer plan beat uniform DAC ranks at equal FLOPs, with no data at all?

    python benchmarks/bm_data_free.py                  # both nets, budgets 0.2 ... 0.9 (the README's figures)
    python benchmarks/bm_data_free.py --quick          # smoke test: ResNet-20, budget 0.5, 1,000 test images
    python benchmarks/bm_data_free.py --nets resnet20 --budgets 0.3 0.5 --threads 2

For each shipped Fashion-MNIST net and FLOPs budget ``b`` it reports the test accuracy (full 10k
test set) of

* ``autodac (all methods)``: ``autodac.optimize(model, b, example_inputs=x[:1], methods=ALL_METHODS)``
  (every factorisation autodac has, transposed DAC included), no data;
* ``autodac (dac only)``: the same with ``methods=("dac",), widths=False`` (DAC alone);
* ``uniform DAC rank r``: every DAC-eligible conv at one rank r, the smallest r whose FLOPs
  ratio is at least ``b`` (so the baseline never has fewer FLOPs than the plan);

with each model's fvcore FLOPs ratio and the planning seconds. No BatchNorm statistics are
re-estimated anywhere. It also times data-free planning on ``autodac.zoo.resnet50_shaped()``
at 1x3x224x224 (budget 0.5, median of 3 runs, 2 threads).

Writes ``benchmarks/results/data_free.md`` and ``.json`` (``data_free_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch

import autodac
from autodac.api import Result
from autodac.datasets import fashion_mnist
from autodac.errors import BudgetError
from autodac.factorize import METHODS
from autodac.zoo import resnet50_shaped

try:
    from common import NETS, load_net, log, set_threads, smallest_uniform_rank, test_accuracy, uniform_dac, warm_up, weights_info, write_results
except ImportError:  # run as `python -m benchmarks.bm_data_free`
    from benchmarks.common import (
        NETS, load_net, log, set_threads, smallest_uniform_rank, test_accuracy, uniform_dac, warm_up, weights_info, write_results,
    )

ALL_METHODS = tuple(METHODS)
DEFAULT_BUDGETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def methods_used(result: Result) -> str:
    counts = Counter(choice.method for choice in result.plan.factorized.values())
    return ", ".join(f"{method} {n}" for method, n in sorted(counts.items())) or "all dense"


def autodac_row(model, budget, example, test_x, test_y, original_acc, methods, label):
    start = time.perf_counter()
    try:
        result = autodac.optimize(model, budget, example_inputs=example, methods=methods, widths=len(methods) > 1, progress=False)
    except BudgetError as error:
        log(f"  {label}: budget unreachable ({error})")
        return {"variant": label, "FLOPs ratio": None, "test acc (%)": None, "Δ acc (pp)": None,
                "plan s": time.perf_counter() - start, "detail": "budget unreachable with these methods"}
    seconds = time.perf_counter() - start
    acc = test_accuracy(result.model, test_x, test_y)
    log(f"  {label}: ratio {result.flops_ratio:.4f}, test acc {acc:.2%}, plan {seconds:.2f} s ({methods_used(result)})")
    return {"variant": label, "FLOPs ratio": result.flops_ratio, "test acc (%)": 100 * acc,
            "Δ acc (pp)": 100 * (acc - original_acc), "plan s": seconds, "detail": methods_used(result)}


def resnet50_planning(runs: int) -> list[dict]:
    torch.manual_seed(0)
    model = resnet50_shaped().eval()
    example = torch.randn(1, 3, 224, 224)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        times, ratio = [], None
        for run in range(runs):
            start = time.perf_counter()
            result = autodac.optimize(model, 0.5, example_inputs=example, progress=False)
            times.append(time.perf_counter() - start)
            ratio = result.flops_ratio
            log(f"resnet50_shaped data-free plan, run {run + 1}/{runs}: {times[-1]:.2f} s (ratio {ratio:.4f})")
    finally:
        torch.set_num_threads(previous)
    return [{"model": "resnet50_shaped (random weights)", "input": "1x3x224x224", "budget": 0.5, "threads": 2,
             "runs": runs, "median s": statistics.median(times), "all runs s": ", ".join(f"{t:.2f}" for t in times),
             "FLOPs ratio": ratio, "layers factorised": methods_used(result)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: resnet20, budget 0.5, 1,000 test images, 1 ResNet-50 run")
    parser.add_argument("--nets", nargs="+", choices=NETS, default=None)
    parser.add_argument("--budgets", nargs="+", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--resnet50-runs", type=int, default=None, help="runs of the ResNet-50 planning timing (default 3)")
    parser.add_argument("--name", default=None, help="results file name (default data_free, or data_free_quick)")
    args = parser.parse_args()
    nets = args.nets or (["resnet20"] if args.quick else list(NETS))
    budgets = args.budgets or ([0.5] if args.quick else list(DEFAULT_BUDGETS))
    runs = args.resnet50_runs or (1 if args.quick else 3)
    name = args.name or ("data_free_quick" if args.quick else "data_free")
    set_threads(args.threads)

    test_x, test_y = fashion_mnist("test")
    if args.quick:
        test_x, test_y = test_x[:1000], test_y[:1000]
    example = test_x[:1]
    log(f"data-free benchmark: nets {nets}, budgets {budgets}, {len(test_y)} test images, {args.threads} threads")

    rows, summary, checkpoints = [], [], []
    for net in nets:
        model = load_net(net)
        checkpoints.append(f"- {net}: {weights_info(net)}")
        original_acc = test_accuracy(model, test_x, test_y)
        log(f"{net}: original test acc {original_acc:.2%}")
        warm_up(model, example)
        rows.append({"net": net, "budget": 1.0, "variant": "original", "FLOPs ratio": 1.0, "test acc (%)": 100 * original_acc,
                     "Δ acc (pp)": 0.0, "plan s": None, "detail": ""})
        for budget in budgets:
            log(f"{net} at budget {budget}")
            every = autodac_row(model, budget, example, test_x, test_y, original_acc, ALL_METHODS, "autodac (all methods)")
            dac = autodac_row(model, budget, example, test_x, test_y, original_acc, ("dac",), "autodac (dac only)")
            rank, _ = smallest_uniform_rank(model, budget, example)
            start = time.perf_counter()
            uniform, ratio = uniform_dac(model, rank, example)
            seconds = time.perf_counter() - start
            acc = test_accuracy(uniform, test_x, test_y)
            log(f"  uniform DAC rank {rank}: ratio {ratio:.4f}, test acc {acc:.2%}")
            flat = {"variant": f"uniform DAC rank {rank}", "FLOPs ratio": ratio, "test acc (%)": 100 * acc,
                    "Δ acc (pp)": 100 * (acc - original_acc), "plan s": seconds,
                    "detail": "smallest uniform rank with FLOPs ratio >= budget"}
            for row in (every, dac, flat):
                rows.append({"net": net, "budget": budget, **row})
            summary.append({
                "net": net, "budget": budget, "original acc (%)": 100 * original_acc,
                "all methods: acc (%)": every["test acc (%)"], "all methods: ratio": every["FLOPs ratio"],
                "dac only: acc (%)": dac["test acc (%)"], "dac only: ratio": dac["FLOPs ratio"],
                "uniform DAC: acc (%)": flat["test acc (%)"], "uniform DAC: rank": rank, "uniform DAC: ratio": ratio,
            })

    planning = resnet50_planning(runs)
    header = "\n".join([
        "Data-free planning (no images, no labels): autodac's per-layer plan vs. uniform DAC ranks at equal or higher FLOPs.",
        "",
        f"Test accuracy on {'the first 1,000 (--quick)' if args.quick else f'all {len(test_y):,}'} Fashion-MNIST test images. "
        "`autodac (all methods)` is `optimize(model, b, example_inputs=x[:1], methods=(all four))`; `autodac (dac only)` adds "
        "`methods=(\"dac\",), widths=False`; `uniform DAC rank r` decomposes every DAC-eligible conv (groups 1, kernel > 1, rank r "
        "cheaper than dense) at the smallest r whose FLOPs ratio is >= b. FLOPs ratios are fvcore counts at 1x1x28x28. "
        "No BatchNorm re-estimation anywhere. `plan s` is the wall time of planning and building the model "
        "(accuracy evaluation excluded; one untimed optimize() per net first, so imports and fvcore's first trace are not counted).",
        "",
        "Checkpoints:",
        *checkpoints,
        "",
        "Machine:",
    ])
    path = write_results(name, {
        "Summary: test accuracy (%) per budget": summary,
        "All rows": rows,
        "Planning time on resnet50_shaped (data-free)": planning,
    }, header)
    log(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
