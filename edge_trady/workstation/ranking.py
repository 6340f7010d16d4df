"""Layer ranking (TraDy step 1): fine-tune with full gradients, accumulate each layer's RGN.

``RGN_i = sum_steps sum_c ||dL/dW_i[:, c]|| / (Cw + Ca)``; the top-K set is the smallest prefix of
layers (sorted by RGN) whose cumulative share reaches the threshold (97 % by default).
LaRa (MeDyate) is recorded too: ``sum_steps ||dL/dW_i|| / sum_c (Cw + Ca)``; ``rescored("lara")``
ranks by it. K rules: ``threshold`` (the paper: the smallest prefix reaching the threshold share) or
``budget`` (MeDyate, ``budget_top_k``: the smallest prefix whose memory ``M_K`` keeps
``B_mem / M_K <= ratio``, 0.2 by default, so that the budget covers at most a fifth of the pool).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.atomic import write_json
from ..errors import EdgeTradyError

DEFAULT_THRESHOLD = 0.97
SCORES = ("rgn", "lara")
K_RULES = ("threshold", "budget")
DEFAULT_K_RATIO = 0.2


@dataclass
class LayerScore:
    name: str
    rgn: float
    lara: float
    share: float
    cumulative: float


@dataclass
class Ranking:
    """Layers sorted by RGN (highest first), with the K that reaches ``threshold``."""

    model: str
    image_size: int
    threshold: float
    k: int
    layers: list[LayerScore]
    score: str = "rgn"
    source: dict = field(default_factory=dict)  # how it was made (data, epochs, seed)

    def top_k(self, threshold: float | None = None) -> list[str]:
        """Names of the top-K layers for ``threshold`` (default: the ranking's own)."""
        target = self.threshold if threshold is None else threshold
        names = []
        for layer in self.layers:
            names.append(layer.name)
            if layer.cumulative >= target - 1e-12:
                break
        return names

    def rescored(self, score: str) -> Ranking:
        """The same measurements ranked by ``score`` ("rgn" or "lara")."""
        if score == self.score:
            return self
        rgn = {layer.name: layer.rgn for layer in self.layers}
        lara = {layer.name: layer.lara for layer in self.layers}
        return build_ranking(self.model, self.image_size, rgn, lara, self.threshold, score, self.source)

    def save(self, path: Path) -> None:
        write_json(Path(path), asdict(self), indent=2)

    @classmethod
    def load(cls, path: Path) -> Ranking:
        try:
            data = json.loads(Path(path).read_text())
            data["layers"] = [LayerScore(**layer) for layer in data["layers"]]
            return cls(**data)
        except FileNotFoundError:
            raise EdgeTradyError(f"{path}: ranking file not found") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise EdgeTradyError(f"{path}: not a ranking.json written by 'edge-trady rank' ({exc})") from exc


def build_ranking(
    model: str,
    image_size: int,
    rgn: dict[str, float],
    lara: dict[str, float],
    threshold: float = DEFAULT_THRESHOLD,
    score: str = "rgn",
    source: dict | None = None,
) -> Ranking:
    """Sort layers by ``score`` ("rgn" or "lara") and compute shares and K."""
    if not 0 < threshold <= 1:
        raise EdgeTradyError(f"threshold must be in (0, 1], got {threshold}")
    if score not in SCORES:
        raise EdgeTradyError(f"layer score must be one of {SCORES}, got {score!r}")
    values = rgn if score == "rgn" else lara
    total = sum(values.values()) or 1.0
    cumulative = 0.0
    scores = []
    for name in sorted(values, key=lambda n: -values[n]):
        share = values[name] / total
        cumulative += share
        scores.append(LayerScore(name, rgn[name], lara[name], share, min(1.0, cumulative)))
    ranking = Ranking(model, image_size, threshold, 0, scores, score, source or {})
    ranking.k = len(ranking.top_k())
    return ranking


def budget_top_k(order: list[str], layer_cost: Mapping[str, float], budget: float, ratio: float) -> list[str]:
    """The smallest prefix of ``order`` whose summed ``layer_cost`` (every channel of each layer, in the
    budget's unit) is at least ``budget / ratio``; every layer when none is."""
    if not 0 < ratio <= 1:
        raise EdgeTradyError(f"K ratio must be in (0, 1], got {ratio}")
    names, total = [], 0.0
    for name in order:
        names.append(name)
        total += layer_cost[name]
        if budget <= ratio * total:
            break
    return names
