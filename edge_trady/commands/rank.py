"""``edge-trady rank``: rank layers by RGN and write ranking.json."""

from __future__ import annotations

from pathlib import Path

import click

from .options import SEED, data_options, finite_positive, model_options


@click.command("rank")
@model_options
@data_options
@click.option(
    "--epochs",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Epochs of full fine-tuning while gradients are accumulated.",
)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option(
    "--lr",
    type=float,
    callback=finite_positive,
    default=0.01,
    show_default=True,
    help="Learning rate of the full fine-tuning (0.125 diverges on pretrained models).",
)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.97,
    show_default=True,
    help="Cumulative share that defines K.",
)
@click.option(
    "--score",
    type=click.Choice(["rgn", "lara"]),
    default="rgn",
    show_default=True,
    help="Layer score used for the order (both are written).",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="ranking.json", show_default=True)
@click.option("--quiet", is_flag=True)
def command(
    model,
    trust_model_code,
    image_size,
    data,
    val_data,
    per_class,
    val_per_class,
    epochs,
    batch_size,
    lr,
    seed,
    threshold,
    score,
    output,
    quiet,
) -> None:
    """Fine-tune all layers for a few epochs and rank them by accumulated RGN.

    Writes, per layer: RGN, LaRa, share and cumulative share, and K, the number of top layers
    whose cumulative share reaches --threshold (TraDy's preselected layers).
    """
    from ..device.progress import Progress
    from ..workstation.finetune import FinetuneSpec, compute_ranking, prepare

    spec = FinetuneSpec(
        model=model,
        data=data,
        image_size=image_size,
        per_class=per_class,
        val_data=val_data,
        val_per_class=val_per_class,
        method="full",
        budget="100%",
        batch_size=batch_size,
        rank_lr=lr,
        seed=seed,
        rank_epochs=epochs,
        threshold=threshold,
        trust_model_code=trust_model_code,
    )
    progress = Progress(quiet)
    ranking = compute_ranking(prepare(spec), spec, progress, score)
    ranking.save(Path(output))
    if not quiet:
        click.echo(f"{'#':>3} {'layer':<36} {'RGN':>10} {'share':>7} {'cumul.':>7}")
        for i, layer in enumerate(ranking.layers[: max(ranking.k + 3, 10)]):
            mark = "*" if i < ranking.k else " "
            click.echo(
                f"{i + 1:>3}{mark}{layer.name:<36} {layer.rgn:>10.4g} {layer.share:>7.2%} {layer.cumulative:>7.2%}"
            )
        click.echo(
            f"K = {ranking.k} of {len(ranking.layers)} layers reach {threshold:.0%} (marked *); written to {output}"
        )
