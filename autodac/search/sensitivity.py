"""Per-layer sensitivity: the probe divergence when one layer alone is factorised (DAC paper, experiment 1).

Fast by construction: the caller's model is never copied. The one layer under test runs its
factorised replacement in place of its own forward, what runs before it is replayed from one
recorded pass, the factors come from one cached SVD per layer and
method, and only a few options per layer are measured (spread along the layer's error/cost
front); every other option's loss is read off the layer's measured loss-versus-error curve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["SensitivityProfile", "measure_profile", "pick_ranks", "interpolate_losses", "loss_curve"]


@dataclass
class SensitivityProfile:
    """``losses[layer][(method, rank)]``: probe divergence with only that layer factorised at that rank."""

    losses: dict[str, dict[tuple[str, int], float]] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, str, int, float]]:
        return [(layer, m, r, loss) for layer, by in self.losses.items() for (m, r), loss in sorted(by.items())]

    def to_dict(self) -> dict:
        return {
            "samples": self.samples, "seconds": self.seconds,
            "losses": {layer: [[m, r, loss] for (m, r), loss in sorted(by.items())] for layer, by in self.losses.items()},
        }


def pick_ranks(ranks: Sequence[int], costs: Sequence[int], count: int) -> list[int]:
    """At most ``count`` ranks spread evenly over the cost range (all of them if there are few)."""
    ranks = list(ranks)
    if len(ranks) <= count:
        return ranks
    costs = np.asarray(costs, dtype=np.float64)
    targets = np.linspace(costs.min(), costs.max(), count)
    chosen = sorted({ranks[int(np.abs(costs - t).argmin())] for t in targets})
    return chosen


def loss_curve(errors: np.ndarray, points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Loss at every reconstruction error in ``errors`` from a few measured ``(error, loss)`` points.

    Monotone: more error never means less loss; anchored at zero loss for zero error; past the
    largest measured error the loss grows in proportion to the error.
    """
    x = np.concatenate([[0.0], [float(e) for e, _ in points]])
    y = np.concatenate([[0.0], [max(0.0, float(v)) for _, v in points]])
    order = np.argsort(x, kind="stable")
    x, y = x[order], np.maximum.accumulate(y[order])
    slope_tail = y[-1] / x[-1] if x[-1] > 0 else 0.0
    query = np.asarray(errors, dtype=np.float64)
    out = np.interp(query, x, y)
    beyond = query > x[-1]
    out[beyond] = query[beyond] * slope_tail
    return out


def interpolate_losses(weight_errors: np.ndarray, measured: dict[int, float]) -> np.ndarray:
    """``loss_curve`` for one method's ranks: ``weight_errors[r - 1]`` and losses measured at some ranks ``r``."""
    return loss_curve(weight_errors, [(weight_errors[r - 1], v) for r, v in sorted(measured.items())])


class _PrefixReplay:
    """Skip recomputing what runs before the layer under test.

    One recording pass stores the output of every parametrised leaf module, in call order.
    While layer ``i`` is under test, any such module whose call came before layer ``i``'s first
    call cannot depend on it, so it returns its stored output (a copy: later in-place ops must
    not touch the store) instead of running. Skipped when the store would exceed ``max_bytes``.
    """

    def __init__(self, model: nn.Module, run: Callable[[nn.Module], float], max_bytes: int) -> None:
        self.records: dict[nn.Module, list[tuple[int, torch.Tensor]]] = {}
        self.enabled = True
        leaves = [m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters(recurse=False))]
        clock = [0]
        size = [0]
        handles = []

        def record(module, _inputs, output):
            clock[0] += 1
            if isinstance(output, torch.Tensor) and self.enabled:
                size[0] += output.numel() * output.element_size()
                if size[0] > max_bytes:
                    self.enabled = False
                    self.records.clear()
                    return
                self.records.setdefault(module, []).append((clock[0], output.detach().clone()))

        for module in leaves:
            handles.append(module.register_forward_hook(record))
        try:
            run(model)
        finally:
            for handle in handles:
                handle.remove()

    def first_call(self, module: nn.Module) -> int | None:
        calls = self.records.get(module)
        return calls[0][0] if calls else None

    def patch(self, before: int) -> list[nn.Module]:
        patched = []
        for module, calls in self.records.items():
            if calls[0][0] >= before:
                continue
            original = type(module).forward
            state = {"call": 0}

            def forward(*args, _module=module, _calls=calls, _state=state, _original=original, **kwargs):
                k = _state["call"]
                _state["call"] += 1
                if k < len(_calls) and _calls[k][0] < before:
                    return _calls[k][1].clone()
                return _original(_module, *args, **kwargs)

            module.forward = forward
            patched.append(module)
        return patched

    @staticmethod
    def unpatch(modules: list[nn.Module]) -> None:
        for module in modules:
            del module.forward


def measure_profile(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module, list[tuple[str, int]]]],
    build: Callable[[str, str, int], nn.Module],
    loss: Callable[[nn.Module], float],
    samples: int,
    progress: bool = False,
    max_cache_bytes: int = 1 << 30,
) -> SensitivityProfile:
    """Measure ``loss(model)`` with each listed layer alone replaced by ``build(name, method, rank)``.

    ``loss`` must run the model the same way every time (same inputs, same batches): the
    prefix before each layer is replayed from one recorded pass rather than recomputed.
    """
    start = time.perf_counter()
    profile = SensitivityProfile(samples=samples)
    replay = _PrefixReplay(model, loss, max_cache_bytes)
    total = sum(len(options) for _, _, options in layers)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="autodac: sensitivity profile", unit="probe", disable=None, leave=False)
    try:
        for name, module, options in layers:
            profile.losses[name] = {}
            first = replay.first_call(module) if replay.enabled else None
            for method, rank in options:
                # the layer under test runs factorised; a bound method, since assigning a Module to
                # `module.forward` would register a child named 'forward' and leave forward() as it was
                module.forward = build(name, method, rank).forward
                patched = replay.patch(first) if first is not None else []
                try:
                    profile.losses[name][(method, rank)] = loss(model)
                finally:
                    replay.unpatch(patched)
                    del module.forward
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    profile.seconds = time.perf_counter() - start
    return profile
