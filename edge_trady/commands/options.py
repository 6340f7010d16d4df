"""Options shared by several commands (torch-free)."""

from __future__ import annotations

import math
from collections.abc import Callable

import click

from ..core.selection import METHODS, OVERFLOW_POLICIES, WEIGHTINGS

Decorator = Callable[[Callable], Callable]
SEED = click.IntRange(0, 2**32 - 1)  # numpy's and torch's seeds: non-negative


def finite_positive(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Callback for a number that must be finite and > 0 (learning rates)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value!r} is not a finite number > 0")
    return value


def stack(*decorators: Decorator) -> Decorator:
    def apply(fn: Callable) -> Callable:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


model_options = stack(
    click.option(
        "--model",
        "model",
        default="efficientnet-lite0",
        show_default=True,
        help="Built-in (efficientnet-lite0, efficientnet-lite1, mobilenetv2-w0.35, mobilenetv2-w<width>) or a "
        "factory 'path/file.py:fn' / 'package.module:fn' returning an nn.Module.",
    ),
    click.option(
        "--trust-model-code",
        is_flag=True,
        help="Allow --model (or a plan's model) to be a factory 'file.py:fn' / 'module:fn': its Python "
        "code runs with your permissions, so edge-trady runs it only when told to. Built-in models "
        "need no trust; device commands (run, evaluate, profile) never run model code.",
    ),
    click.option(
        "--image-size",
        type=click.IntRange(16, 1024),
        default=64,
        show_default=True,
        help="Square input size in pixels.",
    ),
)

data_options = stack(
    click.option(
        "--data",
        required=True,
        help="Training data: 'fashion-mnist[:DIR]', an image folder (one sub-folder per "
        "class), an .npz file with x and y, or 'synthetic[:CLASSES]'.",
    ),
    click.option(
        "--val-data",
        default=None,
        help="Validation data (same forms), scored whole unless it has its own validation part "
        "(Fashion-MNIST's t10k files, an .npz's x_val/y_val, a folder's val/ or test/). Default: the "
        "validation split of --data (its validation part, else a seeded 20% holdout).",
    ),
    click.option(
        "--per-class",
        type=click.IntRange(1),
        default=None,
        help="Keep at most this many training images per class (seeded subset).",
    ),
    click.option(
        "--val-per-class",
        type=click.IntRange(1),
        default=None,
        help="Same for validation. Default: --per-class.",
    ),
)

training_options = stack(
    click.option("--epochs", type=click.IntRange(1), default=10, show_default=True),
    click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True),
    click.option(
        "--lr",
        type=float,
        callback=finite_positive,
        default=0.125,
        show_default=True,
        help="Peak learning rate (plain SGD, cosine decay to 0).",
    ),
    click.option(
        "--warmup-epochs",
        type=click.IntRange(0),
        default=None,
        help="Linear warm-up epochs. Default: min(5, epochs // 10).",
    ),
    click.option(
        "--seed",
        type=SEED,
        default=0,
        show_default=True,
        help="Seeds data subsets and order, new layers and channel sampling.",
    ),
)

progress_options = stack(
    click.option("--quiet", is_flag=True, help="No progress output (for scripts)."),
    click.option(
        "--progress-every",
        type=click.FloatRange(0),
        default=None,
        metavar="SECONDS",
        help="When stderr is not a terminal (systemd, docker logs, a pipe): a plain progress line every "
        "SECONDS (0: every step). Default: $EDGE_TRADY_PROGRESS_EVERY, else 30. On a terminal: a live bar.",
    ),
)

selection_options = stack(
    click.option(
        "--method",
        type=click.Choice(list(METHODS)),
        default="trady",
        show_default=True,
        help="Channel selection method (see docs/methods.md).",
    ),
    click.option(
        "--budget",
        default="2%",
        show_default=True,
        help="Channel budget: units (27946), bytes at the batch size (110KiB, 64MiB) or "
        "a share of full fine-tuning units (2%).",
    ),
    click.option(
        "--overflow",
        type=click.Choice(OVERFLOW_POLICIES),
        default="skip",
        show_default=True,
        help="A drawn channel that would overflow the budget: skip it and keep drawing, or stop.",
    ),
    click.option(
        "--weighting",
        type=click.Choice(WEIGHTINGS),
        default="uniform",
        show_default=True,
        help="How random methods draw channels: uniformly (TraDy) or in proportion to the gradient norm "
        "each channel had when last trained, untried channels at the largest (MeDyate).",
    ),
    click.option(
        "--train-shifts",
        type=click.Choice(["none", "candidates", "all"]),
        default="none",
        show_default=True,
        help="Also train the normalization shifts (biases) of the candidate layers, or of every layer: "
        "the BatchNorm after a conv, the LayerNorm before a Linear; their gradients are paid from the "
        "budget (one value per channel, no stored activation). Scales stay frozen.",
    ),
    click.option(
        "--ranking",
        type=click.Path(dir_okay=False),
        default=None,
        help="ranking.json from 'edge-trady rank' (top-K methods). Default: rank first.",
    ),
    click.option(
        "--threshold",
        type=click.FloatRange(0, 1, min_open=True),
        default=0.97,
        show_default=True,
        help="Cumulative score share that defines the top-K layers (--k-rule threshold).",
    ),
    click.option(
        "--rank-score",
        type=click.Choice(["rgn", "lara"]),
        default="rgn",
        show_default=True,
        help="Layer score of the ranking: RGN (TraDy) or LaRa (MeDyate: layer gradient norm / layer memory).",
    ),
    click.option(
        "--k-rule",
        type=click.Choice(["threshold", "budget"]),
        default="threshold",
        show_default=True,
        help="Top-K layers: the --threshold share of the score, or the fewest whose memory M_K keeps "
        "budget / M_K <= --k-ratio (MeDyate).",
    ),
    click.option(
        "--k-ratio",
        type=click.FloatRange(0, 1, min_open=True),
        default=0.2,
        show_default=True,
        help="Budget / top-K memory ratio of --k-rule budget.",
    ),
    click.option(
        "--rank-epochs",
        type=click.IntRange(1),
        default=1,
        show_default=True,
        help="Epochs of full fine-tuning when a ranking must be computed.",
    ),
)

checkpoint_options = stack(
    click.option(
        "--resume",
        is_flag=True,
        help="Continue the run in --out from its newest checkpoint (a fresh start if there is none; "
        "nothing to do, exit 0, if it has finished). The checkpoint must come from the same artifact "
        "or model, data, seed and settings.",
    ),
    click.option(
        "--overwrite",
        is_flag=True,
        help="Start afresh in a --out that is not empty: removes the files edge-trady wrote there "
        "(never others). Without --resume or --overwrite a non-empty --out is refused.",
    ),
    click.option(
        "--checkpoint-every",
        type=click.IntRange(0),
        default=0,
        show_default=True,
        help="Also checkpoint every N steps (0: at epoch ends only).",
    ),
)
