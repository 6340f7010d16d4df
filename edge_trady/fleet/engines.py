"""The engine a node trains the artifact with, and the one the server reads and exports it with.

Every engine here starts from the same tensors: the ORT engine reads the artifact's checkpoint;
torch-sparse builds the plan's model with the plan's seed, exactly as ``edge-trady finetune --plan``
and ``edge-trady export`` do (the export copies those tensors into the checkpoint), then receives the
global state from the server every round anyway. Besides the ``Engine`` protocol, a fleet engine has
``trainable_state()`` and ``load_trainable_state(state)``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

from ..device.manifest import Manifest
from ..engines.base import Engine
from ..errors import FleetError

ENGINES = ("auto", "torch-sparse", "ort")


class FleetEngine(Engine, Protocol):
    def trainable_state(self) -> dict[str, np.ndarray]:
        """Copies of every tensor that can train, by parameter name."""

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        """Overwrite the trainable tensors."""


def resolve_engine(kind: str) -> str:
    """``auto``: torch-sparse where torch is installed (it stores and computes only the selected
    channels), else the ONNX Runtime training engine."""
    if kind not in ENGINES:
        raise FleetError(f"unknown fleet engine {kind!r}; choose from {', '.join(ENGINES)}")
    if kind != "auto":
        return kind
    if importlib.util.find_spec("torch") is not None:
        return "torch-sparse"
    if importlib.util.find_spec("onnxruntime") is not None:
        return "ort"
    raise FleetError("this device has neither torch nor onnxruntime-training: install edge-trady[torch]")


def open_engine(kind: str, artifact: Path, manifest: Manifest) -> FleetEngine:
    """The engine ``kind`` (resolved, not ``auto``) on ``artifact``."""
    if kind == "ort":
        from ..engines.ort_training import OrtEngine

        return OrtEngine(artifact)
    if kind == "torch-sparse":
        return _torch_sparse(manifest)
    raise FleetError(f"unknown fleet engine {kind!r}; choose from {', '.join(ENGINES[1:])}")


def _torch_sparse(manifest: Manifest) -> FleetEngine:
    try:
        from ..engines.torch_sparse import TorchSparseEngine
        from ..workstation.models import build_model
    except ImportError as exc:
        raise FleetError(f"engine torch-sparse needs torch on this device ({exc}): install edge-trady[torch]") from exc
    plan = manifest.plan
    built = build_model(plan.model, plan.num_classes, plan.image_size, plan.seed)
    if built.classifier != plan.classifier["name"]:
        raise FleetError(f"model {plan.model!r} builds classifier {built.classifier!r}, the plan has another")
    return TorchSparseEngine(built.module, [*plan.layer_costs, plan.classifier_cost], built.classifier)
