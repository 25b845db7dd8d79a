"""DAC (Li et al., WACV 2019): per-input-channel SVD into a depthwise conv then a pointwise conv.

For each input channel ``c`` the slice ``W[:, c]`` (``N x K``, ``K`` kernel elements) is
factored as ``U S V^T``; the depthwise conv holds the top ``r`` rows of ``V^T`` for every
channel (``C*r`` outputs, ``groups=C``, output index ``c*r + j``), the pointwise conv holds
``U[:, :r] * S[:r]``. All ``C`` SVDs run as one batched call.
"""

from __future__ import annotations

import torch

from autodac.factorize.base import Decomposition, Factors, Geometry, _prod, full_svd, out_scale, singular_values, svd_dtype, tail_energy

__all__ = ["DAC"]


class DAC:
    name = "dac"

    def applies_to(self, weight_shape: tuple[int, ...]) -> bool:
        return len(weight_shape) >= 3 and _prod(weight_shape[2:]) > 1

    def max_rank(self, weight_shape: tuple[int, ...]) -> int:
        return min(weight_shape[0], _prod(weight_shape[2:]))

    def _per_channel(self, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        n, c = weight.shape[:2]
        slices = weight.detach().to(svd_dtype(weight.dtype)).reshape(n, c, -1).permute(1, 0, 2)  # C x N x K
        return slices if scale is None else slices * scale[None, :, None]

    def errors(self, weight: torch.Tensor, out_weights: torch.Tensor | None = None) -> torch.Tensor:
        slices = self._per_channel(weight, out_scale(out_weights, weight.to(svd_dtype(weight.dtype))))
        return tail_energy(singular_values(slices), slices.pow(2).sum())

    def decompose(self, weight: torch.Tensor, out_weights: torch.Tensor | None = None) -> Decomposition:
        scale = out_scale(out_weights, weight.to(svd_dtype(weight.dtype)))
        return full_svd(self._per_channel(weight, scale), weight, scale)

    def truncate(self, d: Decomposition, rank: int) -> Factors:
        n, c = d.weight_shape[:2]
        kernel = d.weight_shape[2:]
        depthwise = d.vh[:, :rank, :].reshape(c * rank, 1, *kernel)
        pointwise = d.u[:, :, :rank] * d.s[:, None, :rank]  # C x N x r
        if d.out_scale is not None:
            pointwise = pointwise / d.out_scale[None, :, None]
        pointwise = pointwise.permute(1, 0, 2).reshape(n, c * rank, *([1] * len(kernel)))
        return Factors(depthwise.to(d.dtype).contiguous(), pointwise.to(d.dtype).contiguous())

    def factors(self, weight: torch.Tensor, rank: int) -> Factors:
        return self.truncate(self.decompose(weight), rank)

    def cost(self, geometry: Geometry, rank: int) -> int:
        k, n, c = geometry.kernel_elements, geometry.out_channels, geometry.in_channels
        return sum(batch * _prod(out) * c * rank * (k + n) for batch, _, out in geometry.calls)
