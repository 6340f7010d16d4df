"""The Flower ``ServerApp``: started by the SuperLink for ``flwr run``; runs ``FleetServer``.

A failure is written to the run folder's ``status.json`` (``edge-trady fleet server`` prints it on
one ``error:`` line) and re-raised, so Flower marks the run failed.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..errors import EdgeTradyError
from .server import FleetConfig, FleetServer
from .state import RunFolder

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FleetConfig.from_run_config(context.run_config)
    try:
        FleetServer(config, log=lambda line: print(line, flush=True)).run(grid)
    except EdgeTradyError as exc:
        RunFolder(Path(config.out)).set_status("failed", error=str(exc))
        print(f"fleet: error: {exc}", flush=True)
        raise
