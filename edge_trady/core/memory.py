"""Whole-process peak memory of a training run, as a sum of named parts (no torch needed).

The process goes through two phases: loading (data decoded from its source files) and training.
Parts marked ``always`` are resident in both; the predicted peak is

    peak = always + max(load parts, train parts)

Per engine, the training parts differ:

- torch-masked: autograd keeps the full input of every trainable layer and everything between
  the earliest trainable layer and the loss (traced), full-size weight gradients.
- torch-sparse: autograd keeps only the selected channels of trainable layers' inputs plus
  compact ReLU masks (traced); gradients only for the selected slices.
- ort: ONNX Runtime keeps the training graph's tensors needed for backward (the same set the
  masked engine keeps, traced), gradient accumulators for every trainable weight, the model's
  weights twice (checkpoint state and session), and its arena's slack.
- portable: plain ONNX Runtime runs the step graph, which keeps the selected channels, 1-bit clamp
  masks and the classifier input (traced as torch-sparse with packed masks), gradients of the
  selected slices; the weights twice (the session's, and the graph bytes the runner writes the
  current weights into while it creates a session). A first model, not yet fitted to measurements.

A fleet node (``plan --fleet``) adds Flower's processes and messages as parts of their own
(``fleet_parts``): the peak is then that of the node's processes together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .budget import format_bytes

ENGINES = ("torch-masked", "torch-sparse", "ort", "portable")
DATA_SET_PART = "data set"  # the part the runner re-checks with the data's real size
PHASES = ("always", "load", "train")


@dataclass(frozen=True)
class MemoryPart:
    name: str
    bytes: int
    phase: str  # "always", "load" or "train"
    note: str = ""


@dataclass
class MemoryEstimate:
    engine: str
    parts: list[MemoryPart]

    def phase_bytes(self, phase: str) -> int:
        return sum(part.bytes for part in self.parts if part.phase == phase)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes("always") + max(self.phase_bytes("load"), self.phase_bytes("train"))

    def table(self) -> str:
        width = max(len(p.name) for p in self.parts)
        rows = [f"{'part':<{width}}  {'phase':<6}  {'bytes':>11}  note"]
        for part in self.parts:
            rows.append(f"{part.name:<{width}}  {part.phase:<6}  {format_bytes(part.bytes):>11}  {part.note}")
        rows.append(
            f"{'predicted peak':<{width}}  {'':<6}  {format_bytes(self.peak_bytes):>11}  always + max(load, train)"
        )
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {
            "engine": self.engine,
            "peak_bytes": self.peak_bytes,
            "parts": [asdict(p) for p in self.parts],
        }

    @classmethod
    def from_dict(cls, data: dict) -> MemoryEstimate:
        return cls(data["engine"], [MemoryPart(**part) for part in data["parts"]])


@dataclass(frozen=True)
class RunShape:
    """What the memory of a run depends on, besides the engine."""

    batch_size: int
    weight_bytes: int
    input_bytes_per_sample: int
    largest_activation_per_sample: int
    forward_peak_per_sample: int
    saved_bytes_per_sample: int  # traced for this engine and the plan's worst selection
    saved_bytes_fixed: int
    gradient_bytes: int  # weight-gradient buffers
    dataset_bytes: int  # decoded uint8 images kept for training and validation
    data_load_bytes: int  # transient while decoding the source files
    runtime_baseline_bytes: int  # fresh process with the engine loaded (device profile)


# Calibration constants, fitted by bench/memory_check.py (see docs/memory.md).
WEIGHT_LOAD_FACTOR = 2.0  # PyTorch: a model's weights while they are loaded (file buffer + parameters)
ORT_CHECKPOINT_COPIES = 2  # ORT: writing a checkpoint / exporting the model serialises the weights
ORT_SAVED_FACTOR = 1.2  # ORT keeps ~20 % more per sample than PyTorch autograd (fitted: ORT rows)
PORTABLE_WEIGHT_COPIES = 2  # portable: the session's weights + the graph bytes while a session starts (not fitted)


# A fleet node (Flower 1.42, `edge-trady fleet node`), measured by bench/fleet_memory.py on x86_64
# (bench/results/fleet-memory.csv: EfficientNet-Lite0 48 px, 8 MiB of trainable tensors): the
# SuperNode (162 MiB) and its SuperExec (127 MiB) are resident all the time; the round's ClientApp
# process adds Flower's runtime (63 MiB, importing flwr-clientapp over numpy) and the global tensors
# it receives, held ~3 times over (message bytes, decoded arrays, the engine's copy): fitted on the
# ClientApp's VmHWM minus the same round trained without Flower (+79 MiB ort, +86 MiB torch-sparse).
FLEET_DAEMONS_BYTES = 290 * 2**20
FLEET_CLIENTAPP_RUNTIME_BYTES = 63 * 2**20
FLEET_STATE_COPIES = 3


def fleet_parts(trainable_bytes: int) -> list[MemoryPart]:
    """What a fleet node needs besides the training itself (``trainable_bytes``: the tensors the
    server sends each round, the candidate layers' weights and the classifier)."""
    return [
        MemoryPart("fleet: SuperNode + SuperExec", FLEET_DAEMONS_BYTES, "always", "Flower's node processes"),
        MemoryPart(
            "fleet: Flower in the ClientApp", FLEET_CLIENTAPP_RUNTIME_BYTES, "always", "flwr runtime of the round"
        ),
        MemoryPart(
            "fleet: global tensors received",
            FLEET_STATE_COPIES * trainable_bytes,
            "train",
            "message bytes + decoded arrays",
        ),
    ]


def estimate_memory(engine: str, shape: RunShape) -> MemoryEstimate:
    """The parts of the predicted peak of ``engine`` for a run of ``shape``."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    b = shape.batch_size
    saved = shape.saved_bytes_per_sample * b + shape.saved_bytes_fixed
    weights = shape.weight_bytes * {"ort": 1, "portable": PORTABLE_WEIGHT_COPIES}.get(engine, WEIGHT_LOAD_FACTOR)
    saving = shape.weight_bytes * ORT_CHECKPOINT_COPIES if engine == "ort" else 0
    if engine == "ort":
        saved = int(saved * ORT_SAVED_FACTOR)
    kept_note = {
        "torch-masked": "full inputs of trainable layers + backprop chain (traced)",
        "torch-sparse": "selected input channels + ReLU masks (traced)",
        "ort": "training graph tensors kept for backward (traced)",
        "portable": "selected input channels + 1-bit clamp masks (traced as torch-sparse)",
    }[engine]
    return MemoryEstimate(
        engine,
        [
            MemoryPart(
                "runtime baseline",
                shape.runtime_baseline_bytes,
                "always",
                f"fresh process with the {engine} engine loaded (device profile)",
            ),
            MemoryPart("frozen weights", int(weights), "train", "parameters and buffers (loaded after the data)"),
            MemoryPart(DATA_SET_PART, shape.dataset_bytes, "always", "decoded uint8 images (train + val)"),
            MemoryPart("data loading", shape.data_load_bytes, "load", "source files while decoding"),
            MemoryPart("batch buffers", 2 * b * shape.input_bytes_per_sample, "train", "float32 input batch"),
            MemoryPart(
                "forward working set",
                b * shape.forward_peak_per_sample,
                "train",
                "largest layer input + output",
            ),
            MemoryPart("stored activations + backprop chain", saved, "train", kept_note),
            MemoryPart("gradient buffers", shape.gradient_bytes, "train", "weight gradients"),
            MemoryPart(
                "backward transient",
                2 * b * shape.largest_activation_per_sample,
                "train",
                "activation gradients of the widest layer",
            ),
            MemoryPart("optimizer state", 0, "train", "plain SGD keeps none"),
            MemoryPart(
                "checkpoint writing",
                int(saving),
                "train",
                "ORT serialises the weights to save them"
                if engine == "ort"
                else "the trainable tensors, written as they are",
            ),
        ],
    )
