"""ONNX Runtime training engine (device side: numpy and onnxruntime only, never torch).

``import onnxruntime.training`` runs a package ``__init__`` that imports torch, so this module
talks to the compiled bindings (``CheckpointState``, ``Module``, ``Optimizer``) that the
``onnxruntime.training.api`` wrappers are thin layers over, loaded by ``ort_bindings``.

Masked simulation like the torch masked engine: every trainable layer of the artifact computes
its whole weight gradient; the ``mask::<param>`` inputs zero the unselected entries before plain
SGD, so unselected weights stay bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.masks import channel_mask, mask_shape
from ..core.selection import Selection
from ..device.memwatch import release_free_memory
from ..errors import ArtifactError, out_of_memory
from .ort_runtime import ArtifactLayout, ort_bindings

C = ort_bindings()
STATE_FILE = "ort_checkpoint"


def _quiet() -> C.SessionOptions:
    """Options for the optimizer session: SGDOptimizerV2's output shape ([1]) differs from its
    schema's (scalar), which ORT reports as a warning on load and on every step."""
    options = C.SessionOptions()
    options.log_severity_level = 3
    return options


class OrtEngine:
    """The Engine protocol on an artifact written by ``ort_export.export_training_artifact``."""

    name = "ort"

    def __init__(
        self,
        directory: Path,
        layout: ArtifactLayout | None = None,
        options: C.SessionOptions | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.layout = layout or ArtifactLayout.load(self.directory)
        self.layout.check_files(self.directory)
        self.layers = {layer.name: layer for layer in self.layout.layers}
        self._paths = {
            kind: str(self.directory / getattr(self.layout, kind))
            for kind in ("checkpoint", "training_model", "eval_model", "optimizer_model")
        }
        self._options = options
        self._state = self._module = self._optimizer = None
        self._masks = {
            mask: np.zeros(mask_shape(self.layers[layer]), dtype=np.float32)
            for mask, layer in self.layout.masks.items()
        }
        self._open(self._paths["checkpoint"], f"{self.directory}: cannot load the training artifact")

    def _open(self, checkpoint: str, problem: str) -> None:
        """(Re)build the checkpoint state, training module and optimizer from ``checkpoint``.

        Whatever was open before is released and its heap handed back to the OS first, so a
        resumed run costs what a fresh one does: loading the saved state beside the artifact's and
        copying the trained parameters over kept ~30 MiB more resident under every later peak
        (EfficientNet-Lite0; bench/resume_memory.py)."""
        if self._module is not None:
            self._state = self._module = self._optimizer = None
            release_free_memory()
        device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        try:
            state = C.load_checkpoint(checkpoint)
            self._check_trainable(state, checkpoint)
            module = C.Module(
                self._paths["training_model"],
                state,
                self._paths["eval_model"],
                device,
                self._options or C.SessionOptions(),
            )
            optimizer = C.Optimizer(self._paths["optimizer_model"], state, device, _quiet())
        except ArtifactError:
            raise
        except Exception as exc:
            raise out_of_memory(exc) or ArtifactError(f"{problem} ({exc})") from exc
        self._state, self._module, self._optimizer = state, module, optimizer
        self._train_inputs = list(module.input_names(True))
        outputs = list(module.output_names(True))
        self._loss_index = outputs.index(self.layout.loss_name)
        self._logits_index = outputs.index(self.layout.logits_name)
        module.lazy_reset_grad()

    def _check_trainable(self, state: C.CheckpointState, checkpoint: str) -> None:
        for name in self.layout.trainable_params:
            if not (state.has_parameter(name) and state.get_parameter(name).requires_grad):
                raise ArtifactError(f"{checkpoint}: {name!r} is not trainable there (another artifact?)")

    def set_selection(self, selection: Selection) -> None:
        unknown = set(selection.channels) - set(self.layers)
        if unknown:
            raise ArtifactError(f"layer {sorted(unknown)[0]!r} is selected but is not trainable in this artifact")
        for mask, layer in self.layout.masks.items():
            channels = selection.channels.get(layer, np.zeros(0, dtype=np.int64))
            self._masks[mask] = channel_mask(self.layers[layer], channels)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, int]:
        feeds = {
            self.layout.input_name: np.ascontiguousarray(x, dtype=np.float32),
            self.layout.labels_name: np.ascontiguousarray(y, dtype=np.int64),
        }
        feeds.update(self._masks)
        fetches = C.OrtValueVector()
        self._module.train_step([feeds[name] for name in self._train_inputs], fetches)
        self._optimizer.set_learning_rate(float(lr))
        self._optimizer.optimizer_step()
        self._module.lazy_reset_grad()
        loss = float(fetches[self._loss_index].numpy())
        logits = fetches[self._logits_index].numpy()
        return loss, int((logits.argmax(1) == y).sum())

    def predict(self, x: np.ndarray) -> np.ndarray:
        fetches = C.OrtValueVector()
        self._module.eval_step([np.ascontiguousarray(x, dtype=np.float32)], fetches)
        return fetches[0].numpy()

    def parameter_names(self) -> list[str]:
        """Every parameter of the artifact, trained or frozen."""
        return list(self._state.parameter_names())

    def parameter(self, name: str) -> np.ndarray:
        """A copy of the current value of parameter ``name`` (trained or frozen)."""
        return self._state.get_parameter(name).data.numpy().copy()

    def trainable_state(self) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters (masked layers' weights, the classifier)."""
        return {name: self.parameter(name) for name in self.layout.trainable_params}

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        """Overwrite the trainable parameters with ``state`` (as ``trainable_state`` returns it)."""
        names = self.layout.trainable_params
        if set(state) != set(names):
            missing, unknown = sorted(set(names) - set(state)), sorted(set(state) - set(names))
            raise ArtifactError(f"trainable state: missing {missing[:3]}, unknown {unknown[:3]}")
        device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        for name in names:
            value = np.ascontiguousarray(state[name], dtype=np.float32)
            current = self._state.get_parameter(name).data.numpy()
            if value.shape != current.shape:
                raise ArtifactError(f"{name}: shape {value.shape}, the artifact has {current.shape}")
            self._state.copy_parameter_from(name, C.OrtValue.ortvalue_from_numpy(value, device))

    def save_state(self, directory: Path) -> None:
        C.save_checkpoint(self._state, str(directory / STATE_FILE), False)

    def load_state(self, directory: Path) -> None:
        """Continue from the state ``save_state`` wrote (every parameter): the engine is rebuilt on it."""
        path = directory / STATE_FILE
        self._open(str(path), f"{path}: cannot load the ORT checkpoint")

    def weights_finite(self) -> bool:
        return all(np.isfinite(self._state.get_parameter(n).data.numpy()).all() for n in self.layout.trainable_params)

    def export_inference(self, path: Path) -> None:
        """Write an ONNX model (image in, logits out, current weights) for ``InferenceSession``."""
        self._module.export_model_for_inferencing(str(path), [self.layout.logits_name])


def export_inference(artifact: Path, state: Path, path: Path) -> None:
    """Write the inference model of ``artifact`` with the weights a ``save_state`` left in
    ``state`` (a trained checkpoint directory)."""
    engine = OrtEngine(artifact)
    engine.load_state(state)
    engine.export_inference(path)
