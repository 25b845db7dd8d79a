"""A model that is not a classifier: an RGB photo denoiser, planned on how far its images move.

    bash benchmarks/imagenet/setup.sh && python benchmarks/bm_dense_outputs.py     # ~10 minutes on 2 cores

Trains a small DnCNN-style denoiser (7 convs, residual: it predicts the noise) on crops of the
probe half of the photographs ``benchmarks/imagenet/setup.sh`` fetches, then plans it at a few
FLOPs budgets with ``autodac.optimize``: data-free, with an unlabelled probe of noisy crops
compared as what the outputs are (images laid out like the input: squared error, reported as
R^2), and with the same probe compared as class scores (a softmax over the three colour
channels at each pixel: what ``output_kind`` read off such outputs before it knew images).
Quality is measured on crops of the test photographs (no source shared with the probe's):
R^2 of the planned model's outputs against the original's, and the PSNR of its denoised
images against the clean crops (the original's own PSNR is the ceiling).

Writes ``benchmarks/results/dense_outputs.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import imagenet_assets as assets  # noqa: E402
from common import log, set_threads, write_results  # noqa: E402

import autodac  # noqa: E402
from autodac.probes import predict, r_squared  # noqa: E402

NOISE = 0.2  # Gaussian noise sigma on the crops' [-1, 1] scale (about 25 of 255 grey levels)


class Denoiser(nn.Module):
    """``x - f(x)``: a stack of 3x3 conv-BN-ReLU layers estimates the noise, which is taken away."""

    def __init__(self, width: int = 32, depth: int = 7) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.noise = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.noise(x)


def noisy(clean: torch.Tensor, seed: int) -> torch.Tensor:
    return clean + NOISE * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))


def psnr(denoised: torch.Tensor, clean: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB on the [-1, 1] scale (peak-to-peak 2)."""
    return float(10 * math.log10(4.0 / float((denoised - clean).pow(2).mean())))


def train(clean: torch.Tensor, steps: int, batch: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = Denoiser()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(clean), (batch,), generator=generator)
        target = clean[index]
        flip = torch.rand(batch, generator=generator) < 0.5
        target = torch.where(flip.reshape(-1, 1, 1, 1), target.flip(3), target)
        x = target + NOISE * torch.randn(target.shape, generator=generator)
        loss = (model(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"train step {step}: loss {loss.item():.5f}")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--train-crops", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--probe-crops", type=int, default=512)
    parser.add_argument("--test-crops", type=int, default=1000)
    parser.add_argument("--size", type=int, default=48, help="crop side in pixels (training, probe and test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="dense_outputs")
    args = parser.parse_args()
    set_threads(args.threads)

    probe_files, test_files = assets.split_photos(assets.photo_files(), assets.SPLIT_SEED)
    crops = dict(size=args.size, scale=(args.size, 4 * args.size))
    train_clean = assets.random_crops(probe_files, args.train_crops, 11, **crops)
    probe = noisy(assets.random_crops(probe_files, args.probe_crops, 12, **crops), 13)  # not the training crops
    test_clean = assets.random_crops(test_files, args.test_crops, 14, **crops)
    test = noisy(test_clean, 15)
    log(f"crops drawn: {len(probe_files)} probe photos, {len(test_files)} test photos")

    start = time.perf_counter()
    model = train(train_clean, args.steps, 32, seed=0)
    train_s = time.perf_counter() - start
    reference = predict(model, test)
    original_psnr, noisy_psnr = psnr(reference, test_clean), psnr(test, test_clean)
    log(f"trained in {train_s:.0f} s: test PSNR {noisy_psnr:.2f} dB noisy -> {original_psnr:.2f} dB denoised")

    modes = {
        "data-free": {},
        "probe, compared as values (auto)": {"data": [probe]},
        "probe, compared as class scores": {"data": [probe], "output_kind": "scores"},
    }
    rows = []
    for budget in args.budgets:
        for mode, kwargs in modes.items():
            start = time.perf_counter()
            result = autodac.optimize(model, budget, example_inputs=probe[:1], progress=False, seed=0, **kwargs)
            seconds = time.perf_counter() - start
            out = predict(result.model, test)
            rows.append({
                "budget": budget, "mode": mode, "FLOPs ratio": result.flops_ratio,
                "probe metric (as reported)": result.metrics.get("probe"),
                "probe metric is": next((n.split(": ", 1)[1].split(" on ")[0] for n in result.plan.notes if n.startswith("probe metric: ")), ""),
                "test R^2 vs original": r_squared(out, reference), "test PSNR (dB)": psnr(out, test_clean),
                "PSNR lost (dB)": original_psnr - psnr(out, test_clean),
                "mean shift": float((out - reference).mean()), "optimize s": seconds,
            })
            log(f"{budget} {mode}: R^2 {rows[-1]['test R^2 vs original']:.4f}, PSNR {rows[-1]['test PSNR (dB)']:.2f} dB, {seconds:.0f} s")

    header = (
        "An RGB photo denoiser (DnCNN-style, 7 convs of 32 channels, residual) trained here for "
        f"{args.steps} steps on {args.train_crops} noisy {args.size}x{args.size} crops of the probe photographs "
        f"(noise sigma {NOISE} on the [-1, 1] scale; {train_s:.0f} s), planned by `autodac.optimize` "
        f"(see `benchmarks/bm_dense_outputs.py`). The probe: {args.probe_crops} other noisy crops of the probe photos, no "
        f"labels. The test: {args.test_crops} noisy crops of the test photos (no source shared). Noisy test PSNR "
        f"{noisy_psnr:.2f} dB; the original denoises them to **{original_psnr:.2f} dB**. `test R^2 vs original`: of the "
        "planned model's outputs against the original's; `mean shift`: their mean difference (a brightness change). "
        "`compared as class scores` is what the probe did before it read image outputs as values: a softmax over "
        "the colour channels at each pixel."
    )
    print(write_results(args.out, rows, header))


if __name__ == "__main__":
    main()
