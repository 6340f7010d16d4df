"""Portable engine: trains a portable artifact on plain ``onnxruntime`` (numpy too; never torch,
never onnxruntime-training), on any CPU architecture.

One ``InferenceSession`` runs the training step (forward and backward, ``train_step.onnx``), a
second one predicts (``inference.onnx`` with the current weights fed as inputs). The weights that
can change live in numpy; plain SGD updates the selected slices in place (``core.slices``), so
every unselected entry stays bit-identical. ``export_inference`` writes the fine-tuned model by
patching the weights' bytes in the inference graph (``core.onnx_wire``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.atomic import replacing
from ..core.onnx_wire import OnnxFile
from ..core.selection import Selection
from ..core.slices import ChannelSlice
from ..errors import ArtifactError
from .ort_runtime import ort_bindings
from .portable_format import LAYOUT_FILE, PortableLayout

STATE_FILE = "portable_state.npz"
BAKED_PREFIX = "baked::"  # checkpoint entries of the refreshed weights the step graph holds


def _onnxruntime():
    ort_bindings()  # import onnxruntime without letting it import torch
    import onnxruntime

    return onnxruntime


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def session_options(threads: int | None, step: bool):
    """ONNX Runtime options of the portable sessions (``step``: the training step's)."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_mem_pattern = False  # its planned block is ~25 MiB larger for the step's dynamic shapes
    if step:  # the step graph's node order keeps only what backward needs (step_graph.py)
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads:
        options.intra_op_num_threads = threads
    # Idle worker threads sleep instead of spinning: on a loaded machine spinning doubled the CPU
    # time of a 2-thread step and made it 5x slower in wall time (bench/threads.py, docs/speed.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class PortableEngine:
    """The Engine protocol on an artifact written by ``workstation.export.portable``.

    One ONNX Runtime session is alive at a time: the step session while training, the inference
    session while predicting; switching creates the other one with the current weights written in
    (about as long as a few steps; the loop switches twice per epoch). The step session is also
    re-created when a refreshed weight changed outside the current selection (after an epoch).
    """

    name = "portable"

    def __init__(self, directory: Path, layout: PortableLayout | None = None, threads: int | None = None) -> None:
        ort = _onnxruntime()
        self.directory = Path(directory)
        self.layout = layout or PortableLayout.load(self.directory)
        needed = self.layout.min_onnxruntime
        if _version(ort.__version__) < _version(needed):
            raise ArtifactError(
                f"onnxruntime {ort.__version__} is too old for this artifact (opset {self.layout.opset} needs "
                f"onnxruntime >= {needed}): pip install 'onnxruntime>={needed}'"
            )
        self.threads = threads
        self.layers = {layer.name: layer for layer in self.layout.layers}
        self.weights = self._initial_weights()
        self._session = None
        self._mode = ""  # "step" or "predict": what _session runs
        self._changes = 0  # weight updates so far (the inference session is stale when it saw fewer)
        self._session_changes = -1
        # refreshed weights as the step graph holds them: renewed only when a weight changed outside
        # the selection, so a resumed run (they are checkpointed) computes bit for bit the same
        self._baked = {name: self.weights[name].copy() for name in self.layout.refreshed}
        self._checked = False  # the step session holds for the current selection and weights
        self._slices: dict[str, ChannelSlice] = {}
        self.set_selection(Selection(0, {}, 0.0))

    def _initial_weights(self) -> dict[str, np.ndarray]:
        """The trainable tensors' values in the inference graph, after checking both graphs
        against the layout (a replaced graph fails here, not mid-run)."""
        layout = self.layout
        step_inputs = [layout.input_name, layout.labels_name, *layout.channel_inputs.values(), *layout.inputs.values()]
        step_outputs = [layout.loss_name, layout.correct_name, *layout.grads.values()]
        self._check_graph(
            layout.step_model, step_inputs, step_outputs, {n: layout.weights[n] for n in layout.refreshed}
        )
        inference = self._check_graph(layout.inference_model, [layout.input_name], [layout.logits_name], layout.weights)
        return {name: inference.array(name) for name in layout.weights}

    def _check_graph(self, file: str, inputs: list[str], outputs: list[str], weights: dict[str, list[int]]) -> OnnxFile:
        """The graph ``file``, if its inputs, outputs, opset and initializers ``weights`` (name ->
        shape) are the layout's."""
        path = self.directory / file
        model = self._read(path)
        if sorted(model.inputs) != sorted(inputs) or sorted(model.outputs) != sorted(outputs):
            raise ArtifactError(
                f"{path}: its inputs and outputs are not the ones {LAYOUT_FILE} names (replaced graph?): "
                "export the artifact again"
            )
        if model.opsets.get("", model.opsets.get("ai.onnx")) != self.layout.opset:
            raise ArtifactError(f"{path}: operator sets {model.opsets}, {LAYOUT_FILE} says {self.layout.opset}")
        for name, shape in weights.items():
            init = model.initializers.get(name)
            if init is None or list(init.dims) != shape:
                found = "missing" if init is None else f"shape {list(init.dims)}"
                raise ArtifactError(f"{path}: trainable tensor {name!r} is {found}, {LAYOUT_FILE} says {shape}")
        return model

    @staticmethod
    def _read(path: Path) -> OnnxFile:
        try:
            return OnnxFile(path.read_bytes(), str(path))
        except OSError as exc:
            raise ArtifactError(f"{path}: cannot read ({exc.strerror or exc})") from None

    def _open(self, mode: str):
        """The session of ``mode``, created (after dropping the other one) when missing or stale."""
        if self._session is not None and self._mode == mode:
            if mode == "predict" and self._session_changes == self._changes:
                return self._session
            if mode == "step" and (self._checked or self._step_holds()):
                self._checked = True
                return self._session
        self._session = None  # free the other session before building this one
        if mode == "step" and not self._step_holds():  # write the current values in
            self._baked = {name: self.weights[name].copy() for name in self.layout.refreshed}
        layout = self.layout
        path = self.directory / (layout.step_model if mode == "step" else layout.inference_model)
        self._session = self._create(path, self.graph_bytes(mode), mode == "step")
        self._mode, self._session_changes = mode, self._changes
        self._checked = mode == "step"
        return self._session

    def graph_bytes(self, mode: str) -> bytes:
        """The step graph (``mode="step"``, with the refreshed weights it holds) or the inference
        graph (with the current weights)."""
        layout = self.layout
        step = mode == "step"
        values = self._baked if step else self.weights
        source = self._read(self.directory / (layout.step_model if step else layout.inference_model))
        return source.patched(values)

    def _step_holds(self) -> bool:
        """True if every refreshed weight differs from what the step session holds only inside the
        current selection (the graph adds the selected slice's difference itself)."""
        for name, baked in self._baked.items():
            part = self._slices[self.layout.layer_of[name]]
            outside = np.ones(baked.shape, dtype=bool)
            part.scatter_(outside, np.zeros(part.shape, dtype=bool))
            if (self.weights[name] != baked)[outside].any():
                return False
        return True

    def _create(self, path: Path, data: bytes, step: bool):
        ort = _onnxruntime()
        options = session_options(self.threads, step)
        try:
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            reason = " ".join(str(exc).split())
            raise ArtifactError(f"{path}: onnxruntime {ort.__version__} cannot load it ({reason[:300]})") from None
        # The Python session keeps the serialized model for as long as it lives ("TODO: This is bad as
        # we're holding the memory indefinitely", onnxruntime_inference_collection.py); it is needed
        # only to re-create the session on another execution provider, which this engine never does.
        if getattr(session, "_model_bytes", None) is not None:
            session._model_bytes = None
        return session

    def set_selection(self, selection: Selection) -> None:
        unknown = set(selection.channels) - set(self.layers)
        if unknown:
            raise ArtifactError(f"layer {sorted(unknown)[0]!r} is selected but is not trainable in this artifact")
        empty = np.zeros(0, dtype=np.int64)
        self._slices = {
            name: ChannelSlice(layer, selection.channels.get(name, empty)) for name, layer in self.layers.items()
        }
        self._checked = False

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, int]:
        loss, correct, grads = self.gradients(x, y)
        self.apply_gradients(grads, lr)
        return loss, correct

    def apply_gradients(self, grads: dict[str, np.ndarray], lr: float) -> None:
        """Plain SGD with the gradients of ``gradients``: the selected slices and the classifier."""
        layer_of = self.layout.layer_of
        for name, weight in self.weights.items():
            if name in layer_of:
                self._slices[layer_of[name]].sgd_(weight, grads[name], lr)
            else:  # the classifier: every entry trains
                weight -= np.float32(lr) * grads[name]
        self._changes += 1

    def gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int, dict[str, np.ndarray]]:
        """Mean loss, correct predictions and the gradient of every trainable tensor on a batch: of
        the selected slice for a candidate layer (``core.slices`` layout), of the whole classifier."""
        session = self._open("step")
        layout = self.layout
        outputs = [layout.loss_name, layout.correct_name, *layout.grads.values()]
        loss, correct, *grads = session.run(outputs, self.step_feeds(x, y))
        return float(loss), int(correct), dict(zip(layout.grads, grads, strict=True))

    def step_feeds(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """The step graph's inputs for a batch: images, labels, selections, trainable tensors (a
        refreshed weight as its selected slice)."""
        layout = self.layout
        feeds = {
            layout.input_name: np.ascontiguousarray(x, dtype=np.float32),
            layout.labels_name: np.ascontiguousarray(y, dtype=np.int64),
            **{layout.channel_inputs[name]: part.channels for name, part in self._slices.items()},
        }
        refreshed = set(layout.refreshed)
        for name, weight in self.weights.items():
            sliced = name in refreshed
            feeds[layout.inputs[name]] = self._slices[layout.layer_of[name]].gather(weight) if sliced else weight
        return feeds

    def predict(self, x: np.ndarray) -> np.ndarray:
        session = self._open("predict")
        return session.run([self.layout.logits_name], {self.layout.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The current value of every tensor that can change, by name (read-only views)."""
        views = {}
        for name, weight in self.weights.items():
            view = weight.view()
            view.flags.writeable = False
            views[name] = view
        return views

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        """Set every trainable tensor from ``state`` (same names and shapes as ``trainable_state``)."""
        if set(state) != set(self.weights):
            missing, unknown = sorted(set(self.weights) - set(state)), sorted(set(state) - set(self.weights))
            raise ArtifactError(f"trainable state: missing tensors {missing}, unknown tensors {unknown}")
        for name, value in state.items():
            if np.shape(value) != self.weights[name].shape:
                raise ArtifactError(
                    f"trainable state: {name!r} has shape {np.shape(value)}, expected {self.weights[name].shape}"
                )
        for name, value in state.items():
            np.copyto(self.weights[name], value, casting="same_kind")
        self._changes += 1
        self._checked = False

    def save_state(self, directory: Path) -> None:
        """``portable_state.npz``: every trainable tensor and the refreshed weights the step holds."""
        baked = {BAKED_PREFIX + name: value for name, value in self._baked.items()}
        with open(Path(directory) / STATE_FILE, "wb") as handle:
            np.savez(handle, **self.weights, **baked)

    def load_state(self, directory: Path) -> None:
        path = Path(directory) / STATE_FILE
        try:
            with np.load(path, allow_pickle=False) as saved:
                state = {name: saved[name] for name in saved.files}
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(f"{path}: cannot read the checkpoint ({exc})") from None
        baked = {
            name.removeprefix(BAKED_PREFIX): state.pop(name) for name in list(state) if name.startswith(BAKED_PREFIX)
        }
        try:
            self.load_trainable_state(state)
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: {exc} (a checkpoint of another artifact?)") from None
        if set(baked) != set(self._baked) or any(baked[n].shape != v.shape for n, v in self._baked.items()):
            raise ArtifactError(f"{path}: its refreshed weights are not this artifact's (a checkpoint of another?)")
        self._baked = baked
        self._session = None

    def weights_finite(self) -> bool:
        return all(np.isfinite(weight).all() for weight in self.weights.values())

    def export_inference(self, path: Path) -> None:
        """Write an ONNX model (image in, logits out, current weights) for ``InferenceSession``,
        atomically: the inference graph with the trainable weights' bytes replaced. The session is
        dropped first (made again when needed), so the graph's bytes take its place, not more."""
        self._session = None
        source = self._read(self.directory / self.layout.inference_model)
        with replacing(Path(path)) as tmp, open(tmp, "wb") as handle:
            for chunk in source.patched_chunks(self.weights):
                handle.write(chunk)
