"""Autograd functions that save only what input-channel sparse training needs.

What each function keeps for backward (``S`` = the layer's selected input channels):

- ``SparseConv2d`` / ``SparseLinear``: ``x[:, S]`` (a Linear on ``[B, T.., C]``: ``x[..., S]``, its
  features ``S`` over every token) when the layer trains (tagged ``"selected"``, or ``"classifier"``
  for the head), and the weight when the gradient must flow further down (a model Parameter: no
  copy). The weight gradient is computed for the selected entries only.
- ``FrozenBatchNorm``: the running variance and affine weight (model tensors: no copy); a trained
  shift needs nothing more.
- ``ClampMask`` (ReLU, ReLU6, Hardtanh): a bool mask, or 1 bit per element when packed.

Zero padding, residual adds, global average pooling (a mean) and reshapes are left to autograd:
they save nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.nn.grad import conv2d_input, conv2d_weight

ROLE_ATTR = "_edge_trady_role"  # tags the activations a layer saves for its weight gradient
_BITS = torch.arange(8, dtype=torch.uint8)


def _tag(tensor: Tensor, role: str) -> Tensor:
    setattr(tensor, ROLE_ATTR, role)
    return tensor


class WeightSlice:
    """The weight entries of a layer's selected input channels, as rows of ``weight.view(-1, kh*kw)``.

    Dense conv / linear: ``weight[:, S]``, shape ``[C', |S|, kh, kw]``. Grouped / depthwise conv:
    channel ``s`` sits in group ``s // (C/g)`` and touches that group's ``C'/g`` outputs at column
    ``s % (C/g)``: shape ``[|S|, C'/g, kh, kw]``. ``channels=None``: the whole weight.
    """

    def __init__(self, weight_shape: torch.Size, channels: Tensor | None, groups: int) -> None:
        self.channels = channels
        self.outputs: Tensor | None = None  # grouped: the output channel of each row
        self.rows: Tensor | None = None
        self.shape = tuple(weight_shape)
        if channels is None:
            return
        out, per_group = weight_shape[:2]
        if groups == 1:
            rows = torch.arange(out)[:, None] * per_group + channels[None, :]
        else:
            outs = out // groups
            outputs = (channels // per_group)[:, None] * outs + torch.arange(outs)[None, :]
            rows = outputs * per_group + (channels % per_group)[:, None]
            self.outputs = outputs.flatten()
        self.rows = rows.flatten()
        self.shape = (*rows.shape, *weight_shape[2:])

    def gather(self, weight: Tensor) -> Tensor:
        """The selected entries (a view of the weight when every channel is selected)."""
        if self.rows is None:
            return weight.detach()
        return _as_rows(weight.detach()).index_select(0, self.rows).view(self.shape)

    def sgd_(self, weight: Tensor, grad: Tensor, lr: float) -> None:
        """``weight[selected] -= lr * grad``; every other entry is left untouched."""
        if self.rows is None:
            weight.add_(grad, alpha=-lr)
        else:
            _as_rows(weight).index_add_(0, self.rows, grad.reshape(len(self.rows), -1), alpha=-lr)

    def channel_norms(self, grad: Tensor, groups: int) -> Tensor:
        """``||dL/dW[:, c]||`` of each selected input channel (every channel when ``channels`` is None)
        from the gradient of the selected entries (shape ``self.shape``)."""
        squares = grad.pow(2)
        if self.channels is not None:  # dense [C', |S|, ...] or grouped [|S|, C'/g, ...]
            dim = 1 if self.outputs is None else 0
            return squares.sum([d for d in range(grad.dim()) if d != dim]).sqrt()
        if groups == 1:
            return squares.sum([d for d in range(grad.dim()) if d != 1]).sqrt()
        out, per_group = grad.shape[:2]  # whole grouped weight: input channel = group * (C/g) + j
        per_output = squares.reshape(out, per_group, -1).sum(2)
        return per_output.reshape(groups, out // groups, per_group).sum(1).reshape(-1).sqrt()

    def keep(self, x: Tensor, role: str, axis: int = 1) -> Tensor:
        """What the weight gradient needs from the input: its selected channels (on ``axis``)."""
        return _tag(x if self.channels is None else x.index_select(axis, self.channels), role)


def _as_rows(weight: Tensor) -> Tensor:
    """``[C', C/g, kh, kw]`` as ``[C' * C/g, kh * kw]`` (linear: ``[C' * C, 1]``), sharing storage."""
    return weight.view(weight.shape[0] * weight.shape[1], -1)


@dataclass(frozen=True)
class ConvGeometry:
    """Everything but the weight that defines a conv2d; ``pad`` (left, right, top, bottom) runs first."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pad: tuple[int, int, int, int] | None = None

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x = F.pad(x, self.pad) if self.pad else x
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, shape: torch.Size, weight: Tensor, grad: Tensor) -> Tensor:
        if not self.pad:
            return conv2d_input(shape, weight, grad, self.stride, self.padding, self.dilation, self.groups)
        left, right, top, bottom = self.pad
        padded = (*shape[:2], shape[2] + top + bottom, shape[3] + left + right)
        full = conv2d_input(padded, weight, grad, self.stride, self.padding, self.dilation, self.groups)
        return full[:, :, top : top + shape[2], left : left + shape[3]]

    def weight_grad(self, kept: Tensor, part: WeightSlice, grad: Tensor) -> Tensor:
        """Gradient of ``part``'s entries from the kept input channels."""
        x = F.pad(kept, self.pad) if self.pad else kept
        if part.outputs is None:  # whole weight, or dense: [C', |S|, kh, kw] with the layer's groups
            groups, size = (self.groups if part.channels is None else 1), part.shape
        else:  # grouped: each selected channel is its own group, against its group's outputs
            grad = grad.index_select(1, part.outputs)
            groups, size = len(part.channels), (len(part.outputs), 1, *part.shape[2:])
        weight = conv2d_weight(x, size, grad, self.stride, self.padding, self.dilation, groups)
        return weight.view(part.shape)


class SparseConv2d(Function):
    """conv2d; ``free`` stands for ``part``'s weight entries and gets their gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, free, geometry: ConvGeometry, part: WeightSlice | None):
        kept = part.keep(x, "selected") if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(kept, weight if ctx.needs_input_grad[0] else None)
        ctx.geometry, ctx.part, ctx.input_shape = geometry, part, x.shape
        return geometry.conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        kept, weight = ctx.saved_tensors
        grad_x = None if weight is None else ctx.geometry.input_grad(ctx.input_shape, weight, grad)
        grad_free = None if kept is None else ctx.geometry.weight_grad(kept, ctx.part, grad)
        return grad_x, None, None, grad_free, None, None


class SparseLinear(Function):
    """linear on ``[B, C]`` or ``[B, T.., C]`` (features on the last axis, any leading axes: tokens);
    ``free`` stands for ``part``'s weight entries, ``bias`` may be trained. The weight gradient sums
    over every leading axis: ``grad[.., C']^T @ x[.., S]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, free, part: WeightSlice | None, role: str):
        kept = part.keep(x, role, axis=-1) if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(kept, weight if ctx.needs_input_grad[0] else None)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        kept, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # [B * T.., C']
        grad_x = None if weight is None else grad @ weight
        grad_free = None if kept is None else rows.t() @ kept.reshape(-1, kept.shape[-1])
        grad_bias = rows.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_free, None, None


class FrozenBatchNorm(Function):
    """Eval-mode batch norm: backward is the per-channel scale ``weight / sqrt(var + eps)``; a trained
    shift (``bias``) gets the per-channel sum of the output gradient (nothing saved for it)."""

    @staticmethod
    def forward(ctx, x, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        ctx.save_for_backward(var, weight)
        ctx.eps = eps
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        var, weight = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale = torch.rsqrt(var + ctx.eps)
            if weight is not None:
                scale = scale * weight
            grad_x = grad * scale.view(-1, *[1] * (grad.dim() - 2))
        if ctx.needs_input_grad[4]:
            grad_bias = grad.sum([d for d in range(grad.dim()) if d != 1])
        return grad_x, None, None, None, grad_bias, None


class ClampMask(Function):
    """``relu`` (``high=None``) or ``hardtanh(low, high)``; saves where the gradient passes."""

    @staticmethod
    def forward(ctx, x, low: float, high: float | None, packed: bool):
        y = torch.relu(x) if high is None else F.hardtanh(x, low, high)
        mask = y > low if high is None else (y > low) & (y < high)
        ctx.save_for_backward(pack_bits(mask) if packed else mask)
        ctx.shape, ctx.packed = mask.shape, packed
        return y

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        if ctx.packed:
            mask = unpack_bits(mask, ctx.shape)
        return grad * mask, None, None, None


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as uint8, 8 elements per byte (zero-padded to a multiple of 8)."""
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return (flat.view(-1, 8).view(torch.uint8) << _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    bits = (packed[:, None] >> _BITS) & 1
    return bits.view(-1)[: math.prod(shape)].view(torch.bool).view(shape)
