"""``edge-trady finetune``: fine-tune under a channel budget on the workstation."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    checkpoint_options,
    data_options,
    model_options,
    progress_options,
    selection_options,
    training_options,
)


@click.command("finetune")
@model_options
@data_options
@selection_options
@training_options
@progress_options
@click.option(
    "--engine",
    type=click.Choice(["torch-masked", "torch-sparse", "ort", "portable"]),
    default="torch-masked",
    show_default=True,
    help="torch-masked: full backward then masked (reference); torch-sparse: stores and "
    "computes only the selected channels; ort: ONNX Runtime training artifact; portable: the "
    "portable artifact on plain onnxruntime (what 'edge-trady run' trains).",
)
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Run what plan.json describes (model, input, layers, budget, sampler); "
    "options given explicitly on the command line still apply.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="Run folder: model.pt (or model.onnx), metrics.jsonl, selection.jsonl, summary.json, checkpoints/, "
    "done.json. Must be new or empty, unless --resume or --overwrite.",
)
@checkpoint_options
@click.pass_context
def command(
    ctx: click.Context,
    plan_path: str | None,
    out_dir: str,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    progress_every: float | None,
    **options,
) -> None:
    """Fine-tune a model with TraDy or a baseline, training only the selected input channels.

    The model runs with frozen BatchNorm and no dropout; plain SGD with a cosine schedule. Every
    epoch the method draws the channels to update within --budget; the classifier is always
    trained. Example:

      edge-trady finetune --model efficientnet-lite0 --data fashion-mnist --per-class 100
      --image-size 64 --method trady --budget 2% --epochs 10 --out runs/trady
    """
    from ..device.progress import Progress
    from ..workstation.finetune import FinetuneSpec, run_finetune

    fields = {k: v for k, v in options.items() if k in FinetuneSpec.__dataclass_fields__}
    progress = Progress(quiet, progress_every)
    if plan_path:
        from ..core.plan import Plan

        plan = Plan.load(Path(plan_path))
        explicit = {k for k in fields if ctx.get_parameter_source(k).name == "COMMANDLINE"}
        fields = plan.finetune_fields() | {k: fields[k] for k in explicit}
        fields["data"] = options["data"]
        progress.predicted_peak_bytes = plan.estimate.peak_bytes
    result = run_finetune(FinetuneSpec(**fields), Path(out_dir), progress, resume, overwrite)
    if result is not None and result.accuracy_fell:
        from ..device.loop import accuracy_fell_message

        click.echo(f"warning: {accuracy_fell_message(result.initial_val_acc, result.final_val_acc)}", err=True)
    if result is not None and not quiet:
        before, acc = (f"{a:.4f}" if a is not None else "n/a" for a in (result.initial_val_acc, result.final_val_acc))
        click.echo(
            f"val_acc {before} -> {acc}; peak RSS "
            f"{result.peak_rss_bytes / 2**20:.0f} MiB; {result.seconds:.0f}s; "
            f"written to {out_dir}"
        )
