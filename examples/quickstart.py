"""Quickstart: halve the FLOPs of a trained ResNet-20 without data, save the plan, replay it.

    python examples/quickstart.py

Uses only what ships in the package: the Fashion-MNIST ResNet-20 and a 2,000-image test slice.
"""

import os
import tempfile

import torch

import autodac
from autodac.datasets import fashion_mnist_slice
from autodac.zoo import pretrained


@torch.no_grad()
def accuracy(model, images, labels, batch=250):
    """Top-1 accuracy, in batches (one 2,000-image batch is slower on a CPU)."""
    hits = sum(int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum()) for i in range(0, len(labels), batch))
    return hits / len(labels)


model = pretrained("resnet20")  # trained weights, eval mode
test_x, test_y = fashion_mnist_slice("test")  # normalised 1x28x28 images and their labels

# Data-free: ranks come from each layer's reconstruction error. example_inputs fixes the input
# shape the FLOPs are counted at (the budget is a ratio of fvcore counts at that shape).
result = autodac.optimize(model, flops_budget=0.5, example_inputs=test_x[:1])
print(result.summary())  # per-layer method/rank table, then the FLOPs and parameter totals
print(f"test accuracy: {accuracy(model, test_x, test_y):.2%} -> {accuracy(result.model, test_x, test_y):.2%} "
      f"at {result.flops_ratio:.3f} of the FLOPs")

# A plan is plain JSON: save it, load it later, and rebuild the same model from fresh weights.
with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "resnet20_half.json")
    result.plan.save(path)
    plan = autodac.Plan.load(path)
rebuilt = autodac.apply(pretrained("resnet20"), plan)

with torch.no_grad():
    assert torch.equal(rebuilt(test_x[:500]), result.model(test_x[:500])), "the replayed plan should give the same outputs"
print(f"plan saved, reloaded and replayed: {len(plan.factorized)} layers factorised, outputs identical")
