"""``edge-trady run``: fine-tune a training artifact on the device (never imports torch)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import checkpoint_options, progress_options


@click.command("run")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option(
    "--train",
    "train_data",
    required=True,
    help="Training data: 'fashion-mnist[:DIR]', an image folder (one sub-folder per class), an .npz "
    "file with x and y, or 'synthetic[:CLASSES]'. Its classes must be the artifact's.",
)
@click.option(
    "--val",
    "val_data",
    default=None,
    help="Validation data (same forms), scored whole unless it has its own validation part (Fashion-MNIST's "
    "t10k files, an .npz's x_val/y_val, a folder's val/ or test/). Default: the validation split of --train "
    "(its validation part, else a seeded 20% holdout).",
)
@click.option(
    "--per-class",
    type=click.IntRange(1),
    default=None,
    help="Keep at most this many training images per class (subset seeded by the plan).",
)
@click.option(
    "--val-per-class", type=click.IntRange(1), default=None, help="Same for validation. Default: --per-class."
)
@click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs. Default: the plan's.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="Run folder: metrics.jsonl, selection.jsonl, checkpoints/, then model.onnx, model.json, "
    "summary.json and done.json (the run is final). Must be new or empty, unless --resume or --overwrite.",
)
@checkpoint_options
@click.option(
    "--force",
    is_flag=True,
    help="Run even when the plan's predicted peak exceeds the memory available now.",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 1024),
    default=None,
    envvar="EDGE_TRADY_THREADS",
    help="Threads ONNX Runtime computes a step with (also EDGE_TRADY_THREADS). Default: the cores this "
    "process may use (CPU affinity, a container's CPU quota), at most the physical cores.",
)
@progress_options
def command(
    artifact: str,
    train_data: str,
    val_data: str | None,
    per_class: int | None,
    val_per_class: int | None,
    epochs: int | None,
    out_dir: str,
    resume: bool,
    overwrite: bool,
    force: bool,
    checkpoint_every: int,
    threads: int | None,
    quiet: bool,
    progress_every: float | None,
) -> None:
    """Fine-tune the training artifact ARTIFACT (from 'edge-trady export') on this device.

    Verifies the artifact against its manifest, refuses to start when the plan's predicted peak
    memory exceeds what is available (unless --force), then trains with the plan's method, budget,
    schedule and seed. SIGTERM or Ctrl-C checkpoint and stop; --resume continues. Writes the
    fine-tuned model for plain ONNX Runtime (model.onnx + model.json). Example:

      edge-trady run artifact/ --train fashion-mnist --per-class 30 --out run/
    """
    from ..device.progress import Progress
    from ..device.runner import RunRequest, run

    request = RunRequest(
        artifact=Path(artifact),
        train=train_data,
        out=Path(out_dir),
        val=val_data,
        per_class=per_class,
        val_per_class=val_per_class,
        epochs=epochs,
        resume=resume,
        overwrite=overwrite,
        force=force,
        checkpoint_every=checkpoint_every,
        threads=threads,
    )
    summary = run(request, Progress(quiet, progress_every))
    if summary is not None and summary.accuracy_fell:
        from ..device.loop import accuracy_fell_message

        click.echo(f"warning: {accuracy_fell_message(summary.initial_val_acc, summary.final_val_acc)}", err=True)
    if summary is not None and not quiet:
        click.echo(
            f"val_acc {summary.final_val_acc:.4f}; peak RSS {summary.peak_rss_bytes / 2**20:.0f} MiB "
            f"(predicted {summary.predicted_peak_bytes / 2**20:.0f} MiB); {summary.seconds:.0f}s; "
            f"model written to {Path(out_dir) / 'model.onnx'}"
        )
