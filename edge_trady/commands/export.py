"""``edge-trady export``: turn a plan into an ONNX Runtime training artifact (workstation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ..core.plan import Plan
    from ..device.manifest import Manifest


@click.command("export")
@click.argument("plan_path", metavar="PLAN", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="Artifact folder to write: new or empty (an existing artifact only with --overwrite).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the artifact in --output (as a whole, once the new one is complete); refused if the "
    "folder holds anything that is not part of that artifact.",
)
@click.option(
    "--trust-model-code",
    is_flag=True,
    help="Allow the plan's model to be a factory 'file.py:fn' / 'module:fn' (runs its Python code).",
)
@click.option("--quiet", is_flag=True)
def command(plan_path: str, out_dir: str, overwrite: bool, trust_model_code: bool, quiet: bool) -> None:
    """Export the model and layers PLAN (from 'edge-trady plan') describes as a training artifact.

    Builds the model with the plan's seed (the same new classifier head as 'edge-trady finetune
    --seed'), makes the plan's candidate layers trainable through per-channel gradient masks
    (the classifier always), and writes manifest.json: the plan, the mask inputs, input and
    preprocessing, classes, tool versions and the sha256 of every file. Example:

      edge-trady export plan.json -o artifact/
    """
    from ..core.plan import Plan

    manifest = export_plan(Plan.load(Path(plan_path)), Path(out_dir), overwrite, trust_model_code)
    if not quiet:
        plan = manifest.plan
        click.echo(
            f"{plan.model} at {plan.image_size} px: {len(manifest.masks)} masked layers + classifier, "
            f"method {plan.method}; written to {out_dir} (artifact {manifest.artifact_sha256[:12]})"
        )


def export_plan(plan: Plan, out_dir: Path, overwrite: bool = False, trust_model_code: bool = False) -> Manifest:
    """Write the artifact of ``plan`` and its manifest to ``out_dir``; return the Manifest.

    The artifact is built in a hidden sibling folder and swapped into place when complete, so a
    failed or killed export leaves the previous artifact (or nothing) behind, never half of one."""
    import numpy
    import onnx
    import onnxruntime
    import torch

    from .. import __version__
    from ..core.atomic import replace_folder, staging_sibling
    from ..device.manifest import Manifest, hash_files
    from ..device.runner import plan_sampler
    from ..errors import ArtifactError
    from ..workstation.cost_trace import trace_layers
    from ..workstation.export_ort_training import INPUT, export_training_artifact
    from ..workstation.models import build_model

    if plan.engine != "ort":
        raise ArtifactError(
            f"the plan is for engine {plan.engine!r}: its memory prediction does not hold for the "
            "device runner (ONNX Runtime); make it with 'edge-trady plan --engine ort'"
        )
    out_dir = Path(out_dir).expanduser().resolve()
    check_export_target(out_dir, overwrite)
    trainable = [layer.name for layer in plan_sampler(plan).layers]
    built = build_model(plan.model, plan.num_classes, plan.image_size, plan.seed, trust_model_code)
    layers = trace_layers(built.module, plan.image_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_sibling(out_dir)
    try:
        layout = export_training_artifact(built.module, layers, trainable, built.classifier, plan.image_size, staging)
        channels = {layer.name: layer.in_channels for layer in layout.layers}
        manifest = Manifest(
            plan=plan,
            masks={mask: {"layer": name, "channels": channels[name]} for mask, name in layout.masks.items()},
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
    from ..device.manifest import MANIFEST_FILE
    from ..errors import ArtifactError

    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ArtifactError(f"{out_dir}: exists and is not a folder")
    present = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if not p.is_dir())
    if not present:
        return
    manifest = out_dir / MANIFEST_FILE
    if not manifest.is_file():
        shown = ", ".join(present[:5]) + (" ..." if len(present) > 5 else "")
        raise ArtifactError(f"{out_dir}: not empty and not an artifact ({shown}); give an empty or new folder")
    if not overwrite:
        raise ArtifactError(f"{out_dir}: holds an artifact already; --overwrite replaces it, or give a new folder")
    try:
        listed = json.loads(manifest.read_text()).get("files")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        listed = None
    foreign = sorted(set(present) - set(listed if isinstance(listed, dict) else []) - {MANIFEST_FILE})
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ArtifactError(
            f"{out_dir}: holds files that are not part of its artifact ({shown}); move them away, or "
            "export to a new folder"
        )
