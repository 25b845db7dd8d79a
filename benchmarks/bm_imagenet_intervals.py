"""How much each committed EfficientNet-Lite0 figure owes to which test photographs: 95% intervals by photograph.

``bm_imagenet.py`` measures agreement on 1,000 test crops, but they come from 18 photographs:
crops of one photograph agree or disagree together, so the figure's uncertainty is set by the
photographs, not by the crop count. This script rebuilds the plans already committed under
``benchmarks/results/`` (``autodac.apply`` with the same probe batches: the same model ``optimize``
returned, checked here against the committed agreement), and bootstraps whole photographs
(``bm_imagenet.clustered_interval``). It plans nothing: minutes, not hours. Synthetic and
distilled rows are left out (rebuilding them replays the synthesis or the training).

    python benchmarks/bm_imagenet_intervals.py imagenet_probe imagenet_probe_05 imagenet_data_free

writes ``benchmarks/results/imagenet_intervals.md/.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bm_imagenet as bench  # noqa: E402
import imagenet_assets as assets  # noqa: E402


def draws(args: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor, list[str], torch.Tensor]:
    """The probe crops, test crops, each test crop's photograph and the example input, drawn as ``bm_imagenet`` drew them."""
    files = assets.photo_files()
    probe_files, test_files = assets.split_photos(files, args["split_seed"])
    example = assets.random_crops(probe_files, 1, bench.EXAMPLE_SEED)
    if args.get("probe_pool") == "wide":
        probe_files = sorted(probe_files + assets.extra_probe_photo_files())
    elif args.get("probe_pool") == "test-photos":
        probe_files = test_files
    probe = assets.random_crops(probe_files, args["probe_crops"], bench.PROBE_SEED) if args["probe_crops"] else None
    drawn: list[Path] = []
    test = assets.random_crops(test_files, args["test_crops"], bench.TEST_SEED, drawn=drawn)
    return probe, test, [assets.photo_source(path) for path in drawn], example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="names of bm_imagenet result files under benchmarks/results (without .json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/imagenet_intervals")
    args = parser.parse_args()
    bench.set_threads(args.threads)
    import autodac

    model = bench.load_model("efficientnet_lite0")
    rows, cache = [], {}
    for name in args.results:
        committed = json.loads((HERE / "results" / f"{name}.json").read_text())
        drawn_with = committed["args"]
        key = json.dumps({k: drawn_with.get(k) for k in ("split_seed", "probe_pool", "probe_crops", "test_crops")}, sort_keys=True)
        if key not in cache:
            start = time.perf_counter()
            probe, test, groups, example = draws(drawn_with)
            cache[key] = (probe, test, groups, bench.outputs(model, test))
            bench.log(f"{name}: inputs drawn and the original run in {time.perf_counter() - start:.0f} s")
        probe, test, groups, original = cache[key]
        for row in committed["rows"]:
            plan_data = row.get("plan")
            if plan_data is None or row["mode"] == "synthetic" or plan_data.get("distilled"):
                continue
            start = time.perf_counter()
            plan = autodac.Plan.from_dict(plan_data)
            data = None
            if row["mode"] == "probe":
                data = [probe[i:i + drawn_with["batch"]] for i in range(0, len(probe), drawn_with["batch"])]
            rebuilt = autodac.apply(model, plan, data)
            measured = bench.quality("efficientnet_lite0", original, bench.outputs(rebuilt, test), groups)
            line = {
                "results": name, "mode": row["mode"], "budget": row["budget"], "committed agree (%)": row["agree (%)"],
                "agree (%)": measured["agree (%)"], "agree 95% interval": measured["agree 95% interval"],
                "agree conf (%)": measured["agree conf (%)"], "rebuild s": time.perf_counter() - start,
            }
            rows.append(line)
            bench.log(f"{name} {row['mode']} {row['budget']}: agree {line['agree (%)']:.1f}% [{line['agree 95% interval']}] "
                      f"(committed {row['agree (%)']:.1f}%)")
    write(Path(args.out), args, rows, len(set(next(iter(cache.values()))[2])))


def write(out: Path, args: argparse.Namespace, rows: list[dict[str, Any]], photographs: int) -> None:
    from common import _machine, _table

    meta = _machine()
    header = (
        "Committed `efficientnet_lite0` plans rebuilt with `autodac.apply` (probe rows with the same probe batches) and measured "
        f"again on the same 1,000 test crops; `agree 95% interval` bootstraps the {photographs} test photographs whole (2,000 "
        "draws, `bm_imagenet.clustered_interval`): how much each figure owes to which photographs the test happened to hold. "
        "`committed agree` is the figure in the results file the plan came from; the rebuilt model must give it again."
    )
    command = "python benchmarks/bm_imagenet_intervals.py " + " ".join(args.results)
    lines = [f"# {out.name}", "", header, "", *(f"- {k}: {v}" for k, v in meta.items()), "", _table(rows), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"name": out.name, "meta": meta, "command": command, "rows": rows}, indent=1))
    bench.log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
