"""Probe inputs for models of one input or several: a tensor, or ``Inputs`` (tensors sharing the batch dimension).

Everything that runs the model on probe data (predictions, BatchNorm re-estimation, input
statistics, the sequential re-fit) takes either form and goes through ``count``, ``per_example``,
``call`` and ``concat``, so a two-input model is probed exactly as a one-input one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from torch import nn

__all__ = ["Inputs", "Batch", "count", "per_example", "arguments", "call", "concat", "fast_layout", "tensor_leaves"]


@dataclass(frozen=True)
class Inputs:
    """A batch of examples for a model called as ``model(*parts)``: every part is ``N x ...`` with the same ``N``."""

    parts: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return int(self.parts[0].shape[0])

    def __getitem__(self, index: Any) -> "Inputs":
        return Inputs(tuple(part[index] for part in self.parts))

    def to(self, device: Any) -> "Inputs":
        return Inputs(tuple(part.to(device) for part in self.parts))

    def detach(self) -> "Inputs":
        return Inputs(tuple(part.detach() for part in self.parts))


Batch = Union[torch.Tensor, Inputs]


def count(batch: Batch) -> int:
    """How many examples ``batch`` holds."""
    return len(batch) if isinstance(batch, Inputs) else int(batch.shape[0])


def per_example(batch: Batch) -> tuple[int, ...]:
    """One example's shape (without the batch dimension); for ``Inputs``, its total element count as a 1-tuple.

    What batching needs: ``autodac.probes.batch_size_for`` bounds the elements of one batch.
    """
    if isinstance(batch, Inputs):
        return (sum(math.prod(part.shape[1:]) for part in batch.parts),)
    return tuple(batch.shape[1:])


def arguments(batch: Batch) -> tuple[torch.Tensor, ...]:
    """The positional arguments the model is called with."""
    return batch.parts if isinstance(batch, Inputs) else (batch,)


def call(model: nn.Module, batch: Batch, device: Any) -> Any:
    """``model`` run on ``batch`` moved to ``device``, each image input in the fast layout."""
    return model(*(fast_layout(part.to(device)) for part in arguments(batch)))


def concat(batches: Sequence[Batch]) -> Batch:
    """One batch of every example in ``batches`` (all of one form), in order."""
    if isinstance(batches[0], Inputs):
        return Inputs(tuple(torch.cat(parts) for parts in zip(*(b.parts for b in batches))))
    return torch.cat(list(batches))


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory order when it is a batch of multi-channel images (same values).

    CPU conv kernels run channels-last ~1.5x faster (EfficientNet-Lite0 at 224 px, 2 threads);
    the layout propagates from the input, so the model's own weights are never touched.
    Single-channel inputs stay as they are (their layout would not change, their kernels might).
    """
    if x.dim() == 4 and x.shape[1] > 1 and x.is_floating_point():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output, in order: through tuples, lists, dicts and dataclasses (a number or string is left out)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for value in out.values() for t in tensor_leaves(value)]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in tensor_leaves(item)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in tensor_leaves(getattr(out, f.name))]
    return []
