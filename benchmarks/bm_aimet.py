"""AIMET itself, run side by side with autodac: spatial SVD and weight SVD through ``aimet_torch``'s own API.

AIMET does not install beside the project's torch, so this benchmark runs in a separate
environment (torch 2.14.1, torchvision 0.29.1, aimet-torch 2.42.0, CPU) that also holds autodac
(editable, no deps) for the reference nets, the data and fvcore's FLOP counts:

    bash benchmarks/aimet/setup.sh && .venv-aimet/bin/python benchmarks/bm_aimet.py
    .venv-aimet/bin/python benchmarks/bm_aimet.py --quick      # smoke test: ResNet-20, 0.5, small probe/test,
                                                              # 3 ratio candidates
    # one process per net (e.g. on two cores), then one results file:
    .venv-aimet/bin/python benchmarks/bm_aimet.py --nets resnet20 --name aimet_resnet20
    .venv-aimet/bin/python benchmarks/bm_aimet.py --nets cifar_vgg --name aimet_cifar_vgg
    .venv-aimet/bin/python benchmarks/bm_aimet.py --merge resnet20=aimet_resnet20 cifar_vgg=aimet_cifar_vgg

For each reference net (``resnet20``, ``cifar_vgg``) and target 0.5 and 0.3, with
``aimet_torch.compress.ModelCompressor.compress_model`` and ``CostMetric.mac``, no fine-tuning:

* ``spatial SVD, greedy``: ``SpatialSvdParameters`` auto mode, ``GreedySelectionParameters(target_comp_ratio=b)``;
  AIMET's eval callback is top-1 accuracy on the 2,000-image probe (the same seed-0 draw of the
  train split as ``bm_probe_search.py``). AIMET selects every non-depthwise Conv2d.
* ``weight SVD, greedy``: ``WeightSvdParameters`` auto mode, ``RankSelectScheme.greedy``, same
  (AIMET selects every non-depthwise Conv2d and every Linear).
* ``spatial SVD, uniform ratio (data-free)``: manual mode, one per-layer compression ratio for every
  Conv2d the greedy mode would select; the ratio is the largest of 0.05, 0.06, ..., 0.99 whose
  fvcore FLOPs ratio is at most the budget (no data is used to choose it); where that is not the
  budget itself, also the run with every layer at the budget (AIMET's natural setting, a little over in fvcore).

The eval table of a greedy run does not depend on the target, so the 0.3 run reuses the table
AIMET pickled during the 0.5 run (``saved_eval_scores_dict``, AIMET's own option for this); its
time is reported separately and added to every budget's ``wall s``.

Each compressed model: fvcore FLOPs ratio (``autodac.cost.count_flops`` at 1x1x28x28, the budget
autodac is held to), AIMET's own MAC ratio, test accuracy on all 10,000 test images, probe
accuracy, wall time; then the same with BatchNorm statistics re-estimated on a copy
(``autodac.probes.reestimate_batchnorm`` on ``probe_x[0::2]``, the 1,000 images autodac's own
re-estimation fits on; and on the whole probe) -- AIMET does not do this, it is our strengthening.

Writes ``benchmarks/results/aimet.md`` and ``.json`` (``aimet_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from autodac.cost import count_flops  # noqa: E402
from autodac.probes import reestimate_batchnorm  # noqa: E402

try:
    from common import NETS, RESULTS, load_data, load_net, log, set_threads, test_accuracy, weights_info, write_results
except ImportError:  # run as `python -m benchmarks.bm_aimet`
    from benchmarks.common import NETS, RESULTS, load_data, load_net, log, set_threads, test_accuracy, weights_info, write_results

import aimet_torch  # noqa: E402
from aimet_torch.common.defs import CompressionScheme, CostMetric, GreedySelectionParameters, RankSelectScheme  # noqa: E402
from aimet_torch.compress import ModelCompressor  # noqa: E402
from aimet_torch.defs import ModuleCompRatioPair, SpatialSvdParameters, WeightSvdParameters  # noqa: E402

DEFAULT_BUDGETS = (0.5, 0.3)
UNIFORM_GRID = tuple(round(0.01 * i, 2) for i in range(5, 100))
NOTES = Path(__file__).resolve().parent / "aimet" / "notes.md"
EVAL_DICT = "greedy_selection_eval_scores_dict.pkl"  # AIMET writes ./data/<this> during a greedy run

for area in ("Svd", "CompRatioSelect", "ChannelPruning", "LayerDatabase", "Winnow", "Utils", "Quant"):
    logging.getLogger(area).setLevel(logging.WARNING)


class ProbeEval:
    """AIMET's eval callback ``(model, iterations, use_cuda) -> accuracy``: top-1 on the probe; counts calls and time."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y
        self.calls, self.seconds = 0, 0.0

    def __call__(self, model, iterations=None, use_cuda=False) -> float:
        start = time.perf_counter()
        accuracy = test_accuracy(model, self.x, self.y)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return accuracy


def no_data(model, iterations=None, use_cuda=False) -> float:
    """The eval callback of the data-free (manual, uniform) runs: AIMET calls it for its stats only."""
    return 0.0


def compressible(model: torch.nn.Module, linear: bool) -> list[torch.nn.Module]:
    """What AIMET's layer selectors pick: non-depthwise Conv2d (and Linear for weight SVD)."""
    kinds = (torch.nn.Conv2d, torch.nn.Linear) if linear else (torch.nn.Conv2d,)
    return [m for m in model.modules() if isinstance(m, kinds) and getattr(m, "groups", 1) == 1]


def per_layer(stats) -> dict[str, float | None]:
    return {s.name: (None if s.compression_ratio is None else float(s.compression_ratio)) for s in stats.per_layer_stats}


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.tables: dict[str, dict] = {}
        self.errors: list[str] = []
        self.checkpoints: list[str] = []
        self.parts: list[str] = []  # with --merge: where each net's rows were measured

    def measure(self, net, budget, method, selection, model, original, flops0, seconds, aimet_mac=None, table_s=None,
                detail="", layers=None):
        """One summary row: fvcore ratio, AIMET's ratio, test/probe accuracy without and with BN re-estimation."""
        x1 = self.test_x[:1]
        ratio = count_flops(model, (x1,)).total / flops0
        test = test_accuracy(model, self.test_x, self.test_y)
        probe = test_accuracy(model, self.probe_x, self.probe_y)
        half = reestimate_batchnorm(copy.deepcopy(model), self.probe_x[0::2])
        full = reestimate_batchnorm(copy.deepcopy(model), self.probe_x)
        test_half = test_accuracy(half, self.test_x, self.test_y)
        test_full = test_accuracy(full, self.test_x, self.test_y)
        row = {
            "net": net, "budget": budget, "method": method, "selection": selection,
            "FLOPs ratio (fvcore)": ratio, "<= budget": ratio <= budget + 1e-12, "AIMET MAC ratio": aimet_mac,
            "test acc (%) no BN": 100 * test, "test acc (%) BN re-est.": 100 * test_half,
            "test acc (%) BN re-est. (whole probe)": 100 * test_full, "probe acc (%)": 100 * probe,
            "wall s": seconds, "eval table s": table_s, "detail": detail,
        }
        if layers is not None:
            row["per-layer comp ratios"] = layers
        self.rows.append(row)
        log(f"  {net} {budget} {method} [{selection}]: fvcore ratio {ratio:.4f} (AIMET {aimet_mac}), test {test:.2%} "
            f"/ BN {test_half:.2%} / BN whole probe {test_full:.2%}, probe {probe:.2%}, {seconds:.1f} s {detail}")
        self.save()
        return row

    def load(self, net: str, name: str) -> None:
        """Take ``net``'s rows, eval tables, errors and checkpoint from ``benchmarks/results/<name>.json`` (``--merge``)."""
        data = json.loads((RESULTS / f"{name}.json").read_text())
        sections = data["rows"]
        layers = {(r["net"], r["budget"], r["method"], r["selection"]): r["per-layer comp ratios (None: not compressed)"]
                  for r in sections.get("Per-layer compression ratios", [])}
        have = {(r["net"], r["budget"], r["method"], r["selection"]) for r in self.rows}
        taken = []
        for row in sections["Results"]:
            key = (row["net"], row["budget"], row["method"], row["selection"])
            if row["net"] != net or key in have:  # a net's original row may be in several files: the first one counts
                continue
            if key in layers:
                row["per-layer comp ratios"] = json.loads(layers[key])
            self.rows.append(row)
            taken.append(row["budget"] if row["method"] == "original" else f"{row['method']} {row['selection']} {row['budget']}")
        self.tables.update({k: v for k, v in data.get("greedy eval tables", {}).items() if k.startswith(net + " ")})
        self.errors += [e for e in data.get("errors", []) if e.startswith(net + " ") and e not in self.errors]
        self.checkpoints += [line for line in data["header"].splitlines()
                             if line.startswith(f"- {net}: ") and line not in self.checkpoints]
        earlier = [line for line in data["header"].splitlines() if line.startswith(f"- {net} (")]
        if earlier:  # NAME is itself a merge: keep where its rows were measured
            self.parts += [line for line in earlier if line not in self.parts]
            return
        meta = data["meta"]
        self.parts.append(f"- {net} ({'; '.join(map(str, taken))}): `{meta['command']}`, {meta['date']}, {meta['machine']}, "
                          f"{meta['threads']} thread(s)")
        self.versions = data.get("versions", self.versions)

    def save(self):
        summary = [{k: v for k, v in r.items() if k != "per-layer comp ratios"} for r in self.rows]
        layers = [{"net": r["net"], "budget": r["budget"], "method": r["method"], "selection": r["selection"],
                   "per-layer comp ratios (None: not compressed)": json.dumps(r.get("per-layer comp ratios"))}
                  for r in self.rows if r.get("per-layer comp ratios") is not None]
        sections = {"Results": summary, "autodac beside AIMET": self.comparison(), "Per-layer compression ratios": layers}
        header = self.header()
        path = write_results(self.args.name, sections, header)
        data = json.loads(path.with_suffix(".json").read_text())
        data["greedy eval tables"] = self.tables  # {run: {layer: {comp ratio: probe accuracy}}}
        data["errors"] = self.errors
        data["versions"] = self.versions
        path.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        return path

    def comparison(self) -> list[dict]:
        """autodac's probe-search figures (benchmarks/results/probe_search.json) beside AIMET's own greedy runs."""
        source = RESULTS / "probe_search.json"
        if not source.exists():
            return []
        summary = json.loads(source.read_text())["rows"]["Summary: test accuracy without / with BatchNorm re-estimation"]
        out = []
        for row in self.rows:
            if row["budget"] == 1.0:
                continue
            if row["method"] == "spatial SVD" and row["selection"].startswith("greedy"):
                key = "AIMET spatial SVD greedy"
            elif row["method"] == "weight SVD" and row["selection"].startswith("greedy"):
                key = "AIMET weight SVD greedy"
            elif row["method"] == "spatial SVD":
                key = f"AIMET spatial SVD uniform ({row['selection']})"
            else:
                key = f"AIMET {row['method']} {row['selection']}"
            out.append({"net": row["net"], "budget": row["budget"], "variant": key,
                        "acc (%) no BN": row["test acc (%) no BN"], "acc (%) BN": row["test acc (%) BN re-est."],
                        "FLOPs ratio": row["FLOPs ratio (fvcore)"], "source": "this run"})
        for entry in summary:
            if entry["variant"].startswith("autodac allocation + Optuna") or entry["variant"].startswith("AIMET-style"):
                if entry["net"] in {r["net"] for r in self.rows} and entry["budget"] in {r["budget"] for r in self.rows}:
                    out.append({"net": entry["net"], "budget": entry["budget"], "variant": entry["variant"],
                                "acc (%) no BN": entry["acc (%) no BN"], "acc (%) BN": entry["acc (%) BN"],
                                "FLOPs ratio": entry["ratio no BN"], "source": "probe_search.json"})
        out.sort(key=lambda r: (r["net"] != "resnet20", -r["budget"], r["source"] != "probe_search.json", r["variant"]))
        return out

    def header(self) -> str:
        a = self.args
        lines = [
            f"AIMET (aimet-torch {aimet_torch.__version__}) run through its own compression API "
            "(`aimet_torch.compress.ModelCompressor.compress_model`, `CostMetric.mac`), side by side with autodac's "
            "figures. No fine-tuning anywhere.",
            "",
            f"Probe: {len(self.probe_y):,} Fashion-MNIST train images (seed-0 random draw, as `bm_probe_search.py`); "
            f"AIMET's greedy eval callback is top-1 accuracy on it. Test accuracy on "
            f"{'the first 1,000 (--quick)' if a.quick else f'all {len(self.test_y):,}'} test images. "
            f"Greedy: `num_comp_ratio_candidates={a.candidates}` (AIMET's default is 10: candidates 0.1..0.9), "
            "`use_monotonic_fit=False`, no modules ignored. Uniform: manual mode, the same ratio for every Conv2d, the "
            "largest of 0.05, 0.06..0.99 whose fvcore ratio is <= the budget (data-free), and where that differs every "
            "layer at the budget itself.",
            "",
            "`FLOPs ratio (fvcore)`: `autodac.cost.count_flops` at 1x1x28x28 of the compressed model over the "
            "original's (the budget autodac is held to; it also counts BatchNorm, pooling, the classifier and the "
            "additions, so it is a little above AIMET's conv/linear-only MAC ratio). `AIMET MAC ratio`: AIMET's "
            "`CompressionStats.mac_compression_ratio`. `BN re-est.`: a copy's BatchNorm statistics re-estimated "
            "with `autodac.probes.reestimate_batchnorm` on `probe_x[0::2]` (1,000 images; autodac's own "
            "re-estimation fits on the same half), and on the whole probe in the next column; AIMET does not do "
            "this. `wall s`: the `compress_model` call(s) (including AIMET's final probe evaluation of the original "
            "and compressed model) plus, for greedy runs, the eval table (built once per net and scheme, in the 0.5 "
            "run, and reused by the 0.3 run through `saved_eval_scores_dict`); `eval table s` is that table's share. "
            "For uniform rows `wall s` is the grid of manual runs. Accuracy evaluation outside AIMET is excluded.",
            "",
            "Environment (`benchmarks/aimet/requirements.txt`, made by `benchmarks/aimet/setup.sh`): "
            + ", ".join(f"{k} {v}" for k, v in self.versions.items()) + ".",
            "",
            "Checkpoints:",
            *self.checkpoints,
        ]
        if NOTES.exists():  # observations on the runs, written by whoever ran them
            lines += ["", NOTES.read_text().strip()]
        if self.parts:
            lines += ["", "Measured in one process per net, merged with `--merge`:", *self.parts]
        if self.errors:
            lines += ["", "Errors:", *[f"- {e}" for e in self.errors]]
        lines += ["", "Machine:"]
        return "\n".join(lines)

    # ------------------------------------------------------------------ the runs

    def greedy(self, net, model, flops0, budget, scheme, workdir, table_cache):
        """One AIMET greedy run; the eval table is pickled by AIMET and reused for the next budget."""
        name = "spatial SVD" if scheme is CompressionScheme.spatial_svd else "weight SVD"
        key = f"{net} {name}"
        saved = table_cache.get(key)
        greedy = GreedySelectionParameters(target_comp_ratio=budget, num_comp_ratio_candidates=self.args.candidates,
                                           saved_eval_scores_dict=saved[0] if saved else None)
        work = copy.deepcopy(model)
        if scheme is CompressionScheme.spatial_svd:
            params = SpatialSvdParameters(SpatialSvdParameters.Mode.auto, SpatialSvdParameters.AutoModeParams(greedy))
        else:
            params = WeightSvdParameters(WeightSvdParameters.Mode.auto,
                                         WeightSvdParameters.AutoModeParams(RankSelectScheme.greedy, greedy))
        evaluate = ProbeEval(self.eval_x, self.eval_y)
        start = time.perf_counter()
        try:
            compressed, stats = ModelCompressor.compress_model(
                work, evaluate, None, tuple(self.test_x[:1].shape), scheme, CostMetric.mac, params)
        except Exception as error:  # record AIMET's failure and go on
            message = f"{net} {budget} {name} greedy: {type(error).__name__}: {error}"
            log("  FAILED " + message)
            self.errors.append(message)
            self.save()
            return
        seconds = time.perf_counter() - start
        if saved is None:
            table_s = evaluate.seconds - 2 * evaluate.seconds / max(evaluate.calls, 1)  # all but AIMET's 2 final evals
            pickle_path = workdir / f"{net}_{scheme.name}_{EVAL_DICT}"
            shutil.copy(workdir / "data" / EVAL_DICT, pickle_path)
            table_cache[key] = (str(pickle_path), table_s, evaluate.calls - 2)
            table = stats.compression_ratio_selection_stats.eval_scores_dictionary
            self.tables[key] = {layer: {str(r): s for r, s in scores.items()} for layer, scores in table.items()}
            wall = seconds
            reuse = f"{evaluate.calls - 2} probe evals in the eval table"
        else:
            table_s = saved[1]
            wall = seconds + table_s
            reuse = f"eval table of the first budget's run reused ({saved[2]} probe evals); this call {seconds:.1f} s"
        ratios = per_layer(stats)
        kept = sum(r is None for r in ratios.values())
        detail = (f"{reuse}; {len(ratios) - kept} of {len(ratios)} layers compressed; AIMET's probe acc "
                  f"{float(stats.compressed_model_accuracy):.4f}")
        self.measure(net, budget, name, "greedy, probe", compressed, model, flops0, wall,
                     aimet_mac=float(stats.mac_compression_ratio), table_s=table_s, detail=detail, layers=ratios)

    def uniform(self, net, model, flops0, budgets):
        """Spatial SVD, one ratio for every Conv2d (manual mode): the largest grid ratio whose fvcore ratio is <= b."""
        x1 = self.test_x[:1]
        start = time.perf_counter()
        grid = {}
        for c in UNIFORM_GRID:
            work = copy.deepcopy(model)
            pairs = [ModuleCompRatioPair(m, c) for m in compressible(work, linear=False)]
            params = SpatialSvdParameters(SpatialSvdParameters.Mode.manual, SpatialSvdParameters.ManualModeParams(pairs))
            try:
                compressed, stats = ModelCompressor.compress_model(
                    work, no_data, None, tuple(x1.shape), CompressionScheme.spatial_svd, CostMetric.mac, params)
            except Exception as error:
                message = f"{net} spatial SVD uniform ratio {c}: {type(error).__name__}: {error}"
                log("  FAILED " + message)
                self.errors.append(message)
                continue
            grid[c] = (compressed, count_flops(compressed, (x1,)).total / flops0, float(stats.mac_compression_ratio),
                       per_layer(stats))
        seconds = time.perf_counter() - start
        log(f"  {net} uniform spatial SVD grid ({seconds:.1f} s): "
            + ", ".join(f"{c}->{v[1]:.3f}" for c, v in grid.items()))
        for budget in budgets:
            fitting = [c for c, v in grid.items() if v[1] <= budget + 1e-12]
            if not fitting:
                self.errors.append(f"{net} {budget} spatial SVD uniform: no grid ratio meets the budget")
                continue
            picks = [(max(fitting), "largest grid ratio with fvcore ratio <= budget")]
            if round(budget, 2) in grid and round(budget, 2) != picks[0][0]:
                picks.append((round(budget, 2), "per-layer ratio = budget (may exceed it in fvcore FLOPs)"))
            for c, why in picks:
                compressed, _, mac, ratios = grid[c]
                self.measure(net, budget, "spatial SVD", f"uniform {c}, data-free", compressed, model, flops0, seconds,
                             aimet_mac=mac, detail=f"per-layer ratio {c} on all {len(ratios)} Conv2d: {why}",
                             layers=ratios)

    def run(self):
        a = self.args
        probe_x, probe_y, test_x, test_y = load_data(a.probe_size, seed=0)
        if a.quick:
            test_x, test_y = test_x[:1000], test_y[:1000]
        self.probe_x, self.probe_y, self.test_x, self.test_y = probe_x, probe_y, test_x, test_y
        self.eval_x, self.eval_y = probe_x, probe_y
        workdir = Path(tempfile.mkdtemp(prefix="bm_aimet_"))
        os.chdir(workdir)  # AIMET pickles its eval tables and choices into ./data
        log(f"AIMET benchmark: aimet_torch {aimet_torch.__version__}, torch {torch.__version__}, nets {a.nets}, "
            f"budgets {a.budgets}, probe {len(probe_y)}, test {len(test_y)}, candidates {a.candidates}, "
            f"{torch.get_num_threads()} thread(s), work dir {workdir}")
        for net in a.nets:
            model = load_net(net).eval()
            self.checkpoints.append(f"- {net}: {weights_info(net)}")
            flops0 = count_flops(model, (test_x[:1],)).total
            self.measure(net, 1.0, "original", "", model, model, flops0, 0.0, detail=f"fvcore FLOPs {flops0:,}")
            if "uniform" in a.runs:
                self.uniform(net, model, flops0, a.budgets)
            cache: dict = {}
            for scheme in (CompressionScheme.spatial_svd, CompressionScheme.weight_svd):
                if (scheme is CompressionScheme.spatial_svd and "spatial" not in a.runs) or (
                        scheme is CompressionScheme.weight_svd and "weight" not in a.runs):
                    continue
                for budget in a.budgets:
                    self.greedy(net, model, flops0, budget, scheme, workdir, cache)
        path = self.save()
        log(f"wrote {path} and {path.with_suffix('.json')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: resnet20, 0.5, 200-image probe, 1,000 test "
                                                             "images, 3 ratio candidates")
    parser.add_argument("--nets", nargs="+", choices=NETS, default=None)
    parser.add_argument("--budgets", nargs="+", type=float, default=None)
    parser.add_argument("--runs", nargs="+", choices=("uniform", "spatial", "weight"), default=("uniform", "spatial", "weight"))
    parser.add_argument("--candidates", type=int, default=None, help="AIMET's num_comp_ratio_candidates (default 10)")
    parser.add_argument("--probe-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--name", default=None, help="results file name (default aimet, or aimet_quick)")
    parser.add_argument("--merge", nargs="+", metavar="NET=NAME", default=None,
                        help="write one results file from per-net runs: each NET's rows from benchmarks/results/NAME.json")
    args = parser.parse_args()
    args.nets = args.nets or (["resnet20"] if args.quick else list(NETS))
    args.budgets = args.budgets or ([0.5] if args.quick else list(DEFAULT_BUDGETS))
    args.candidates = args.candidates or (3 if args.quick else 10)
    args.probe_size = args.probe_size or (200 if args.quick else 2000)
    args.name = args.name or ("aimet_quick" if args.quick else "aimet")
    set_threads(args.threads)
    bench = Bench(args)
    import torchvision
    bench.versions = {"aimet-torch": aimet_torch.__version__, "torch": torch.__version__,
                      "torchvision": torchvision.__version__}
    for package in ("fvcore", "numpy", "optuna"):
        try:
            from importlib.metadata import version
            bench.versions[package] = version(package)
        except Exception:
            pass
    if args.merge:
        for item in args.merge:
            net, name = item.split("=", 1)
            bench.load(net, name)
        bench.probe_y, bench.test_y = range(args.probe_size), range(10_000)
        path = bench.save()
        log(f"merged {args.merge} into {path} and {path.with_suffix('.json')}")
        return
    bench.run()


if __name__ == "__main__":
    main()
