"""The ``edge-trady`` command line.

Sub-commands are imported only when invoked, so device-side commands (``run``, ``profile``,
``evaluate``) never import torch. Command modules keep heavy imports inside their functions.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_STATUSES, EXIT_STOPPED, EdgeTradyError, out_of_memory

DEBUG_ENV = "EDGE_TRADY_DEBUG"  # set to 1: let unexpected exceptions show their traceback

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


def _exit_status_epilog() -> str:
    rows = "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_STATUSES.items())
    return f"\b\nExit status:\n{rows}"


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=_exit_status_epilog(),
)
@click.version_option(__version__, prog_name="edge-trady")
def cli() -> None:
    """Memory-budgeted fine-tuning on edge devices with TraDy.

    Workstation: inspect, rank, plan, export, finetune. Device: profile, run, evaluate, report.
    Run `edge-trady COMMAND --help` for the options of a command.
    """


def main(args: list[str] | None = None) -> None:
    """The console entry point: every failure ends in one ``error: ...`` line and its exit status."""
    try:
        cli.main(args, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("stopped", err=True)
        sys.exit(EXIT_STOPPED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        error = user_error(exc)
        if error is None and os.environ.get(DEBUG_ENV):
            raise
        if error is None:
            text = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            click.echo(f"error: internal error ({text}); {DEBUG_ENV}=1 shows the traceback", err=True)
            sys.exit(EXIT_INTERNAL)
        if getattr(error, "details", ""):
            click.echo(error.details, err=True)
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)


def user_error(exc: BaseException) -> EdgeTradyError | None:
    """``exc`` as the user-facing error it stands for, or None for a bug."""
    if isinstance(exc, EdgeTradyError):
        return exc
    if (oom := out_of_memory(exc)) is not None:
        return oom
    if isinstance(exc, OSError):
        where = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
        return EdgeTradyError(f"{where + ': ' if where else ''}{exc.strerror or exc}")
    return None
