"""The export driver: a plan -> an artifact folder with its manifest (workstation)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy
import onnx
import onnxruntime
import torch

from ... import __version__
from ...core.plan import Plan
from ...device.manifest import MANIFEST_FILE, Manifest, hash_files
from ...device.runner import plan_sampler
from ...errors import ArtifactError
from ..cost_trace import trace_layers
from ..models import build_model
from .forward import INPUT
from .ort_training import export_training_artifact
from .portable import export_portable_artifact

FORMAT_OF_ENGINE = {"portable": "onnx", "ort": "ort-training"}  # the plan's engine -> what it runs


def export_plan(plan: Plan, out_dir: Path, artifact_format: str | None = None) -> Manifest:
    """Write the artifact of ``plan`` (format ``artifact_format``, default: the one its engine
    runs) and its manifest to ``out_dir``; return the Manifest.

    The artifact is built in a sibling folder and renamed into place when complete, so a failed
    export leaves no half-written artifact behind."""
    artifact_format = artifact_format or FORMAT_OF_ENGINE.get(plan.engine)
    engine = next((e for e, f in FORMAT_OF_ENGINE.items() if f == artifact_format), None)
    if plan.engine != engine:
        raise ArtifactError(
            f"the plan is for engine {plan.engine!r}: its memory prediction does not hold for the device runner of "
            f"format {artifact_format or 'onnx'!r}; make it with 'edge-trady plan --engine {engine or 'portable'}'"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise ArtifactError(f"{out_dir}: exists and is not an artifact; give an empty or new folder")
    trainable = [layer.name for layer in plan_sampler(plan).layers]
    built = build_model(plan.model, plan.num_classes, plan.image_size, plan.seed)
    layers = trace_layers(built.module, plan.image_size)
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    args = (built.module, layers, trainable, built.classifier, plan.image_size, staging)
    try:
        if artifact_format == "onnx":
            selection = {name: layer for layer, name in export_portable_artifact(*args).channel_inputs.items()}
            layer_costs = {layer.name: layer for layer in layers}
        else:
            layout = export_training_artifact(*args)
            selection = layout.masks
            layer_costs = {layer.name: layer for layer in layout.layers}
        manifest = Manifest(
            format=artifact_format,
            plan=plan,
            selection_inputs={
                name: {"layer": layer, "channels": layer_costs[layer].in_channels} for name, layer in selection.items()
            },
            input={
                "name": INPUT,
                "image_size": plan.image_size,
                "channels": 3,
                "dtype": "float32",
                "layout": "NCHW",
            },
            normalization=plan.normalization,
            class_names=plan.class_names,
            versions={
                "edge-trady": __version__,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "numpy": numpy.__version__,
            },
            files=hash_files(staging),
        )
        manifest.save(staging)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
