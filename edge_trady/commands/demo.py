"""``edge-trady demo``: the main job end to end on an embedded default."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="edge-trady-demo",
    show_default=True,
    help="Folder for everything the demo writes.",
)
@click.option(
    "--per-class",
    type=click.IntRange(1),
    default=60,
    show_default=True,
    help="Fashion-MNIST images per class (train and validation).",
)
@click.option("--image-size", type=click.IntRange(16), default=48, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=4, show_default=True)
@click.option("--budget", default="2%", show_default=True, help="Channel budget (units, bytes or %).")
@click.option(
    "--data",
    default="fashion-mnist",
    show_default=True,
    help="Data set (default: Fashion-MNIST from the Debian package dataset-fashion-mnist).",
)
@click.option("--quiet", is_flag=True)
def command(
    out_dir: str, per_class: int, image_size: int, epochs: int, budget: str, data: str, quiet: bool
) -> None:
    """Fine-tune ImageNet-pretrained EfficientNet-Lite0 on a Fashion-MNIST subset with TraDy.

    Ranks the layers, trains the top-K layers' randomly re-sampled channels under --budget with the
    PyTorch masked engine, and prints accuracy before/after, the budget, channels updated and the
    measured peak memory. A few minutes on 2 cores.
    """
    from ..budget import format_bytes
    from ..finetune import FinetuneSpec, run_finetune
    from ..progress import Progress

    spec = FinetuneSpec(
        model="efficientnet-lite0",
        data=data,
        image_size=image_size,
        per_class=per_class,
        method="trady",
        budget=budget,
        epochs=epochs,
        lr=0.125,
        rank_epochs=1,
    )
    result = run_finetune(spec, Path(out_dir), Progress(quiet))
    last = result.epochs[-1]
    channels = sum(e["channels_selected"] for e in result.epochs) / len(result.epochs)
    report = [
        "",
        "edge-trady demo: EfficientNet-Lite0 -> Fashion-MNIST, TraDy",
        f"  data           {per_class} images/class, {image_size} px, {epochs} epochs",
        f"  accuracy       {result.initial_val_acc:.1%} before -> {result.final_val_acc:.1%} after",
        f"  budget         {budget} = {result.budget_amount:,.0f} of {result.full_units:,} units "
        f"(full fine-tuning), top-K = {len(result.top_k or [])} layers",
        f"  channels       {channels:.0f} input channels per epoch (units used {last['units_used']:,.0f})",
        f"  memory         peak RSS {format_bytes(result.peak_rss_bytes)} (measured, VmHWM)",
        f"  time           {result.seconds:.0f} s",
        f"  output         {out_dir}/ (model.pt, metrics.jsonl, selection.jsonl, ranking.json)",
    ]
    click.echo("\n".join(report))
