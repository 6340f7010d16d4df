import json

import numpy as np
import pytest

from edge_trady.core.layers import LayerCost
from edge_trady.core.masks import channel_mask
from edge_trady.core.selection import METHODS, CandidateLayer, ChannelSampler, Selection, candidate_names
from edge_trady.errors import EdgeTradyError

POOL = [CandidateLayer("a", 40, 3.0), CandidateLayer("b", 16, 7.0), CandidateLayer("c", 8, 50.0)]
RANDOM_METHODS = ["trady", "s-topk-random", "d-full-random", "s-full-random"]


@pytest.mark.parametrize("method", RANDOM_METHODS + ["d-det-rgn", "s-det-rgn"])
@pytest.mark.parametrize("overflow", ["skip", "stop"])
def test_budget_never_exceeded(method: str, overflow: str) -> None:
    sampler = ChannelSampler(method, POOL, budget=123.0, seed=3, overflow=overflow)
    scores = {c.name: np.random.default_rng(1).random(c.channels) for c in POOL}
    for epoch in range(20):
        selection = sampler.select(epoch, scores)
        costs = {c.name: c.cost for c in POOL}
        cost = sum(costs[name] * len(idx) for name, idx in selection.channels.items())
        assert cost == pytest.approx(selection.cost)
        assert 0 < cost <= 123.0


def test_skip_fills_budget_better_than_stop() -> None:
    fill = {}
    for overflow in ("skip", "stop"):
        sampler = ChannelSampler("trady", POOL, 123.0, seed=0, overflow=overflow)
        fill[overflow] = np.mean([sampler.select(e).cost for e in range(30)])
    assert fill["skip"] > fill["stop"]
    assert fill["skip"] > 120  # skip-and-continue leaves less than the cheapest channel unused


@pytest.mark.parametrize("method", ["trady", "d-full-random"])
def test_dynamic_methods_redraw_every_epoch(method: str) -> None:
    sampler = ChannelSampler(method, POOL, 60.0, seed=0)
    selections = [sampler.select(e).to_json()["channels"] for e in range(5)]
    assert all(selections[i] != selections[i + 1] for i in range(4))


@pytest.mark.parametrize("method", ["s-topk-random", "s-full-random"])
def test_static_methods_keep_their_selection(method: str) -> None:
    sampler = ChannelSampler(method, POOL, 60.0, seed=0)
    selections = [sampler.select(e).to_json()["channels"] for e in range(5)]
    assert all(s == selections[0] for s in selections)


def test_static_det_rgn_ignores_later_scores() -> None:
    sampler = ChannelSampler("s-det-rgn", POOL, 30.0, seed=0)
    first = sampler.select(0, {c.name: np.arange(c.channels, dtype=float) for c in POOL})
    later = sampler.select(1, {c.name: -np.arange(c.channels, dtype=float) for c in POOL})
    assert first.to_json()["channels"] == later.to_json()["channels"]


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_selection_is_a_function_of_seed_and_epoch(method: str) -> None:
    one = ChannelSampler(method, POOL, 60.0, seed=7)
    two = ChannelSampler(method, POOL, 60.0, seed=7)
    other = ChannelSampler(method, POOL, 60.0, seed=8)
    assert [one.select(e).to_json() for e in (2, 0, 1)] == [two.select(e).to_json() for e in (2, 0, 1)]
    assert one.select(0).to_json() != other.select(0).to_json()


def test_det_rgn_takes_highest_scores_first() -> None:
    sampler = ChannelSampler("d-det-rgn", POOL, 20.0, seed=0)
    scores = {"a": np.zeros(40), "b": np.zeros(16), "c": np.zeros(8)}
    scores["a"][[5, 9]] = [2.0, 3.0]
    scores["b"][4] = 2.5
    selection = sampler.select(0, scores)
    # a9 (3.0, cost 3), b4 (2.5, cost 7), a5 (2.0, cost 3), then zero scores in index order: a0, a1
    assert selection.channels["a"].tolist() == [0, 1, 5, 9]
    assert selection.channels["b"].tolist() == [4]
    assert selection.cost == 19.0


def test_full_and_classifier_only() -> None:
    full = ChannelSampler("full", POOL, None, seed=0).select(0)
    assert full.channel_count == 40 + 16 + 8
    nothing = ChannelSampler("classifier-only", POOL, None, seed=0).select(0)
    assert nothing.channel_count == 0 and nothing.cost == 0


def test_candidates_follow_method_pool() -> None:
    layers = ["l0", "l1", "l2", "l3"]
    assert candidate_names("trady", layers, ["l3", "l1"]) == ["l1", "l3"]
    assert candidate_names("d-full-random", layers, None) == layers
    assert candidate_names("classifier-only", layers, None) == []
    with pytest.raises(EdgeTradyError, match="ranking"):
        candidate_names("trady", layers, None)
    assert set(METHODS) >= {
        "trady",
        "s-topk-random",
        "d-full-random",
        "s-full-random",
        "d-det-rgn",
        "s-det-rgn",
        "full",
        "classifier-only",
    }


def test_grouped_mask_maps_input_channels_to_weight_entries() -> None:
    layer = LayerCost("g", "gconv", 8, 12, (3, 3), 4, (8, 8), (4, 4))  # 2 inputs, 3 outputs per group
    mask = channel_mask(layer, np.array([1, 6]))
    assert mask.shape == (12, 2, 1, 1)
    expected = np.zeros((12, 2))
    expected[0:3, 1] = 1  # input 1 = group 0, slot 1 -> outputs 0..2
    expected[9:12, 0] = 1  # input 6 = group 3, slot 0 -> outputs 9..11
    assert np.array_equal(mask[:, :, 0, 0], expected)
    depthwise = LayerCost("d", "dwconv", 4, 4, (3, 3), 4, (8, 8), (8, 8))
    assert channel_mask(depthwise, np.array([2]))[:, 0, 0, 0].tolist() == [0, 0, 1, 0]


def test_gradnorm_weighting_draws_high_norm_channels_and_explores_unseen_ones() -> None:
    layers = [CandidateLayer("hot", 50, 1.0), CandidateLayer("cold", 50, 1.0), CandidateLayer("new", 50, 1.0)]
    sampler = ChannelSampler("trady", layers, 30.0, seed=0, weighting="gradnorm")
    assert sampler.needs_grad_norms
    first = sampler.select(0)  # nothing seen yet: all alike
    assert set(first.channels) == {"hot", "cold", "new"}
    seen = Selection(0, {"hot": np.arange(50), "cold": np.arange(50)}, 100.0)
    sampler.observe(seen, {"hot": np.full(50, 10.0), "cold": np.full(50, 0.1)})
    counts = {"hot": 0, "cold": 0, "new": 0}
    for epoch in range(1, 21):
        for name, count in sampler.select(epoch).counts().items():
            counts[name] += count
    # unseen channels weigh the largest norm seen (10): "new" is drawn as often as "hot", "cold" rarely
    assert counts["cold"] < 0.1 * counts["hot"]
    assert 0.7 < counts["new"] / counts["hot"] < 1.4


def test_gradnorm_history_is_in_the_state_so_a_resumed_sampler_draws_the_same() -> None:
    one = ChannelSampler("trady", POOL, 60.0, seed=4, weighting="gradnorm")
    rng = np.random.default_rng(0)
    for epoch in range(3):
        selection = one.select(epoch)
        one.observe(selection, {k: 10.0 ** rng.uniform(-3, 1, len(v)) for k, v in selection.channels.items()})
    two = ChannelSampler("trady", POOL, 60.0, seed=4, weighting="gradnorm")
    two.load_state(json.loads(json.dumps(one.state())))  # as a checkpoint stores it
    assert two.select(3).to_json() == one.select(3).to_json()
    fresh = ChannelSampler("trady", POOL, 60.0, seed=4, weighting="gradnorm")
    assert fresh.select(3).to_json() != one.select(3).to_json()  # the history matters


def test_sampler_state_of_older_checkpoints_still_loads() -> None:
    sampler = ChannelSampler("s-topk-random", POOL, 60.0, seed=0)
    old_format = sampler.select(0).to_json()  # what state() returned before it had sections
    again = ChannelSampler("s-topk-random", POOL, 60.0, seed=1)
    again.load_state(old_format)
    assert again.select(5).to_json()["channels"] == old_format["channels"]


def test_weighting_is_refused_for_non_random_methods() -> None:
    with pytest.raises(EdgeTradyError, match="random methods"):
        ChannelSampler("d-det-rgn", POOL, 60.0, seed=0, weighting="gradnorm")


def test_budget_dependent_k_and_lara_ranking() -> None:
    from edge_trady.workstation.ranking import budget_top_k, build_ranking

    cost = {"a": 100.0, "b": 50.0, "c": 400.0, "d": 10.0}
    assert budget_top_k(["a", "b", "c", "d"], cost, budget=20.0, ratio=0.2) == ["a"]  # 20 <= 0.2 * 100
    assert budget_top_k(["a", "b", "c", "d"], cost, budget=30.0, ratio=0.2) == ["a", "b"]  # 0.2 * 150
    assert budget_top_k(["a", "b", "c", "d"], cost, budget=31.0, ratio=0.2) == ["a", "b", "c"]
    assert budget_top_k(["a", "b", "c", "d"], cost, budget=1e6, ratio=0.2) == ["a", "b", "c", "d"]
    ranking = build_ranking("m", 32, {"a": 3.0, "b": 2.0, "c": 1.0}, {"a": 0.1, "b": 0.5, "c": 0.4}, 0.97)
    assert [layer.name for layer in ranking.layers] == ["a", "b", "c"]
    lara = ranking.rescored("lara")
    assert [layer.name for layer in lara.layers] == ["b", "c", "a"]
    assert lara.top_k(0.5) == ["b"] and lara.layers[0].rgn == 2.0
