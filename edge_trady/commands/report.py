"""``edge-trady report``: a run folder as a short text and one picture (no torch)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False))
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(exists=True),
    default=None,
    help="plan.json or the artifact folder the run used: adds the candidate layers never trained, their "
    "widths and (for finetune) the predicted peak. 'run' folders already know their predicted peak.",
)
@click.option(
    "-o",
    "--out",
    "out_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the picture. Default: RUN_DIR/report.png.",
)
def command(run_dir: str, plan_path: str | None, out_path: str | None) -> None:
    """Summarise the run folder RUN_DIR (from 'edge-trady run' or 'finetune', finished, stopped or
    resumed) and draw it: accuracy and loss per epoch, measured peak RSS against the predicted
    peak, channel budget use, and which input channels of which layer were trained in each epoch.

    The picture needs matplotlib (pip install 'edge-trady[report]'); without it only the text is
    printed. Example:

      edge-trady report runs/trady
    """
    from ..device.report import PICTURE_EXTRA, REPORT_FILE, load_report, text_summary, write_picture

    report = load_report(Path(run_dir), _plan(plan_path) if plan_path else None)
    click.echo(text_summary(report))
    target = Path(out_path) if out_path else Path(run_dir) / REPORT_FILE
    try:
        write_picture(report, target)
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib" and not str(exc.name).startswith("matplotlib."):
            raise
        click.echo(f"  picture    none: matplotlib is not installed ({PICTURE_EXTRA})")
        return
    click.echo(f"  picture    {target}")


def _plan(path: str):
    from ..core.plan import Plan

    if Path(path).is_dir():
        from ..device.manifest import Manifest

        return Manifest.load(Path(path)).plan
    return Plan.load(Path(path))
