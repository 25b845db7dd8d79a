"""The probe-search issue's four targets in one short run: ResNet-20, 2k-image probe, full 10k test set.

    python benchmarks/bm_probe_targets.py      # about 3 minutes on 2 quiet cores

Rows: labeled probe at 0.5 (bar: >= 92.1%, < 60 s), unlabeled probe at 0.5 (bar: within 0.3
points of labeled), labeled probe at 0.3 (bar: >= 91.0%). Default ``optimize`` settings, 2 threads,
one untimed warm-up call first. Writes ``benchmarks/results/probe_targets.md``.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import torch

import autodac
from autodac.datasets import fashion_mnist
from autodac.zoo import pretrained


def main() -> None:
    torch.set_num_threads(2)
    test_x, test_y = fashion_mnist("test")
    train_x, train_y = fashion_mnist("train")
    index = torch.randperm(60000, generator=torch.Generator().manual_seed(0))[:2000]
    probe_x, probe_y = train_x[index], train_y[index]

    def accuracy(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return sum((model(test_x[i : i + 1000]).argmax(1) == test_y[i : i + 1000]).sum().item() for i in range(0, 10000, 1000)) / 100

    model = pretrained("resnet20")
    autodac.optimize(model, 0.5, example_inputs=test_x[:1], progress=False)  # warm-up: imports, first fvcore trace
    rows = [f"| original | 1.0 | {accuracy(model):.2f} | | |"]
    cases = (("labeled probe", 0.5, [(probe_x, probe_y)]), ("unlabeled probe", 0.5, [probe_x]), ("labeled probe", 0.3, [(probe_x, probe_y)]))
    for label, budget, data in cases:
        start = time.perf_counter()
        result = autodac.optimize(model, budget, data=data, progress=False)
        seconds = time.perf_counter() - start
        bn = "kept" if result.metrics.get("bn_reestimated") else "rejected"
        rows.append(f"| {label} | {result.flops_ratio:.4f} | {accuracy(result.model):.2f} | {seconds:.1f} | {bn} |")
        print(rows[-1], flush=True)
    text = [
        "# probe_targets", "",
        "ResNet-20 (shipped weights), `optimize(model, budget, data=probe)` with default settings, 2,000 fixed-seed train images "
        "as the probe, test accuracy on all 10,000 test images.", "",
        "- command: `python benchmarks/bm_probe_targets.py`", f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: nproc {os.cpu_count()}, load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}; torch {torch.__version__}, 2 threads", "",
        "| probe | FLOPs ratio | test acc (%) | optimize s | BN re-estimation |", "|---|---|---|---|---|", *rows,
    ]
    out = Path(__file__).resolve().parent / "results" / "probe_targets.md"
    out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
