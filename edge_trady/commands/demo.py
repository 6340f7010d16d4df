"""``edge-trady demo``: the main job end to end on an embedded default."""

from __future__ import annotations

import json
import subprocess
import sys
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
@click.option("--overwrite", is_flag=True, help="Replace what an earlier demo wrote in --out.")
@click.option("--quiet", is_flag=True)
def command(
    out_dir: str, per_class: int, image_size: int, epochs: int, budget: str, data: str, overwrite: bool, quiet: bool
) -> None:
    """Profile -> plan -> export -> run -> evaluate, on ImageNet-pretrained EfficientNet-Lite0 and a
    Fashion-MNIST subset, with TraDy. A few minutes on 2 cores.

    1. profile this machine (memory, CPU, the ONNX Runtime baseline);
    2. plan: rank the layers, keep the top-K, fit the budget to the usable memory (engine portable);
    3. export the portable artifact (a training-step graph for plain onnxruntime);
    4. run it with the device runner in a fresh process that never imports torch;
    5. evaluate the exported inference model with plain onnxruntime.
    """
    from ..core.budget import format_bytes
    from ..device.profile import measure_profile
    from ..device.progress import Progress
    from ..workstation.export.artifact import export_plan
    from ..workstation.planner import PlanRequest, make_plan
    from ..workstation.plots import plot_memory

    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        from ..errors import RunFolderError

        raise RunFolderError(f"{out}: not empty (an earlier demo?); --overwrite replaces it, or give another --out")
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(quiet)

    progress.line("[1/5] profile: measuring this machine")
    profile = measure_profile("this-machine", engines=("ort",))
    profile.save(out / "device.json")

    progress.line("[2/5] plan: ranking layers and fitting the budget to the usable memory")
    request = PlanRequest(
        model="efficientnet-lite0",
        profile=profile,
        image_size=image_size,
        engine="portable",
        budget=budget,
        data=data,
        per_class=per_class,
        epochs=epochs,
    )
    plan = make_plan(request, progress)
    plan.save(out / "plan.json")
    plot_memory(plan.estimate, plan.usable_memory_bytes, f"{plan.model} on this machine", out / "plan.png")

    progress.line("[3/5] export: portable artifact (training step for plain onnxruntime)")
    manifest = export_plan(plan, out / "artifact", overwrite=overwrite)

    progress.line("[4/5] run: device runner (fresh process, no torch)")
    run_dir = out / "run"
    _cli(
        "run",
        str(out / "artifact"),
        "--train",
        data,
        "--per-class",
        str(per_class),
        "--out",
        str(run_dir),
        *(["--overwrite"] if overwrite else []),
        *(["--quiet"] if quiet else []),
    )

    progress.line("[5/5] evaluate: the exported model on plain onnxruntime")
    _cli(
        "evaluate",
        str(run_dir / "model.onnx"),
        "--data",
        data,
        "--per-class",
        str(per_class),
    )

    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    channels = sum(m["channels_selected"] for m in metrics) / len(metrics)
    click.echo(
        "\n".join(
            [
                "",
                "edge-trady demo: EfficientNet-Lite0 -> Fashion-MNIST, TraDy, portable runner (plain onnxruntime)",
                f"  device     {profile.cpu_model}, {profile.cpu_cores} cores, usable "
                f"{format_bytes(profile.usable_memory_bytes)}",
                f"  data       {per_class} images/class, {image_size} px, {epochs} epochs",
                f"  accuracy   {summary['initial_val_acc']:.1%} before -> {summary['final_val_acc']:.1%} after",
                f"  budget     {budget} = {plan.budget:,.0f} {plan.budget_unit} of full fine-tuning; "
                f"{len(plan.layers)} top-K layers, {channels:.0f} channels updated per epoch",
                f"  memory     predicted peak {format_bytes(summary['predicted_peak_bytes'])}, measured "
                f"{format_bytes(summary['peak_rss_bytes'])} (VmHWM of the runner)",
                f"  artifact   {out / 'artifact'} ({manifest.artifact_sha256[:12]}), model {run_dir / 'model.onnx'}",
                f"  time       {summary['seconds']:.0f} s of training on the runner",
            ]
        )
    )


def _cli(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "edge_trady", *args])
    if result.returncode:
        raise SystemExit(result.returncode)
