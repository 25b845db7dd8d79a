"""Transposed DAC: per-output-channel SVD into a pointwise conv then a grouped (per output channel) conv.

For each output channel ``n`` the slice ``W[n]`` (``C x K``, ``K`` kernel elements) is factored
as ``U S V^T``. The pointwise conv maps the ``C`` inputs to ``N*r`` channels (output index
``n*r + j`` holds ``s_j u_j``), then a conv with ``groups=N`` sums each output channel's ``r``
kernels ``v_j`` (it keeps the original stride, padding, dilation and padding mode; a pointwise
map commutes with every padding mode, so the pair is exact at full rank). DAC factors the
slices ``W[:, c]`` instead; which of the two keeps more depends on the layer, so the planner
chooses. All ``N`` SVDs run as one batched call.

With an input covariance the fit is weighted by its Kronecker approximation
``cov ~ cov_C (x) cov_K`` (channels by kernel taps, each the average of the other's blocks): then
the output error of slice ``n`` is ``|L_C^T dW_n L_K|^2`` and the weighted SVD is still closed
form; the full covariance does not factor over this method's structure.
"""

from __future__ import annotations

import torch

from torch import nn

from autodac.factorize.base import Decomposition, Factors, Geometry, SVDFactorization, _prod, cholesky_factor, conv_type, kernel_like, out_scale, svd_dtype

__all__ = ["TransposedDAC", "kronecker_factors"]


def kronecker_factors(input_cov: torch.Tensor, channels: int, taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cov_C, cov_K)``: the channel and tap covariances whose Kronecker product approximates ``input_cov``.

    ``cov_C`` averages the ``K x K``-indexed blocks' diagonals (the channel covariance at one tap,
    averaged over taps); ``cov_K`` averages the channel-diagonal blocks (the tap covariance of one
    channel, averaged over channels).
    """
    blocks = input_cov.double().reshape(channels, taps, channels, taps)
    cov_c = blocks.diagonal(dim1=1, dim2=3).mean(-1)
    cov_k = blocks.diagonal(dim1=0, dim2=2).mean(-1)
    return cov_c, cov_k


class TransposedDAC(SVDFactorization):
    name = "tdac"
    part_names = ("pointwise", "per_output")
    color = "#9467bd"

    def applies_to(self, weight_shape: tuple[int, ...]) -> bool:
        return len(weight_shape) >= 3 and _prod(weight_shape[2:]) > 1

    def max_rank(self, weight_shape: tuple[int, ...]) -> int:
        return min(weight_shape[1], _prod(weight_shape[2:]))

    def _matrix(self, weight, out_weights, input_cov):
        """The N slices ``C x K`` under the weighting, and the (channel, tap) Cholesky factors (or None)."""
        n, c = weight.shape[:2]
        dtype = svd_dtype(weight.dtype)
        slices = weight.detach().to(dtype).reshape(n, c, -1)  # N x C x K
        scale = out_scale(out_weights, slices)
        if scale is not None:
            slices = slices * scale[:, None, None]
        factor = None
        if input_cov is not None:
            cov_c, cov_k = kronecker_factors(input_cov, c, slices.shape[-1])
            left, right = cholesky_factor(cov_c).to(dtype), cholesky_factor(cov_k).to(dtype)
            slices = left.T @ slices @ right
            factor = torch.block_diag(left, right)  # both factors in one tensor; split again by size
        return slices, scale, factor

    def truncate(self, d: Decomposition, rank: int) -> Factors:
        n, c = d.weight_shape[:2]
        kernel = d.weight_shape[2:]
        pointwise = d.u[:, :, :rank] * d.s[:, None, :rank]  # N x C x r
        taps = d.vh[:, :rank, :]  # N x r x K
        if d.in_factor is not None:  # undo the weighting: L_C^-T on the left, L_K^-1 on the right
            left, right = d.in_factor[:c, :c], d.in_factor[c:, c:]
            pointwise = torch.linalg.solve_triangular(left.T, pointwise, upper=True)
            taps = torch.linalg.solve_triangular(right, taps, upper=False, left=False)
        if d.out_scale is not None:
            pointwise = pointwise / d.out_scale[:, None, None]
        first = pointwise.permute(0, 2, 1).reshape(n * rank, c, *([1] * len(kernel)))
        second = taps.reshape(n, rank, *kernel)
        return Factors(first.to(d.dtype).contiguous(), second.to(d.dtype).contiguous())

    def cost(self, geometry: Geometry, rank: int) -> int:
        k, n, c = geometry.kernel_elements, geometry.out_channels, geometry.in_channels
        return sum(batch * (_prod(inp) * c * n * rank + _prod(out) * n * rank * k) for batch, inp, out in geometry.calls)

    def params(self, weight_shape: tuple[int, ...], rank: int, bias: bool) -> int:
        n, c, k = weight_shape[0], weight_shape[1], _prod(weight_shape[2:])
        return c * n * rank + n * rank * k + (n if bias else 0)

    def modules(self, module: nn.Module, rank: int, options: dict) -> tuple[nn.Module, nn.Module]:
        """Pointwise ``C -> N*r`` at the input's resolution, then each output channel's ``r`` kernels."""
        n, c = module.weight.shape[:2]
        second = kernel_like(module, n * rank, n, groups=n, bias=module.bias is not None, options=options)
        return conv_type(module)(c, n * rank, 1, bias=False, **options), second

    def place_padding(self, pads: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """All of it before the second half: the 1x1 first half without bias maps zero padding to zero padding."""
        return (), pads
