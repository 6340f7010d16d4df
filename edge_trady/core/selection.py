"""Channel selection methods (numpy only: the device runner uses this module too).

Every method picks, for an epoch, a set of input channels of the candidate layers whose summed
cost stays within the budget. The classifier is not a candidate: it is always trained.

=================  ==================  ==============  ==========================
method             candidate layers    redrawn         rule
=================  ==================  ==============  ==========================
trady              top-K (ranking)     every epoch     uniform random
s-topk-random      top-K (ranking)     once            uniform random
d-full-random      all                 every epoch     uniform random
s-full-random      all                 once            uniform random
d-det-rgn          all                 every epoch     highest channel RGN first
s-det-rgn          all                 once            highest channel RGN first
full               all                 --              every parameter, BatchNorm in train mode
full-frozen-bn     all                 --              every channel, BatchNorm frozen
classifier-only    none                --              no channel
=================  ==================  ==============  ==========================

``full`` is full fine-tuning as users run it: batch statistics (running statistics updated) and
every parameter trained, BatchNorm affine and biases included; only the PyTorch masked engine does
it. Every other method runs the model with frozen BatchNorm (the usual choice on device).

Random rules draw channels without replacement from the pooled channels and add each one while
the total stays within the budget. ``overflow="skip"`` (default) skips a drawn channel that would
overflow and keeps drawing (fills the budget better); ``overflow="stop"`` stops at the first one.

``weighting`` says how likely each channel is to be drawn:

- ``uniform`` (TraDy): every channel alike. Selections are a pure function of ``(seed, epoch)``.
- ``gradnorm`` (MeDyate): proportional to the channel's gradient norm ``||dL/dW[:, c]||`` the last
  time it was trained (its mean over that epoch's steps); never-trained channels get the largest
  norm seen so far, so every channel keeps being explored. The engine reports the norms
  (``observe``); the history is part of ``state()``, so a selection is a pure function of
  ``(seed, epoch, recorded history)`` and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeTradyError


@dataclass(frozen=True)
class MethodSpec:
    pool: str  # "topk", "all" or "none"
    dynamic: bool
    rule: str  # "random", "rgn", "all" or "none"
    batchnorm: str = "frozen"  # "train": batch statistics and every parameter trained (full FT)


METHODS: dict[str, MethodSpec] = {
    "trady": MethodSpec("topk", True, "random"),
    "s-topk-random": MethodSpec("topk", False, "random"),
    "d-full-random": MethodSpec("all", True, "random"),
    "s-full-random": MethodSpec("all", False, "random"),
    "d-det-rgn": MethodSpec("all", True, "rgn"),
    "s-det-rgn": MethodSpec("all", False, "rgn"),
    "full": MethodSpec("all", False, "all", batchnorm="train"),
    "full-frozen-bn": MethodSpec("all", False, "all"),
    "classifier-only": MethodSpec("none", False, "none"),
}
OVERFLOW_POLICIES = ("skip", "stop")
WEIGHTINGS = ("uniform", "gradnorm")


@dataclass(frozen=True)
class CandidateLayer:
    """A layer whose input channels may be selected, with the cost of one channel."""

    name: str
    channels: int
    cost: float


@dataclass
class Selection:
    """The input channels chosen for one epoch, per layer (sorted), and their summed cost."""

    epoch: int
    channels: dict[str, np.ndarray]
    cost: float

    @property
    def channel_count(self) -> int:
        return int(sum(len(c) for c in self.channels.values()))

    def counts(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.channels.items()}

    def to_json(self) -> dict:
        return {
            "epoch": self.epoch,
            "cost": self.cost,
            "channels": {name: idx.tolist() for name, idx in self.channels.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Selection:
        channels = {k: np.asarray(v, dtype=np.int64) for k, v in data["channels"].items()}
        return cls(int(data["epoch"]), channels, float(data["cost"]))


def candidate_names(method: str, all_layers: Sequence[str], top_k: Sequence[str] | None) -> list[str]:
    """Names of the layers ``method`` draws from, in network order."""
    spec = method_spec(method)
    if spec.pool == "none":
        return []
    if spec.pool == "all":
        return list(all_layers)
    if not top_k:
        raise EdgeTradyError(f"method {method!r} needs a layer ranking (top-K layers)")
    chosen = set(top_k)
    unknown = chosen - set(all_layers)
    if unknown:
        raise EdgeTradyError(f"ranking names layers the model does not have: {sorted(unknown)[:3]}")
    return [name for name in all_layers if name in chosen]


def method_spec(method: str) -> MethodSpec:
    try:
        return METHODS[method]
    except KeyError:
        raise EdgeTradyError(f"unknown method {method!r}; choose from {', '.join(METHODS)}") from None


class ChannelSampler:
    """Chooses the channels to update at each epoch for one method, budget and seed."""

    def __init__(
        self,
        method: str,
        layers: Sequence[CandidateLayer],
        budget: float | None,
        seed: int,
        overflow: str = "skip",
        weighting: str = "uniform",
    ) -> None:
        self.spec = method_spec(method)
        if overflow not in OVERFLOW_POLICIES:
            raise EdgeTradyError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        if weighting not in WEIGHTINGS:
            raise EdgeTradyError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if weighting != "uniform" and self.spec.rule != "random":
            raise EdgeTradyError(f"--weighting {weighting} applies to random methods, not {method!r}")
        if self.spec.rule in ("random", "rgn") and (budget is None or budget < 0):
            raise EdgeTradyError(f"method {method!r} needs a non-negative budget")
        self.method = method
        self.layers = list(layers)
        self.budget = budget
        self.seed = int(seed)
        self.overflow = overflow
        self.weighting = weighting
        self._static: Selection | None = None
        # Pooled view: one entry per (layer, channel).
        self._layer_of = np.repeat(np.arange(len(self.layers)), [c.channels for c in self.layers])
        self._channel_of = np.concatenate(
            [np.arange(c.channels) for c in self.layers] or [np.zeros(0, dtype=np.int64)]
        ).astype(np.int64)
        self._cost_of = np.array([c.cost for c in self.layers], dtype=np.float64)[self._layer_of]
        self._norms = np.full(len(self._layer_of), np.nan)  # last gradient norm seen per channel (gradnorm)
        starts = np.cumsum([0] + [c.channels for c in self.layers])[:-1]
        self._offsets = {c.name: int(start) for c, start in zip(self.layers, starts, strict=True)}

    @property
    def needs_scores(self) -> bool:
        """True for the RGN oracles: ``select`` then needs per-channel scores."""
        return self.spec.rule == "rgn"

    @property
    def dynamic(self) -> bool:
        return self.spec.dynamic

    @property
    def needs_grad_norms(self) -> bool:
        """True when ``observe`` must be fed the trained channels' gradient norms after each epoch."""
        return self.weighting == "gradnorm"

    def observe(self, selection: Selection, norms: Mapping[str, np.ndarray]) -> None:
        """Record the gradient norms of ``selection``'s channels (per layer, in its channel order)."""
        for name, channels in selection.channels.items():
            if name in norms and name in self._offsets:
                self._norms[self._offsets[name] + channels] = np.asarray(norms[name], dtype=np.float64)

    def select(self, epoch: int, scores: Mapping[str, np.ndarray] | None = None) -> Selection:
        """The selection for ``epoch``; static methods return their first selection again."""
        if not self.spec.dynamic and self._static is not None:
            return Selection(epoch, self._static.channels, self._static.cost)
        if self.spec.rule == "none":
            chosen = np.zeros(0, dtype=np.int64)
        elif self.spec.rule == "all":
            chosen = np.arange(len(self._layer_of))
        elif self.spec.rule == "random":
            draw_epoch = epoch if self.spec.dynamic else 0
            rng = np.random.default_rng([self.seed, draw_epoch])
            order = self._weighted_order(rng) if self.weighting == "gradnorm" else rng.permutation(len(self._layer_of))
            chosen = self._fill(order)
        else:
            chosen = self._fill(self._rgn_order(scores))
        selection = self._to_selection(epoch, chosen)
        if not self.spec.dynamic:
            self._static = selection
        return selection

    def state(self) -> dict | None:
        """What a checkpoint must keep to reproduce the next selections on resume: a static
        method's selection, the gradient-norm history (``gradnorm``)."""
        state: dict = {}
        if self._static is not None:
            state["static"] = self._static.to_json()
        if self.needs_grad_norms:
            state["grad_norms"] = [None if np.isnan(v) else v for v in self._norms.tolist()]
        return state or None

    def load_state(self, state: dict | None) -> None:
        state = state or {}
        if "channels" in state:  # written before the state had sections: a static selection
            state = {"static": state}
        self._static = Selection.from_json(state["static"]) if state.get("static") else None
        norms = state.get("grad_norms")
        if norms is not None and len(norms) != len(self._norms):
            raise EdgeTradyError(f"sampler state has {len(norms)} channel norms, this sampler pools {len(self._norms)}")
        self._norms = np.array([np.nan if v is None else v for v in norms], dtype=np.float64) if norms else self._norms

    def _weighted_order(self, rng: np.random.Generator) -> np.ndarray:
        """A draw without replacement with probabilities proportional to the weights (Efraimidis-Spirakis:
        sort by ``u ** (1 / w)``); unseen channels weigh the largest norm seen, all alike before any."""
        seen = np.isfinite(self._norms)
        top = self._norms[seen].max() if seen.any() else 1.0
        weights = np.where(seen, self._norms, top if top > 0 else 1.0)
        weights = np.maximum(weights, 1e-12 * max(top, 1e-30))  # a zero norm stays drawable, last
        keys = np.log(rng.random(len(weights))) / weights
        return np.argsort(-keys, kind="stable")

    def _rgn_order(self, scores: Mapping[str, np.ndarray] | None) -> np.ndarray:
        if scores is None:
            raise EdgeTradyError(f"method {self.method!r} needs per-channel gradient scores")
        flat = np.concatenate(
            [np.asarray(scores[c.name], dtype=np.float64).reshape(c.channels) for c in self.layers] or [np.zeros(0)]
        )
        return np.argsort(-flat, kind="stable")

    def _fill(self, order: np.ndarray) -> np.ndarray:
        """Greedily take channels in ``order`` while the budget holds."""
        assert self.budget is not None
        costs = self._cost_of[order]
        if self.overflow == "stop":
            fits = np.cumsum(costs) <= self.budget + 1e-9
            return order[: int(np.argmin(fits)) if not fits.all() else len(order)]
        taken: list[int] = []
        remaining = self.budget
        cheapest = costs.min() if len(costs) else 0.0
        for index, cost in zip(order.tolist(), costs.tolist(), strict=True):
            if cost <= remaining + 1e-9:
                taken.append(index)
                remaining -= cost
                if remaining < cheapest:
                    break
        return np.asarray(taken, dtype=np.int64)

    def _to_selection(self, epoch: int, chosen: np.ndarray) -> Selection:
        channels: dict[str, np.ndarray] = {}
        for layer_index, layer in enumerate(self.layers):
            picked = chosen[self._layer_of[chosen] == layer_index]
            if len(picked):
                channels[layer.name] = np.sort(self._channel_of[picked])
        return Selection(epoch, channels, float(self._cost_of[chosen].sum()))
