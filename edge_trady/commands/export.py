"""``edge-trady export``: turn a plan into an ONNX Runtime training artifact (workstation)."""

from __future__ import annotations

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
    help="Artifact folder to write (replaced if it holds an artifact).",
)
@click.option("--quiet", is_flag=True)
def command(plan_path: str, out_dir: str, quiet: bool) -> None:
    """Export the model and layers PLAN (from 'edge-trady plan') describes as a training artifact.

    Builds the model with the plan's seed (the same new classifier head as 'edge-trady finetune
    --seed'), makes the plan's candidate layers trainable through per-channel gradient masks
    (the classifier always), and writes manifest.json: the plan, the mask inputs, input and
    preprocessing, classes, tool versions and the sha256 of every file. Example:

      edge-trady export plan.json -o artifact/
    """
    from ..core.plan import Plan

    manifest = export_plan(Plan.load(Path(plan_path)), Path(out_dir))
    if not quiet:
        plan = manifest.plan
        click.echo(
            f"{plan.model} at {plan.image_size} px: {len(manifest.masks)} masked layers + classifier, "
            f"method {plan.method}; written to {out_dir} (artifact {manifest.artifact_sha256[:12]})"
        )


def export_plan(plan: Plan, out_dir: Path) -> Manifest:
    """Write the artifact of ``plan`` and its manifest to ``out_dir``; return the Manifest.

    The artifact is built in a sibling folder and renamed into place when complete, so a failed
    export leaves no half-written artifact behind."""
    import numpy
    import onnx
    import onnxruntime
    import torch

    from .. import __version__
    from ..device.manifest import MANIFEST_FILE, Manifest, hash_files
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
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise ArtifactError(f"{out_dir}: exists and is not an artifact; give an empty or new folder")
    trainable = [layer.name for layer in plan_sampler(plan).layers]
    built = build_model(plan.model, plan.num_classes, plan.image_size, plan.seed)
    layers = trace_layers(built.module, plan.image_size)
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
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
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
