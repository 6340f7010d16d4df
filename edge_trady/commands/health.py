"""``edge-trady health``: is a run making progress? (its heartbeat's age; the image's HEALTHCHECK)."""

from __future__ import annotations

import sys

import click


@click.command("health")
@click.argument("run_dir", envvar="EDGE_TRADY_RUN", type=click.Path(file_okay=False))
@click.option(
    "--max-age",
    envvar="EDGE_TRADY_HEALTH_MAX_AGE",
    default="10m",
    show_default=True,
    help="Unhealthy when the last heartbeat is older: seconds, or with a unit (90s, 10m, 1h). "
    "Allow for a few training steps plus an evaluation of the validation set on this device.",
)
def command(run_dir: str, max_age: str) -> None:
    """Exit 0 if the run in RUN_DIR (default: $EDGE_TRADY_RUN) is making progress or has
    finished training, 1 if not: no heartbeat, stopped, failed, or no new heartbeat for
    --max-age. The runner rewrites RUN_DIR/heartbeat.json every few steps. Prints one line.

    \b
    Docker HEALTHCHECK (in the image):  edge-trady health   (EDGE_TRADY_RUN=/work/run)
    by hand / cron:                     edge-trady health /var/lib/edge-trady/run --max-age 15m
    """
    from ..device.heartbeat import health, parse_duration

    healthy, why = health(run_dir, parse_duration(max_age))
    click.echo(f"{'ok' if healthy else 'unhealthy'}: {why}")
    sys.exit(0 if healthy else 1)
