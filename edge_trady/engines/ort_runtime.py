"""Torch-free pieces of the ONNX Runtime engine: the artifact layout and the ORT bindings.

An artifact directory holds ``training_model.onnx`` (with one ``mask::<param>`` input per masked
weight), ``eval_model.onnx`` (image in, logits out), ``optimizer_model.onnx`` (plain SGD),
``checkpoint`` (every parameter; only the trained ones change) and ``layout.json`` (this class).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

from ..core import fields as f
from ..core.atomic import write_json
from ..core.layers import LayerCost
from ..errors import ArtifactError
from .layout_file import build_layout, read_layout_json

FORMAT_VERSION = 1
LAYOUT_FILE = "layout.json"
_NAMES = f.list_of(f.text, "a list of names")
_RULES: dict[str, f.Rule] = {
    "image_size": f.integer(1, 8192),
    **dict.fromkeys(("classifier", "input_name", "labels_name", "loss_name", "logits_name"), f.text),
    "masks": lambda v: (
        None
        if isinstance(v, dict) and all(not f.text(k) and not f.text(x) for k, x in v.items())
        else "an object of mask input -> layer name"
    ),
    "params": lambda v: (
        None
        if isinstance(v, dict) and all(not f.text(k) and not _NAMES(x) for k, x in v.items())
        else "an object of layer -> parameter names"
    ),
    "layers": f.list_of(f.layer_cost, "a list of layers"),
    **dict.fromkeys(("training_model", "eval_model", "optimizer_model", "checkpoint"), f.relative_path),
}
MASK_PREFIX = "mask::"
_HIDDEN_ON_IMPORT = ("torch", "onnx")


def ort_bindings() -> ModuleType:
    """``onnxruntime.capi._pybind_state`` (``CheckpointState``, ``Module``, ``Optimizer``).

    Importing any part of onnxruntime runs a package check that imports
    ``onnxruntime.training.ortmodule`` and with it torch and onnx when they are installed
    (+220 MB RSS, +1.2 s here). They are hidden during that first import, so the check fails
    quietly as it does on a device without torch; importing them later still works.
    """
    hidden = [] if "onnxruntime" in sys.modules else [name for name in _HIDDEN_ON_IMPORT if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        from onnxruntime.capi import _pybind_state
    finally:
        for name in hidden:
            del sys.modules[name]
    return _pybind_state


@dataclass
class ArtifactLayout:
    """File names, graph input/output names and the trainable parameters of an artifact."""

    image_size: int
    classifier: str
    input_name: str
    labels_name: str
    loss_name: str
    logits_name: str
    masks: dict[str, str]  # mask input name -> layer name
    params: dict[str, list[str]]  # layer name -> its trainable parameter names
    layers: list[LayerCost]  # costs (and shapes) of the masked layers
    training_model: str = "training_model.onnx"
    eval_model: str = "eval_model.onnx"
    optimizer_model: str = "optimizer_model.onnx"
    checkpoint: str = "checkpoint"
    version: int = FORMAT_VERSION

    @property
    def trainable_params(self) -> list[str]:
        return [name for names in self.params.values() for name in names]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = LAYOUT_FILE) -> ArtifactLayout:
        layout = build_layout(cls, data, where, _RULES, FORMAT_VERSION, "artifact format")
        masked = [layer.name for layer in layout.layers]
        if sorted(masked) != sorted(layout.masks.values()) or not set(masked) | {layout.classifier} <= set(
            layout.params
        ):
            raise ArtifactError(f"{where}: masks, params and layers do not name the same layers")
        return layout

    def save(self, directory: Path) -> None:
        write_json(directory / LAYOUT_FILE, self.to_dict())

    @classmethod
    def load(cls, directory: Path) -> ArtifactLayout:
        return cls.from_dict(*read_layout_json(directory, LAYOUT_FILE, "training artifact"))

    def check_files(self, directory: Path) -> None:
        """Raise ArtifactError if a file the layout names is missing from ``directory``."""
        for name in (self.training_model, self.eval_model, self.optimizer_model, self.checkpoint):
            if not (directory / name).exists():
                raise ArtifactError(f"{directory / name}: missing from the training artifact")
