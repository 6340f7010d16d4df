"""Plan files: what to train on which device, with the predicted memory (no torch needed to read).

A plan fixes the model and input, the candidate layers with their per-channel costs, the channel
budget (in the sampler's unit), the sampler and seed, the engine, and the predicted peak memory
broken into parts, for one device profile. ``edge-trady finetune --plan`` and ``export`` use it.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ..errors import PlanError
from .atomic import write_json
from .layers import BYTES_PER_UNIT, LayerCost
from .memory import MemoryEstimate

PLAN_VERSION = 1


@dataclass
class Plan:
    model: str
    num_classes: int
    image_size: int
    normalization: dict
    batch_size: int
    engine: str
    method: str
    seed: int
    overflow: str
    epochs: int
    lr: float
    warmup_epochs: int | None
    layers: list[dict]  # candidate layers: LayerCost fields
    classifier: dict  # LayerCost fields of the always-trained head
    budget: float  # channel budget in ``budget_unit``
    budget_unit: str  # "units" (paper units, one sample) or "bytes" (at batch_size)
    ranking: dict  # threshold, k, rule, source
    memory: dict  # MemoryEstimate.to_dict()
    profile: dict  # DeviceProfile fields
    usable_memory_bytes: int
    data: dict  # spec, per_class, train images: what the memory model assumed
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    engines: list[dict] = field(default_factory=list)  # the other engines' predicted peaks (planner)
    version: int = PLAN_VERSION

    @property
    def layer_costs(self) -> list[LayerCost]:
        return [LayerCost.from_dict(layer) for layer in self.layers]

    @property
    def classifier_cost(self) -> LayerCost:
        return LayerCost.from_dict(self.classifier)

    @property
    def estimate(self) -> MemoryEstimate:
        return MemoryEstimate.from_dict(self.memory)

    @property
    def budget_bytes(self) -> float:
        if self.budget_unit == "bytes":
            return self.budget
        per_unit = [layer.bytes_per_channel(self.batch_size) / layer.unit_cost for layer in self.layer_costs]
        return self.budget * max(per_unit, default=BYTES_PER_UNIT)

    def budget_text(self) -> str:
        """The budget as ``finetune --budget`` reads it."""
        return f"{int(self.budget)}B" if self.budget_unit == "bytes" else f"{self.budget:.3f}"

    def finetune_fields(self) -> dict:
        """Keyword arguments of FinetuneSpec for the run this plan describes."""
        return {
            "model": self.model,
            "image_size": self.image_size,
            "method": self.method,
            "budget": self.budget_text(),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "warmup_epochs": self.warmup_epochs,
            "seed": self.seed,
            "overflow": self.overflow,
            "top_k": [layer["name"] for layer in self.layers],
            "engine": self.engine,
            "data": self.data.get("spec"),
            "per_class": self.data.get("per_class"),
        }

    def save(self, path: Path) -> None:
        write_json(Path(path), asdict(self))

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"{path}: plan file not found") from None
        except ValueError as exc:
            raise PlanError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            found = data.get("version") if isinstance(data, dict) else None
            raise PlanError(f"{path}: plan format version {found!r}, this tool reads version {PLAN_VERSION}")
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if missing or unknown:
            raise PlanError(f"{path}: missing fields {missing} / unknown fields {unknown}")
        return cls(**data)
