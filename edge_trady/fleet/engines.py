"""The engine a node trains the artifact with, and the one the server reads and exports it with.

A node trains with the engine of the artifact's format where its runtime is installed (``portable``
on plain onnxruntime for format ``onnx``, ``ort`` on onnxruntime-training for ``ort-training``) and
with ``torch-sparse`` otherwise. Every engine starts from the same tensors: the ONNX Runtime engines
read the artifact's graphs; torch-sparse builds the plan's model with the plan's seed, exactly as
``edge-trady finetune --plan`` and ``edge-trady export`` do (the export copies those tensors into
the artifact), then receives the global state from the server every round anyway.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..device.manifest import Manifest
from ..engines.base import Engine
from ..errors import FleetError

ENGINES = ("auto", "portable", "ort", "torch-sparse")
FORMAT_ENGINES = {"onnx": "portable", "ort-training": "ort"}  # the engine that runs each artifact format


def onnxruntime_kind() -> str | None:
    """``"training"`` (onnxruntime-training), ``"plain"`` (onnxruntime) or None, without importing it
    (both wheels are the ``onnxruntime`` module; only the training one has ``training/``)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    return "training" if (package / "training").is_dir() else "plain"


def resolve_engine(kind: str, manifest: Manifest) -> str:
    """The engine ``kind`` names for this artifact; ``auto``: the artifact format's engine where its
    runtime is installed (plain onnxruntime runs the portable format, onnxruntime-training both), else
    torch-sparse where torch is."""
    if kind not in ENGINES:
        raise FleetError(f"unknown fleet engine {kind!r}; choose from {', '.join(ENGINES)}")
    native = FORMAT_ENGINES[manifest.format]
    if kind in FORMAT_ENGINES.values() and kind != native:
        raise FleetError(
            f"engine {kind} does not run an artifact of format {manifest.format}: use --engine {native} "
            "or torch-sparse, or export the artifact with the other --format"
        )
    if kind != "auto":
        return kind
    runtime = onnxruntime_kind()
    if runtime == "training" or (runtime == "plain" and native == "portable"):
        return native
    if importlib.util.find_spec("torch") is not None:
        return "torch-sparse"
    needs = "onnxruntime (pip install 'edge-trady[device]')" if native == "portable" else "onnxruntime-training"
    raise FleetError(
        f"this device cannot train an artifact of format {manifest.format}: install {needs}, "
        "or torch (edge-trady[torch]) for torch-sparse"
    )


def open_engine(kind: str, artifact: Path, manifest: Manifest) -> Engine:
    """The engine ``kind`` (resolved, not ``auto``) on ``artifact``."""
    if kind in FORMAT_ENGINES.values():
        from ..device.runner import open_engine as open_artifact

        return open_artifact(manifest, artifact)
    if kind == "torch-sparse":
        return _torch_sparse(manifest)
    raise FleetError(f"unknown fleet engine {kind!r}; choose from {', '.join(ENGINES[1:])}")


def _torch_sparse(manifest: Manifest) -> Engine:
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
