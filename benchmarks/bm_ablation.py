"""Issue 7's ablation: what each quality lever adds, with a 2k-image probe and with no data at all.

    python benchmarks/bm_ablation.py                                  # both nets, budgets 0.5 0.3 0.2
    python benchmarks/bm_ablation.py --nets resnet20 --budgets 0.3 --threads 1

Probe: the fixed-seed 2,000 Fashion-MNIST train images of ``bm_probe_search.py``; no-data rows
plan on 512 inputs synthesised once per net with ``autodac.synthesize_inputs`` (seed 0, the
default steps: exactly what ``optimize(..., synthesize=512)`` makes). Test accuracy on all
10,000 test images. Each row is one ``optimize`` call; the default is every lever on, and each
ablation turns one off:

* ``default``: DAC, spatial SVD and channel SVD per layer, sensitivity + Optuna on the probe,
  data-aware fits, sequential (interaction-aware) re-fit, BatchNorm re-estimation (the last two
  kept only where the held-out probe half says they help);
* ``- sequential re-fit``: ``sequential_fit=False``;
* ``- data-aware fits``: ``fit_to_data=False, sequential_fit=False`` (weight-error fits only);
* ``- BN re-estimation``: ``reestimate_bn=False``;
* ``DAC only``: ``methods=("dac",), widths=False``;
* ``+ transposed DAC``: ``methods=("dac", "spatial", "lowrank", "tdac")``;
* ``data-free (no probe)``: ``optimize(model, b)``: reconstruction error only.

Writes ``benchmarks/results/ablation.md`` and ``.json``; ``benchmarks/results/aimet.json`` (AIMET
itself, run by ``bm_aimet.py`` in its own environment), when present, is quoted beside it.
"""

from __future__ import annotations

import argparse
import json
import time


import autodac
from autodac.errors import BudgetError

try:
    from common import NETS, RESULTS, load_data, load_net, log, set_threads, test_accuracy, weights_info, write_results
except ImportError:  # run as `python -m benchmarks.bm_ablation`
    from benchmarks.common import NETS, RESULTS, load_data, load_net, log, set_threads, test_accuracy, weights_info, write_results

DEFAULT_METHODS = ("dac", "spatial", "lowrank")
PROBE_VARIANTS = {
    "default": {},
    "- sequential re-fit": {"sequential_fit": False},
    "- data-aware fits": {"fit_to_data": False, "sequential_fit": False},
    "- BN re-estimation": {"reestimate_bn": False},
    "DAC only": {"methods": ("dac",), "widths": False},
    "+ transposed DAC": {"methods": DEFAULT_METHODS + ("tdac",)},
}
SECTION = "autodac, one lever off at a time"
SYNTHETIC_VARIANTS = ("default", "- sequential re-fit", "- data-aware fits", "- BN re-estimation")


def levers(result: autodac.Result) -> str:
    """Which corrections the held-out probe kept, read off the plan."""
    kept = []
    if any(c.fit.startswith("seq+") for c in result.plan.factorized.values()):
        kept.append("re-fit kept")
    elif any("sequential re-fit tried and rejected" in n for n in result.plan.notes):
        kept.append("re-fit rejected")
    if result.metrics.get("bn_reestimated"):
        kept.append("BN kept")
    return ", ".join(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3, 0.2])
    parser.add_argument("--variants", nargs="*", default=None, help="probe variants to run (default: all)")
    parser.add_argument("--synthetic-variants", nargs="*", default=list(SYNTHETIC_VARIANTS),
                        help="no-data variants to run (default: all; none to skip the synthesis)")
    parser.add_argument("--synthetic-count", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-data-free", action="store_true", help="skip the data-free rows")
    parser.add_argument("--name", default="ablation")
    parser.add_argument("--merge", nargs="+", default=None, metavar="NAME",
                        help="only combine these results files (benchmarks/results/NAME.json) into --name")
    args = parser.parse_args()
    if args.merge:
        merge(args.name, args.merge)
        return
    set_threads(args.threads)
    probe_x, probe_y, test_x, test_y = load_data(2000, seed=0)
    example = test_x[:1]
    rows, checkpoints = [], []
    variants = {k: v for k, v in PROBE_VARIANTS.items() if args.variants is None or k in args.variants}

    def run(net, model, budget, data_label, variant, **options) -> None:
        start = time.perf_counter()
        try:
            result = autodac.optimize(model, budget, progress=False, **options)
        except BudgetError as error:
            log(f"  {variant}: budget unreachable ({error})")
            return
        seconds = time.perf_counter() - start
        accuracy = 100 * test_accuracy(result.model, test_x, test_y)
        rows.append({"net": net, "budget": budget, "data": data_label, "variant": variant, "FLOPs ratio": result.flops_ratio,
                     "test acc (%)": accuracy, "kept": levers(result), "optimize s": seconds})
        log(f"  {net} {budget} {data_label} {variant}: {accuracy:.2f}% at {result.flops_ratio:.4f} ({seconds:.0f} s) {levers(result)}")
        (RESULTS / f"{args.name}.partial.json").write_text(json.dumps(rows, indent=1) + "\n")

    for net in args.nets:
        model = load_net(net)
        checkpoints.append(f"- {net}: {weights_info(net)}")
        rows.append({"net": net, "budget": 1.0, "data": "", "variant": "original", "FLOPs ratio": 1.0,
                     "test acc (%)": 100 * test_accuracy(model, test_x, test_y)})
        synthetic = None
        if args.synthetic_variants:
            start = time.perf_counter()
            synthetic = autodac.synthesize_inputs(model, example, args.synthetic_count, seed=0, progress=False)
            log(f"{net}: synthesised {args.synthetic_count} inputs in {time.perf_counter() - start:.0f} s")
        for budget in args.budgets:
            for variant, options in variants.items():
                run(net, model, budget, "2k probe", variant, data=[(probe_x, probe_y)], **options)
            if synthetic is not None:
                for variant in args.synthetic_variants:
                    run(net, model, budget, f"none ({args.synthetic_count} synthetic)", variant, data=[synthetic], **PROBE_VARIANTS[variant])
            if not args.no_data_free:
                run(net, model, budget, "none", "data-free (no probe)", example_inputs=example)

    write(args.name, rows, checkpoints)
    (RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)


def write(name: str, rows: list[dict], checkpoints: list[str], sources: list[str] = ()) -> None:
    header = "\n".join([
        "Each lever of issue 7 turned off one at a time (see `benchmarks/bm_ablation.py`); test accuracy on all 10,000 Fashion-MNIST "
        "test images, no fine-tuning. `kept`: which held-out-checked corrections the final plan kept. AIMET itself: "
        "`benchmarks/results/aimet.md`. `optimize s` is wall time on a shared 2-core machine and depends on what else ran "
        "(merged runs ran at different loads: here the default rows beside the AIMET benchmark, load 4-7, the others at "
        "load ~2); the quiet-core time of the default call is in `probe_targets.md`.", "", *checkpoints, *sources,
    ])
    write_results(name, {SECTION: rows}, header)


def merge(name: str, parts: list[str]) -> None:
    """One results file from several runs' files (e.g. one process per net), rows in the order given."""
    rows, checkpoints, sources = [], [], []
    for part in parts:
        saved = json.loads((RESULTS / f"{part}.json").read_text())
        sources.append(f"- rows from `{saved['meta'].get('command')}` ({saved['meta'].get('date')}, load {saved['meta'].get('machine', '')})")
        rows += [row for row in saved["rows"][SECTION] if row["variant"] != "original" or row not in rows]
        checkpoints += [line for line in saved["header"].splitlines() if line.startswith("- ") and line not in checkpoints]
    nets = list(dict.fromkeys(row["net"] for row in rows))
    variants = ["original", *PROBE_VARIANTS, "data-free (no probe)"]
    rows.sort(key=lambda r: (nets.index(r["net"]), -r["budget"], r["data"] != "2k probe", r["data"], variants.index(r["variant"])))
    write(name, rows, checkpoints, sources)


if __name__ == "__main__":
    main()
