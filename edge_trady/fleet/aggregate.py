"""Aggregation of sparse client updates into the global model (numpy only, no Flower).

A client sends, for each candidate layer it trained this round, the input channels it selected and
the new values of the weight entries of those channels (a ``core.slices.ChannelSlice``: dense conv
``W[:, S]``, grouped / depthwise conv the rows of each channel's group, linear ``W[:, S]``), plus
the whole classifier. Per weight entry, the new global value is the example-weighted mean of the
values of the clients that updated that entry; an entry no client touched keeps its value bit for
bit. The classifier (sent by every client) is plain FedAvg over all of them. With ``ALL_CLIENTS``
an updated entry's change is averaged over every client of the round instead (a client that did not
update it counts as no change: full-model FedAvg's mean); untouched entries still keep their bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core.layers import LayerCost
from ..core.slices import ChannelSlice
from ..errors import FleetError

UPDATERS, ALL_CLIENTS = "updaters", "all"  # whose examples weigh an entry's new value
AGGREGATIONS = (UPDATERS, ALL_CLIENTS)


def check_aggregation(name: str) -> None:
    """Raise FleetError unless ``name`` is one of ``AGGREGATIONS``."""
    if name not in AGGREGATIONS:
        raise FleetError(f"unknown aggregation {name!r}; choose from {', '.join(AGGREGATIONS)}")


@dataclass
class SliceUpdate:
    """A client's new values of the weight entries of ``channels`` (``ChannelSlice`` layout)."""

    channels: np.ndarray  # int32 (as sent), sorted, unique input channels
    values: np.ndarray  # float32, shaped ChannelSlice(layer, channels).shape


@dataclass
class ClientUpdate:
    """What one client sends back after a round."""

    examples: int  # training images this round (the aggregation weight)
    slices: dict[str, SliceUpdate]  # weight parameter of a candidate layer -> its selected entries
    dense: dict[str, np.ndarray]  # parameters sent whole: the classifier's weight and bias

    @property
    def payload_bytes(self) -> int:
        """Bytes of the arrays themselves (no message framing)."""
        sliced = sum(s.channels.nbytes + s.values.nbytes for s in self.slices.values())
        return sliced + sum(a.nbytes for a in self.dense.values())


@dataclass
class RoundAggregate:
    """The new global state and what the round changed."""

    state: dict[str, np.ndarray]
    clients: int
    examples: int
    touched: dict[str, int] = field(default_factory=dict)  # parameter -> entries updated by >= 1 client


def entry_mask(layer: LayerCost, channels: np.ndarray) -> np.ndarray:
    """bool mask over ``layer``'s whole weight: True on the entries of the input ``channels``."""
    part = ChannelSlice(layer, channels)
    mask = np.zeros(layer.weight_shape, dtype=bool)
    part.scatter_(mask, np.ones(part.shape, dtype=bool))
    return mask


def weight_layers(layers: Sequence[LayerCost]) -> dict[str, LayerCost]:
    """Weight parameter name -> layer, for the candidate layers (``<layer>.weight``)."""
    return {f"{layer.name}.weight": layer for layer in layers}


def check_update(update: ClientUpdate, state: Mapping[str, np.ndarray], layers: Mapping[str, LayerCost]) -> None:
    """Raise FleetError unless ``update`` fits ``state`` (names, channels, sizes, finite values)."""
    if update.examples < 1:
        raise FleetError(f"update reports {update.examples} training examples")
    for name, part in update.slices.items():
        layer = layers.get(name)
        if layer is None:
            raise FleetError(f"update has channels of {name!r}, which is not a candidate layer's weight")
        channels = part.channels
        if channels.ndim != 1 or channels.dtype.kind not in "iu" or len(channels) == 0:
            raise FleetError(f"{name}: channels must be a non-empty 1-D integer array")
        if channels.min() < 0 or channels.max() >= layer.in_channels or np.any(np.diff(channels) <= 0):
            raise FleetError(f"{name}: channels must be sorted, unique and below {layer.in_channels}")
        expected = ChannelSlice(layer, channels).shape
        if part.values.shape != expected or part.values.dtype != np.float32:
            raise FleetError(
                f"{name}: {part.values.shape} {part.values.dtype} values for {len(channels)} channels, "
                f"expected {expected} float32"
            )
        if not np.isfinite(part.values).all():
            raise FleetError(f"{name}: the update has non-finite values (the client diverged)")
    for name, array in update.dense.items():
        if name not in state or name in layers:
            raise FleetError(f"update sends {name!r} whole, which is not a classifier parameter")
        if array.shape != state[name].shape or array.dtype != np.float32:
            raise FleetError(f"{name}: {array.shape} {array.dtype}, expected {state[name].shape} float32")
        if not np.isfinite(array).all():
            raise FleetError(f"{name}: the update has non-finite values (the client diverged)")


def aggregate(
    state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    layers: Mapping[str, LayerCost],
    over: str = UPDATERS,
) -> RoundAggregate:
    """The new global state from checked ``updates`` (``check_update``) of the round; ``over``:
    ``UPDATERS`` or ``ALL_CLIENTS`` (module docstring)."""
    if not updates:
        raise FleetError("no update to aggregate")
    check_aggregation(over)
    examples = sum(u.examples for u in updates)
    new = {name: array.copy() for name, array in state.items()}
    touched: dict[str, int] = {}
    for name, layer in layers.items():
        total = np.zeros(layer.weight_shape, dtype=np.float64)
        weight = np.zeros(layer.weight_shape, dtype=np.float64)
        for update in updates:
            part = update.slices.get(name)
            if part is None:
                continue
            entries = ChannelSlice(layer, part.channels)
            entries.add_(total, update.examples * part.values.astype(np.float64))
            entries.add_(weight, np.full(entries.shape, float(update.examples)))
        hit = weight > 0
        if over == ALL_CLIENTS:  # the clients that did not update an entry keep its old value
            total[hit] += (examples - weight[hit]) * state[name][hit].astype(np.float64)
            weight[hit] = examples
        new[name][hit] = (total[hit] / weight[hit]).astype(np.float32)
        touched[name] = int(hit.sum())
    dense = sorted({name for update in updates for name in update.dense})
    for name in dense:
        senders = [u for u in updates if name in u.dense]
        if len(senders) != len(updates):
            raise FleetError(f"{name}: only {len(senders)} of {len(updates)} updates carry it")
        total = sum(u.examples * u.dense[name].astype(np.float64) for u in senders)
        new[name] = (total / examples).astype(np.float32)
        touched[name] = new[name].size
    return RoundAggregate(new, len(updates), examples, touched)
