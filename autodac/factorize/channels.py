"""Hidden-width math: which input channels of a layer to keep, and its weight re-fitted to the rest.

Pure tensor math. A layer ``y = W x`` (a ``1x1`` conv or a linear layer, ``W`` is ``N x C``) whose
input channels are produced channel by channel (conv -> BatchNorm -> activation -> depthwise
conv -> ... -> this layer: an inverted-residual or bottleneck block) can drop input channels:
the channels it no longer reads need not be computed at all upstream, so keeping ``k`` of ``C``
channels costs ``k / C`` of the whole chain. Which ``k`` to keep, and the weight that best
reproduces ``W x`` from them, follow from the second moments of the layer's inputs.

Inputs are augmented with a constant ``1`` (always kept) so that a dropped channel's mean moves
into the bias. With ``S = E[z z^T]`` of ``z = [x; 1]`` and the kept set ``K``, the least-squares
weight is ``W_K = W S[:, K] S[K, K]^-1`` and the output error left is ``tr(M S_res)`` with ``S_res``
the Schur complement of ``S`` on ``K`` and ``M = W^T D W`` (``D``: output-channel weights). Channels
are ordered greedily, each step keeping the channel that removes most of the error left, with
rank-one updates: the whole order of ``C`` channels costs ``O(C^3)``, and the error at every
width comes with it. Widths are nested (the first ``k`` of the order), so a planner can try any.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ChannelOrder", "order_channels", "refit_kept"]


@dataclass(frozen=True)
class ChannelOrder:
    """Input channels in the order they are worth keeping, and the relative error at each width.

    ``errors[k - 1]`` is the relative output error ``E|W x - W_k z_k|^2 / E|W (x - E x)|^2`` (output
    channels weighted) when only ``order[:k]`` are kept and the weight is re-fitted: relative to
    the output's spread, not its mean, which the BatchNorm after such a layer takes away (an error
    of 1 is as large as all the signal the layer carries).
    """

    order: torch.Tensor  # int64, length C
    errors: torch.Tensor  # float64, length C; errors[-1] == 0 up to rounding


def _weighted(weight: torch.Tensor, out_weights: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().double().reshape(weight.shape[0], -1)
    if out_weights is not None:
        w = w * out_weights.detach().double().clamp_min(0).sqrt()[:, None].to(w.device)
    return torch.cat([w, torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)], 1)  # the constant adds nothing to W x


def order_channels(
    weight: torch.Tensor, moments: torch.Tensor, out_weights: torch.Tensor | None = None, step: int = 1
) -> ChannelOrder:
    """Greedy keep-order of the input channels of ``weight`` (``N x C``) under augmented ``moments``.

    ``moments`` is ``E[z z^T]`` of ``z = [x; 1]`` (``(C + 1) x (C + 1)``, the constant last), as
    ``autodac.widths.input_moments`` collects it. ``out_weights`` weighs each output channel's
    squared error (e.g. as the BatchNorm after the layer scales it). With ``step > 1`` the
    ``step`` channels of largest gain join together (one block update instead of ``step``
    rank-one ones: wide layers order in seconds); errors are exact at multiples of ``step`` and
    interpolated between.
    """
    w = _weighted(weight, out_weights)
    n = w.shape[1]
    if moments.shape != (n, n):
        raise ValueError(f"moments must be {n} x {n} for a weight with {n - 1} input channels, but got {tuple(moments.shape)}")
    metric = w.T @ w  # M
    residual = moments.double().to(w.device).clone()
    # keep the constant first: what is left is the covariance about the mean
    v = residual[:, -1:].clone()
    residual -= v @ v.T / max(float(v[-1, 0]), 1e-300)
    q = torch.einsum("ij,ji->i", residual @ metric, residual)  # diag(R M R): each channel's gain is q_j / R_jj
    error = total = float((metric * residual).sum())  # tr(M R), both symmetric
    free = torch.ones(n, dtype=torch.bool, device=w.device)
    free[-1] = False
    tiny = 1e-12 * max(float(torch.diagonal(moments).double().abs().mean()), 1e-300)
    order: list[int] = []
    marks = [(0, error)]
    while len(order) < n - 1:
        d = torch.diagonal(residual)
        gain = torch.where(free & (d > tiny), q / d.clamp_min(tiny), torch.full_like(q, -1.0))
        count = min(step, int(free.sum()))
        picked = torch.topk(gain, count).indices
        useful = picked[gain[picked] >= 0]
        if len(useful) == 0:  # every channel left is a combination of the kept ones: keeping them gains nothing
            rest = torch.nonzero(free).flatten().tolist()
            order.extend(rest)
            free[rest] = False
            marks.append((len(order), error))
            break
        picked = useful
        block = residual[:, picked]  # V
        inverse = torch.linalg.pinv(residual[picked][:, picked], hermitian=True)  # D^-1
        a = block @ inverse  # A = V D^-1
        mv = metric @ block  # M V
        b = mv.T @ residual  # V^T M R (g x n)
        q = q - 2 * torch.einsum("ig,gi->i", a, b) + torch.einsum("ig,gh,ih->i", a, block.T @ mv, a)
        error -= float(torch.trace(inverse @ (block.T @ mv)))
        residual -= a @ block.T
        free[picked] = False
        order.extend(int(j) for j in picked)
        marks.append((len(order), max(error, 0.0)))
    widths = torch.tensor([m for m, _ in marks], dtype=torch.float64)
    values = torch.tensor([e for _, e in marks], dtype=torch.float64)
    errors = torch.from_numpy(np.interp(np.arange(1, n, dtype=np.float64), widths.numpy(), values.numpy()))
    errors = errors / max(total, 1e-300)
    errors[-1] = 0.0  # all channels kept: the layer is unchanged
    return ChannelOrder(torch.tensor(order, dtype=torch.int64), errors)


def refit_kept(weight: torch.Tensor, moments: torch.Tensor, kept: torch.Tensor, damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_K, b)``: the weight over the ``kept`` input channels and the bias that best reproduce ``W x``.

    Least squares under the augmented ``moments`` (the constant is always kept, its coefficient
    is the bias added to the layer's own), with a small ridge pulling ``W_K`` toward ``W``'s own
    columns along directions the inputs barely excite, so keeping every channel gives ``W`` back.
    Returned in ``weight``'s dtype; ``W_K`` has ``weight``'s shape with ``len(kept)`` input channels.
    """
    n_out = weight.shape[0]
    w = weight.detach().double().reshape(n_out, -1)
    w_aug = torch.cat([w, torch.zeros(n_out, 1, dtype=w.dtype, device=w.device)], 1)
    c = w.shape[1]
    keep = torch.cat([kept.to(torch.int64).cpu(), torch.tensor([c])]).to(w.device)
    s = moments.double().to(w.device)
    s_kk = s[keep][:, keep]
    level = torch.diagonal(s_kk).mean().clamp_min(1e-12) * damping
    eye = torch.eye(len(keep), dtype=s.dtype, device=s.device)
    target = w_aug @ s[:, keep] + level * w_aug[:, keep]
    solved = torch.linalg.solve(s_kk + level * eye, target.T).T
    new_weight = solved[:, :-1].reshape(n_out, len(kept), *weight.shape[2:])
    return new_weight.to(weight.dtype), solved[:, -1].to(weight.dtype)
