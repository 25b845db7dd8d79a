"""The interface every factorisation implements: its math, the pair of modules it builds, its sizes.

A factorisation takes a dense weight ``W`` (``N x C x k...`` for a conv, ``N x C`` for a
linear layer) and a rank ``r`` and returns the weights of two smaller layers whose
composition approximates ``W``; at ``max_rank`` the composition is exact. It also gives, in
closed form, the multiply-adds of those two layers (counted the way fvcore counts them) and
the relative reconstruction error at every rank, from one SVD of the layer.

Each method's class also owns everything else that differs between methods, so that adding a
method is its file and one ``register_method`` call (``autodac.factorize``): the two empty
``nn`` layers its factors go into (``modules``), their names (``part_names``), its ways to run
(``implementations``, ``implement``), where a layer's own input padding goes (``place_padding``),
its parameters at a rank (``params``) and its colour in pictures (``color``).
``autodac.layers.build_factorized`` is the same few lines for every method.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

__all__ = [
    "Geometry", "Decomposition", "Factors", "Factorization", "BaseFactorization", "svd_dtype", "tail_energy", "out_scale", "full_svd", "singular_values",
    "cholesky_factor", "SVDFactorization", "conv_type", "covariance_for",
]


@dataclass(frozen=True)
class Geometry:
    """What the cost of one layer depends on, read off one forward pass.

    ``kernel_size`` is ``()`` for a linear layer. ``input_spatial``/``output_spatial`` are the
    spatial sizes of one call (``()`` for linear layers); ``batch`` is the number of rows a
    linear layer sees (all leading dims) or the batch of a conv. ``calls`` lists one
    ``(batch, input_spatial, output_spatial)`` triple per time the module runs in a forward.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    calls: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]

    @property
    def kernel_elements(self) -> int:
        n = 1
        for k in self.kernel_size:
            n *= k
        return n

    def dense_cost(self) -> int:
        """fvcore's count of the dense layer: one multiply-add per weight per output position."""
        total = 0
        for batch, _, out_spatial in self.calls:
            total += batch * _prod(out_spatial) * self.out_channels * self.in_channels * self.kernel_elements
        return total


@dataclass(frozen=True)
class Decomposition:
    """One full SVD of a layer in a method's own layout, truncated to any rank without recomputing.

    ``u``: ``... x rows x m``, ``s``: ``... x m``, ``vh``: ``... x m x cols`` (batched for DAC).
    ``weight_shape`` and ``dtype`` are the dense layer's, so factors come back in its dtype.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    energy: torch.Tensor
    weight_shape: tuple[int, ...]
    dtype: torch.dtype
    out_scale: torch.Tensor | None = None  # sqrt of the output-channel weights the SVD was taken under
    in_factor: torch.Tensor | None = None  # Cholesky factor of the input covariance the SVD was taken under

    def errors(self) -> torch.Tensor:
        return tail_energy(self.s, self.energy)


@dataclass(frozen=True)
class Factors:
    """The weights of the two layers that replace one dense layer (bias goes on ``second``)."""

    first: torch.Tensor
    second: torch.Tensor


class Factorization(Protocol):
    """A way to split one dense layer into two cheaper ones."""

    name: str

    def applies_to(self, weight_shape: tuple[int, ...]) -> bool:
        """Whether this method can factor a (groups=1) weight of this shape."""

    def max_rank(self, weight_shape: tuple[int, ...]) -> int:
        """The rank at which the factorisation is exact."""

    def errors(
        self, weight: torch.Tensor, out_weights: torch.Tensor | None = None, input_cov: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``errors[r - 1]``: relative squared Frobenius error ``|W - W_r|^2 / |W|^2`` at rank ``r``.

        With ``out_weights`` (one positive weight per output channel) both norms weigh output
        channel ``n``'s squared error by ``out_weights[n]``, and so does the fit below.
        """

    def decompose(
        self, weight: torch.Tensor, out_weights: torch.Tensor | None = None, input_cov: torch.Tensor | None = None
    ) -> Decomposition:
        """The full SVD this method truncates (one batched call), optionally output-weighted.

        ``input_cov`` (``CK x CK``, channel-major like ``F.unfold``) makes the fit minimise the
        error of the layer's output on inputs with that covariance instead of the weight error.
        """

    def truncate(self, decomposition: Decomposition, rank: int) -> Factors:
        """The two weights at ``rank`` (in the dense layer's dtype, on its device)."""

    def cost(self, geometry: Geometry, rank: int) -> int:
        """Multiply-adds of the pair, counted as fvcore counts them."""

    part_names: tuple[str, str]  # the names of the two halves in a ``FactorizedLayer`` (and so its state-dict keys)
    implementations: tuple[str, ...]  # ways to run the pair (same outputs, different speed); ``""`` is the plain form
    color: str  # its colour in pictures (``autodac.plots``)

    def params(self, weight_shape: tuple[int, ...], rank: int, bias: bool) -> int:
        """Parameters of the pair at ``rank`` (tests prove it equals the built pair's count)."""

    def modules(self, module: nn.Module, rank: int, options: dict) -> tuple[nn.Module, nn.Module]:
        """The two layers that replace ``module`` at ``rank`` (``options``: device and dtype), weights still to be copied in.

        They take ``truncate``'s ``first`` and ``second`` and the layer's bias goes on the second.
        """

    def implement(self, first: nn.Module, second: nn.Module, impl: str, rank: int) -> tuple[nn.Module, nn.Module]:
        """The filled pair rewritten as implementation ``impl`` (one of ``implementations``): same outputs."""

    def place_padding(self, pads: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Where a layer's own input padding (``F.pad`` amounts) goes: ``(before the first half, before the second)``."""


class BaseFactorization:
    """Defaults of what a method's class owns besides its math; a method overrides those that differ."""

    name: str
    part_names: tuple[str, str] = ("first", "second")
    implementations: tuple[str, ...] = ("",)
    color: str = "#7f7f7f"

    def modules(self, module: nn.Module, rank: int, options: dict) -> tuple[nn.Module, nn.Module]:  # pragma: no cover
        raise NotImplementedError

    def params(self, weight_shape: tuple[int, ...], rank: int, bias: bool) -> int:  # pragma: no cover
        raise NotImplementedError

    def implement(self, first: nn.Module, second: nn.Module, impl: str, rank: int) -> tuple[nn.Module, nn.Module]:
        return first, second

    def place_padding(self, pads: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return pads, ()


_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_type(module: nn.Module) -> type[nn.Module]:
    """The conv class a factorised conv's halves use: the plain one of as many kernel dimensions as ``module``'s."""
    return _CONV_BY_DIMS[len(module.kernel_size)]


def kernel_like(module: nn.Module, in_channels: int, out_channels: int, groups: int, bias: bool, options: dict) -> nn.Module:
    """The half of a pair that keeps ``module``'s kernel: its size, stride, padding, dilation and padding mode."""
    return conv_type(module)(
        in_channels, out_channels, module.kernel_size, stride=module.stride, padding=module.padding, dilation=module.dilation,
        groups=groups, bias=bias, padding_mode=module.padding_mode, **options,
    )


class SVDFactorization(BaseFactorization):
    """Shared plumbing of the SVD-based methods: each supplies only ``_matrix`` and ``truncate``.

    ``_matrix(weight, out_weights, input_cov)`` returns the matrix the method factors, already
    weighted, with the output scale and input Cholesky factor it applied (or None), so that
    ``truncate`` can undo them.
    """

    name: str
    uses_channel_blocks: bool = False  # whether ``_matrix`` can take a ``C x K x K`` input covariance of channel blocks

    def _matrix(self, weight, out_weights, input_cov):  # pragma: no cover - every method overrides it
        raise NotImplementedError

    def truncate(self, d: Decomposition, rank: int) -> Factors:  # pragma: no cover
        raise NotImplementedError

    def errors(self, weight, out_weights=None, input_cov=None) -> torch.Tensor:
        matrix, _, _ = self._matrix(weight, out_weights, input_cov)
        return tail_energy(singular_values(matrix), energy_of(matrix))

    def decompose(self, weight, out_weights=None, input_cov=None) -> Decomposition:
        matrix, scale, factor = self._matrix(weight, out_weights, input_cov)
        return full_svd(matrix, weight, scale, factor)

    def factors(self, weight: torch.Tensor, rank: int) -> Factors:
        return self.truncate(self.decompose(weight), rank)


def covariance_for(method: object, input_cov: torch.Tensor | None) -> torch.Tensor | None:
    """``input_cov`` if ``method`` can fit to it, else None (a fit to the weights alone).

    A full ``CK x CK`` covariance suits every method; channel blocks (``C x K x K``, a layer whose
    full covariance is too large) only a method that declares ``uses_channel_blocks`` (DAC).
    """
    if input_cov is not None and input_cov.dim() == 3 and not getattr(method, "uses_channel_blocks", False):
        return None
    return input_cov


def _prod(values: tuple[int, ...]) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


def svd_dtype(dtype: torch.dtype) -> torch.dtype:
    """SVDs run in float64 for float64 weights and float32 otherwise (half types have no SVD)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tail_energy(singular_values: torch.Tensor, total_energy: torch.Tensor) -> torch.Tensor:
    """Relative error at each rank from spectra ``... x m``: sum of discarded ``s^2`` over all batches.

    Returns a float64 vector of length ``m`` whose entry ``r - 1`` is the error at rank ``r``.
    """
    energy = singular_values.double().pow(2).reshape(-1, singular_values.shape[-1]).sum(0)
    kept = torch.cumsum(energy, 0)
    total = total_energy.double().clamp_min(torch.finfo(torch.float64).tiny)
    return ((total - kept) / total).clamp_min(0.0)


# Output weights whose peak is within these are used as they are: float32 holds their squares and their sums.
_SAFE_LOW, _SAFE_HIGH = 2.0**-60, 2.0**60


def power_of_two_peak(tensor: torch.Tensor) -> float:
    """The power of two nearest below ``tensor``'s largest magnitude (1 for an empty, all-zero or non-finite one).

    Dividing by it is exact, so values of any range are brought near 1 before they are squared in float32
    (a Gram or covariance of entries near 1e20 overflows, near 1e-20 underflows), and values already near 1
    give bit for bit what they gave unscaled."""
    peak = float(tensor.detach().abs().amax()) if tensor.numel() else 0.0
    if not math.isfinite(peak) or peak == 0.0:
        return 1.0
    return 2.0 ** math.floor(math.log2(peak))


def energy_of(matrix: torch.Tensor) -> torch.Tensor:
    """``sum(matrix^2)`` as a float64 scalar, squared after an exact power-of-two scaling (no float32 overflow)."""
    scale = power_of_two_peak(matrix)
    return (matrix / scale).pow(2).sum().double() * (scale * scale)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, batched over leading dims) from the smaller Gram matrix.

    Only the spectrum is needed to score every rank, and ``eigvalsh`` of the ``m x m`` Gram
    matrix (``m`` the smaller side) is many times faster than an SVD of the matrix itself.
    The Gram is formed in the matrix's own dtype (float32 for float32 weights: the product is
    most of the time, 4x faster than in float64 on a CPU, and the tail energies it gives
    differ from float64's by < 1e-6 of the layer's energy on spectra decaying as ``1/i^2``
    or slower) and decomposed in float64, which keeps those tail energies accurate.
    """
    scale = power_of_two_peak(matrix)
    m = matrix / scale  # squared in the Gram: weights near 1e20 (or 1e-20) would overflow (underflow) float32
    gram = m @ m.transpose(-1, -2) if m.shape[-2] <= m.shape[-1] else m.transpose(-1, -2) @ m
    return torch.linalg.eigvalsh(gram.double()).flip(-1).clamp_min(0).sqrt() * scale


def out_scale(out_weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``sqrt`` of output-channel weights, floored so the scaling stays invertible (exact at full rank)."""
    if out_weights is None:
        return None
    w = out_weights.detach().to(device=like.device, dtype=torch.float64).clamp_min(0)
    scale = power_of_two_peak(w)
    if not _SAFE_LOW <= scale <= _SAFE_HIGH:  # only ratios matter: gamma^2/|W|^2 of a dead filter (1e40) overflows float32
        w = w / scale  # only then: a sqrt of an odd power of two would change ordinary plans' bits
    w = w.to(like.dtype)
    floor = w.mean().clamp_min(torch.finfo(like.dtype).tiny) * 1e-6
    return w.clamp_min(floor).sqrt()


def full_svd(
    matrix: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, in_factor: torch.Tensor | None = None
) -> Decomposition:
    """SVD of ``matrix`` (already in the SVD dtype and weighting) packaged with what truncation needs."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return Decomposition(u, s, vh, energy_of(matrix), tuple(weight.shape), weight.dtype, scale, in_factor)


def cholesky_factor(covariance: torch.Tensor, damping: float = 1e-2) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of ``covariance + damping * mean(diag) * I`` (batched).

    Weighting a fit by ``L`` minimises the error of the layer's *output* on inputs with that
    covariance (``|dW L|^2 = E|dW x|^2``). The damping keeps directions the probe never saw
    from being amplified on the way back (``L^-1``); at full rank the fit is exact regardless.
    """
    cov = covariance.to(torch.float64, copy=True)  # damped in place: no identity or sum of the covariance's size
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
    diag.add_(diag.mean(-1, keepdim=True).clamp_min(1e-12) * damping)
    return torch.linalg.cholesky(cov)


def output_matching_weight(
    weight: torch.Tensor, cross_cov: torch.Tensor, input_cov: torch.Tensor, damping: float = 1e-3
) -> torch.Tensor:
    """``W* = W (C_oc + l I)(C_cc + l I)^-1`` with ``l = damping * mean(diag C_cc)``, in ``weight``'s shape and dtype.

    When a layer's inputs have changed from ``x_o`` to ``x_c`` (the layers before it were
    truncated), ``W*`` is the dense weight whose output on ``x_c`` is closest in least squares
    to the original output ``W x_o`` (``cross_cov = E[x_o x_c^T]``, ``input_cov = E[x_c x_c^T]``,
    both ``CK x CK``), with a ridge ``l |W* - W|^2`` pulling it toward ``W`` along directions
    the inputs barely excite (unchanged inputs give ``W`` back exactly). The output error of any
    weight ``W'`` then splits orthogonally (up to the ridge):
    ``E|W x_o - W' x_c|^2 = E|W x_o - W* x_c|^2 + E|(W* - W') x_c|^2``, so the best rank-``r``
    factorisation is the data-aware fit of ``W*`` under ``input_cov``.
    """
    matrix = weight.detach().double().reshape(weight.shape[0], -1)
    gram = input_cov.to(matrix.device, torch.float64, copy=True)  # ridges added in place: no identity of their size
    level = torch.diagonal(gram).mean().clamp_min(1e-12) * damping
    cross = cross_cov.to(matrix.device, torch.float64, copy=True)
    torch.diagonal(cross).add_(level)
    target = matrix @ cross
    del cross
    torch.diagonal(gram).add_(level)
    solved = torch.linalg.solve(gram, target.T).T  # the system is symmetric
    return solved.reshape(weight.shape).to(weight.dtype)
