"""``nn.MultiheadAttention`` as four Linears that lowbit quantizes like any other.

torch's attention module keeps its q/k/v projections in one raw ``in_proj_weight`` and calls
``F.multi_head_attention_forward`` with ``out_proj.weight`` instead of calling ``out_proj``;
``nn.TransformerEncoderLayer`` in eval mode goes further and hands every weight of the layer to
one fused kernel. A quantized wrapper in any of those places is either never called (no range
to calibrate) or read as a tensor it is not. So before planning, ``quantize`` (and ``plan``, on a
copy) replaces each such module with ``ExplicitMultiheadAttention``: the same function written
out as ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears and two matmuls, as Hugging Face
models write theirs. It keeps the module's call signature and public attributes, and its
``in_proj_bias`` is ``None``, which turns the encoder layer's fused path off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ExplicitMultiheadAttention(nn.Module):
    """What ``nn.MultiheadAttention`` computes, with its projections as ``nn.Linear``s."""

    # Read by nn.TransformerEncoderLayer / nn.TransformerEncoder before their fused paths;
    # these values send both down the path that calls ``self_attn(...)``.
    in_proj_weight = None
    in_proj_bias = None
    bias_k = None
    bias_v = None
    add_zero_attn = False
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not can_unfold(mha):
            raise ValueError("an nn.MultiheadAttention with add_bias_kv or add_zero_attn "
                             "has no explicit form here")
        self.embed_dim, self.kdim, self.vdim = mha.embed_dim, mha.kdim, mha.vdim
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(),
                       mha.v_proj_weight.detach())
        biases = ((None,) * 3 if mha.in_proj_bias is None
                  else mha.in_proj_bias.detach().chunk(3))
        self.q_proj, self.k_proj, self.v_proj = (
            _linear(w, b) for w, b in zip(weights, biases))
        self.out_proj = _linear(mha.out_proj.weight.detach(),
                                None if mha.out_proj.bias is None
                                else mha.out_proj.bias.detach())
        self.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1)
                                 for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, _ = query.shape
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        scores = torch.matmul(q * (1.0 / math.sqrt(self.head_dim)), k.transpose(-2, -1))
        mask = self._mask(attn_mask, key_padding_mask, is_causal, scores)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(n, length, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
        if not need_weights:
            return out, None
        returned = weights.mean(dim=1) if average_attn_weights else weights
        return out, returned.squeeze(0) if unbatched else returned

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, E)`` → ``(N, heads, L, head_dim)``."""
        n, length, _ = x.shape
        return x.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
              is_causal: bool, scores: torch.Tensor) -> torch.Tensor | None:
        """One additive mask for ``scores`` ``(N, heads, L, S)``, of their dtype and device:
        ``True`` in a boolean mask means "may not attend", as in ``nn.MultiheadAttention``;
        float masks are added."""
        n, _, length, source = scores.shape
        dtype = scores.dtype
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool,
                                   device=scores.device).triu(1)
        total = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:  # (N * heads, L, S)
                mask = mask.reshape(n, self.num_heads, length, source)
            total = mask
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).reshape(n, 1, 1, source)
            total = padding if total is None else total + padding
        return total


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def can_unfold(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` that ``ExplicitMultiheadAttention`` computes exactly
    (learned key/value biases and zero attention are not written out)."""
    return (isinstance(module, nn.MultiheadAttention) and module.bias_k is None
            and not module.add_zero_attn)


def has_multihead_attention(model: nn.Module) -> bool:
    """Whether a submodule of ``model`` is an ``nn.MultiheadAttention`` to write out."""
    return any(can_unfold(m) for name, m in model.named_modules() if name)


def unfold_multihead_attention(model: nn.Module) -> list[str]:
    """Replace, in ``model``, every ``nn.MultiheadAttention`` that can be written out with its
    ``ExplicitMultiheadAttention``; the names replaced."""
    from lowbit.fuse import set_module

    found = [(name, m) for name, m in model.named_modules()
             if name and isinstance(m, nn.MultiheadAttention) and can_unfold(m)]
    for name, mha in found:
        set_module(model, name, ExplicitMultiheadAttention(mha))
    return [name for name, _ in found]


def unfolded_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its ``nn.MultiheadAttention`` modules written out."""
    import copy

    from lowbit.float_modules import deep_copyable

    with deep_copyable(model):
        model = copy.deepcopy(model)
    unfold_multihead_attention(model)
    return model
