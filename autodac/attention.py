"""Attention whose projections are ordinary ``nn.Linear`` modules, so they can be factorised.

``nn.MultiheadAttention`` keeps its in-projection as a packed Parameter (``in_proj_weight``)
and calls it and ``out_proj`` through ``F.multi_head_attention_forward``: no module runs, so no
layer can be traced, fitted or swapped. ``UnfusedMultiheadAttention`` is the same computation
with four modules, ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` (plans name them
``<attention>.q_proj`` ...), and the same outputs, attention weights, masks, dropout and fvcore
count. ``unfuse_attention`` swaps every ``nn.MultiheadAttention`` of a copy of a model for it;
``optimize`` and ``apply`` both do, so plans replay.

The forward follows torch's ``F.multi_head_attention_forward`` op for op (the projections
aside), so the ops fvcore counts are the same; it never takes torch's fused fast path, whose
kernels need the packed weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autodac.surgery import replace_layers

__all__ = ["UnfusedMultiheadAttention", "PaddedZerosTransformerEncoder", "unfuse_attention"]


def _linear_from(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias`` (same device, dtype and ``requires_grad``)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return layer


class UnfusedMultiheadAttention(nn.Module):
    """A drop-in ``nn.MultiheadAttention`` whose in- and out-projections are ``nn.Linear`` modules.

    Same constructor arguments' meaning and the same ``forward`` signature and results (exact
    at full rank: the projections are the packed weight's rows). ``in_proj_weight`` and
    ``in_proj_bias`` read ``None``: the weights live in ``q_proj``/``k_proj``/``v_proj``, and the
    fused kernels of ``nn.TransformerEncoderLayer`` (which read the packed weight) stay off.
    """

    in_proj_weight = None
    in_proj_bias = None

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, add_bias_kv: bool = False,
        add_zero_attn: bool = False, kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
        device=None, dtype=None,
    ) -> None:
        super().__init__()
        options = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"`embed_dim` must be divisible by `num_heads`, but got embed_dim={embed_dim}, num_heads={num_heads}")
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **options)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **options)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **options)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **options)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim, **options))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim, **options))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "UnfusedMultiheadAttention":
        """The equivalent of ``mha`` with copies of its weights (``mha`` is not changed)."""
        weight = mha.out_proj.weight
        new = cls(
            mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None, add_bias_kv=False,
            add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first,
            device=weight.device, dtype=weight.dtype,
        )
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        new.q_proj, new.k_proj, new.v_proj = (_linear_from(w, b) for w, b in zip(weights, biases))
        new.out_proj = _linear_from(mha.out_proj.weight, mha.out_proj.bias)
        if mha.bias_k is not None:
            new.bias_k = nn.Parameter(mha.bias_k.detach().clone(), requires_grad=mha.bias_k.requires_grad)
        if mha.bias_v is not None:
            new.bias_v = nn.Parameter(mha.bias_v.detach().clone(), requires_grad=mha.bias_v.requires_grad)
        new.train(mha.training)
        return new

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = True,
        attn_mask: Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``."""
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype, check_other=False,
        )
        if self.batch_first and is_batched:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        output, weights = self._attend(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        if self.batch_first and is_batched:
            output = output.transpose(1, 0)
        return output, weights

    def _attend(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, need_weights: bool,
        attn_mask: Tensor | None, average_attn_weights: bool, is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``F.multi_head_attention_forward`` (sequence-first), with the projections run as modules."""
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. "
                "You may use the Transformer module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA builds the causal mask itself
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype, check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        head_dim = self.head_dim
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(bsz * num_heads, tgt_len, src_len)}."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if not torch.jit.is_tracing() and key_padding_mask.shape != (bsz, src_len):
                raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got {key_padding_mask.shape}")
            key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
            if is_causal and attn_mask is None:
                raise AssertionError("FIXME: is_causal not implemented for need_weights")
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            output = torch.bmm(weights, v)
            output = output.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            output = self.out_proj(output)
            output = output.view(tgt_len, bsz, output.size(1))
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                output, weights = output.squeeze(1), weights.squeeze(0)
            return output, weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        output = output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        output = self.out_proj(output)
        output = output.view(tgt_len, bsz, output.size(1))
        if not is_batched:
            output = output.squeeze(1)
        return output, None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class PaddedZerosTransformerEncoder(nn.TransformerEncoder):
    """An ``nn.TransformerEncoder`` over unfused layers that gives padded positions what torch's nested path gives them.

    In eval mode, with a ``src_key_padding_mask`` and the fast path's other conditions met, torch's
    encoder runs its layers on a nested tensor of the valid positions only and pads the result
    with zeros (then the final norm, if any): the padded positions' outputs are zeros, not what the
    layers compute there. The unfused layers cannot take nested tensors, so this encoder runs them
    on the padded batch (the valid positions come out the same: the mask hides the padded keys) and
    puts back at the padded positions what torch's path leaves there, under the conditions that
    path checks. Without it, a model that pools over the sequence, padding included, would change
    at full rank.
    """

    def _would_nest(self, src: Tensor, mask: Tensor | None, padding: Tensor | None) -> bool:
        """Whether ``nn.TransformerEncoder.forward`` would take its nested-tensor path here (the mask's alignment aside)."""
        first = self.layers[0]
        return (
            getattr(self, "nested_like_torch", False) and padding is not None and mask is None and src.dim() == 3
            and not first.training and not src.is_nested and not torch.is_autocast_enabled()
            and torch.backends.mha.get_fastpath_enabled()
            and src.device.type in ("cpu", "cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name)
            and not (torch.is_grad_enabled() and any(p.requires_grad for p in first.parameters()))
            and not (getattr(self, "mask_check", True) and torch.compiler.is_compiling())
        )

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        output = super().forward(src, mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        if not self._would_nest(src, mask, src_key_padding_mask):
            return output
        padded = src_key_padding_mask if src_key_padding_mask.dtype == torch.bool else src_key_padding_mask != 0
        if getattr(self, "mask_check", True):  # torch nests only a mask whose padding ends every row; no data-dependent branch
            padded = padded & (padded[:, 1:] >= padded[:, :-1]).all()
        filler = torch.zeros_like(output[:, :1])
        if self.norm is not None:
            filler = self.norm(filler)
        return torch.where(padded[..., None], filler, output)


def unfuse_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.MultiheadAttention`` swapped for ``UnfusedMultiheadAttention``;
    ``model`` itself when it has none (nothing to copy). Subclasses keep their own forward and are left alone.

    A ``nn.TransformerEncoder`` over swapped layers gets ``use_nested_tensor = False``: its
    nested-tensor fast path feeds the layers tensors that only the fused kernels take. A plain one
    becomes a ``PaddedZerosTransformerEncoder``, which gives padded positions what that path gave them.
    """
    found = {name: module for name, module in model.named_modules() if type(module) is nn.MultiheadAttention}
    if not found:
        return model
    result = replace_layers(model, {name: UnfusedMultiheadAttention.from_mha(module) for name, module in found.items()})
    for module in result.modules():
        if isinstance(module, nn.TransformerEncoder) and any(isinstance(m, UnfusedMultiheadAttention) for m in module.modules()):
            if type(module) is nn.TransformerEncoder:  # a subclass keeps its own forward, and with it torch's path or not
                module.__class__ = PaddedZerosTransformerEncoder
                module.nested_like_torch = bool(module.use_nested_tensor)
            module.use_nested_tensor = False
    return result
