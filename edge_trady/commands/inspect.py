"""``edge-trady inspect``: the per-layer cost table of a model."""

from __future__ import annotations

import json

import click

from .options import model_options


@click.command("inspect")
@model_options
@click.option("--num-classes", type=click.IntRange(1), default=10, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Batch size for the bytes column (activations scale with it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def command(
    model: str, trust_model_code: bool, image_size: int, num_classes: int, batch_size: int, as_json: bool
) -> None:
    """Print every Conv2d/Linear layer with its per-input-channel costs (METHOD.md).

    Columns: the input's height x width (a Linear on tokens: their count T), Cw (weight units per
    channel), Ca (activation units per channel, one sample: H*W, or T for a Linear on tokens),
    unit = Cw + Ca, bytes/ch at --batch-size (fp32), total units if fully updated, and the
    weight-gradient multiply-adds per channel and sample.
    """
    from ..core.budget import format_bytes
    from ..core.layers import full_units
    from ..workstation.cost_trace import trace_layers
    from ..workstation.models import build_model

    built = build_model(model, num_classes, image_size, trust_code=trust_model_code)
    layers = trace_layers(built.module, built.example)
    if as_json:
        click.echo(json.dumps([layer.to_dict() | {"unit_cost": layer.unit_cost} for layer in layers], indent=1))
        return
    header = (
        f"{'#':>3} {'layer':<34} {'type':<6} {'weight shape':<18} {'C_in':>5} {'in HxW':>8} "
        f"{'Cw':>6} {'Ca':>6} {'unit':>7} {'bytes/ch':>10} {'total units':>12} {'wgrad MAC/ch':>12}"
    )
    click.echo(header)
    click.echo("-" * len(header))
    for i, layer in enumerate(layers):
        shape = "x".join(str(d) for d in layer.weight_shape)
        hw = (
            f"{layer.tokens} tok"
            if layer.kind == "linear" and layer.tokens > 1
            else f"{layer.in_hw[0]}x{layer.in_hw[1]}"
        )
        click.echo(
            f"{i:>3} {layer.name:<34.34} {layer.kind:<6} {shape:<18} {layer.in_channels:>5} {hw:>8} "
            f"{layer.weight_units_per_channel:>6} {layer.act_units_per_channel:>6} "
            f"{layer.unit_cost:>7} {layer.bytes_per_channel(batch_size):>10} "
            f"{layer.total_units:>12,} {layer.wgrad_macs_per_channel:>12,}"
        )
    total = full_units(layers)
    click.echo(
        f"\n{len(layers)} layers, classifier {built.classifier}; full fine-tuning: {total:,} units "
        f"({format_bytes(total * 4)} at batch 1); weights {sum(x.weight_count for x in layers):,}"
    )
