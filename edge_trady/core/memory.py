"""Whole-process peak memory of a training run, as a sum of named parts (no torch needed).

The process goes through two phases: loading (data decoded from its source files) and training.
Parts marked ``always`` are resident in both; the predicted peak is

    peak = always + max(load parts, train parts)

Per engine, the training parts differ:

- torch-masked: autograd keeps the full input of every trainable layer and everything between
  the earliest trainable layer and the loss (traced), full-size weight gradients.
- torch-sparse: autograd keeps only the selected channels of trainable layers' inputs plus
  compact ReLU masks (traced); gradients only for the selected slices; glibc keeps the freed
  blocks of the forward and backward transients, so they count more than once (``CALIBRATION``).
- ort: ONNX Runtime keeps the training graph's tensors needed for backward (the same set the
  masked engine keeps, traced), gradient accumulators for every trainable weight, the model's
  weights several times (checkpoint state, session, optimizer, serialisation), and its arena's slack.
- portable: plain ONNX Runtime runs the step graph, which keeps the selected channels, 1-bit clamp
  masks and the classifier input (traced as torch-sparse with packed masks), gradients of the
  selected slices. At small budgets its peak is dominated by the weights, held several times over
  (``CALIBRATION``); ONNX Runtime frees each activation after its last use, so only part of the
  modelled working sets is resident at once. At large budgets the weight-gradient *patches* (the
  ``kh*kw`` shifted copies of the selected channels, ``LayerCost.patch_bytes_per_channel``)
  dominate: ONNX Runtime's arena keeps blocks of their sizes, so the part grows with their sum.

The constants of each engine in ``CALIBRATION`` are fitted on ``bench/memory_check.py``
(EfficientNet-Lite0, Fashion-MNIST, 64 and 128 px, batch 8 and 32; docs/memory.md), preferring
slight over-prediction: under-predicting is the dangerous direction.

A fleet node (``plan --fleet``) adds Flower's processes and messages as parts of their own
(``fleet_parts``): the peak is then that of the node's processes together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .budget import format_bytes
from .layers import LayerCost

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
    patch_bytes: int = 0  # portable: weight-gradient patches of a selection (selection_patch_bytes)


@dataclass(frozen=True)
class Calibration:
    """An engine's two fitted constants (measured with bench/memory_check.py, docs/memory.md).

    ``weight_copies``: how many times the model's weight bytes are resident at the training peak
    (the "frozen weights" part). ``working_set_share``: the factor on the modelled working sets
    (batch buffers, forward working set, backward transient) that fits the measured growth with the
    batch size and the image size: < 1 where the runtime frees activations right after their last
    use and they never coexist, > 1 where freed heap stays resident.
    """

    weight_copies: float
    working_set_share: float
    patch_share: float = 0.0  # portable: the factor on the selection's weight-gradient patches


CALIBRATION = {
    # PyTorch reads the weights file whole while it fills the parameters: 2 copies. The working sets
    # as modelled; fits the rows within +-10 % (64 px batch 8 lowest, -6 %).
    "torch-masked": Calibration(weight_copies=2.0, working_set_share=1.0),
    # glibc keeps freed heap of the weights' loading and of forward and backward (the peak varies by
    # ~40 MiB between identical runs with the heap layout): 5.5 copies and 1.35x the working sets,
    # fitted on the 5 rows of bench/memory_check.py (64 and 128 px, batch 8 and 32, fresh and
    # resumed; all within -1 .. +3 %).
    "torch-sparse": Calibration(weight_copies=5.5, working_set_share=1.35),
    # The session's initializers, the checkpoint state's copy, the optimizer's view and the module's
    # evaluation copy: 2.7 copies fitted on the batch-8 rows (the batch-32 rows are dominated by the
    # traced activations, which stay as they were fitted).
    "ort": Calibration(weight_copies=2.7, working_set_share=1.0),
    # The runner's numpy weights, the graph bytes patched while a session is created (released once
    # it exists), each ONNX Runtime session's initializers and optimized (NCHWc / prepacked) weights,
    # the final export: 5.75 copies. ONNX Runtime frees activations after their last use (0.15x the
    # modelled working sets), but its arena keeps blocks of every size the step asked for: 0.64x the
    # selection's weight-gradient patches summed over the layers. Fitted on the 8 rows of
    # bench/memory_check.py at 32-128 px, batch 8-32, budgets 2-100 % (all within -1.4 .. +5.8 %).
    "portable": Calibration(weight_copies=5.75, working_set_share=0.15, patch_share=0.64),
}
ORT_CHECKPOINT_COPIES = 2  # ORT: writing a checkpoint / exporting the model serialises the weights
ORT_SAVED_FACTOR = 1.2  # ORT keeps ~20 % more per sample than PyTorch autograd (fitted: ORT rows)


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


def selection_patch_bytes(layers: list[LayerCost], batch_size: int, share: float) -> int:
    """The weight-gradient patches of the portable step for a selection holding ``share`` of every
    candidate channel (as the sampler draws channels at random), summed over the layers. Each
    layer's patches are freed after use, but ONNX Runtime's arena keeps blocks of every size the
    step asked for, so the peak grows with the sum (``patch_share`` of it, calibrated)."""
    return int(share * sum(layer.in_channels * layer.patch_bytes_per_channel(batch_size) for layer in layers))


def estimate_memory(engine: str, shape: RunShape) -> MemoryEstimate:
    """The parts of the predicted peak of ``engine`` for a run of ``shape``."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    b = shape.batch_size
    fit = CALIBRATION[engine]
    saved = shape.saved_bytes_per_sample * b + shape.saved_bytes_fixed
    weights = shape.weight_bytes * fit.weight_copies
    share = fit.working_set_share  # on the three working-set parts below
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
            MemoryPart(
                "frozen weights",
                int(weights),
                "train",
                f"parameters and buffers x {fit.weight_copies:g} (loaded after the data; calibrated)",
            ),
            MemoryPart(DATA_SET_PART, shape.dataset_bytes, "always", "decoded uint8 images (train + val)"),
            MemoryPart("data loading", shape.data_load_bytes, "load", "source files while decoding"),
            MemoryPart(
                "batch buffers", int(share * 2 * b * shape.input_bytes_per_sample), "train", "float32 input batch"
            ),
            MemoryPart(
                "forward working set",
                int(share * b * shape.forward_peak_per_sample),
                "train",
                "largest layer input + output",
            ),
            MemoryPart("stored activations + backprop chain", saved, "train", kept_note),
            MemoryPart("gradient buffers", shape.gradient_bytes, "train", "weight gradients"),
            MemoryPart(
                "backward transient",
                int(share * 2 * b * shape.largest_activation_per_sample),
                "train",
                "activation gradients of the widest layer",
            ),
            *(
                [
                    MemoryPart(
                        "weight-gradient patches",
                        int(fit.patch_share * shape.patch_bytes),
                        "train",
                        f"kh*kw shifted copies of the selected channels x {fit.patch_share:g} (calibrated)",
                    )
                ]
                if engine == "portable"
                else []
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
