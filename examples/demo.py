"""The README's demo: halve the FLOPs of the shipped Fashion-MNIST ResNet-20, without retraining.

    python examples/demo.py [--budget 0.5] [--model resnet20|cifar_vgg] [--no-probe]

Runs on the slice of Fashion-MNIST shipped in the package (2,000 test images, 1,000 train
images as the probe), so it needs nothing but the package. Prints the per-layer plan, fvcore's
FLOPs ratio, and test accuracy before and after, for the data-free plan and the probe-driven one.
"""

from __future__ import annotations

import argparse
import time

import torch

import autodac
from autodac.datasets import fashion_mnist_slice
from autodac.zoo import pretrained


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", choices=["resnet20", "cifar_vgg"])
    parser.add_argument("--budget", type=float, default=0.5, help="FLOPs budget as a fraction of the original")
    parser.add_argument("--no-probe", action="store_true", help="only the data-free plan")
    args = parser.parse_args()

    model = pretrained(args.model)
    test_x, test_y = fashion_mnist_slice("test")
    probe_x, probe_y = fashion_mnist_slice("train")
    print(f"{args.model}: test accuracy {accuracy(model, test_x, test_y):.2%} on {len(test_y)} shipped test images")

    start = time.perf_counter()
    free = autodac.optimize(model, flops_budget=args.budget, example_inputs=test_x[:1])
    print(f"\n== data-free plan ({time.perf_counter() - start:.1f} s) ==")
    print(free.summary())
    print(f"test accuracy after: {accuracy(free.model, test_x, test_y):.2%}")

    if not args.no_probe:
        start = time.perf_counter()
        probed = autodac.optimize(model, flops_budget=args.budget, data=[(probe_x, probe_y)], seed=0)
        print(f"\n== probe-driven plan, {len(probe_y)} train images ({time.perf_counter() - start:.1f} s) ==")
        print(probed.summary())
        print("probe figures:", {k: round(v, 4) for k, v in probed.metrics.items()})
        print(f"test accuracy after: {accuracy(probed.model, test_x, test_y):.2%}")


if __name__ == "__main__":
    main()
