"""No data at all: does a probe synthesised from the BatchNorm statistics beat planning on reconstruction error?

    python benchmarks/bm_synthetic_probe.py                 # both nets, budgets 0.5 0.3 0.2 (the README's figures)
    python benchmarks/bm_synthetic_probe.py --nets resnet20 --budgets 0.3 --threads 2

For each shipped Fashion-MNIST net it synthesises ``--count`` inputs once with
``autodac.synthesize_inputs`` (seed 0, the default steps: exactly the inputs
``optimize(..., synthesize=count)`` makes) and times that, then for each budget reports the
test accuracy (all 10k test images) of

* ``data-free``: ``optimize(model, b)``, reconstruction error only;
* ``synthetic probe``: ``optimize(model, b, data=synthetic)``: sensitivity, Optuna, data-aware
  fits and BatchNorm re-estimation all on the synthetic inputs (kept only where the synthetic
  held-out half says they help);
* ``synthetic probe, no BN re-estimation``: the same with ``reestimate_bn=False`` (ablation);
* ``synthetic probe, no data-aware fits``: the same with ``fit_to_data=False`` (ablation).

No real image is seen by any plan. Writes ``benchmarks/results/synthetic_probe.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import time

import torch

import autodac
from autodac.synthesis import DEFAULT_STEPS, statistics_mismatch

try:
    from common import NETS, load_data, load_net, log, set_threads, test_accuracy, weights_info, write_results
except ImportError:  # run as `python -m benchmarks.bm_synthetic_probe`
    from benchmarks.common import NETS, load_data, load_net, log, set_threads, test_accuracy, weights_info, write_results

VARIANTS = {
    "data-free": None,
    "synthetic probe": {},
    "synthetic probe, no BN re-estimation": {"reestimate_bn": False},
    "synthetic probe, no data-aware fits": {"fit_to_data": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3, 0.2])
    parser.add_argument("--count", type=int, default=512, help="inputs to synthesise (default 512)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="synthetic_probe")
    args = parser.parse_args()
    set_threads(args.threads)
    probe_x, _, test_x, test_y = load_data()
    log(f"synthetic-probe benchmark: nets {args.nets}, budgets {args.budgets}, {args.count} inputs, {args.threads} threads")
    rows, synthesis = [], []
    for net in args.nets:
        model = load_net(net)
        example = test_x[:1]
        original = test_accuracy(model, test_x, test_y)
        start = time.perf_counter()
        synthetic = autodac.synthesize_inputs(model, example, args.count, progress=False)
        seconds = time.perf_counter() - start
        noise = torch.randn(synthetic.shape, generator=torch.Generator().manual_seed(0))
        synthesis.append({
            "net": net, "inputs": args.count, "steps": DEFAULT_STEPS, "seconds": round(seconds, 1),
            "BN mismatch, noise": round(statistics_mismatch(model, noise), 4),
            "BN mismatch, synthetic": round(statistics_mismatch(model, synthetic), 4),
            "BN mismatch, real (2k train images)": round(statistics_mismatch(model, probe_x), 4),
        })
        log(f"{net}: original {100 * original:.2f}%, synthesised {args.count} inputs in {seconds:.1f} s; {synthesis[-1]}")
        rows.append({"net": net, "budget": 1.0, "variant": "original", "FLOPs ratio": 1.0, "test acc (%)": round(100 * original, 2),
                     "seconds": 0.0, "notes": ""})
        for budget in args.budgets:
            for variant, options in VARIANTS.items():
                start = time.perf_counter()
                if options is None:
                    result = autodac.optimize(model, budget, example_inputs=example, progress=False)
                else:
                    result = autodac.optimize(model, budget, example_inputs=example, data=synthetic, progress=False, **options)
                seconds = time.perf_counter() - start
                accuracy = test_accuracy(result.model, test_x, test_y)
                notes = "BN re-estimated" if result.metrics.get("bn_reestimated") else ""
                rows.append({"net": net, "budget": budget, "variant": variant, "FLOPs ratio": round(result.flops_ratio, 4),
                             "test acc (%)": round(100 * accuracy, 2), "seconds": round(seconds, 1), "notes": notes})
                log(f"  {net} {budget} {variant}: {100 * accuracy:.2f}% (ratio {result.flops_ratio:.4f}, {seconds:.1f} s) {notes}")
    header = (
        f"Test accuracy on all {len(test_y):,} Fashion-MNIST test images of plans made with no real data. "
        f"The synthetic probe is {args.count} inputs from `autodac.synthesize_inputs` (seed 0, {DEFAULT_STEPS} Adam steps per "
        "batch of 256): Gaussian noise optimised until the statistics at every BatchNorm match the stored running "
        "statistics. `BN mismatch` is `autodac.synthesis.statistics_mismatch` (mean over BatchNorms of the squared gap in "
        "mean and std). Seconds are wall time of the whole `optimize` call (synthesis "
        "timed once per net, in the first table). Weights: " + "; ".join(f"{n}: {weights_info(n)}" for n in args.nets)
    )
    path = write_results(args.name, {"synthesis": synthesis, "plans": rows}, header)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
