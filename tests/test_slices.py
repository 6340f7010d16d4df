"""core.slices: the entries of selected input channels, against the masks and torch-sparse's layout."""

import numpy as np
import pytest
import torch

from edge_trady.core.layers import LayerCost
from edge_trady.core.masks import channel_mask
from edge_trady.core.slices import ChannelSlice, normalize
from edge_trady.engines.sparse_ops import WeightSlice
from edge_trady.errors import EdgeTradyError

LAYERS = {
    "dense": LayerCost("dense", "conv", 6, 4, (3, 3), 1, (8, 8), (8, 8)),
    "grouped": LayerCost("grouped", "gconv", 6, 9, (3, 1), 3, (8, 8), (4, 8)),
    "depthwise": LayerCost("depthwise", "dwconv", 6, 12, (3, 3), 6, (8, 8), (8, 8)),
    "linear": LayerCost("linear", "linear", 6, 5, (1, 1), 1, (1, 1), (1, 1)),
}
CHANNELS = np.array([0, 2, 5])


@pytest.mark.parametrize("kind", LAYERS)
def test_slice_holds_exactly_the_masked_entries_in_torch_sparse_order(kind: str) -> None:
    layer = LAYERS[kind]
    weight = np.arange(np.prod(layer.weight_shape), dtype=np.float32).reshape(layer.weight_shape)
    part = ChannelSlice(layer, CHANNELS)
    values = part.gather(weight)
    assert values.shape == part.shape and part.size == values.size
    selected = np.broadcast_to(channel_mask(layer, CHANNELS) == 1, weight.shape)
    assert sorted(values.ravel()) == sorted(weight[selected])
    expected = WeightSlice(torch.Size(layer.weight_shape), torch.from_numpy(CHANNELS), layer.groups)
    assert np.array_equal(values, expected.gather(torch.from_numpy(weight)).numpy())


@pytest.mark.parametrize("kind", LAYERS)
def test_updates_touch_the_slice_only(kind: str) -> None:
    layer = LAYERS[kind]
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(layer.weight_shape, dtype=np.float32)
    part = ChannelSlice(layer, CHANNELS)
    grad = rng.standard_normal(part.shape, dtype=np.float32)
    frozen = np.broadcast_to(channel_mask(layer, CHANNELS) == 0, weight.shape)
    for update in ("sgd", "add", "scatter"):
        after = weight.copy()
        if update == "sgd":
            part.sgd_(after, grad, 0.5)
            expected = part.gather(weight) - np.float32(0.5) * grad
        elif update == "add":
            part.add_(after, grad)
            expected = part.gather(weight) + grad
        else:
            part.scatter_(after, grad)
            expected = grad
        assert np.array_equal(after[frozen], weight[frozen]), update
        assert np.array_equal(part.gather(after), expected), update


def test_empty_selection_and_channel_checks() -> None:
    layer = LAYERS["grouped"]
    part = ChannelSlice(layer, [])
    weight = np.ones(layer.weight_shape, np.float32)
    assert part.shape == (0, 3, 3, 1) and part.gather(weight).shape == (0, 3, 3, 1)
    part.sgd_(weight, np.zeros(part.shape, np.float32), 1.0)
    assert (weight == 1).all()
    assert normalize(layer, [5, 1, 1]).tolist() == [1, 5]
    with pytest.raises(EdgeTradyError, match="layer 'grouped': selected input channel 6 is out of range"):
        normalize(layer, [0, 6])
    with pytest.raises(ValueError, match="slice values of shape"):
        ChannelSlice(layer, [1]).sgd_(weight, np.zeros((2, 3, 3, 1), np.float32), 1.0)
