"""The weight entries of a layer's selected input channels, in numpy (no torch).

Selecting input channel ``c`` of a layer trains exactly the weight entries that read ``c``. A
``ChannelSlice`` names those entries for a set of channels ``S`` and reads, writes or updates them in
place, leaving every other entry bit-identical. The layout of a slice (the shape the portable
training graph gives a selected weight gradient, and what a fleet sends per layer):

=====================  ===================  =====================================================
layer                  weight               slice for channels ``S`` (``n = len(S)``)
=====================  ===================  =====================================================
dense conv             ``[C', C, kh, kw]``   ``weight[:, S]``: ``[C', n, kh, kw]``
grouped / depthwise    ``[C', C/g, kh, kw]`` ``[n, C'/g, kh, kw]``: row ``i`` holds the ``C'/g``
                                             outputs of ``S[i]``'s group at column ``S[i] % (C/g)``
linear                 ``[C', C]``           ``weight[:, S]``: ``[C', n]``
=====================  ===================  =====================================================

Channels are a sorted 1-D int64 array without duplicates (``Selection`` and ``normalize`` give one);
an empty array selects nothing and its slice has ``n = 0``.
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgeTradyError
from .layers import LayerCost


def normalize(layer: LayerCost, channels: np.ndarray | list[int]) -> np.ndarray:
    """``channels`` as a sorted, duplicate-free int64 vector; EdgeTradyError if one is out of range."""
    index = np.unique(np.asarray(channels, dtype=np.int64).reshape(-1))
    if index.size and (index[0] < 0 or index[-1] >= layer.in_channels):
        bad = index[0] if index[0] < 0 else index[-1]
        raise EdgeTradyError(
            f"layer {layer.name!r}: selected input channel {int(bad)} is out of range "
            f"(the layer has {layer.in_channels} input channels)"
        )
    return index


class ChannelSlice:
    """The weight entries of ``layer`` that read ``channels`` (see the module docstring)."""

    def __init__(self, layer: LayerCost, channels: np.ndarray | list[int]) -> None:
        self.layer = layer
        self.channels = normalize(layer, channels)
        n = len(self.channels)
        if layer.kind == "linear" or layer.groups == 1:
            self._index: tuple = (slice(None), self.channels)
            self.shape = (layer.out_channels, n, *layer.weight_shape[2:])
        else:
            per_group = layer.in_channels // layer.groups
            outs = layer.out_channels // layer.groups
            outputs = (self.channels // per_group)[:, None] * outs + np.arange(outs)[None, :]
            self._index = (outputs, (self.channels % per_group)[:, None])
            self.shape = (n, outs, *layer.kernel)

    @property
    def size(self) -> int:
        """Number of weight entries in the slice."""
        return int(np.prod(self.shape))

    def gather(self, weight: np.ndarray) -> np.ndarray:
        """A copy of the slice's entries of ``weight``, shaped ``self.shape``."""
        self._check(weight)
        return weight[self._index]

    def scatter_(self, weight: np.ndarray, values: np.ndarray) -> None:
        """``weight[slice] = values`` in place."""
        self._check(weight, values)
        weight[self._index] = values

    def add_(self, weight: np.ndarray, delta: np.ndarray) -> None:
        """``weight[slice] += delta`` in place (e.g. an aggregated update)."""
        self._check(weight, delta)
        weight[self._index] += delta

    def sgd_(self, weight: np.ndarray, grad: np.ndarray, lr: float) -> None:
        """Plain SGD on the slice in place: ``weight[slice] -= lr * grad`` (float32 arithmetic)."""
        self._check(weight, grad)
        weight[self._index] -= np.float32(lr) * grad

    def _check(self, weight: np.ndarray, values: np.ndarray | None = None) -> None:
        if weight.shape != self.layer.weight_shape:
            raise ValueError(f"{self.layer.name}: weight of shape {weight.shape}, expected {self.layer.weight_shape}")
        if values is not None and values.shape != self.shape:
            raise ValueError(f"{self.layer.name}: slice values of shape {values.shape}, expected {self.shape}")
