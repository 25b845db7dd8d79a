"""One search spread over worker processes: trials per minute with 1 and 2 workers on one study, and the plan they find.

    python benchmarks/bm_storage.py                      # the README's figures: 24 trials in all, a few minutes
    python benchmarks/bm_storage.py --trials 12 --storage journal

The shipped ResNet-20 at ``flops_budget=0.5`` with the shipped probe (the 1,000 training images
of ``autodac.datasets.fashion_mnist_slice``, written as an ``.npz``), each worker an
``autodac worker`` process with one thread, all in one run:

* ``1 worker``: one process adds ``--trials`` trials to a fresh study;
* ``2 workers``: two processes started together add ``--trials / 2`` each to another fresh study;
* ``in memory``: ``autodac optimize`` with ``--trials`` trials and no storage (the default; the reference plan).

Trials per minute come from the study's own timestamps (first trial started to last trial
finished), so process start-up and the shared set-up (profile, BatchNorm decision) are not
counted; the sum of the workers' own rates (each over its own first-to-last trial) leaves out the
seconds when one worker had not started yet; wall and CPU seconds (all workers together) are end
to end. The quality columns are the best probe objective (minus
the KL divergence from the original on the held-out probe half, what the search maximises), the
probe metric, and the plan's accuracy on the 2,000 shipped test images. Writes
``benchmarks/results/storage.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from autodac.datasets import fashion_mnist_slice
from autodac.search.storage import open_storage

try:
    from common import log, write_results
except ImportError:  # run as `python -m benchmarks.bm_storage`
    from benchmarks.common import log, write_results

BUDGET = 0.5


def _command(kind: str, folder: Path, trials: int, storage: str | None, study: str | None, out: str) -> list[str]:
    command = [sys.executable, "-m", "autodac.cli", kind]
    if storage is not None:
        command += ["--storage", storage, "--study", study]
    return command + ["autodac.zoo:resnet20", "--pretrained", "--flops-budget", str(BUDGET), "--data", str(folder / "probe.npz"),
                      "--n-trials", str(trials), "--quiet", "--json", "--out", str(folder / f"{out}.json"),
                      "--save-model", str(folder / f"{out}.pt")]


def _cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _run(commands: list[list[str]]) -> tuple[list[dict], float, float]:
    """Start the commands together (one thread each): their JSON reports, the wall seconds until the last ends, their CPU seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start, cpu = time.perf_counter(), _cpu_seconds()
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in commands]
    outputs = [p.communicate() for p in processes]
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    for process, (_, err) in zip(processes, outputs):
        if process.returncode != 0:
            raise SystemExit(f"a worker failed: {err.strip().splitlines()[-1] if err.strip() else process.returncode}")
    return [json.loads(out) for out, _ in outputs], seconds, cpu


def _per_worker_rate(trials: list) -> float:
    """Trials per minute of each worker over its own first-start-to-last-end span, summed over the workers."""
    by_worker: dict[str, list] = {}
    for trial in trials:
        by_worker.setdefault(str(trial.user_attrs.get("worker", {}).get("id")), []).append(trial)
    total = 0.0
    for own in by_worker.values():
        span = (max(t.datetime_complete for t in own) - min(t.datetime_start for t in own)).total_seconds()
        total += 60.0 * len(own) / span
    return total


def _accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    model = torch.load(path, weights_only=False).eval()
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=24, help="trials in all (each of the 2 workers adds half)")
    parser.add_argument("--storage", choices=("sqlite", "journal"), default="sqlite")
    args = parser.parse_args()
    torch.set_num_threads(1)
    test_x, test_y = fashion_mnist_slice("test")
    train_x, train_y = fashion_mnist_slice("train")
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        np.savez(folder / "probe.npz", x=train_x.numpy(), y=train_y.numpy())
        url = f"sqlite:///{folder / 'search.db'}" if args.storage == "sqlite" else str(folder / "search.journal")
        setups = [
            ("1 worker", [("worker", args.trials, "one", "one-0")]),
            ("2 workers", [("worker", args.trials // 2, "two", f"two-{k}") for k in range(2)]),
            ("in memory (no storage)", [("optimize", args.trials, None, "memory-0")]),
        ]
        for label, workers in setups:
            log(f"{label}: {', '.join(f'{n} trials' for _, n, _, _ in workers)}")
            commands = [_command(kind, folder, n, None if study is None else url, study, out) for kind, n, study, out in workers]
            reports, seconds, cpu = _run(commands)
            row = {"run": label, "storage": "none" if workers[0][2] is None else args.storage, "workers": len(workers),
                   "trials asked": sum(n for _, n, _, _ in workers), "wall s": round(seconds, 1), "CPU s": round(cpu, 1)}
            last = max(range(len(reports)), key=lambda k: reports[k].get("trials", 0))  # the worker that saw every trial
            study_name = workers[0][2]
            if study_name is not None:
                study = optuna.load_study(study_name=study_name, storage=open_storage(url))
                finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
                evaluated = sum(1 for t in finished if not t.user_attrs.get("reused"))
                row.update({"trials finished": len(finished), "plans evaluated": evaluated, "search s": round(span, 1),
                            "trials / min": round(60.0 * len(finished) / span, 2),
                            "sum of workers' own trials / min": round(_per_worker_rate(finished), 2),
                            "best objective": round(max(t.value for t in finished), 6)})
            metrics = reports[last]["metrics"]
            row.update({"FLOPs ratio": round(reports[last]["flops_ratio"], 4), "probe metric": metrics.get("probe"),
                        "test acc (%)": round(_accuracy(folder / f"{workers[last][3]}.pt", test_x, test_y), 2),
                        "load avg (1 min)": round(os.getloadavg()[0], 2)})
            rows.append(row)
            log(str(row))
    one, two = rows[0], rows[1]
    speedup = two["trials / min"] / one["trials / min"]
    header = (
        f"The shipped ResNet-20 at `flops_budget={BUDGET}`, probe: the 1,000 shipped training images; each worker an "
        f"`autodac worker` process with one thread on a {args.storage} study; test accuracy on the 2,000 shipped test images. "
        f"Trials per minute from the study's timestamps (first trial started to last finished; start-up and the shared "
        f"profile excluded). 2 workers / 1 worker: **{speedup:.2f}x** trials per minute, measured in this run. Best "
        f"objective (minus the KL divergence from the original on the held-out probe half): 1 worker "
        f"{one['best objective']:.6f}, 2 workers {two['best objective']:.6f}. The machine's other load during the run is "
        f"in the last column (the 1-minute load average as each run ended, this benchmark's own workers included): on a "
        f"machine whose cores are shared with other jobs, a second worker cannot get a whole core."
    )
    path = write_results("storage", rows, header)
    log(f"2 workers / 1 worker: {speedup:.2f}x trials per minute; wrote {path}")


if __name__ == "__main__":
    main()
