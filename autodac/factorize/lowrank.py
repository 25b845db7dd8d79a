"""Plain low-rank split (channel SVD): a conv (or linear) ``C -> r`` then a ``1x1`` (or linear) ``r -> N``.

The weight is reshaped to ``N x (C*K)`` and factored once. The first layer keeps the kernel,
stride, padding and dilation; the second is pointwise and carries the bias. This is the only
factorisation that helps ``1x1`` convs and ``nn.Linear``.
"""

from __future__ import annotations

import torch

from torch import nn

from autodac.factorize.base import Decomposition, Factors, Geometry, SVDFactorization, _prod, cholesky_factor, conv_type, kernel_like, out_scale, svd_dtype

__all__ = ["LowRank"]


class LowRank(SVDFactorization):
    name = "lowrank"
    part_names = ("reduce", "expand")
    color = "#2ca02c"

    def applies_to(self, weight_shape: tuple[int, ...]) -> bool:
        return len(weight_shape) >= 2

    def max_rank(self, weight_shape: tuple[int, ...]) -> int:
        return min(weight_shape[0], weight_shape[1] * _prod(weight_shape[2:]))

    def _matrix(self, weight, out_weights, input_cov):
        matrix = weight.detach().to(svd_dtype(weight.dtype)).reshape(weight.shape[0], -1)
        scale = out_scale(out_weights, matrix)
        if scale is not None:
            matrix = matrix * scale[:, None]
        factor = None
        if input_cov is not None:
            factor = cholesky_factor(input_cov).to(matrix.dtype)
            matrix = matrix @ factor
        return matrix, scale, factor

    def truncate(self, d: Decomposition, rank: int) -> Factors:
        n, c = d.weight_shape[:2]
        kernel = d.weight_shape[2:]
        first = d.vh[:rank]
        if d.in_factor is not None:
            first = torch.linalg.solve_triangular(d.in_factor, first, upper=False, left=False)
        first = first.reshape(rank, c, *kernel)
        second = d.u[:, :rank] * d.s[:rank]
        if d.out_scale is not None:
            second = second / d.out_scale[:, None]
        second = second.reshape(n, rank, *([1] * len(kernel)))
        return Factors(first.to(d.dtype).contiguous(), second.to(d.dtype).contiguous())

    def cost(self, geometry: Geometry, rank: int) -> int:
        k, n, c = geometry.kernel_elements, geometry.out_channels, geometry.in_channels
        return sum(batch * _prod(out) * rank * (c * k + n) for batch, _, out in geometry.calls)

    def params(self, weight_shape: tuple[int, ...], rank: int, bias: bool) -> int:
        n, c, k = weight_shape[0], weight_shape[1], _prod(weight_shape[2:])
        return rank * c * k + n * rank + (n if bias else 0)

    def modules(self, module: nn.Module, rank: int, options: dict) -> tuple[nn.Module, nn.Module]:
        n, c = module.weight.shape[:2]
        has_bias = module.bias is not None
        if isinstance(module, nn.Linear):
            return nn.Linear(c, rank, bias=False, **options), nn.Linear(rank, n, bias=has_bias, **options)
        first = kernel_like(module, c, rank, groups=1, bias=False, options=options)
        return first, conv_type(module)(rank, n, 1, bias=has_bias, **options)
