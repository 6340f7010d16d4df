"""``edge-trady export``: turn a plan into a training artifact for the device runner (workstation)."""

from __future__ import annotations

from pathlib import Path

import click


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
@click.option(
    "--format",
    "artifact_format",
    type=click.Choice(["onnx", "ort-training"]),
    default=None,
    help="onnx: portable, trains on plain onnxruntime on any CPU (plans for --engine portable); "
    "ort-training: ONNX Runtime training artifact, x86_64 only (plans for --engine ort). "
    "Default: what the plan's engine runs.",
)
@click.option("--quiet", is_flag=True)
def command(
    plan_path: str, out_dir: str, overwrite: bool, trust_model_code: bool, artifact_format: str | None, quiet: bool
) -> None:
    """Export the model and layers PLAN (from 'edge-trady plan') describes as a training artifact.

    Builds the model with the plan's seed (the same new classifier head as 'edge-trady finetune
    --seed'), makes the plan's candidate layers trainable channel by channel (the classifier
    always), and writes manifest.json: the format, the plan, the graph inputs that select each
    layer's channels, input and preprocessing, classes, tool versions and the sha256 of every file.
    A plan from 'edge-trady plan' (engine portable by default) exports the portable format:
    one training-step graph of standard ONNX operators that 'edge-trady run' trains with plain
    onnxruntime (docs/portable.md). Example:

      edge-trady export plan.json -o artifact/
    """
    from ..core.plan import Plan
    from ..workstation.export.artifact import export_plan

    manifest = export_plan(Plan.load(Path(plan_path)), Path(out_dir), artifact_format, overwrite, trust_model_code)
    if not quiet:
        plan = manifest.plan
        click.echo(
            f"{plan.model} at {plan.image_size} px, format {manifest.format}: {len(manifest.selection_inputs)} "
            f"candidate layers + classifier, method {plan.method}; written to {out_dir} "
            f"(artifact {manifest.artifact_sha256[:12]})"
        )
