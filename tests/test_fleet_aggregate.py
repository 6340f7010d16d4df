"""Aggregation of sparse client updates: per-entry example-weighted means over the clients that
updated an entry (or of its change over all clients), untouched entries bit-identical, the classifier
FedAvg'd; malformed updates refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_trady.core.layers import LayerCost
from edge_trady.core.masks import channel_mask
from edge_trady.core.slices import ChannelSlice
from edge_trady.errors import FleetError
from edge_trady.fleet.aggregate import (
    ALL_CLIENTS,
    UPDATERS,
    ClientUpdate,
    SliceUpdate,
    aggregate,
    check_update,
    entry_mask,
    weight_layers,
)

DENSE = LayerCost("conv", "conv", 6, 4, (3, 3), 1, (8, 8), (8, 8))
DEPTHWISE = LayerCost("dw", "dwconv", 6, 6, (3, 3), 6, (8, 8), (8, 8))
GROUPED = LayerCost("grouped", "gconv", 6, 4, (1, 1), 2, (8, 8), (8, 8))
LINEAR = LayerCost("fc", "linear", 5, 3, (1, 1), 1, (1, 1), (1, 1))
LAYERS = weight_layers([DENSE, DEPTHWISE, GROUPED, LINEAR])
HEAD = {"head.weight": (10, 5), "head.bias": (10,)}


def _state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {name: layer.weight_shape for name, layer in LAYERS.items()} | HEAD
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _update(rng: np.random.Generator, examples: int, chosen: dict[str, list[int]]) -> ClientUpdate:
    """A client that selected ``chosen`` channels and moved their entries (and the head) at random."""
    slices = {}
    for name, channels in chosen.items():
        shape = ChannelSlice(LAYERS[name], channels).shape
        slices[name] = SliceUpdate(np.asarray(channels, np.int32), rng.standard_normal(shape).astype(np.float32))
    dense = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in HEAD.items()}
    return ClientUpdate(examples, slices, dense)


def _input_channel_of_entries(layer: LayerCost) -> np.ndarray:
    """For each weight entry, the input channel it belongs to (brute force, from channel_mask)."""
    owner = np.full(layer.weight_shape, -1)
    for c in range(layer.in_channels):
        owner[np.broadcast_to(channel_mask(layer, np.array([c])) > 0, layer.weight_shape)] = c
    assert (owner >= 0).all()
    return owner


def _expected(state, updates, over: str = UPDATERS) -> dict[str, np.ndarray]:
    """Entry by entry: the example-weighted mean of the clients whose selection holds its channel;
    ``ALL_CLIENTS``: of every client's value, the old one for a client that did not select it."""
    out = {name: array.copy() for name, array in state.items()}
    for name, layer in LAYERS.items():
        owner = _input_channel_of_entries(layer)
        sent = []  # each client's values placed on the whole weight (NaN: not sent)
        for update in updates:
            full = np.full(layer.weight_shape, np.nan, np.float32)
            if name in update.slices:
                ChannelSlice(layer, update.slices[name].channels).scatter_(full, update.slices[name].values)
            sent.append(full)
        for index in np.ndindex(layer.weight_shape):
            values, weights = [], []
            for update, full in zip(updates, sent, strict=True):
                part = update.slices.get(name)
                if part is not None and owner[index] in part.channels:
                    assert not np.isnan(full[index])
                    values.append(float(full[index]))
                    weights.append(update.examples)
            if weights and over == ALL_CLIENTS:
                others = sum(u.examples for u in updates) - sum(weights)
                values.append(float(state[name][index]))
                weights.append(others)
            if weights:
                out[name][index] = np.float32(np.dot(values, weights) / sum(weights))
    for name in HEAD:
        total = sum(u.examples * u.dense[name].astype(np.float64) for u in updates)
        out[name] = (total / sum(u.examples for u in updates)).astype(np.float32)
    return out


@pytest.mark.parametrize("layer", [DENSE, DEPTHWISE, GROUPED, LINEAR], ids=lambda x: x.kind)
def test_entries_of_a_channel_are_the_mask_of_every_engine(layer: LayerCost) -> None:
    """The slice a client sends holds exactly the entries the engines' gradient masks train."""
    owner = _input_channel_of_entries(layer)
    channels = np.array([0, 3, 4])
    assert np.array_equal(entry_mask(layer, channels), np.isin(owner, channels))
    weight = np.arange(np.prod(layer.weight_shape), dtype=np.float32).reshape(layer.weight_shape)
    sent = ChannelSlice(layer, channels).gather(weight)
    assert sorted(sent.ravel()) == sorted(weight[np.isin(owner, channels)])


def test_overlapping_selections_average_per_entry_weighted_by_examples() -> None:
    rng = np.random.default_rng(0)
    state = _state(rng)
    updates = [
        _update(rng, 10, {"conv.weight": [0, 2, 5], "dw.weight": [1, 2], "fc.weight": [0, 4]}),
        _update(rng, 30, {"conv.weight": [2, 3], "dw.weight": [2], "grouped.weight": [0, 5]}),
        _update(rng, 20, {"conv.weight": [2, 5], "grouped.weight": [5], "fc.weight": [4]}),
    ]
    for update in updates:
        check_update(update, state, LAYERS)
    result = aggregate(state, updates, LAYERS)
    expected = _expected(state, updates)
    for name in state:
        np.testing.assert_allclose(result.state[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert result.examples == 60 and result.clients == 3
    conv = DENSE.weight_shape
    assert result.touched["conv.weight"] == conv[0] * 4 * 9  # channels {0, 2, 3, 5}, 4 outputs, 3x3


def test_untouched_entries_keep_their_bits_and_a_lone_client_is_copied_exactly() -> None:
    rng = np.random.default_rng(1)
    state = _state(rng)
    state["conv.weight"][0, 1, 0, 0] = np.float32(-0.0)  # a signed zero survives too
    updates = [_update(rng, 7, {"conv.weight": [3]}), _update(rng, 5, {"conv.weight": [4], "dw.weight": [0]})]
    result = aggregate(state, updates, LAYERS)
    for name, layer in LAYERS.items():
        touched = np.zeros(layer.weight_shape, bool)
        for update in updates:
            if name in update.slices:
                touched |= entry_mask(layer, update.slices[name].channels)
        assert np.array_equal(result.state[name][~touched].view(np.uint32), state[name][~touched].view(np.uint32))
        for update in updates:  # one client per entry here: its value, bit for bit
            if name in update.slices:
                part = update.slices[name]
                assert np.array_equal(ChannelSlice(layer, part.channels).gather(result.state[name]), part.values)
    assert result.touched["grouped.weight"] == result.touched["fc.weight"] == 0


def test_weights_are_example_counts() -> None:
    rng = np.random.default_rng(2)
    state = _state(rng)
    a, b = _update(rng, 1, {"fc.weight": [2]}), _update(rng, 3, {"fc.weight": [2]})
    result = aggregate(state, [a, b], LAYERS)
    column = result.state["fc.weight"][:, 2]
    sent = [u.slices["fc.weight"].values[:, 0] for u in (a, b)]
    np.testing.assert_allclose(column, (sent[0] + 3 * sent[1]) / 4, 1e-6)
    np.testing.assert_allclose(result.state["head.bias"], (a.dense["head.bias"] + 3 * b.dense["head.bias"]) / 4, 1e-6)


def test_all_clients_moves_an_entry_by_its_mean_change_over_every_client() -> None:
    """Four clients of equal weight: an entry only one updated moves a quarter of its change, one
    all four updated takes their mean (as with the default), an untouched one keeps its bits."""
    rng = np.random.default_rng(4)
    state = _state(rng)
    updates = [_update(rng, 5, {"fc.weight": [0, 1] if k == 0 else [0]}) for k in range(4)]
    default = aggregate(state, updates, LAYERS)
    result = aggregate(state, updates, LAYERS, ALL_CLIENTS)
    old, new = state["fc.weight"], result.state["fc.weight"]
    lone = updates[0].slices["fc.weight"].values[:, 1]
    np.testing.assert_allclose(new[:, 1], old[:, 1] + (lone - old[:, 1]) / 4, rtol=1e-6)
    np.testing.assert_allclose(default.state["fc.weight"][:, 1], lone, rtol=0)
    shared = np.mean([u.slices["fc.weight"].values[:, 0] for u in updates], axis=0)
    np.testing.assert_allclose(new[:, 0], shared, rtol=1e-6)
    np.testing.assert_allclose(default.state["fc.weight"][:, 0], shared, rtol=1e-6)
    assert np.array_equal(new[:, 2:].view(np.uint32), old[:, 2:].view(np.uint32))
    assert result.touched == default.touched
    for name in HEAD:
        assert np.array_equal(result.state[name], default.state[name])


def test_an_unknown_aggregation_is_refused() -> None:
    rng = np.random.default_rng(5)
    state = _state(rng)
    with pytest.raises(FleetError, match="unknown aggregation 'median'"):
        aggregate(state, [_update(rng, 1, {})], LAYERS, "median")


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    picks=st.lists(
        st.tuples(st.integers(1, 50), st.sets(st.integers(0, 5), max_size=6), st.sets(st.integers(0, 4), max_size=5)),
        min_size=1,
        max_size=4,
    ),
)
@pytest.mark.parametrize("over", [UPDATERS, ALL_CLIENTS])
def test_aggregate_matches_the_entry_by_entry_definition(over: str, seed: int, picks) -> None:
    rng = np.random.default_rng(seed)
    state = _state(rng)
    updates = []
    for examples, conv, fc in picks:
        chosen = {"dw.weight": sorted(conv), "fc.weight": sorted(fc)}
        updates.append(_update(rng, examples, {k: v for k, v in chosen.items() if v}))
    result = aggregate(state, updates, LAYERS, over)
    expected = _expected(state, updates, over)
    for name in state:
        np.testing.assert_allclose(result.state[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda u: setattr(u, "examples", 0), "training examples"),
        (lambda u: u.slices.update({"nope.weight": u.slices["conv.weight"]}), "not a candidate"),
        (lambda u: setattr(u.slices["conv.weight"], "channels", np.array([2, 1], np.int32)), "sorted, unique"),
        (lambda u: setattr(u.slices["conv.weight"], "channels", np.array([1, 1], np.int32)), "sorted, unique"),
        (lambda u: setattr(u.slices["conv.weight"], "channels", np.array([1, 6], np.int32)), "below 6"),
        (lambda u: setattr(u.slices["conv.weight"], "values", u.slices["conv.weight"].values[1:]), "expected"),
        (lambda u: setattr(u.slices["conv.weight"], "values", u.slices["conv.weight"].values.ravel()), "expected"),
        (lambda u: u.slices["conv.weight"].values.__setitem__((0, 0), np.nan), "non-finite"),
        (lambda u: u.dense.update({"head.bias": np.zeros(9, np.float32)}), r"expected \(10,\)"),
        (lambda u: u.dense.update({"conv.weight": np.zeros(DENSE.weight_shape, np.float32)}), "not a classifier"),
        (lambda u: u.dense["head.weight"].__setitem__((0, 0), np.inf), "non-finite"),
    ],
)
def test_malformed_updates_are_refused(break_it, message: str) -> None:
    rng = np.random.default_rng(3)
    state = _state(rng)
    update = _update(rng, 4, {"conv.weight": [1, 2]})
    check_update(update, state, LAYERS)
    break_it(update)
    with pytest.raises(FleetError, match=message):
        check_update(update, state, LAYERS)
