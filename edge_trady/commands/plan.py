"""``edge-trady plan``: layers and channel budget that fit a device, with the predicted memory."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.selection import METHODS, OVERFLOW_POLICIES
from .options import SEED, finite_positive, model_options


@click.command("plan")
@model_options
@click.option(
    "--profile",
    "profile_name",
    required=True,
    help="Device profile: a name from profiles/ (e.g. raspberry-pi-4-2gb) or a JSON file written "
    "by 'edge-trady profile'.",
)
@click.option(
    "--budget",
    default=None,
    help="Channel budget (units, bytes or %). Default: 2.5% of full fine-tuning (the accuracy-efficient "
    "budget, docs/reproduction.md), or the largest whose predicted peak fits if that is less.",
)
@click.option(
    "--engine",
    type=click.Choice(["portable", "ort", "torch-masked", "torch-sparse"]),
    default="portable",
    show_default=True,
    help="Engine the device will train with (memory differs a lot): portable ('edge-trady run' on an "
    "artifact of format onnx: plain onnxruntime, any CPU), ort (format ort-training, x86_64), or a "
    "torch engine ('edge-trady finetune --plan').",
)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--data", default=None, help="Data to rank layers with and to size the data set in memory.")
@click.option("--per-class", type=click.IntRange(1), default=None, help="Images per class of --data.")
@click.option("--num-classes", type=click.IntRange(1), default=None, help="Classes, when --data is not given.")
@click.option(
    "--train-images",
    type=click.IntRange(1),
    default=None,
    help="Images the device keeps in memory, when --data is not given (default 1000).",
)
@click.option(
    "--ranking",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="ranking.json from 'edge-trady rank'. Default: rank on --data.",
)
@click.option("--method", type=click.Choice(list(METHODS)), default="trady", show_default=True)
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=0.97, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--lr", type=float, callback=finite_positive, default=0.125, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--overflow", type=click.Choice(OVERFLOW_POLICIES), default="skip", show_default=True)
@click.option(
    "--fleet",
    is_flag=True,
    help="Plan for a fleet node ('edge-trady fleet node'): add Flower's SuperNode, SuperExec and "
    "ClientApp memory to the prediction.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="plan.json", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a bar chart PNG of memory by part.")
@click.option("--quiet", is_flag=True)
def command(
    model,
    trust_model_code,
    image_size,
    profile_name,
    budget,
    engine,
    batch_size,
    data,
    per_class,
    num_classes,
    train_images,
    ranking,
    method,
    threshold,
    epochs,
    lr,
    seed,
    overflow,
    fleet,
    output,
    plot,
    quiet,
) -> None:
    """Plan a fine-tuning run for a device.

    Ranks the layers (or reads --ranking), keeps the top-K, and checks that the channel budget's
    predicted whole-process peak fits the profile's usable memory: --budget, or by default 2.5% of
    full fine-tuning (more bought no accuracy), lowered to the largest that fits if needed. Prints the
    predicted peaks of the other engines beside it (at this budget and for the classifier alone) and
    why they do not fit. Exits with status 2 and says what would fit when even the classifier alone
    does not fit. Example:

      edge-trady plan --model efficientnet-lite0 --image-size 64 --profile raspberry-pi-3b
      --data fashion-mnist --per-class 50 -o plan.json --plot plan.png
    """
    from ..device.profile import load_profile
    from ..device.progress import Progress
    from ..workstation.planner import PlanRequest, make_plan

    request = PlanRequest(
        model=model,
        profile=load_profile(profile_name),
        image_size=image_size,
        batch_size=batch_size,
        engine=engine,
        method=method,
        budget=budget,
        ranking=ranking,
        data=data,
        per_class=per_class,
        num_classes=num_classes,
        train_images=train_images,
        seed=seed,
        overflow=overflow,
        fleet=fleet,
        epochs=epochs,
        lr=lr,
        threshold=threshold,
        trust_model_code=trust_model_code,
        compare_engines=True,
    )
    plan = make_plan(request, Progress(quiet))
    plan.save(Path(output))
    if plot:
        from ..workstation.plots import plot_memory

        plot_memory(plan.estimate, plan.usable_memory_bytes, f"{plan.model} on {plan.profile['name']}", Path(plot))
    if not quiet:
        click.echo(summary(plan))
        click.echo(f"written to {output}" + (f" and {plot}" if plot else ""))


def summary(plan) -> str:
    from ..core.budget import format_bytes

    units = sum(layer["in_channels"] for layer in plan.layers)
    lines = [
        f"device        {plan.profile['name']}: usable {format_bytes(plan.usable_memory_bytes)} "
        f"({plan.profile['source']})",
        f"model         {plan.model}, {plan.image_size} px, {plan.num_classes} classes, batch {plan.batch_size}",
        f"layers        {len(plan.layers)} candidate layers ({units} input channels), method {plan.method}, "
        f"engine {plan.engine}",
        f"budget        {format_bytes(plan.budget_bytes)} at batch {plan.batch_size} "
        f"({plan.budget:,.0f} {plan.budget_unit})",
        f"peak          {format_bytes(plan.estimate.peak_bytes)} predicted, "
        f"{plan.estimate.peak_bytes / plan.usable_memory_bytes:.0%} of usable",
        "",
        plan.estimate.table(),
    ]
    if plan.engines:
        lines += [
            "",
            f"other engines (predicted peak at this budget / classifier only; usable "
            f"{format_bytes(plan.usable_memory_bytes)}):",
        ]
        width = max(len(row["engine"]) for row in plan.engines)
        for row in plan.engines:
            peaks = " / ".join(
                "-" if row[k] is None else format_bytes(row[k]) for k in ("at_budget_bytes", "smallest_bytes")
            )
            lines.append(
                f"  {row['engine']:<{width}}  {peaks:>21}  fits: {row['fits']}"
                + (f" ({row['reason']})" if row["reason"] else "")
            )
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
