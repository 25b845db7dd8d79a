"""Distillation with and without, side by side: the shipped Fashion-MNIST nets at deep cuts, a probe of train images.

    python benchmarks/bm_distill.py                       # about 15 minutes on 2 cores
    python benchmarks/bm_distill.py --nets resnet20 --budgets 0.3 --epochs 2   # a quick look

For each net and budget, two ``autodac.optimize`` calls on the same unlabelled probe (1,024 fixed-seed
train images): the default call, and the same call with ``distill=DistillOptions(...)``. The plans
are the same (seeded search); only the weights differ. Quality is top-1 accuracy on the full
10,000-image test set (never seen by either call) and top-1 agreement with the original there;
``probe`` is the call's own held-out probe metric, ``before distillation`` the same on the model
as it came into the distillation stage. Time is each call's wall time; ``peak RSS`` the process's
peak after the call (ru_maxrss: it only grows, so read it as the most any call so far needed).
Writes ``benchmarks/results/distill.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import resource
import time


import autodac
from common import load_data, load_net, log, set_threads, test_accuracy, weights_info, write_results
from autodac.probes import predict, top1_match


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["resnet20", "cifar_vgg"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.2, 0.1])
    parser.add_argument("--probe", type=int, default=1024, help="probe images (unlabelled), drawn from the train set")
    parser.add_argument("--epochs", type=int, default=autodac.DistillOptions.epochs)
    parser.add_argument("--lr", type=float, default=autodac.DistillOptions.lr)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="distill")
    args = parser.parse_args()
    set_threads(args.threads)
    probe_x, _, test_x, test_y = load_data(args.probe, seed=0)
    options = autodac.DistillOptions(epochs=args.epochs, lr=args.lr)
    rows = []
    for net in args.nets:
        model = load_net(net)
        original = predict(model, test_x, batch_size=500)
        rows.append({"net": net, "budget": 1.0, "distill": "", "test acc (%)": 100 * test_accuracy(model, test_x, test_y)})
        for budget in args.budgets:
            for distill in (False, options):
                start = time.perf_counter()
                result = autodac.optimize(model, budget, data=[probe_x], distill=distill, progress=False)
                seconds = time.perf_counter() - start
                outputs = predict(result.model, test_x, batch_size=500)
                record = result.plan.distilled
                row = {
                    "net": net, "budget": budget, "FLOPs ratio": result.flops_ratio,
                    "distill": "" if distill is False else (f"kept epoch {record['epoch']}/{options.epochs}" if record else "rejected"),
                    "test acc (%)": 100 * top1_match(outputs, test_y), "test agreement (%)": 100 * top1_match(outputs, original.argmax(1)),
                    "probe": result.metrics.get("probe"), "before distillation": result.metrics.get("probe_before_distillation"),
                    "optimize s": seconds, "peak RSS (GiB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                }
                rows.append(row)
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    header = (
        f"`autodac.optimize(model, budget, data=[probe])` and the same with `distill=DistillOptions(epochs={options.epochs}, "
        f"lr={options.lr:g})` (other options default), {args.probe} unlabelled train images as the probe, "
        f"{len(test_y)} test images for quality, {args.threads} threads. Weights: "
        + "; ".join(weights_info(net) for net in args.nets)
    )
    path = write_results(args.out, rows, header)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
