"""``edge-trady export``: turn a plan into an ONNX Runtime training artifact (workstation)."""

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
    from ..workstation.export.artifact import export_plan

    manifest = export_plan(Plan.load(Path(plan_path)), Path(out_dir))
    if not quiet:
        plan = manifest.plan
        click.echo(
            f"{plan.model} at {plan.image_size} px: {len(manifest.masks)} masked layers + classifier, "
            f"method {plan.method}; written to {out_dir} (artifact {manifest.artifact_sha256[:12]})"
        )
