"""Plain low-rank split (channel SVD): a conv (or linear) ``C -> r`` then a ``1x1`` (or linear) ``r -> N``.

The weight is reshaped to ``N x (C*K)`` and factored once. The first layer keeps the kernel,
stride, padding and dilation; the second is pointwise and carries the bias. This is the only
factorisation that helps ``1x1`` convs and ``nn.Linear``.
"""

from __future__ import annotations

import torch

from autodac.factorize.base import Factors, Geometry, _prod, svd_dtype, tail_energy

__all__ = ["LowRank"]


class LowRank:
    name = "lowrank"

    def applies_to(self, weight_shape: tuple[int, ...]) -> bool:
        return len(weight_shape) >= 2

    def max_rank(self, weight_shape: tuple[int, ...]) -> int:
        return min(weight_shape[0], weight_shape[1] * _prod(weight_shape[2:]))

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().to(svd_dtype(weight.dtype)).reshape(weight.shape[0], -1)

    def errors(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = self._matrix(weight)
        return tail_energy(torch.linalg.svdvals(matrix), matrix.pow(2).sum())

    def factors(self, weight: torch.Tensor, rank: int) -> Factors:
        n, c = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        u, s, vh = torch.linalg.svd(self._matrix(weight), full_matrices=False)
        first = vh[:rank].reshape(rank, c, *kernel)
        second = (u[:, :rank] * s[:rank]).reshape(n, rank, *([1] * len(kernel)))
        return Factors(first.to(weight.dtype).contiguous(), second.to(weight.dtype).contiguous())

    def cost(self, geometry: Geometry, rank: int) -> int:
        k, n, c = geometry.kernel_elements, geometry.out_channels, geometry.in_channels
        return sum(batch * _prod(out) * rank * (c * k + n) for batch, _, out in geometry.calls)
