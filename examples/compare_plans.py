"""Three ways to halve the ResNet-20's FLOPs, side by side: DAC only, all methods, all methods + a probe.

    python examples/compare_plans.py [--budget 0.5] [--probe 512] [--n-trials 6] [--test-images 2000]

Prints ``autodac.compare`` (a row per layer: method, rank and that layer's FLOPs ratio; then the
totals and any probe figures), the test accuracy of each plan on the shipped 2,000-image slice,
and, per plan, the layers that lost the most rank.
"""

import argparse

import torch

import autodac
from autodac.datasets import fashion_mnist_slice
from autodac.factorize import get_method
from autodac.zoo import pretrained


@torch.no_grad()
def accuracy(model, images, labels, batch=250):
    hits = sum(int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum()) for i in range(0, len(labels), batch))
    return hits / len(labels)


def rank_kept(choice):
    """Fraction of a layer's full rank the plan keeps (1.0 for a dense layer; full rank = exact factorisation)."""
    if choice.is_dense:
        return 1.0
    return choice.rank / get_method(choice.method).max_rank(choice.weight_shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5, help="FLOPs budget, a fraction of the original")
    parser.add_argument("--probe", type=int, default=512, help="probe images taken from the shipped train slice")
    parser.add_argument("--n-trials", type=int, default=6, help="Optuna trials of the probe-driven search")
    parser.add_argument("--test-images", type=int, default=2000, help="shipped test images to score accuracy on")
    args = parser.parse_args()

    model = pretrained("resnet20")
    test_x, test_y = (t[:args.test_images] for t in fashion_mnist_slice("test"))
    train_x, train_y = fashion_mnist_slice("train")
    probe = [(train_x[:args.probe], train_y[:args.probe])]  # one (images, labels) batch; any iterable of batches works
    shape = test_x[:1]  # the input shape FLOPs are counted at

    results = {
        "DAC only": autodac.optimize(model, args.budget, example_inputs=shape, methods=["dac"], widths=False, progress=False),
        "all methods": autodac.optimize(model, args.budget, example_inputs=shape, progress=False),
        # With labels the probe scores plans by top-1 accuracy on held-out probe images (plan.metrics).
        "all + probe": autodac.optimize(model, args.budget, example_inputs=shape, data=probe, n_trials=args.n_trials,
                                        progress=False),
    }
    print(autodac.compare({title: r.plan for title, r in results.items()}))

    print(f"\ntest accuracy of the original: {accuracy(model, test_x, test_y):.2%}")
    for title, result in results.items():
        cut = sorted(result.plan.factorized.items(), key=lambda item: rank_kept(item[1]))[:3]
        worst = ", ".join(f"{name} ({c.method} r{c.rank}, {rank_kept(c):.0%} of its rank)" for name, c in cut)
        print(f"{title}: test accuracy {accuracy(result.model, test_x, test_y):.2%}; "
              f"{len(result.plan.factorized)} layers factorised; cut deepest: {worst}.")


if __name__ == "__main__":
    main()
