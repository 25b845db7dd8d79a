"""Deploy: halve a trained ResNet-20's FLOPs, then write it in every format that loads without autodac.

    python examples/export.py

Each file is loaded back by ``autodac.export`` and checked against the model before it returns;
the ``onnx`` format needs ``pip install 'autodac[deploy]'`` and is skipped here without it.
"""

import importlib.util
import os
import tempfile

import autodac
from autodac.datasets import fashion_mnist_slice
from autodac.zoo import pretrained

model = pretrained("resnet20")
test_x, _ = fashion_mnist_slice("test")
result = autodac.optimize(model, flops_budget=0.5, example_inputs=test_x[:8], progress=False)
print(f"planned: FLOPs ratio {result.flops_ratio:.3f}")

has_onnx = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
loaders = {
    "pt": "torch.load(path, weights_only=False)",
    "torchscript": "torch.jit.load(path)",
    "pt2": "torch.export.load(path).module()",
    "onnx": "onnxruntime.InferenceSession(path)",
}
with tempfile.TemporaryDirectory() as folder:
    for fmt, loader in loaders.items():
        if fmt == "onnx" and not has_onnx:
            print("onnx: skipped (pip install 'autodac[deploy]')")
            continue
        done = autodac.export(result, os.path.join(folder, f"resnet20.{fmt}"), format=fmt)
        size = os.path.getsize(done.path) / 2**20
        print(f"{fmt}: {size:.2f} MB, loaded back, max |difference| {done.max_difference:.2g} (allowed {done.allowed:.2g}); load with {loader}")
