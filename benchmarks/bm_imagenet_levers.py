"""Levers tried on EfficientNet-Lite0 at 224 px and left out of the library, each measured on the same test crops.

    bash benchmarks/imagenet/setup.sh          # once: the model and the photographs
    python benchmarks/bm_imagenet_levers.py    # 35 minutes on one thread beside another benchmark
    python benchmarks/bm_imagenet_levers.py --levers fit --out imagenet_levers_fit   # one lever alone

The inputs are ``bm_imagenet.py``'s (same split, same seeds): 1,024 probe crops, 1,000 test crops
from photographs that share no source with the probe's; quality is top-1 agreement with the
original on the test crops.

1. **Width projections re-fitted in execution order.** ``sequential_fit`` re-fits low-rank layers
   to the decomposed model's own inputs; width choices are skipped ("already re-fitted to the
   probe"). Is that a loss? The probe plan at 0.9 (``results/imagenet_probe.json``) is rebuilt by
   ``autodac.apply`` on the probe crops, then each narrowed projection, in execution order, is
   re-fitted by least squares (weight and bias) to reproduce the original projection's output
   from the narrowed model's own inputs, on the 256 crops the library fits on (its calibration
   half). A second variant also asks the projection to absorb the drift of the block's skip
   input (``x + project(h)`` blocks: the target is the original output plus the skip's change,
   through the BatchNorm after the projection).
2. **Which of two competing width units to plan.** ``_blocks.15._project_conv`` is the consumer
   of its block's hidden width (1152 channels) and the producer of ``_conv_head``'s input (320);
   a module belongs to one unit, and the one with more FLOPs behind it (the head's) wins. Planning
   the hidden width instead (``exclude=["_conv_head"]``), data-free at 0.9 and 0.7.
3. **More crops, or more ridge, for the width re-fit.** Each narrowed projection is re-fitted by
   least squares on the input moments of the first ``FIT_EXAMPLES`` (256) calibration crops,
   with a ridge of ``1e-6`` of the mean input energy. Do moments from all 512 calibration crops,
   or a ridge of ``1e-3`` to ``1e-1`` (pulling the fit toward the original columns), carry
   better to the test photos? The probe plans at 0.9 and 0.7 are rebuilt by ``autodac.apply``
   with the same kept channels and each variant's fit.

4. **The classifier re-fitted to the original's logits.** The probe plan at 0.9 is rebuilt and its
   last layer (``_fc``, 1280 -> 1000) re-fitted by ridge least squares from the planned model's
   features to the original's logits on the calibration half (512 crops), the ridge pulling
   toward the layer's own weights (``lambda`` times the mean feature energy). It costs no FLOPs.
   Beside it, where the plan's disagreements lie: the test crops by the original's margin
   between its top two softmax probabilities.

Writes ``benchmarks/results/imagenet_levers.md`` and ``.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bm_imagenet as bench  # noqa: E402  (same inputs, same seeds)
import imagenet_assets as assets  # noqa: E402

import autodac  # noqa: E402
import autodac.api  # noqa: E402
import autodac.probes  # noqa: E402
from autodac.factorize.channels import refit_kept  # noqa: E402
from autodac.probes import FIT_EXAMPLES, _input_of  # noqa: E402
from autodac.sequential import execution_order  # noqa: E402


def agreement(model: torch.nn.Module, test: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement with the original, in %, on every test crop and on the confident ones."""
    row = bench.quality("efficientnet_lite0", reference, bench.outputs(model, test))
    return row["agree (%)"], row["agree conf (%)"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> one row per position, ``C`` columns."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).T


def _skip_drift_scale(original: torch.nn.Module, name: str) -> tuple[str, torch.Tensor] | None:
    """For a projection whose block adds its input back after the BatchNorm: the block's name and ``1 / BN scale``."""
    block_name = name.rpartition(".")[0]
    block = original.get_submodule(block_name)
    args = getattr(block, "_block_args", None)
    if args is None or not (block.id_skip and args.stride == 1 and args.input_filters == args.output_filters):  # as its forward decides
        return None
    bn = block._bn2
    return block_name, (torch.sqrt(bn.running_var + bn.eps) / bn.weight).double()


@torch.no_grad()
def refit_widths_in_order(original, narrowed, names, inputs, with_skip: bool, batch: int = 32, max_rows: int = 4096):
    """``narrowed`` with each width consumer of ``names`` re-fitted, in execution order, to its own inputs (in place)."""
    generator = torch.Generator().manual_seed(0)
    for name in names:
        dense, layer = original.get_submodule(name), narrowed.get_submodule(name)
        skip = _skip_drift_scale(original, name) if with_skip else None
        cross = gram = extra = None
        rows = 0
        for start in range(0, len(inputs), batch):
            x = inputs[start:start + batch]
            seen, now = _rows(_input_of(original, name, x)), _rows(_input_of(narrowed, name, x))
            keep = torch.randperm(seen.shape[0], generator=generator)[:max_rows]
            ones = torch.ones(len(keep), 1)
            z_seen = torch.cat([seen[keep], ones], 1).double()
            z_now = torch.cat([now[keep], ones], 1).double()
            cross = z_seen.T @ z_now + (0 if cross is None else cross)
            gram = z_now.T @ z_now + (0 if gram is None else gram)
            if skip is not None:  # the skip's change, in the projection's output units
                drift = (_rows(_input_of(original, skip[0], x)) - _rows(_input_of(narrowed, skip[0], x)))[keep].double() * skip[1]
                extra = drift.T @ z_now + (0 if extra is None else extra)
            rows += len(keep)
        weight = dense.weight.detach().double().reshape(dense.weight.shape[0], -1)
        target = torch.cat([weight, torch.zeros(weight.shape[0], 1, dtype=weight.dtype)], 1) @ cross / rows
        if extra is not None:
            target = target + extra / rows
        gram = gram / rows
        own_bias = dense.bias.detach().double() if dense.bias is not None else 0
        current = torch.cat([layer.weight.detach().double().reshape(weight.shape[0], -1), (layer.bias.detach().double() - own_bias)[:, None]], 1)
        ridge = torch.diagonal(gram).mean() * 1e-6  # as the library's width fit: toward the current fit where inputs barely move
        solved = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), (target + ridge * current).T).T
        layer.weight.copy_(solved[:, :-1].reshape(layer.weight.shape))
        layer.bias.copy_(solved[:, -1] + own_bias)
    return narrowed


HEAD_RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MARGIN_EDGES = (0.0, 0.05, 0.1, 0.2, 0.4, 1.01)


def classifier_inputs(model: torch.nn.Module, x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """What ``model._fc`` receives on ``x``."""
    seen = []
    handle = model._fc.register_forward_hook(lambda module, args, output: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch):
                model(x[start:start + batch])
    finally:
        handle.remove()
    return torch.cat(seen)


def refit_classifier(layer: torch.nn.Linear, features: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """``[W b]`` minimising ``|f W^T + b - target|^2 + ridge * mean(diag G) * |[W b] - [W0 b0]|^2`` (``G``: the feature Gram)."""
    z = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], 1)
    gram, cross = z.T @ z / len(z), z.T @ target.double() / len(z)
    own = torch.cat([layer.weight.detach().double(), layer.bias.detach().double()[:, None]], 1)
    level = torch.diagonal(gram).mean() * ridge
    return torch.linalg.solve(gram + level * torch.eye(len(gram), dtype=gram.dtype), cross + level * own.T).T


def with_classifier(features: torch.Tensor, solved: torch.Tensor) -> torch.Tensor:
    return (torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], 1) @ solved.T).float()


FIT_VARIANTS = ((FIT_EXAMPLES, 1e-6), (512, 1e-6), (FIT_EXAMPLES, 1e-3), (FIT_EXAMPLES, 1e-2), (FIT_EXAMPLES, 1e-1))


@contextlib.contextmanager
def width_fit(examples: int, damping: float):
    """Within the block, ``autodac.apply`` re-fits widths on the first ``examples`` calibration inputs with ``damping``."""
    saved = autodac.probes.FIT_EXAMPLES, autodac.api.refit_kept
    autodac.probes.FIT_EXAMPLES = examples
    autodac.api.refit_kept = lambda weight, moments, kept: refit_kept(weight, moments, kept, damping)
    try:
        yield
    finally:
        autodac.probes.FIT_EXAMPLES, autodac.api.refit_kept = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plan-budget", type=float, default=0.9, help="the probe row of results/imagenet_probe.json to rebuild")
    parser.add_argument("--data-free-budgets", nargs="+", type=float, default=[0.9, 0.7])
    parser.add_argument("--fit-budgets", nargs="+", type=float, default=[0.9, 0.7], help="probe rows rebuilt with each width-fit variant")
    parser.add_argument("--levers", nargs="+", choices=["order", "units", "fit", "head"], default=["order", "units", "fit", "head"])
    parser.add_argument("--out", default="imagenet_levers", help="results name under benchmarks/results")
    args = parser.parse_args()
    bench.set_threads(args.threads)
    from common import write_results

    probe_files, test_files = assets.split_photos(assets.photo_files(), assets.SPLIT_SEED)
    probe = assets.random_crops(probe_files, 1024, bench.PROBE_SEED)
    test = assets.random_crops(test_files, 1000, bench.TEST_SEED)
    example = assets.random_crops(probe_files, 1, bench.EXAMPLE_SEED)
    model = assets.efficientnet_lite0().eval()
    reference = bench.outputs(model, test)
    bench.log("inputs drawn")

    refits = []
    rows = json.loads((HERE / "results" / "imagenet_probe.json").read_text())["rows"]
    data = [probe[i:i + 64] for i in range(0, len(probe), 64)]
    found = [r for r in rows if r["mode"] == "probe" and r["budget"] == args.plan_budget and "plan" in r]
    if found and "order" in args.levers:
        plan = autodac.Plan.from_dict(found[0]["plan"])
        built = autodac.apply(model, plan, data=data).eval()
        widths = [n for n, c in plan.factorized.items() if c.method == "width"]
        order, _ = execution_order(model, widths, example)
        fit = probe[0::2][:FIT_EXAMPLES]  # the library's calibration half, first FIT_EXAMPLES
        agree, conf = agreement(built, test, reference)
        refits.append({"plan": f"probe {args.plan_budget}", "fit": "as planned (autodac.apply)", "agree (%)": agree, "agree conf (%)": conf, "s": 0.0})
        bench.log(f"as planned: {agree:.1f}%")
        for with_skip in (False, True):
            start = time.perf_counter()
            refitted = refit_widths_in_order(model, autodac.apply(model, plan, data=data).eval(), order, fit, with_skip)
            agree, conf = agreement(refitted, test, reference)
            label = "re-fitted in order" + (", skip drift absorbed" if with_skip else "")
            refits.append({"plan": f"probe {args.plan_budget}", "fit": label, "agree (%)": agree, "agree conf (%)": conf,
                           "s": time.perf_counter() - start})
            bench.log(f"{label}: {agree:.1f}%")

    units = []
    for budget in args.data_free_budgets if "units" in args.levers else []:
        for exclude, label in (([], "head input (320), the default"), (["_conv_head"], "block 15 hidden (1152)")):
            start = time.perf_counter()
            result = autodac.optimize(model, budget, example_inputs=example, exclude=exclude, progress=False)
            agree, conf = agreement(result.model, test, reference)
            units.append({"budget": budget, "unit planned": label, "FLOPs ratio": result.flops_ratio,
                          "agree (%)": agree, "agree conf (%)": conf, "s": time.perf_counter() - start})
            bench.log(f"data-free {budget}, {label}: {agree:.1f}%")

    header = (
        "Levers tried on EfficientNet-Lite0 (224 px, no training) and left out of the library; see "
        "`benchmarks/bm_imagenet_levers.py` for what each does. Inputs as `bm_imagenet.py`'s: 1,000 test crops from "
        "photographs that share no source with the 1,024 probe crops'; `agree` is top-1 agreement with the original, "
        "`conf` the same on the test crops the original is at least 0.7 sure of."
    )
    fits = []
    for budget in args.fit_budgets if "fit" in args.levers else []:
        plan = autodac.Plan.from_dict(next(r for r in rows if r["mode"] == "probe" and r["budget"] == budget and "plan" in r)["plan"])
        for examples, damping in FIT_VARIANTS:
            start = time.perf_counter()
            with width_fit(examples, damping):
                built = autodac.apply(model, plan, data=data).eval()
            agree, conf = agreement(built, test, reference)
            fits.append({"plan": f"probe {budget}", "fit crops": examples, "ridge": damping, "agree (%)": agree, "agree conf (%)": conf,
                         "s": time.perf_counter() - start})
            bench.log(f"probe {budget}, fit on {examples} crops, ridge {damping:g}: {agree:.1f}%")

    heads, margins = [], []
    if found and "head" in args.levers:
        plan = autodac.Plan.from_dict(found[0]["plan"])
        built = autodac.apply(model, plan, data=data).eval()
        calibration, held_out = probe[0::2], probe[1::2]  # the library's halves
        probe_reference = bench.outputs(model, probe)
        planned_test = bench.outputs(built, test)
        agree, conf = agreement(built, test, reference)
        held = float((bench.outputs(built, held_out).argmax(1) == probe_reference[1::2].argmax(1)).float().mean()) * 100
        heads.append({"plan": f"probe {args.plan_budget}", "classifier": "as planned", "agree (%)": agree, "agree conf (%)": conf,
                      "probe held-out agree (%)": held})
        features = {name: classifier_inputs(built, x) for name, x in (("calibration", calibration), ("held out", held_out), ("test", test))}
        for ridge in HEAD_RIDGES:
            solved = refit_classifier(built._fc, features["calibration"], probe_reference[0::2], ridge)
            row = bench.quality("efficientnet_lite0", reference, with_classifier(features["test"], solved))
            held = float((with_classifier(features["held out"], solved).argmax(1) == probe_reference[1::2].argmax(1)).float().mean()) * 100
            heads.append({"plan": f"probe {args.plan_budget}", "classifier": f"re-fitted, ridge {ridge:g}", "agree (%)": row["agree (%)"],
                          "agree conf (%)": row["agree conf (%)"], "probe held-out agree (%)": held})
            bench.log(f"classifier re-fitted, ridge {ridge:g}: {row['agree (%)']:.1f}% (probe held-out {held:.1f}%)")
        top2 = reference.softmax(1).topk(2, 1).values
        margin, differs = top2[:, 0] - top2[:, 1], planned_test.argmax(1) != reference.argmax(1)
        for low, high in zip(MARGIN_EDGES, MARGIN_EDGES[1:]):
            inside = (margin >= low) & (margin < high)
            margins.append({"original's top-2 margin": f"[{low:g}, {min(high, 1):g}{']' if high > 1 else ')'}", "test crops": int(inside.sum()),
                            "disagreements": int((inside & differs).sum())})

    titles = {"order": ("width projections re-fitted in execution order", refits), "units": ("competing width units, data-free", units),
              "fit": ("width re-fit: fit crops and ridge (kept channels as planned)", fits),
              "head": ("the classifier re-fitted to the original's logits (no FLOPs)", heads)}
    sections = dict(titles[lever] for lever in args.levers)
    if margins:
        sections[f"where the probe plan at {args.plan_budget} disagrees: test crops by the original's top-2 margin"] = margins
    bench.log(f"wrote {write_results(args.out, sections, header)}")


if __name__ == "__main__":
    main()
