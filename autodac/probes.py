"""Quality signals: reconstruction error (no data), and probe metrics on a small held-out set.

A *probe* is a bounded set of inputs (and, if the user has them, labels) drawn from the
user's ``data``. With labels the metric is top-1 accuracy; without, it is top-1 agreement
with the original model. A caller-supplied ``evaluate(model) -> float`` replaces both.
BatchNorm statistics can be re-estimated on probe inputs; the search keeps that correction
only when the probe metric, measured on probe images the re-estimation did not see, improves.
"""

from __future__ import annotations

import contextlib
import itertools
import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from autodac.batches import Batch, Inputs, arguments, call, concat, count, fast_layout, per_example
from autodac.errors import AutodacError, ModelError
from autodac.factorize import get_method
from autodac.factorize.base import covariance_for, power_of_two_peak
from autodac.subclasses import explicit_padding
from autodac.surgery import evaluating

__all__ = [
    "DEFAULT_PROBE_SIZE", "Probe", "collect_probe", "reconstruction_errors", "batchnorm_weights", "predict", "run_through", "top1_match",
    "divergence", "reestimate_batchnorm", "has_batchnorm", "input_covariances", "cross_covariances", "split_probe", "fit_examples",
    "BATCH_ELEMENTS", "ACTIVATION_ELEMENTS", "activation_batch_size", "batch_size_for", "divergence_tensor", "output_kind", "OUTPUT_KINDS",
    "OUTPUT_KIND_CHOICES", "check_output_kind", "r_squared", "probe_metric", "metric_name", "divergence_share",
    "fast_layout", "MAX_COVARIANCE_BYTES", "patch_size", "covariance_bytes", "covariance_fits", "blocks_bytes", "blocks_fit",
]

DEFAULT_PROBE_SIZE = 2048
_BATCH = 256  # the most examples in one batch, whatever their size
_COVARIANCE_BATCH = 64  # the most in one batch of a covariance pass (its patches are subsampled per batch)

BATCH_ELEMENTS = 32 * 3 * 224 * 224
"""The most input elements one batch of a pass over probe inputs holds: 4,816,896 (18 MiB in float32).

A batch's activations are its input times a factor of the architecture (a forward pass holds a
few of them at a time, a synthesis step all of them for its backward pass), so sizing batches
by their input bounds their memory for a given model where a fixed count does not: 256 inputs
of 3x224x224 held 21.5 GB in one synthesis step of EfficientNet-Lite0, 32 hold 3.1 GiB (and a
forward pass well under 1 GiB). 32 images at 224 px is also about the smallest batch whose
statistics BatchNorm re-estimation can trust and that keeps a CPU's kernels busy; smaller
inputs are capped at 256 a batch as before, so the 28x28 and 32x32 benchmarks are unchanged.
"""

MAX_COVARIANCE_BYTES = 2**28
"""The largest input covariance (float64, ``CK x CK`` for a layer whose patches have ``CK`` entries) a layer may have: 256 MiB.

That is ``CK <= 5792``: every 3x3 conv over up to 643 channels (the 3x3 convs over 512 channels of
VGG and ResNet: 4608, 170 MB), every 1x1 conv and Linear over up to 5792 features (ResNet-50's
2048, VGG's 4096). Larger patches (VGG's 25088-wide first classifier: 5 GB; a depthwise conv's
unfolded 1152x5x5 patches: 6.6 GB) would cost more memory than the rest of the search, and
``O(CK^3)`` time, for one layer, so such a layer is not re-fitted in order (``covariance_fits``)
and is fitted to its channel blocks where they fit (``blocks_fit``: DAC, the one method that needs
no more), to its weights alone otherwise. A layer's fit holds a few matrices its covariance's size at
once (its damped copy and Cholesky factor; the sequential re-fit: the cross and input
covariances and the solve's copy), so one layer's fit peaks at about five times this limit,
and the covariances of all candidate layers are held together through the search.
"""


def reconstruction_errors(
    module: nn.Module, method: str, out_weights: torch.Tensor | None = None, input_cov: torch.Tensor | None = None
) -> np.ndarray:
    """``errors[r - 1]``: relative squared error ``|W - W_r|^2 / |W|^2`` of ``method`` at rank ``r``.

    Relative errors make layers of very different sizes comparable: each is the fraction of
    the layer's weight energy that truncation discards. ``out_weights`` weighs each output
    channel's share (see ``batchnorm_weights``).
    """
    factorization = get_method(method)
    return factorization.errors(module.weight, out_weights, covariance_for(factorization, input_cov)).cpu().numpy()


def batchnorm_weights(norm: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Output-channel weights for a layer whose output feeds ``norm``: ``gamma_n^2 / |W_n|^2``.

    After the BatchNorm, channel ``n`` carries power ``gamma_n^2``; truncating the layer disturbs
    that channel by about the fraction ``|dW_n|^2 / |W_n|^2`` of its signal (for inputs without
    strong correlations). So the error the rest of the network sees is roughly
    ``sum_n gamma_n^2 |dW_n|^2 / |W_n|^2``: a channel the BatchNorm silences can absorb error
    for free, and a small-norm channel it amplifies cannot. Data-free: read off the weights.
    Measured on the reference VGG it beat both the plain weight error and ``gamma^2 / var``.
    """
    energy = weight.detach().double().pow(2).reshape(weight.shape[0], -1).sum(1)
    gamma2 = norm.weight.detach().double().pow(2) if norm.weight is not None else torch.ones_like(energy)
    # an all-zero row (a dead channel; common in half precision, where tiny weights underflow) stays zero at every rank,
    # so its weight is moot: the typical one, not gamma^2 / 1e-308, which no float32 factorisation survives
    typical = energy[energy > 0].mean() if bool((energy > 0).any()) else torch.ones((), dtype=energy.dtype)
    return gamma2 / torch.where(energy > 0, energy, typical)


@dataclass
class Probe:
    """Probe inputs (``N x ...``), optional integer labels, and the original model's outputs on them."""

    inputs: Batch
    labels: torch.Tensor | None
    reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return count(self.inputs)

    def subset(self, index: slice | torch.Tensor) -> "Probe":
        return Probe(
            self.inputs[index], None if self.labels is None else self.labels[index],
            None if self.reference is None else self.reference[index],
        )


FIT_EXAMPLES = 256


def split_probe(probe: "Probe") -> tuple[Batch, "Probe"]:
    """Calibration inputs (even positions) and the held-out probe (odd positions).

    BatchNorm re-estimation and data-aware fits use the calibration half; every score is
    measured on the held-out half, so nothing is judged on the examples it was fitted to.
    """
    return probe.inputs[0::2], probe.subset(slice(1, None, 2))


def fit_examples(probe: "Probe") -> Batch:
    """The inputs data-aware fits are computed from: the first ``FIT_EXAMPLES`` calibration inputs."""
    return split_probe(probe)[0][:FIT_EXAMPLES] if len(probe) >= 2 else probe.inputs[:FIT_EXAMPLES]


def _batch_parts(batch: Any, position: int) -> tuple[Batch, Any]:
    """``(inputs, labels or None)`` of one batch of ``data``: ``x``, ``(x,)``, ``(x, y)``, or ``((x0, x1, ...), y)``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        second = batch[1] if len(batch) > 1 else None
        if len(batch) > 2 and isinstance(second, torch.Tensor) and second.dim() != 1:
            # (x, y, extra fields) is taken; but DataLoader(TensorDataset(x0, x1, y)) yields [x0, x1, y], whose second
            # item is an input, not labels: read as (x, y) the labels would be lost
            raise AutodacError(
                f"each batch of `data` must be x, (x, y), or ((x0, x1, ...), y) for a model of several inputs, but batch "
                f"{position} holds {len(batch)} items whose second, of shape {tuple(second.shape)}, is not labels (one per "
                "example): group the inputs, ((x0, x1, ...), y)"
            )
        first, y = batch[0], second
        if isinstance(first, torch.Tensor):
            return first, y
        if isinstance(first, (tuple, list)) and first and all(isinstance(t, torch.Tensor) for t in first):
            sizes = {int(t.shape[0]) if t.dim() else -1 for t in first}
            if len(sizes) != 1 or -1 in sizes:
                raise AutodacError(
                    f"the inputs of a batch of `data` must share their first (batch) dimension, but batch {position} has inputs of "
                    f"shapes {[tuple(t.shape) for t in first]}"
                )
            return Inputs(tuple(first)), y
        if isinstance(first, (tuple, list)) and first:
            others = sorted({type(t).__name__ for t in first if not isinstance(t, torch.Tensor)})
            raise AutodacError(
                f"the inputs of a batch of `data` must all be tensors (batched along their first dimension; a model's non-tensor "
                f"arguments cannot be batched: bind them in a wrapper module), but batch {position} holds {', '.join(others)}"
            )
    raise AutodacError(
        f"each batch of `data` must be a tensor x, a tuple (x, y), or for a model of several inputs ((x0, x1, ...), y) "
        f"or ((x0, x1, ...),), but batch {position} is {type(batch).__name__}"
        + (f" of {[type(t).__name__ for t in batch]}" if isinstance(batch, (tuple, list)) else "")
    )


# what a label refusal tells the user whose targets are not class labels (regression values, masks, multi-hot)
LEAVE_TARGETS_OUT = "pass batches of x alone (the metric is then agreement with the original)"


def probe_fingerprint(inputs: Batch) -> str:
    """``sha256:`` and 16 hex digits of the probe's inputs (every argument's dtype, shape and bytes, in order): what a plan
    records so that ``apply`` can tell the data it was fitted to from other data of the same shape."""
    digest = hashlib.sha256()
    for part in arguments(inputs):
        tensor = part.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():  # the buffer itself: no copy of a probe that may be gigabytes (bool has no uint8 view)
            digest.update((tensor if tensor.dtype != torch.bool else tensor.to(torch.uint8)).view(torch.uint8).numpy())
    return f"sha256:{digest.hexdigest()[:16]}"


def _example_shapes(x: Batch) -> list[tuple[int, ...]]:
    return [tuple(part.shape[1:]) for part in (x.parts if isinstance(x, Inputs) else (x,))]


def _dtypes(x: Batch) -> str:
    return ", ".join(str(part.dtype).removeprefix("torch.") for part in (x.parts if isinstance(x, Inputs) else (x,)))


def _shapes(x: Batch) -> Any:
    """A batch's shape as an error shows it: one tuple, or a list of them for several inputs."""
    return [tuple(part.shape) for part in x.parts] if isinstance(x, Inputs) else tuple(x.shape)


def collect_probe(data: Iterable[Any], max_samples: int = DEFAULT_PROBE_SIZE) -> Probe:
    """Take at most ``max_samples`` examples from ``data``, in order.

    Batches are ``x`` or ``(x, y)`` for a model of one input, ``((x0, x1, ...), y)`` or
    ``((x0, x1, ...),)`` for a model called as ``model(x0, x1, ...)``.
    """
    if isinstance(data, torch.Tensor):
        data = [data]
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data) and (
        data[0].dim() > 1 and data[1].dim() == 1 and data[0].shape[0] == data[1].shape[0]
    ):
        data = [tuple(data)]  # one (inputs, labels) pair given directly
    try:
        batches = iter(data)
    except TypeError:
        raise AutodacError(f"`data` must be an iterable of batches (x or (x, y)), but got {type(data).__name__}") from None
    xs, ys, taken, labelled, ignored = [], [], 0, None, []
    for position, batch in enumerate(batches):
        x, y = _batch_parts(batch, position)
        if not isinstance(y, torch.Tensor):
            y = None
        if (isinstance(x, torch.Tensor) and x.dim() < 1) or (xs and _example_shapes(x) != _example_shapes(xs[0])):
            raise AutodacError(  # else torch.cat or x.shape[0] fails obscurely
                f"every batch of `data` must hold inputs N x ... of one shape, but batch {position} has inputs of shape "
                f"{_shapes(x)}" + (f" and batch 0 {_shapes(xs[0])}" if xs else "")
            )
        if xs and _dtypes(x) != _dtypes(xs[0]):  # else torch.cat promotes every batch to the widest, unsaid
            raise AutodacError(
                f"every batch of `data` must hold inputs of one dtype, but batch {position} has {_dtypes(x)} and batch 0 {_dtypes(xs[0])}"
            )
        for part in arguments(x):
            if isinstance(part, torch.Tensor) and part.is_floating_point() and not bool(torch.isfinite(part).all()):
                bad = int((~torch.isfinite(part)).sum())
                raise AutodacError(f"the inputs in `data` must be finite, but batch {position} holds {bad} NaN or infinite values")
        n = count(x)
        if y is not None and y.dim() > 2 and y.shape[0] == n and isinstance(x, torch.Tensor):
            raise AutodacError(
                f"the second element of a batch of `data` must be labels (one integer class per example, shape ({n},)), but batch "
                f"{position} has a {y.dtype} tensor of shape {tuple(y.shape)}; a target the model is not scored on (an image, a "
                f"mask) is left out: {LEAVE_TARGETS_OUT}; a model of several inputs takes batches ((x0, x1, ...), y) or "
                "((x0, x1, ...),)"
            )
        y = _class_labels(n, y, position, ignored)
        if labelled is None:
            labelled = y is not None
        if labelled != (y is not None):
            raise AutodacError(f"every batch of `data` must carry labels or none must, but batch {position} differs")
        take = min(max_samples - taken, n)
        xs.append(x[:take].detach())
        if y is not None:
            ys.append(y[:take].detach())
        taken += take
        if taken >= max_samples:
            break
    if taken == 0:
        raise AutodacError("`data` must hold at least one example, but it was empty")
    return Probe(concat(xs), torch.cat(ys) if ys else None)


def _class_labels(n: int, y: torch.Tensor | None, position: int, ignored: list[int]) -> torch.Tensor | None:
    """The labels ``y`` of batch ``position`` if they are class indices; None (and one warning per probe, noted in
    ``ignored``) for float targets that are clearly not; an error for anything in between.

    The rule: labels must hold one entry per input (``y.shape[0] == n``, the batch's examples), else ``AutodacError``.
    Integer labels are class indices (the metric is top-1 accuracy), shape ``(n,)`` only: ``(n, 1)``
    would broadcast against the predictions, and multi-hot ``(n, k)`` is not one class. Float labels that are whole
    numbers >= 0 look like class indices stored as floats: refused, since reading them either way
    could be wrong (pass ``y.long()``). Other float targets (soft labels ``N x C``, regression
    targets) are not class labels: ignored with a warning, and the metric is top-1 agreement with
    the original model, as for unlabelled data.
    """
    if y is None:
        return None
    if y.dim() < 1 or y.shape[0] != n:
        unbatched = " (one example with its label: `data` must yield batches; a Dataset goes in a DataLoader)" if y.dim() == 0 else ""
        raise AutodacError(
            f"labels must hold one entry per input, but batch {position} of `data` has {n} inputs and labels of shape "
            f"{tuple(y.shape)}{unbatched}"
        )
    if not y.is_floating_point():
        if y.dim() != 1:  # (N, 1) would broadcast against (N,) predictions into an N x N table: every accuracy wrong
            how = "pass y.reshape(-1)" if math.prod(y.shape[1:]) == 1 else f"multi-hot or per-position targets are not scored: {LEAVE_TARGETS_OUT}"
            raise AutodacError(
                f"class labels must be one integer class per example, shape ({n},), but batch {position} of `data` has integer "
                f"labels of shape {tuple(y.shape)}; {how}"
            )
        if y.numel() and int(y.min()) < 0:
            raise AutodacError(f"class labels must be >= 0 (class indices), but batch {position} of `data` holds {int(y.min())}")
        return y
    if y.dim() == 1 and bool(torch.isfinite(y).all()) and bool((y >= 0).all()) and bool((y == y.round()).all()):
        raise AutodacError(
            f"class labels must be an integer tensor (pass y.long()), but batch {position} of `data` has float labels "
            f"(dtype {y.dtype}) holding whole numbers, e.g. {y[:3].tolist()}; regression targets are not scored: {LEAVE_TARGETS_OUT}"
        )
    if not ignored:
        warnings.warn(
            f"autodac: the targets in `data` are not class labels (float, shape {tuple(y.shape)}, dtype {y.dtype}, from batch "
            f"{position}), so they are ignored: the probe compares the outputs with the original model's (top-1 agreement, or "
            "R^2 for outputs compared as values; pass integer class labels for top-1 accuracy; a model of several inputs takes "
            "batches ((x0, x1, ...), y))", UserWarning, stacklevel=4,
        )
    ignored.append(position)
    return None


def batch_size_for(example_shape: Sequence[int], most: int = _BATCH) -> int:
    """Examples per batch: as many as keep one batch's input within ``BATCH_ELEMENTS``, from 1 to ``most``.

    ``example_shape`` is one example's shape (without the batch dimension): 256 for 1x28x28 or
    3x32x32 inputs, 5 for 3x224x224.
    """
    return max(1, min(most, BATCH_ELEMENTS // max(1, math.prod(example_shape))))


ACTIVATION_ELEMENTS = 2**26
"""The most elements the largest single layer output of one batch of ``predict`` may hold: 67 M (256 MiB in float32).

Batches sized by their inputs alone (``BATCH_ELEMENTS``) suit networks whose layer outputs are a
few times their input; CREPE's first conv turns a 1,024-sample frame into 1,024 channels of 256
samples, and a DAC factorisation of its second conv makes ``C r`` = 30,720 channels of 128 (16 MB
a frame at rank 30), 256 frames to a batch. So ``predict`` (and BatchNorm re-estimation, and
distillation's steps) also measure the largest output of one example and size their batches to
keep a batch's within this bound; networks with smaller outputs keep their batches.
"""


@contextlib.contextmanager
def _largest_output_of(model: nn.Module):
    """Within the block, ``largest[0]`` is the most elements any module of ``model`` has output."""
    largest = [0]

    def measure(_module, _args, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())

    handles = [m.register_forward_hook(measure) for m in model.modules()]
    try:
        yield largest
    finally:
        for handle in handles:
            handle.remove()


def _activation_batch(batch_size: int, largest: int) -> int:
    """``batch_size`` lowered as far as keeps a batch's largest layer output within ``ACTIVATION_ELEMENTS``."""
    return max(1, min(batch_size, ACTIVATION_ELEMENTS // max(1, largest)))


def activation_batch_size(
    model: nn.Module, inputs: Batch, batch_size: int, stand_ins: Mapping[nn.Module, Iterable[nn.Module]] | None = None,
) -> int:
    """``batch_size``, lowered as far as keeps the largest layer output of a batch of ``inputs`` within ``ACTIVATION_ELEMENTS``.

    Measured by one eval pass of ``model`` on the first example (for callers whose own passes
    cannot include it: their hooks, or training, come after). ``stand_ins`` maps modules of
    ``model`` to modules that later passes run in their place without registering them (so no
    hook on ``model`` would see inside them): each stand-in, taken one at a time, runs once on
    the input its module got, and its own layer outputs count too.
    """
    if batch_size <= 1 or count(inputs) < 1:
        return batch_size
    stand_ins = stand_ins or {}
    seen: dict[nn.Module, tuple[tuple, dict]] = {}

    def capture(module, args, kwargs):
        seen.setdefault(module, (args, kwargs))

    handles = [module.register_forward_pre_hook(capture, with_kwargs=True) for module in stand_ins]
    try:
        with _largest_output_of(model) as largest, evaluating(model):
            call(model, inputs[0:1], _device_of(model))
    finally:
        for handle in handles:
            handle.remove()
    most = largest[0]
    for module, replacements in stand_ins.items():
        if module not in seen:  # not run on this example: nothing to measure it by
            continue
        args, kwargs = seen[module]
        for replacement in replacements:
            with _largest_output_of(replacement) as inside, evaluating(replacement):
                replacement(*args, **kwargs)
            most = max(most, inside[0])
    return _activation_batch(batch_size, most)


def predict(model: nn.Module, inputs: Batch, batch_size: int | None = None) -> torch.Tensor:
    """The model's outputs on ``inputs`` in eval mode, batched, on the model's device, returned on CPU.

    Batches hold ``batch_size`` examples, by default as many as ``batch_size_for`` allows and as
    keep the largest layer output of a batch within ``ACTIVATION_ELEMENTS``, measured on the first
    example, which then runs alone (so every hook still sees each example once); the outputs do
    not depend on it.
    """
    outs: list[torch.Tensor] = []

    def keep(out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise ModelError(
                f"the built-in probe metric needs a model that returns one tensor, but it returned {type(out).__name__}; "
                "pass evaluate=callable for other outputs (in Python; the command line has no --evaluate: plan such a model "
                "there without --data, or load a wrapper module that returns the one tensor to score)"
            )
        outs.append(out.float().cpu())

    _run_batches(model, inputs, batch_size, keep)
    return torch.cat(outs)


def run_through(model: nn.Module, inputs: Batch, batch_size: int | None = None) -> None:
    """One eval pass of ``model`` over ``inputs``, batched as ``predict`` batches them, outputs dropped.

    For passes whose hooks collect what they need: the model may return anything (a tuple, a dict).
    """
    _run_batches(model, inputs, batch_size, lambda _out: None)


def _run_batches(model: nn.Module, inputs: Batch, batch_size: int | None, keep: Callable[[Any], None]) -> None:
    device = _device_of(model)
    start = 0
    with evaluating(model):
        if batch_size is None:
            batch_size = batch_size_for(per_example(inputs))
            if batch_size > 1 and count(inputs) > 1:
                with _largest_output_of(model) as largest:
                    keep(call(model, inputs[0:1], device))
                start = 1
                batch_size = _activation_batch(batch_size, largest[0])
        for first in range(start, count(inputs), batch_size):
            keep(call(model, inputs[first : first + batch_size], device))


def _device_of(model: nn.Module) -> torch.device:
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def top1_match(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of positions where ``argmax`` over dim 1 equals ``targets`` (labels or reference argmax).

    Labels ``(N,)`` score outputs of one class vector per example, ``N x classes`` or ``N x classes x 1 x 1``
    (a fully convolutional classifier); they are matched per example, never broadcast.
    """
    if outputs.dim() < 2:
        raise ModelError(f"the built-in probe metric needs outputs with a class dimension (N x classes ...), but got shape {tuple(outputs.shape)}")
    predicted = outputs.argmax(1)
    if predicted.shape != targets.shape:
        if predicted.numel() != targets.numel():
            raise ModelError(
                f"top-1 needs one target per scored position, but the outputs of shape {tuple(outputs.shape)} score "
                f"{tuple(predicted.shape)} positions and the targets have shape {tuple(targets.shape)}"
            )
        predicted = predicted.reshape(targets.shape)
    return float((predicted == targets).float().mean())


OUTPUT_KINDS = {
    "scores": "KL of the softmax over dim 1 (class scores, logits)",
    "distribution": "KL over dim 1 (outputs are already distributions: non-negative, summing to 1)",
    "probabilities": "Bernoulli KL of each entry (outputs lie in [0, 1] but do not sum to 1: independent probabilities, e.g. a sigmoid)",
    "values": "relative squared error (values: no class dimension, or laid out like an input)",
}
OUTPUT_KIND_CHOICES = ("auto", *OUTPUT_KINDS)  # what ``optimize(output_kind=...)`` takes: "auto" reads it off the outputs


def _laid_out_like_an_input(reference: torch.Tensor, inputs: Batch | None) -> bool:
    """Whether the outputs have an input's channels over at least its positions (image to image: restoration, super-resolution)."""
    if inputs is None or reference.dim() < 3:
        return False
    return any(
        x.is_floating_point() and x.dim() == reference.dim() and x.shape[1] == reference.shape[1]
        and all(o >= i for o, i in zip(reference.shape[2:], x.shape[2:]))
        for x in arguments(inputs)
    )


def output_kind(reference: torch.Tensor, inputs: Batch | None = None) -> str:
    """Which divergence fits the original's outputs (a key of ``OUTPUT_KINDS``), read off their values and layout.

    A model that ends in a softmax or a sigmoid has already turned its scores into
    probabilities; a softmax of those would be nearly uniform and barely move when the model
    does (CREPE's 360 sigmoid pitch bins), so they are compared as the distributions they are.
    Outputs with one entry per position, or laid out like one of ``inputs`` (the same channels
    over the same or more positions: a denoiser's or an upscaler's image), are values: a softmax
    over an image's colour channels would not see its brightness change. Decided once on the
    whole reference, so every chunk and every candidate is measured alike; ``optimize(output_kind=...)``
    overrides it (a segmenter with as many classes as its input has channels reads as values).
    """
    if reference.dim() < 2 or reference.shape[1] < 2 or _laid_out_like_an_input(reference, inputs):
        return "values"
    low, high = float(reference.min()), float(reference.max())
    if low < 0 or high > 1:
        return "scores"
    sums = reference.double().sum(1)
    return "distribution" if float((sums - 1).abs().max()) <= 1e-3 else "probabilities"


def check_output_kind(kind: str, reference: torch.Tensor) -> None:
    """Refuse an ``output_kind`` the original's outputs cannot be compared by (named with their shape or range)."""
    if kind in ("auto", "values"):
        return
    if reference.dim() < 2 or reference.shape[1] < 2:
        raise AutodacError(
            f"output_kind={kind!r} compares outputs over a class dimension (dim 1, at least 2 entries), but the model's outputs "
            f"have shape {tuple(reference.shape)}: use 'values'"
        )
    low, high = float(reference.min()), float(reference.max())
    if kind != "scores" and (low < 0 or high > 1):
        raise AutodacError(
            f"output_kind={kind!r} needs outputs in [0, 1] (probabilities), but the original's range over [{low:.4g}, {high:.4g}]: "
            "use 'scores' for logits or 'values'"
        )
    if kind == "distribution":
        sums = reference.double().sum(1)
        if float((sums - 1).abs().max()) > 1e-3:  # the rule output_kind("auto") reads a distribution by
            raise AutodacError(
                f"output_kind='distribution' needs outputs that sum to 1 over dim 1, but the original's sums range over "
                f"[{float(sums.min()):.4g}, {float(sums.max()):.4g}]: use 'probabilities' for independent ones or 'values'"
            )


def r_squared(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """``1 - |outputs - reference|^2 / |reference - mean|^2``: how much of the original's variation the outputs reproduce.

    The mean is taken per entry of dim 1 (each output channel) over everything else, so an
    image's brightness or a regression target's offset is not counted as reproduced variation.
    1 for the original itself; 0 for outputs no closer than each channel's mean. Where the
    original's outputs do not vary (a spread below 1e-12 of their energy) R^2 is undefined, and the
    error is taken relative to their energy instead (``1 - |outputs - reference|^2 / |reference|^2``,
    the scale the probe's divergence uses); all-zero outputs give 1 when matched exactly, else 0.
    """
    outputs, reference = outputs.double(), reference.double()
    dims = [d for d in range(reference.dim()) if d != 1] if reference.dim() > 1 else [0]
    spread = float((reference - reference.mean(dims, keepdim=True)).pow(2).sum())
    energy = float(reference.pow(2).sum())
    error = float((outputs - reference).pow(2).sum())
    scale = spread if spread > 1e-12 * energy else energy
    if scale <= 0:
        return 1.0 if error == 0 else 0.0
    return 1 - error / scale


def probe_metric(outputs: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None, kind: str) -> float:
    """The metric reported to the user: top-1 accuracy with labels, else top-1 agreement with the original, or R^2 for values."""
    if labels is not None:
        return top1_match(outputs, labels)
    return r_squared(outputs, reference) if kind == "values" else top1_match(outputs, reference.argmax(1))


def metric_name(labelled: bool, kind: str | None) -> str:
    """What ``probe_metric`` measures, in words."""
    if labelled:
        return "top-1 accuracy"
    return "R^2 of the outputs against the original's" if kind == "values" else "top-1 agreement with the original"


def divergence_share(outputs: torch.Tensor, reference: torch.Tensor, kind: str, rows: int, energy: float) -> float:
    """What one chunk of examples adds to the whole probe's ``divergence``: a non-negative part, so partial sums are lower bounds.

    ``rows`` is the whole reference's number of positions (its entries over dim 1), ``energy``
    its squared sum (read only for values, whose divergence is relative to the whole's energy).
    """
    if kind == "values":
        return float((outputs - reference).double().pow(2).sum()) / max(energy, 1e-300)
    return divergence(outputs, reference, kind) * (outputs.numel() // outputs.shape[1]) / rows


def divergence(outputs: torch.Tensor, reference: torch.Tensor, kind: str | None = None) -> float:
    """How far outputs drift from the original's: KL(original || new) over dim 1 (see ``output_kind``)."""
    return float(divergence_tensor(outputs, reference, kind))


def divergence_tensor(outputs: torch.Tensor, reference: torch.Tensor, kind: str | None = None) -> torch.Tensor:
    """``divergence`` as a 0-d tensor that gradients flow through (distillation trains on it).

    ``kind`` (from ``output_kind``) is read off ``reference`` when not given; callers that
    measure in chunks pass the whole reference's.
    """
    kind = output_kind(reference) if kind is None else kind
    if kind == "values":
        return (outputs - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-12)
    if kind == "scores":
        log_p = torch.log_softmax(reference, 1)
        log_q = torch.log_softmax(outputs, 1)
        return (log_p.exp() * (log_p - log_q)).sum(1).mean()
    eps = 1e-6  # outputs of a changed model can reach 0 or 1 exactly (float32 sigmoids saturate)
    p, q = reference.double(), outputs.double().clamp(eps, 1 - eps)
    if kind == "distribution":
        return (torch.xlogy(p, p) - p * q.log()).sum(1).mean()
    if kind == "probabilities":
        terms = torch.xlogy(p, p) - p * q.log() + torch.xlogy(1 - p, 1 - p) - (1 - p) * (1 - q).log()
        return terms.sum(1).mean()
    raise ValueError(f"kind must be one of {sorted(OUTPUT_KINDS)}, but got {kind!r}")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def reestimate_batchnorm(model: nn.Module, inputs: Batch, batch_size: int | None = None) -> nn.Module:
    """Recompute every BatchNorm's running statistics from ``inputs`` (in place; returns ``model``).

    Statistics are the mean and (unbiased) variance of each BatchNorm's input over all of
    ``inputs``, pooled exactly across batches (torch's cumulative average with momentum
    ``None`` weights a short last batch like a full one and drops the spread between batch
    means); the rest of the model stays in eval mode, so dropout and the like are not switched on.
    Batches hold ``batch_size`` examples (default: ``batch_size_for``, and no more than keep the
    largest layer output of a batch within ``ACTIVATION_ELEMENTS``, as in ``predict``); a
    BatchNorm's input depends on it only through the BatchNorms before it, which normalise each
    batch by its own statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    device = _device_of(model)
    if batch_size is None:
        batch_size = batch_size_for(per_example(inputs))
        if count(inputs) > 1:  # measured before the statistics' hooks go on
            batch_size = activation_batch_size(model, inputs, batch_size)
    momenta = [(m, m.momentum) for m in norms]
    pooled: dict[nn.Module, tuple[int, torch.Tensor, torch.Tensor]] = {}  # count, mean, sum of squared deviations

    def accumulate(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        dims = [0] + list(range(2, x.dim()))
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x, dims, correction=0)  # one batch in its own precision, pooled in float64
        mean, m2 = mean.double(), var.double() * n
        if module in pooled:  # Chan et al.'s pairwise update
            n0, mean0, m20 = pooled[module]
            delta = mean - mean0
            total = n0 + n
            mean, m2, n = mean0 + delta * (n / total), m20 + m2 + delta.pow(2) * (n0 * n / total), total
        pooled[module] = (n, mean, m2)

    handles = [m.register_forward_pre_hook(accumulate) for m in norms]
    with evaluating(model):
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            bounds = list(range(0, count(inputs), batch_size)) + [count(inputs)]
            if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
                del bounds[-2]  # a last batch of one cannot be normalised by its own statistics: join it to the one before
            for start, stop in zip(bounds[:-1], bounds[1:]):
                call(model, inputs[start:stop], device)
            for m, (n, mean, m2) in pooled.items():
                m.running_mean.copy_(mean)
                m.running_var.copy_(m2 / max(n - 1, 1))
        finally:
            for handle in handles:
                handle.remove()
            for m, momentum in momenta:
                m.momentum = momentum
    return model




def _pad_like(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded exactly as the conv pads it (amounts, ``'same'``/``'valid'``, and padding mode)."""
    if module.padding == "valid":
        return x
    pads: list[int] = []
    for axis in reversed(range(len(module.kernel_size))):  # F.pad takes the last dim first
        if module.padding == "same":
            total = module.dilation[axis] * (module.kernel_size[axis] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [module.padding[axis], module.padding[axis]]
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return torch.nn.functional.pad(x, pads, mode=mode)


def _patches(module: nn.Module, x: torch.Tensor, max_positions: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of what the layer multiplies by its weight: ``positions x (C*K)``, channel-major
    (at most ``max_positions`` of them, drawn by ``generator``)."""
    rows = _patch_rows(module, x)
    if rows.shape[0] > max_positions:
        rows = rows[torch.randperm(rows.shape[0], generator=generator)[:max_positions]]
    return rows.float()


_BLOCK_CHUNK_ELEMENTS = 2**24  # patch entries unfolded at once for channel blocks (64 MiB in float32)


def _channel_blocks(module: nn.Module, x: torch.Tensor, max_positions: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """``(sum over positions of p_c p_c^T for every input channel c, positions)``: ``C x K x K`` float32.

    The same ``max_positions`` positions (drawn by ``generator``) serve every channel, and the
    channels are unfolded a few at a time, so memory stays at ``_BLOCK_CHUNK_ELEMENTS`` whatever
    the layer's width: the full patch rows of such a layer are what does not fit.
    """
    if x.dim() == len(module.kernel_size) + 1:
        x = x.unsqueeze(0)
    first = _patch_rows(module, x[:, :1])  # positions x K
    positions, taps = first.shape
    keep = torch.randperm(positions, generator=generator)[:max_positions] if positions > max_positions else None
    used = positions if keep is None else len(keep)
    channels = x.shape[1]
    step = max(1, _BLOCK_CHUNK_ELEMENTS // max(1, positions * taps))
    blocks = torch.empty(channels, taps, taps)
    for start in range(0, channels, step):
        rows = _patch_rows(module, x[:, start : start + step])
        rows = (rows if keep is None else rows[keep]).float().reshape(used, -1, taps).transpose(0, 1)  # c x P x K
        blocks[start : start + rows.shape[0]] = rows.transpose(1, 2) @ rows
    return blocks, used


def _patch_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every row the layer multiplies by its weight on input ``x``: ``positions x (C*K)``."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    else:
        if x.dim() == len(module.kernel_size) + 1:
            x = x.unsqueeze(0)
        own = explicit_padding(module)  # what a subclass's own forward pads before its conv (a reason string if it cannot be read)
        if own and not isinstance(own, str):
            x = torch.nn.functional.pad(x, own)
        x = _pad_like(module, x)
        if len(module.kernel_size) == 3:
            return _volume_rows(x, module.kernel_size, module.dilation, module.stride)
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1, module.kernel_size[0]), (1, module.dilation[0]), (1, module.stride[0])
        else:
            kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        cols = torch.nn.functional.unfold(x, kernel, dilation=dilation, stride=stride)  # B x CK x L
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return rows


def _volume_rows(x: torch.Tensor, kernel, dilation, stride) -> torch.Tensor:
    """``F.unfold``'s rows for a 3-D conv (which it does not take): ``positions x (C*K)``, channel-major, taps row-major."""
    for axis, (k, d, s) in enumerate(zip(kernel, dilation, stride)):
        x = x.unfold(2 + axis, d * (k - 1) + 1, s)  # appends the window (with its dilation gaps) as the last dim
        x = x[..., ::d]
    # B x C x oD x oH x oW x kD x kH x kW -> (B oD oH oW) x (C kD kH kW)
    return x.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, math.prod(x.shape[1:2] + x.shape[5:]))


def patch_size(module: nn.Module) -> int:
    """``CK``: the entries of one row the layer multiplies by its weight (``in_features``, or input channels times kernel taps).

    A grouped conv's patches span all its input channels (as ``F.unfold`` takes them).
    """
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    return int(module.in_channels) * math.prod(module.kernel_size)


def covariance_bytes(module: nn.Module) -> int:
    """Bytes of the layer's float64 ``CK x CK`` input covariance."""
    return 8 * patch_size(module) ** 2


def covariance_fits(module: nn.Module) -> bool:
    """Whether the layer's input covariance is within ``MAX_COVARIANCE_BYTES`` (else at most its channel blocks, ``blocks_fit``)."""
    return covariance_bytes(module) <= MAX_COVARIANCE_BYTES


def blocks_bytes(module: nn.Module) -> int:
    """Bytes of the layer's float64 channel blocks: ``C`` covariances ``K x K``, one per input channel's own kernel taps."""
    if isinstance(module, nn.Linear):
        return 8 * int(module.in_features)
    taps = math.prod(module.kernel_size)
    return 8 * int(module.in_channels) * taps * taps


def blocks_fit(module: nn.Module) -> bool:
    """Whether a conv whose full covariance is over the limit can still be fitted to its channel blocks.

    DAC factors each input channel's kernel slice on its own, so its data-aware fit needs only the
    covariance of each channel's own taps (``C K^2`` entries, not ``(C K)^2``): CREPE's
    ``1024 x 64`` conv has a 32 GiB covariance and 32 MiB of channel blocks. Only convs with more
    than one tap (a linear layer's blocks would be single variances no method uses).
    """
    return (
        not isinstance(module, nn.Linear) and math.prod(module.kernel_size) > 1
        and not covariance_fits(module) and blocks_bytes(module) <= MAX_COVARIANCE_BYTES
    )


def input_covariances(
    model: nn.Module, layers: dict[str, nn.Module], inputs: Batch, batch_size: int | None = None, max_positions: int = 4096
) -> dict[str, torch.Tensor]:
    """``E[p p^T]`` of each layer's input patches ``p`` on ``inputs`` (float64, ``CK x CK``, channel-major).

    A layer whose full covariance is over ``MAX_COVARIANCE_BYTES`` gets its channel blocks
    instead (``C x K x K``: the covariance of each input channel's own taps, ``blocks_fit``).

    This is what a data-aware fit weighs the factorisation by: the error of the layer's output
    on these inputs rather than the error of its weight. At most ``max_positions`` patches per
    batch per layer are kept (drawn with a fixed seed), so memory stays bounded on large maps.
    Each layer draws from its own generator, so its covariance does not depend on which other
    layers are asked for (``apply`` asks for fewer layers than ``optimize`` and must get the same).
    Batches hold ``batch_size`` examples (default: ``batch_size_for``, at most 64); without
    subsampling the covariances do not depend on it. Only the layers asked for are measured;
    each holds one float64 sum (``covariance_bytes``) and one float32 product of its size.
    """
    if batch_size is None:
        batch_size = batch_size_for(per_example(inputs), _COVARIANCE_BATCH)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {name: 0 for name in layers}
    generators = {name: torch.Generator().manual_seed(0) for name in layers}
    handles = []

    def hook(name: str):
        def collect(module, args, _output):
            x = args[0].detach().cpu()
            scale = power_of_two_peak(x)  # exact: activations near 1e20 would overflow the float32 product
            if scale != 1.0:  # in float32 at least: a float16 input divided in its own dtype would lose its small values
                x = x.to(torch.promote_types(x.dtype, torch.float32)) / scale
            if covariance_fits(module):
                rows = _patches(module, x, max_positions, generators[name])
                product, positions = rows.T @ rows, rows.shape[0]  # float32 product, float64 sum
            else:
                product, positions = _channel_blocks(module, x, max_positions, generators[name])
            _accumulate(sums, name, product, scale * scale)
            counts[name] += positions

        return collect

    for name, module in layers.items():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        run_through(model, inputs, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name].div_(counts[name]) for name in layers if counts[name]}


def _accumulate(sums: dict[str, torch.Tensor], name: str, product: torch.Tensor, scale: float = 1.0) -> None:
    """``sums[name] += scale * product`` in float64, in place (no float64 copy of the product)."""
    if name in sums:
        sums[name].add_(product, alpha=scale)
    else:
        sums[name] = product.double().mul_(scale)


class _Reached(Exception):
    """Raised by a hook to stop a forward pass once the layer of interest has its input."""


def _input_of(model: nn.Module, name: str, x: Batch) -> torch.Tensor | None:
    """What layer ``name`` receives (first call) when ``model`` runs on ``x``; the rest of the pass is skipped."""
    captured: list[torch.Tensor] = []

    def grab(_module, args):
        captured.append(args[0].detach())
        raise _Reached

    handle = model.get_submodule(name).register_forward_pre_hook(grab)
    try:
        with evaluating(model):
            call(model, x, _device_of(model))
    except _Reached:
        pass
    finally:
        handle.remove()
    return captured[0] if captured else None


def cross_covariances(
    original: nn.Module, changed: nn.Module, name: str, inputs: Batch, batch_size: int | None = None, max_positions: int = 4096
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(E[p_o p_c^T], E[p_c p_c^T])`` of layer ``name``'s input patches in ``original`` (``p_o``) and ``changed`` (``p_c``).

    Both models see the same ``inputs`` and the patches are taken at the same positions, so the
    pair is what a least-squares refit from the changed model's inputs to the original layer's
    outputs needs. The patches are those of ``original``'s layer ``name`` (``CK x CK``, float64);
    each forward pass stops at the layer. None if the layer never runs. Batches as in ``input_covariances``.
    """
    if batch_size is None:
        batch_size = batch_size_for(per_example(inputs), _COVARIANCE_BATCH)
    module = original.get_submodule(name)
    generator = torch.Generator().manual_seed(0)
    sums: dict[str, torch.Tensor] = {}
    rows = 0
    for start in range(0, count(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        seen, now = _input_of(original, name, batch), _input_of(changed, name, batch)
        if seen is None or now is None:
            return None
        rows_seen, rows_now = _patch_rows(module, seen.cpu()), _patch_rows(module, now.cpu())
        if rows_seen.shape[0] > max_positions:
            keep = torch.randperm(rows_seen.shape[0], generator=generator)[:max_positions]
            rows_seen, rows_now = rows_seen[keep], rows_now[keep]
        scale_seen, scale_now = power_of_two_peak(rows_seen), power_of_two_peak(rows_now)  # exact, as in input_covariances
        rows_seen, rows_now = rows_seen.float() / scale_seen, rows_now.float() / scale_now
        _accumulate(sums, "cross", rows_seen.T @ rows_now, scale_seen * scale_now)
        _accumulate(sums, "gram", rows_now.T @ rows_now, scale_now * scale_now)
        rows += rows_now.shape[0]
    return sums["cross"].div_(rows), sums["gram"].div_(rows)
