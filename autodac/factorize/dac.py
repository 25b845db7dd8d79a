"""DAC (Li et al., WACV 2019): per-input-channel SVD into a depthwise conv then a pointwise conv.

For each input channel ``c`` the slice ``W[:, c]`` (``N x K``, ``K`` kernel elements) is
factored as ``U S V^T``; the depthwise conv holds the top ``r`` rows of ``V^T`` for every
channel (``C*r`` outputs, ``groups=C``, output index ``c*r + j``), the pointwise conv holds
``U[:, :r] * S[:r]``. All ``C`` SVDs run as one batched call.

Two implementations, same outputs: ``"grouped"`` (one depthwise conv of multiplier ``r``) and
``"split"`` (``r`` depthwise convs of multiplier 1, ``autodac.layers.SplitDepthwise``).
"""

from __future__ import annotations

import torch

from torch import nn

from autodac.factorize.base import Decomposition, Factors, Geometry, SVDFactorization, _prod, cholesky_factor, conv_type, kernel_like, out_scale, svd_dtype

__all__ = ["DAC"]


class DAC(SVDFactorization):
    name = "dac"
    part_names = ("depthwise", "pointwise")
    implementations = ("grouped", "split")
    color = "#1f77b4"
    uses_channel_blocks = True

    def applies_to(self, weight_shape: tuple[int, ...]) -> bool:
        return len(weight_shape) >= 3 and _prod(weight_shape[2:]) > 1

    def max_rank(self, weight_shape: tuple[int, ...]) -> int:
        return min(weight_shape[0], _prod(weight_shape[2:]))

    def _matrix(self, weight, out_weights, input_cov):
        """The C slices ``N x K`` under the weighting, and the per-channel Cholesky factors (or None)."""
        n, c = weight.shape[:2]
        dtype = svd_dtype(weight.dtype)
        slices = weight.detach().to(dtype).reshape(n, c, -1).permute(1, 0, 2)  # C x N x K
        scale = out_scale(out_weights, slices)
        if scale is not None:
            slices = slices * scale[None, :, None]
        factor = None
        if input_cov is not None:  # each input channel's own K x K block: DAC mixes no channels before the pointwise
            k = slices.shape[-1]
            if input_cov.dim() == 3:  # given as the blocks alone (a layer whose full covariance is too large)
                blocks = input_cov.double()
            else:
                blocks = input_cov.double().reshape(c, k, c, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            factor = cholesky_factor(blocks).to(dtype)
            slices = slices @ factor
        return slices, scale, factor

    def truncate(self, d: Decomposition, rank: int) -> Factors:
        n, c = d.weight_shape[:2]
        kernel = d.weight_shape[2:]
        depthwise = d.vh[:, :rank, :]
        if d.in_factor is not None:  # undo the input weighting: rows times L^-1
            depthwise = torch.linalg.solve_triangular(d.in_factor, depthwise, upper=False, left=False)
        depthwise = depthwise.reshape(c * rank, 1, *kernel)
        pointwise = d.u[:, :, :rank] * d.s[:, None, :rank]  # C x N x r
        if d.out_scale is not None:
            pointwise = pointwise / d.out_scale[None, :, None]
        pointwise = pointwise.permute(1, 0, 2).reshape(n, c * rank, *([1] * len(kernel)))
        return Factors(depthwise.to(d.dtype).contiguous(), pointwise.to(d.dtype).contiguous())

    def cost(self, geometry: Geometry, rank: int) -> int:
        k, n, c = geometry.kernel_elements, geometry.out_channels, geometry.in_channels
        return sum(batch * _prod(out) * c * rank * (k + n) for batch, _, out in geometry.calls)

    def params(self, weight_shape: tuple[int, ...], rank: int, bias: bool) -> int:
        n, c, k = weight_shape[0], weight_shape[1], _prod(weight_shape[2:])
        return c * rank * k + n * c * rank + (n if bias else 0)

    def modules(self, module: nn.Module, rank: int, options: dict) -> tuple[nn.Module, nn.Module]:
        n, c = module.weight.shape[:2]
        first = kernel_like(module, c, c * rank, groups=c, bias=False, options=options)
        return first, conv_type(module)(c * rank, n, 1, bias=module.bias is not None, **options)

    def implement(self, first: nn.Module, second: nn.Module, impl: str, rank: int) -> tuple[nn.Module, nn.Module]:
        if impl == "split" and not isinstance(first, nn.Linear):
            return _split_depthwise(first, second, first.in_channels, rank)
        return first, second


def _split_depthwise(grouped: nn.Module, pointwise: nn.Module, channels: int, rank: int) -> tuple[nn.Module, nn.Module]:
    """The grouped depthwise conv (output ``c*r + j``) as ``r`` multiplier-1 convs (output ``j*C + c``)."""
    from autodac.layers import SplitDepthwise  # the class saved models name; autodac.layers imports this package

    conv = type(grouped)
    kernel = tuple(grouped.weight.shape[2:])
    per_rank = grouped.weight.reshape(channels, rank, 1, *kernel)
    convs = []
    for j in range(rank):
        part = conv(
            channels, channels, grouped.kernel_size, stride=grouped.stride, padding=grouped.padding, dilation=grouped.dilation,
            groups=channels, bias=False, padding_mode=grouped.padding_mode, device=grouped.weight.device, dtype=grouped.weight.dtype,
        )
        part.weight.copy_(per_rank[:, j])
        convs.append(part)
    n = pointwise.weight.shape[0]
    rest = pointwise.weight.shape[2:]
    pointwise.weight.copy_(pointwise.weight.reshape(n, channels, rank, *rest).transpose(1, 2).reshape(n, rank * channels, *rest))
    return SplitDepthwise(convs), pointwise
