"""Spatial SVD (Jaderberg et al. 2014): a ``kh x 1`` conv to ``r`` channels, then a ``1 x kw`` conv.

The weight is reshaped to a ``(C*kh) x (N*kw)`` matrix and factored once. The vertical conv
keeps the original stride, padding and dilation along the height, the horizontal conv those
along the width, so the pair is exact at full rank for any padding mode.
"""

from __future__ import annotations

import torch

from torch import nn

from autodac.factorize.base import Decomposition, Factors, Geometry, SVDFactorization, _prod, cholesky_factor, out_scale, svd_dtype

__all__ = ["Spatial"]


class Spatial(SVDFactorization):
    name = "spatial"
    part_names = ("vertical", "horizontal")
    color = "#ff7f0e"

    def applies_to(self, weight_shape: tuple[int, ...]) -> bool:
        # Only true 2-D kernels: with kh == 1 or kw == 1 it is the plain low-rank split.
        return len(weight_shape) == 4 and weight_shape[2] > 1 and weight_shape[3] > 1

    def max_rank(self, weight_shape: tuple[int, ...]) -> int:
        n, c, kh, kw = weight_shape
        return min(c * kh, n * kw)

    def _matrix(self, weight, out_weights, input_cov):
        n, c, kh, kw = weight.shape
        matrix = weight.detach().to(svd_dtype(weight.dtype)).permute(1, 2, 0, 3).reshape(c * kh, n * kw)
        scale = out_scale(out_weights, matrix)
        if scale is not None:
            matrix = matrix * scale.repeat_interleave(kw)[None, :]
        factor = None
        if input_cov is not None:
            # the vertical conv sees (C*kh) column patches, one per horizontal tap: average their covariance
            cov = input_cov.double().reshape(c, kh, kw, c, kh, kw).diagonal(dim1=2, dim2=5).mean(-1).reshape(c * kh, c * kh)
            factor = cholesky_factor(cov).to(matrix.dtype)
            matrix = factor.T @ matrix
        return matrix, scale, factor

    def truncate(self, d: Decomposition, rank: int) -> Factors:
        n, c, kh, kw = d.weight_shape
        root = d.s[:rank].sqrt()
        vertical = d.u[:, :rank] * root
        if d.in_factor is not None:  # undo the input weighting: L^-T on the left
            vertical = torch.linalg.solve_triangular(d.in_factor.T, vertical, upper=True)
        vertical = vertical.reshape(c, kh, rank).permute(2, 0, 1).reshape(rank, c, kh, 1)
        horizontal = root[:, None] * d.vh[:rank]
        if d.out_scale is not None:
            horizontal = horizontal / d.out_scale.repeat_interleave(kw)[None, :]
        horizontal = horizontal.reshape(rank, n, kw).permute(1, 0, 2).reshape(n, rank, 1, kw)
        return Factors(vertical.to(d.dtype).contiguous(), horizontal.to(d.dtype).contiguous())

    def cost(self, geometry: Geometry, rank: int) -> int:
        kh, kw = geometry.kernel_size
        n, c = geometry.out_channels, geometry.in_channels
        total = 0
        for batch, in_spatial, out_spatial in geometry.calls:
            mid = out_spatial[0] * in_spatial[1]  # height already strided, width not yet
            total += batch * (c * rank * kh * mid + rank * n * kw * _prod(out_spatial))
        return total

    def params(self, weight_shape: tuple[int, ...], rank: int, bias: bool) -> int:
        n, c, kh, kw = weight_shape
        return c * rank * kh + rank * n * kw + (n if bias else 0)

    def modules(self, module: nn.Module, rank: int, options: dict) -> tuple[nn.Module, nn.Module]:
        n, c, kh, kw = module.weight.shape
        first = nn.Conv2d(
            c, rank, (kh, 1), stride=_split_2d(module.stride, 0, 1), padding=_split_2d(module.padding, 0, 0),
            dilation=_split_2d(module.dilation, 0, 1), bias=False, padding_mode=module.padding_mode, **options,
        )
        second = nn.Conv2d(
            rank, n, (1, kw), stride=_split_2d(module.stride, 1, 1), padding=_split_2d(module.padding, 1, 0),
            dilation=_split_2d(module.dilation, 1, 1), bias=module.bias is not None, padding_mode=module.padding_mode, **options,
        )
        return first, second

    def place_padding(self, pads: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Height padding before the vertical half, width padding before the horizontal (``F.pad`` order: left, right, top, bottom)."""
        return (0, 0, *pads[2:]), (*pads[:2], 0, 0)


def _split_2d(value, axis: int, neutral):
    """Keep ``value`` along ``axis`` (0 = height, 1 = width) and ``neutral`` along the other."""
    if isinstance(value, str):
        return value
    return (value[0], neutral) if axis == 0 else (neutral, value[1])
