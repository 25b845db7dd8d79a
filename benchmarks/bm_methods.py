"""Which factorisations pay? Data-free plans with each method alone and in combination, both nets.

    python benchmarks/bm_methods.py                  # budgets 0.5 0.3 0.2, both nets (the README's figures)

Test accuracy (all 10k Fashion-MNIST test images) of ``autodac.optimize(model, b, methods=...)``
with no data, for DAC alone (the paper's setting), transposed DAC alone, and the default mix
with and without transposed DAC, plus how many layers each plan gave each method. Writes
``benchmarks/results/methods.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import autodac

try:
    from common import NETS, load_data, load_net, log, set_threads, test_accuracy, write_results
except ImportError:  # run as `python -m benchmarks.bm_methods`
    from benchmarks.common import NETS, load_data, load_net, log, set_threads, test_accuracy, write_results

METHOD_SETS = {
    "dac, spatial, lowrank (default)": ("dac", "spatial", "lowrank"),
    "dac, tdac, spatial, lowrank (all)": ("dac", "tdac", "spatial", "lowrank"),
    "dac only": ("dac",),
    "tdac only": ("tdac",),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3, 0.2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="methods")
    args = parser.parse_args()
    set_threads(args.threads)
    _, _, test_x, test_y = load_data()
    rows = []
    for net in args.nets:
        model = load_net(net)
        for budget in args.budgets:
            for label, methods in METHOD_SETS.items():
                start = time.perf_counter()
                try:
                    alone = len(methods) == 1  # one method alone: no widths either (they are offered whatever `methods` lists)
                    result = autodac.optimize(model, budget, example_inputs=test_x[:1], methods=methods, widths=not alone, progress=False)
                except autodac.BudgetError as refusal:
                    rows.append({"net": net, "budget": budget, "methods": label, "test acc (%)": None, "FLOPs ratio": None,
                                 "layers per method": f"refused: {refusal}", "seconds": None})
                    continue
                used = Counter(c.method for c in result.plan.factorized.values())
                accuracy = test_accuracy(result.model, test_x, test_y)
                rows.append({
                    "net": net, "budget": budget, "methods": label, "test acc (%)": round(100 * accuracy, 2),
                    "FLOPs ratio": round(result.flops_ratio, 4), "layers per method": ", ".join(f"{m} {n}" for m, n in sorted(used.items())),
                    "seconds": round(time.perf_counter() - start, 1),
                })
                log(f"{net} {budget} {label}: {rows[-1]}")
    header = (
        "Data-free plans (reconstruction error weighted by the following BatchNorm, exact knapsack, no data, no BatchNorm "
        "re-estimation), test accuracy on all 10k Fashion-MNIST test images, by the set of factorisations the planner may "
        "choose from. `tdac` is transposed DAC (per-output-channel SVD: a pointwise conv to N*r channels, then each output "
        "channel's r kernels)."
    )
    path = write_results(args.name, rows, header)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
