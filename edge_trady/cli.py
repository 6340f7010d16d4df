"""The ``edge-trady`` command line.

Sub-commands are imported only when invoked, so device-side commands (``run``, ``profile``,
``evaluate``) never import torch. Command modules keep heavy imports inside their functions.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from . import __version__
from .errors import EdgeTradyError

# name -> (module under edge_trady.commands, one-line help shown by ``edge-trady --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "Run the end-to-end demo on an embedded default (a few minutes on 2 cores)."),
    "inspect": ("inspect", "Print the per-layer cost table of a model."),
    "rank": ("rank", "Rank layers by reweighted gradient norm (RGN) and write ranking.json."),
    "finetune": ("finetune", "Fine-tune a model under a channel budget (PyTorch, ORT or portable engine)."),
    "profile": ("profile", "Measure this device's memory, CPU and runtime baseline (no torch)."),
    "plan": ("plan", "Pick layers and the largest channel budget that fit a device profile."),
    "export": ("export", "Export a plan as a training artifact (portable ONNX, or ORT training)."),
    "run": ("run", "Fine-tune on the device from a training artifact (no torch)."),
    "evaluate": ("evaluate", "Report the accuracy of an inference ONNX model on a data set."),
    "report": ("report", "Summarise a run folder and draw it (accuracy, memory, budget, channels per layer)."),
    "health": ("health", "Exit 0 if a run is making progress (its heartbeat is recent), 1 if not."),
    "fleet": ("fleet", "Fine-tune one model on many devices over Flower (server, node, partition)."),
}


class LazyGroup(click.Group):
    """A group whose commands are loaded from ``edge_trady.commands.<module>`` on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _) in COMMANDS.items() if _module_exists(module)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not _module_exists(COMMANDS[cmd_name][0]):
            return None
        module = importlib.import_module(f"edge_trady.commands.{COMMANDS[cmd_name][0]}")
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands from ``COMMANDS`` without importing them."""
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(f"edge_trady.commands.{module}") is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-trady")
def cli() -> None:
    """Memory-budgeted fine-tuning on edge devices with TraDy.

    Workstation: inspect, rank, plan, export, finetune. Device: profile, run, evaluate, report.
    Run `edge-trady COMMAND --help` for the options of a command.
    """


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EdgeTradyError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
