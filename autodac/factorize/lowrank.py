"""Plain low-rank split (channel SVD): a conv (or linear) ``C -> r`` then a ``1x1`` (or linear) ``r -> N``.

The weight is reshaped to ``N x (C*K)`` and factored once. The first layer keeps the kernel,
stride, padding and dilation; the second is pointwise and carries the bias. This is the only
factorisation that helps ``1x1`` convs and ``nn.Linear``.
"""

from __future__ import annotations

import torch

from autodac.factorize.base import Decomposition, Factors, Geometry, _prod, full_svd, out_scale, singular_values, svd_dtype, tail_energy

__all__ = ["LowRank"]


class LowRank:
    name = "lowrank"

    def applies_to(self, weight_shape: tuple[int, ...]) -> bool:
        return len(weight_shape) >= 2

    def max_rank(self, weight_shape: tuple[int, ...]) -> int:
        return min(weight_shape[0], weight_shape[1] * _prod(weight_shape[2:]))

    def _matrix(self, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        matrix = weight.detach().to(svd_dtype(weight.dtype)).reshape(weight.shape[0], -1)
        return matrix if scale is None else matrix * scale[:, None]

    def errors(self, weight: torch.Tensor, out_weights: torch.Tensor | None = None) -> torch.Tensor:
        matrix = self._matrix(weight, out_scale(out_weights, weight.to(svd_dtype(weight.dtype))))
        return tail_energy(singular_values(matrix), matrix.pow(2).sum())

    def decompose(self, weight: torch.Tensor, out_weights: torch.Tensor | None = None) -> Decomposition:
        scale = out_scale(out_weights, weight.to(svd_dtype(weight.dtype)))
        return full_svd(self._matrix(weight, scale), weight, scale)

    def truncate(self, d: Decomposition, rank: int) -> Factors:
        n, c = d.weight_shape[:2]
        kernel = d.weight_shape[2:]
        first = d.vh[:rank].reshape(rank, c, *kernel)
        second = d.u[:, :rank] * d.s[:rank]
        if d.out_scale is not None:
            second = second / d.out_scale[:, None]
        second = second.reshape(n, rank, *([1] * len(kernel)))
        return Factors(first.to(d.dtype).contiguous(), second.to(d.dtype).contiguous())

    def factors(self, weight: torch.Tensor, rank: int) -> Factors:
        return self.truncate(self.decompose(weight), rank)

    def cost(self, geometry: Geometry, rank: int) -> int:
        k, n, c = geometry.kernel_elements, geometry.out_channels, geometry.in_channels
        return sum(batch * _prod(out) * rank * (c * k + n) for batch, _, out in geometry.calls)
