"""Plan files: what to train on which device, with the predicted memory (no torch needed to read).

A plan fixes the model and input, the candidate layers with their per-channel costs, the channel
budget (in the sampler's unit), the sampler and seed, the engine, and the predicted peak memory
broken into parts, for one device profile. ``edge-trady finetune --plan`` and ``export`` use it.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ..errors import PlanError
from . import fields as f
from .atomic import write_json
from .json_file import read_json
from .layers import BYTES_PER_UNIT, LayerCost
from .memory import PHASES, MemoryEstimate
from .selection import METHODS, OVERFLOW_POLICIES

PLAN_VERSION = 1


def _memory(value: object) -> str | None:
    part = {"name": f.text, "bytes": f.integer(0, 1 << 62), "phase": f.one_of(*PHASES), "note": f.of_type(str, "")}
    expected = '{"engine", "peak_bytes", "parts": [{"name", "bytes" >= 0, "phase", "note"}]}'
    if not (isinstance(value, dict) and set(value) == {"engine", "peak_bytes", "parts"}):
        return expected
    parts = value["parts"]
    ok = isinstance(parts, list) and parts and not f.integer(0)(value["peak_bytes"])
    for entry in parts if ok else []:
        ok = ok and isinstance(entry, dict) and set(entry) == set(part)
        ok = ok and not any(rule(entry[key]) for key, rule in part.items())
    return None if ok else expected


PLAN_RULES: dict[str, f.Rule] = {
    "model": f.text,
    "num_classes": f.integer(1, 1 << 20),
    "image_size": f.integer(1, 8192),
    "normalization": f.normalization,
    "batch_size": f.integer(1, 1 << 16),
    "engine": f.text,
    "method": f.one_of(*METHODS),
    "seed": f.integer(0, 2**32 - 1),
    "overflow": f.one_of(*OVERFLOW_POLICIES),
    "epochs": f.integer(1, 1 << 20),
    "lr": f.number(positive=True),
    "warmup_epochs": f.optional(f.integer(0, 1 << 20)),
    "layers": f.list_of(f.layer_cost, "a list of layers (name, kind, channels, kernel, groups, in_hw, out_hw)"),
    "classifier": f.layer_cost,
    "budget": f.number(0),
    "budget_unit": f.one_of("units", "bytes"),
    "ranking": f.of_type(dict, "an object"),
    "memory": _memory,
    "profile": f.of_type(dict, "an object"),
    "usable_memory_bytes": f.integer(1),
    "data": f.of_type(dict, "an object"),
    "class_names": f.optional(f.list_of(f.of_type(str, "x"), "a list of class names")),
    "notes": f.list_of(f.of_type(str, "x"), "a list of strings"),
}


def check_plan(data: dict, where: str, error: type[Exception] = PlanError) -> None:
    """Raise ``error`` for a plan field of the wrong type or out of range (fields: ``Plan``)."""
    f.check_fields(data, PLAN_RULES, where, error)
    names = data.get("class_names")
    if names is not None and len(names) != data["num_classes"]:
        raise error(f"{where}: {len(names)} class_names for num_classes {data['num_classes']}")
    layers = [layer["name"] for layer in data["layers"]]
    if len(set(layers)) != len(layers) or data["classifier"]["name"] in layers:
        raise error(f"{where}: candidate layers must be distinct and not the classifier")


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
        data = read_json(path, PlanError, "plan file not found", "not valid JSON or unreadable")
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            found = data.get("version") if isinstance(data, dict) else None
            raise PlanError(f"{path}: plan format version {found!r}, this tool reads version {PLAN_VERSION}")
        required = {x.name for x in fields(cls) if x.default is MISSING and x.default_factory is MISSING}
        missing = sorted(required - set(data))
        unknown = sorted(set(data) - {field.name for field in fields(cls)})
        if missing or unknown:
            raise PlanError(f"{path}: missing fields {missing} / unknown fields {unknown}")
        check_plan(data, str(path))
        return cls(**data)
