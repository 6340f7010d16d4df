"""``nn.MultiheadAttention`` split into four Linear layers, so that its projections can train.

``nn.MultiheadAttention`` keeps query, key and value projections in ONE packed weight
(``in_proj_weight``, ``[3E, E]``) used through a functional call, and calls its ``out_proj`` the
same way: no Linear module runs, so no layer of it could be traced, ranked or trained channel by
channel. ``build_model`` therefore replaces every one by ``SplitMultiheadAttention``: ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj`` Linear modules holding the same numbers, and the attention
written out (``matmul``, ``softmax``) — the same function (outputs equal to ~1e-6), four candidate
layers, and a graph of standard ops for the exporters. What changes is the parameter names:
``attn.in_proj_weight`` becomes ``attn.q_proj.weight`` / ``k_proj`` / ``v_proj`` (``merged_state``
gives the packed names back). ``nn.TransformerEncoder(Layer)`` keeps working: its fused fast paths
(which would bypass the modules) are turned off. Refused with a clear error: ``add_bias_kv`` and
``add_zero_attn``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import EdgeTradyError


def split_multihead_attention(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` inside ``model`` (in place); returns how many."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, module in found:
        parent, _, attr = name.rpartition(".")
        if not attr:
            raise EdgeTradyError("the model is a bare nn.MultiheadAttention: wrap it in a module with a head")
        setattr(model.get_submodule(parent), attr, SplitMultiheadAttention(module, name))
    for encoder in model.modules():
        if found and isinstance(encoder, nn.TransformerEncoder):
            encoder.use_nested_tensor = False  # its nested-tensor fast path would bypass the modules
    return len(found)


def merged_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of a split model with each attention's ``q/k/v_proj`` packed back into
    ``in_proj_weight`` / ``in_proj_bias`` (the names ``nn.MultiheadAttention`` loads)."""
    merged = dict(state)
    for key in [k for k in state if k.endswith(".q_proj.weight")]:
        prefix = key[: -len("q_proj.weight")]
        parts = [f"{prefix}{p}_proj" for p in "qkv"]
        merged[prefix + "in_proj_weight"] = torch.cat([merged.pop(f"{p}.weight") for p in parts])
        if f"{parts[0]}.bias" in merged:
            merged[prefix + "in_proj_bias"] = torch.cat([merged.pop(f"{p}.bias") for p in parts])
    return merged


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward with separate q/k/v/out Linear modules."""

    # What nn.TransformerEncoderLayer reads to choose its fused fast path: with no packed
    # projection it takes the plain path, which calls this module.
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention, name: str = "attention") -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise EdgeTradyError(f"{name}: nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        embed, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.num_heads, self.dropout, self.batch_first = mha.num_heads, mha.dropout, mha.batch_first
        self.q_proj = nn.Linear(embed, embed, bias=bias)
        self.k_proj = nn.Linear(mha.kdim, embed, bias=bias)
        self.v_proj = nn.Linear(mha.vdim, embed, bias=bias)
        self.out_proj = nn.Linear(embed, embed, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            if mha.in_proj_weight is not None:
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = mha.in_proj_bias.chunk(3) if bias else (None,) * 3
            for proj, weight, b in zip((self.q_proj, self.k_proj, self.v_proj), weights, biases, strict=True):
                proj.weight.copy_(weight)
                if b is not None:
                    proj.bias.copy_(b)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.train(mha.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,  # a hint about attn_mask, which is what counts (as in nn.MultiheadAttention)
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, h, L, S]
        scores = scores + self._additive_mask(attn_mask, key_padding_mask, scores)
        weights = torch.softmax(scores, dim=-1)
        attended = F.dropout(weights, self.dropout, self.training) if self.dropout > 0 else weights
        context = torch.matmul(attended, v).transpose(1, 2).flatten(2)  # [B, L, E]
        out = self.out_proj(context)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.mean(1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights

    def _heads(self, x: Tensor) -> Tensor:
        batch, tokens, embed = x.shape
        return x.reshape(batch, tokens, self.num_heads, embed // self.num_heads).transpose(1, 2)

    def _additive_mask(self, attn_mask: Tensor | None, padding: Tensor | None, scores: Tensor) -> Tensor | float:
        """``attn_mask`` ``[L, S]`` or ``[B*h, L, S]`` and ``key_padding_mask`` ``[B, S]`` as one
        additive mask (bool: True = not attended, -inf; float: added)."""
        total: Tensor | float = 0.0
        batch, heads, length, source = scores.shape
        if attn_mask is not None:
            mask = _additive(attn_mask, scores.dtype)
            total = mask.view(batch, heads, length, source) if mask.dim() == 3 else mask
        if padding is not None:
            total = total + _additive(padding, scores.dtype).view(batch, 1, 1, source)
        return total


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
