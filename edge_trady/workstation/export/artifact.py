"""The export driver: a plan -> an artifact folder with its manifest (workstation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy
import onnx
import onnxruntime
import torch

from ... import __version__
from ...core.atomic import replace_folder, staging_sibling
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


def export_plan(
    plan: Plan,
    out_dir: Path,
    artifact_format: str | None = None,
    overwrite: bool = False,
    trust_model_code: bool = False,
) -> Manifest:
    """Write the artifact of ``plan`` (format ``artifact_format``, default: the one its engine
    runs) and its manifest to ``out_dir``; return the Manifest.

    The artifact is built in a hidden sibling folder and swapped into place when complete, so a
    failed or killed export leaves the previous artifact (or nothing) behind, never half of one.
    ``out_dir`` must be new or empty, or (``overwrite``) hold exactly one artifact."""
    artifact_format = artifact_format or FORMAT_OF_ENGINE.get(plan.engine)
    engine = next((e for e, f in FORMAT_OF_ENGINE.items() if f == artifact_format), None)
    if plan.engine != engine:
        raise ArtifactError(
            f"the plan is for engine {plan.engine!r}: its memory prediction does not hold for the device runner of "
            f"format {artifact_format or 'onnx'!r}; make it with 'edge-trady plan --engine {engine or 'portable'}'"
        )
    out_dir = Path(out_dir).expanduser().resolve()
    check_export_target(out_dir, overwrite)
    trainable = [layer.name for layer in plan_sampler(plan).layers]
    built = build_model(plan.model, plan.num_classes, plan.image_size, plan.seed, trust_model_code)
    layers = trace_layers(built.module, built.example)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_sibling(out_dir)
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
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def check_export_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write an artifact over anything but a new or empty folder, or (``overwrite``) a
    folder holding exactly one artifact: its manifest and the files the manifest lists."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ArtifactError(f"{out_dir}: exists and is not a folder")
    present = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if not p.is_dir())
    if not present:
        return
    manifest = out_dir / MANIFEST_FILE
    if not manifest.is_file():
        raise ArtifactError(
            f"{out_dir}: not empty and not an artifact ({_shown(present)}); give an empty or new folder"
        )
    if not overwrite:
        raise ArtifactError(f"{out_dir}: holds an artifact already; --overwrite replaces it, or give a new folder")
    try:
        listed = json.loads(manifest.read_text()).get("files")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        listed = None
    foreign = sorted(set(present) - set(listed if isinstance(listed, dict) else []) - {MANIFEST_FILE})
    if foreign:
        raise ArtifactError(
            f"{out_dir}: holds files that are not part of its artifact ({_shown(foreign)}); move them away, "
            "or export to a new folder"
        )


def _shown(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")
