"""Inputs synthesised from a model's own BatchNorm statistics: a probe when the user has no data.

Every BatchNorm stores the mean and variance its input had over the training data. Starting
from Gaussian noise, inputs are optimised (Adam, gradients to the inputs only) until the batch
statistics at every BatchNorm match the stored ones (the ZeroQ / DeepInversion idea, without
a label or image prior). Such inputs drive the network through the same internal distributions
as real data, so they serve where real inputs would: BatchNorm re-estimation after
factorisation, data-aware fits, and an unlabeled probe (agreement with the original model).
The model is run in eval mode and is not changed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autodac.errors import AutodacError, ModelError
from autodac.probes import batch_size_for
from autodac.surgery import copy_model, evaluating, outside_inference_mode

__all__ = ["synthesize_inputs", "statistics_mismatch", "DEFAULT_STEPS"]

DEFAULT_STEPS = 100
_LEARNING_RATE = 0.1  # Adam's step on inputs that start at unit scale


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def _mismatch_terms(norms: list[nn.Module]):
    """Forward pre-hooks that append each BatchNorm's statistics mismatch to a list.

    The mismatch of one BatchNorm is the mean over channels of
    ``(batch mean - running mean)^2 + (batch std - running std)^2`` (ZeroQ's objective). Dividing
    by the stored variance, so every layer counts alike, was measured worse on the reference
    ResNet-20 (``benchmarks/bm_synthetic_probe.py``, 512 inputs): plans on inputs made that way
    kept 86.9% / 68.3% at 0.3 / 0.2 of the FLOPs against 87.1% / 73.3% for this form.
    """
    terms: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x.float(), dims, correction=0)
        std_gap = (var + module.eps).sqrt() - (module.running_var.float() + module.eps).sqrt()
        terms.append(((mean - module.running_mean.float()) ** 2 + std_gap**2).mean())

    return terms, [m.register_forward_pre_hook(hook) for m in norms]


@torch.no_grad()
def statistics_mismatch(model: nn.Module, inputs: torch.Tensor) -> float:
    """Mean over BatchNorms of the squared gap between ``inputs``' statistics and the stored ones (0 = identical)."""
    norms = _norms(model)
    if not norms:
        raise ModelError("the model must have a BatchNorm with running statistics to compare against, but it has none")
    terms, handles = _mismatch_terms(norms)
    try:
        with evaluating(model):
            model(inputs.to(norms[0].running_mean.device))
    finally:
        for handle in handles:
            handle.remove()
    return float(sum(terms) / max(len(terms), 1))


_REDUCED = (torch.float16, torch.bfloat16)


@outside_inference_mode
def synthesize_inputs(
    model: nn.Module,
    example_inputs: torch.Tensor,
    count: int = 512,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """``count`` inputs shaped like ``example_inputs[0]`` whose BatchNorm statistics match the stored ones.

    Deterministic for a fixed ``seed`` (on one machine and thread count). Each batch is optimised
    for ``steps`` Adam steps; the cost is about ``steps`` forward and backward passes per batch.
    A batch holds as many inputs as ``autodac.probes.batch_size_for`` allows (at least 2), since
    a step keeps every activation of its batch for the backward pass: 256 inputs of 3x32x32 or
    smaller, 32 of 3x224x224 (whose statistics are still taken over thousands of positions per
    channel). Refuses models without BatchNorm, whose inputs nothing constrains.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}")
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 1 or not example_inputs.is_floating_point():
        raise AutodacError(
            "synthesising inputs needs `example_inputs` to be one floating-point tensor (a batch N x ...), "
            f"but got {type(example_inputs).__name__ if not isinstance(example_inputs, torch.Tensor) else example_inputs.dtype}"
        )
    for name, value, low in (("count", count, 2), ("steps", steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise AutodacError(f"`{name} >= {low}` must hold (an integer), but got {name}={value!r}")
    norms = _norms(model)
    if not norms:
        raise ModelError(
            "synthesising inputs needs BatchNorm layers with running statistics to match, but the model has none "
            "(pass real `data` instead)"
        )
    shape = tuple(example_inputs.shape[1:])
    options = {"device": example_inputs.device, "dtype": example_inputs.dtype}
    model = copy_model(model)  # run on a copy: a forward that updates its own buffers leaves the caller's as they were
    if example_inputs.dtype in _REDUCED or any(p.dtype in _REDUCED for p in model.parameters()):
        # half-precision activations and BatchNorm moments overflow under Adam (inputs turned to NaN): optimise in float32
        model, options["dtype"] = model.float(), torch.float32
    norms = _norms(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batch = max(2, batch_size_for(shape))  # a bound on memory, and batch statistics need more than one input
    sizes = [min(batch, count - start) for start in range(0, count, batch)]
    if len(sizes) > 1 and sizes[-1] < 2:  # a batch of one has no spread to match: join it to the one before
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * len(sizes), desc="autodac: synthesising inputs", unit="step", disable=None, leave=False)
    terms, handles = _mismatch_terms(norms)
    batches = []
    try:
        with evaluating(model), torch.enable_grad():
            for size in sizes:
                x = torch.randn((size, *shape), generator=generator).to(**options).requires_grad_(True)
                optimizer = torch.optim.Adam([x], lr=_LEARNING_RATE)
                for _ in range(steps):
                    terms.clear()
                    model(x)
                    if not terms:
                        raise ModelError("the model's BatchNorm layers never ran on the example inputs, so nothing constrains the synthesis")
                    loss = torch.stack(terms).mean()
                    (grad,) = torch.autograd.grad(loss, x)  # the inputs only: the model's parameters get no .grad
                    x.grad = grad
                    optimizer.step()
                    if bar is not None:
                        bar.update(1)
                batches.append(x.detach())
    finally:
        for handle in handles:
            handle.remove()
        if bar is not None:
            bar.close()
    return torch.cat(batches).to(example_inputs.dtype)
