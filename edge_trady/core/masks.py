"""Gradient masks for input-channel selection (numpy; shared by every engine).

A mask has a compact shape that broadcasts against the weight gradient:
dense conv ``(1, C, 1, 1)``, grouped/depthwise conv ``(C', C/g, 1, 1)``, linear ``(1, C)``.
"""

from __future__ import annotations

import numpy as np

from .layers import LayerCost


def mask_shape(layer: LayerCost) -> tuple[int, ...]:
    if layer.kind == "linear":
        return (1, layer.in_channels)
    if layer.groups == 1:
        return (1, layer.in_channels, 1, 1)
    return (layer.out_channels, layer.in_channels // layer.groups, 1, 1)


def channel_mask(layer: LayerCost, channels: np.ndarray | None) -> np.ndarray:
    """float32 mask, 1 where the weight entry belongs to a selected input channel.

    ``channels=None`` means every channel (a fully trained layer such as the classifier).
    """
    selected = np.zeros(layer.in_channels, dtype=np.float32)
    if channels is None:
        selected[:] = 1.0
    else:
        selected[np.asarray(channels, dtype=np.int64)] = 1.0
    if layer.kind == "linear" or layer.groups == 1:
        return selected.reshape(mask_shape(layer))
    per_group = layer.in_channels // layer.groups
    outs_per_group = layer.out_channels // layer.groups
    # weight[o, j] reads input channel (o // outs_per_group) * per_group + j
    group_of_out = np.arange(layer.out_channels) // outs_per_group
    index = group_of_out[:, None] * per_group + np.arange(per_group)[None, :]
    return selected[index].reshape(mask_shape(layer))
