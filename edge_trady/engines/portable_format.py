"""The portable artifact's files and layout (torch-free, onnxruntime-free).

An artifact directory of format ``onnx`` holds

- ``train_step.onnx``: one training step, forward and backward, default-domain ONNX operators at
  opset ``opset`` (see ``workstation.export.step_graph``); run it with the priority-based
  execution order; the ``refreshed`` weights are float32 raw-data initializers that the runner
  overwrites with their current value whenever it creates the session;
- ``inference.onnx``: image in, logits out; every weight is an initializer, the trainable ones
  float32 raw data: the runner predicts and writes the fine-tuned ``model.onnx`` with its current
  weights written in (``core.onnx_wire``);
- ``portable.json``: this class; ``manifest.json`` (``device.manifest``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..core import fields as f
from ..core.atomic import write_json
from ..core.layers import LayerCost
from ..errors import ArtifactError
from .layout_file import build_layout, read_layout_json

FORMAT_VERSION = 1
LAYOUT_FILE = "portable.json"
_NAME_TO_NAME = f.mapping(f.text, f.text, "an object of name -> name")
_RULES: dict[str, f.Rule] = {
    "image_size": f.integer(1, 8192),
    **dict.fromkeys(
        ("classifier", "min_onnxruntime", "input_name", "labels_name", "loss_name", "correct_name", "logits_name"),
        f.text,
    ),
    "opset": f.integer(1, 1000),
    "layers": f.list_of(f.layer_cost, "a list of layers"),
    "weights": f.mapping(f.text, f.list_of(f.integer(1, 1 << 31), "x"), "an object of tensor -> shape"),
    "refreshed": f.list_of(f.text, "a list of names"),
    **dict.fromkeys(("channel_inputs", "inputs", "grads", "kept"), _NAME_TO_NAME),
    **dict.fromkeys(("step_model", "inference_model"), f.relative_path),
    "execution_order": f.one_of("priority_based"),
}


@dataclass
class PortableLayout:
    """Graph names, trainable tensors and candidate layers of a portable artifact."""

    image_size: int
    classifier: str
    opset: int
    min_onnxruntime: str  # oldest onnxruntime that runs the graphs
    layers: list[LayerCost]  # candidate layers, in channel-input order
    channel_inputs: dict[str, str]  # layer -> its int64 selected-channel input
    weights: dict[str, list[int]]  # trainable tensor -> full shape
    inputs: dict[str, str]  # trainable tensor -> the step input that feeds it (the full tensor or its slice)
    refreshed: list[str]  # trainable tensors that are initializers of the step graph, written in per session
    grads: dict[str, str]  # trainable tensor -> its gradient output (the slice for a candidate layer)
    kept: dict[str, str]  # tensor the step keeps from forward to backward -> what it is
    input_name: str = "input"
    labels_name: str = "labels"
    loss_name: str = "loss"
    correct_name: str = "correct"
    logits_name: str = "logits"
    step_model: str = "train_step.onnx"
    inference_model: str = "inference.onnx"
    execution_order: str = "priority_based"
    version: int = FORMAT_VERSION

    @property
    def layer_of(self) -> dict[str, str]:
        """Candidate weight name -> its layer."""
        return {f"{layer.name}.weight": layer.name for layer in self.layers}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = LAYOUT_FILE) -> PortableLayout:
        layout = build_layout(cls, data, where, _RULES, FORMAT_VERSION, "portable layout")
        trainable = set(layout.weights)
        if not (
            set(layout.channel_inputs) == {layer.name for layer in layout.layers}
            and set(layout.layer_of) <= trainable
            and set(layout.inputs) == trainable == set(layout.grads)
            and set(layout.refreshed) <= trainable
        ):
            raise ArtifactError(f"{where}: layers, channel inputs, weights, inputs and gradients do not name the same")
        return layout

    def save(self, directory: Path) -> None:
        write_json(Path(directory) / LAYOUT_FILE, self.to_dict())

    @classmethod
    def load(cls, directory: Path) -> PortableLayout:
        return cls.from_dict(*read_layout_json(directory, LAYOUT_FILE, "portable artifact"))
