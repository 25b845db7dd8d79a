"""Deploy the smallest model that is still good enough: sweep FLOPs budgets, keep the first that passes.

    python examples/deploy_smallest.py [--nets resnet20 cifar_vgg] [--budgets 0.2 0.3 0.4 0.5 0.6]
                                       [--max-drop 1.0] [--probe 512] [--n-trials 6] [--test-images 2000] [--out DIR]

For each net, tries the budgets from small to large (each one a probe-driven ``optimize`` on
train images) and stops at the first whose accuracy on the shipped 2,000 test images is within
``--max-drop`` percentage points of the original's. The winner's plan (JSON) and weights (state
dict) are written to ``--out``, and the script checks that they rebuild the same model.

Every budget is a full ``optimize`` run, so the default sweep of both nets takes a few minutes on
a busy two-core CPU; ``--nets cifar_vgg --budgets 0.4 0.5`` is a quicker first try. On a machine
other jobs keep busy, ``OMP_NUM_THREADS=1`` (or ``OMP_WAIT_POLICY=passive``) can be several times faster.
"""

import argparse
import os
import tempfile

import torch
from tabulate import tabulate

import autodac
from autodac.datasets import fashion_mnist_slice
from autodac.zoo import pretrained


@torch.no_grad()
def accuracy(model, images, labels, batch=250):
    hits = sum(int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum()) for i in range(0, len(labels), batch))
    return hits / len(labels)


def smallest_passing(net, budgets, probe, test, max_drop, n_trials):
    """Sweep ``budgets`` (ascending) and return ``(budget, result)`` of the first within the bar, else ``None``."""
    model = pretrained(net)
    baseline = accuracy(model, *test)
    rows, winner = [], None
    for budget in budgets:
        try:
            # A probe (images + labels) lets autodac measure each layer's sensitivity and refine the ranks with
            # Optuna; n_trials is small here to keep the sweep quick. progress=False: one line per budget instead.
            result = autodac.optimize(model, budget, data=probe, n_trials=n_trials, progress=False)
        except autodac.BudgetError as error:  # this net cannot get that cheap with these methods
            rows.append([budget, "-", "-", "-", "-", f"unreachable: {error}"])
            continue
        acc = accuracy(result.model, *test)
        drop = 100 * (baseline - acc)  # percentage points
        passed = drop <= max_drop
        rows.append([budget, f"{result.flops_ratio:.3f}", f"{result.params:,}", f"{acc:.2%}", f"{drop:+.2f}", "PASS" if passed else "fail"])
        if passed:
            winner = (budget, result)
            break  # budgets only get larger from here: the first pass is the smallest
    print(f"\n{net}: original test accuracy {baseline:.2%}, quality bar: at most {max_drop:g} points lower")
    print(tabulate(rows, headers=["budget", "FLOPs ratio", "params", "test acc", "drop (pts)", "verdict"], disable_numparse=True))
    return winner


def _checked(convert, rule, holds):
    """An argparse type: ``convert`` the text, then refuse it naming ``rule`` and the value unless ``holds``."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not holds(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, but got {text!r}")
        return value
    return parse


BUDGET = _checked(float, "a FLOPs ratio with 0 < budget <= 1", lambda v: 0 < v <= 1)
POINTS = _checked(float, "a finite number of points >= 0", lambda v: 0 <= v < float("inf"))


def _at_least(low):
    return _checked(int, f"an integer >= {low}", lambda v: v >= low)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["resnet20", "cifar_vgg"], choices=["resnet20", "cifar_vgg"])
    parser.add_argument("--budgets", nargs="+", type=BUDGET, default=[0.2, 0.3, 0.4, 0.5, 0.6], help="FLOPs budgets to try")
    parser.add_argument("--max-drop", type=POINTS, default=1.0, help="largest acceptable test-accuracy drop, in points")
    parser.add_argument("--probe", type=_at_least(2), default=512, help="probe images taken from the shipped train slice")
    parser.add_argument("--n-trials", type=_at_least(1), default=6, help="Optuna trials per budget")
    parser.add_argument("--test-images", type=_at_least(1), default=2000, help="shipped test images the quality bar is measured on")
    parser.add_argument("--out", default=None, help="folder for the winning plans and weights (default: a new temp folder)")
    args = parser.parse_args()

    out = args.out or tempfile.mkdtemp(prefix="autodac-deploy-")
    os.makedirs(out, exist_ok=True)
    test = tuple(t[:args.test_images] for t in fashion_mnist_slice("test"))
    train_x, train_y = fashion_mnist_slice("train")
    probe = [(train_x[:args.probe], train_y[:args.probe])]  # one (images, labels) batch; a DataLoader works too

    for net in args.nets:
        found = smallest_passing(net, sorted(args.budgets), probe, test, args.max_drop, args.n_trials)
        if found is None:
            print(f"{net}: no budget passed; deploy the original model")
            continue
        budget, result = found
        plan_path, weights_path = os.path.join(out, f"{net}.plan.json"), os.path.join(out, f"{net}.pt")
        result.plan.save(plan_path)
        torch.save(result.model.state_dict(), weights_path)

        # Rebuilding on the deployment side: apply() recreates the factorised layers from the plan. A probe-driven
        # plan fits layers to the probe, so apply() needs the same data; the saved state dict then restores the exact
        # weights, including any BatchNorm statistics optimize() re-estimated (the plan alone does not hold those).
        rebuilt = autodac.apply(pretrained(net), autodac.Plan.load(plan_path), data=probe)
        rebuilt.load_state_dict(torch.load(weights_path, weights_only=True))
        with torch.no_grad():
            assert torch.equal(rebuilt(test[0][:250]), result.model(test[0][:250])), "the saved model should rebuild exactly"
        print(f"{net}: smallest passing budget {budget:g} (FLOPs ratio {result.flops_ratio:.3f}); "
              f"saved {plan_path} and {os.path.basename(weights_path)}, rebuilt and checked")


if __name__ == "__main__":
    main()
