"""``edge-trady profile``: measure this device and write its profile JSON (no torch import)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..core.budget import format_bytes, parse_bytes
from ..errors import EdgeTradyError

if TYPE_CHECKING:
    from ..device.profile import DeviceProfile

ENGINE_CHOICES = ("ort", "torch")  # "python" (interpreter + numpy) is always measured


def _parse_engines(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(e.strip() for e in value.split(",") if e.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [e for e in names if e not in ENGINE_CHOICES]
    if unknown:
        raise click.BadParameter(f"unknown engine(s) {', '.join(unknown)}; use ort, torch or none")
    return names


def _parse_reserve(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except EdgeTradyError as exc:
        raise click.BadParameter(str(exc)) from None


def _version(profile: DeviceProfile, module: str) -> str:
    return f"{module} {profile.runtime_versions.get(module, 'version unknown')}"


def summary(profile: DeviceProfile) -> str:
    """Aligned ``key: value`` lines with human-readable sizes."""
    from ..device.profile import ENGINE_MODULES

    rows = [
        ("name", profile.name),
        ("source", profile.source),
        ("arch", profile.arch),
        ("cpu", f"{profile.cpu_model}, {profile.cpu_cores} cores"),
        ("os", profile.os),
        ("python", profile.python or "unknown"),
        ("memory total", format_bytes(profile.total_memory_bytes)),
        ("memory available", format_bytes(profile.available_memory_bytes)),
        ("os reserved", format_bytes(profile.os_reserved_bytes)),
        ("usable for training", format_bytes(profile.usable_memory_bytes)),
        ("swap", format_bytes(profile.swap_bytes)),
        *(
            (f"baseline {engine}", f"{format_bytes(rss)} peak RSS ({_version(profile, module)})")
            for engine, rss in profile.runtime_baseline_bytes.items()
            for module in [ENGINE_MODULES.get(engine, engine)]
        ),
        (
            "compute",
            "not measured" if profile.compute_gflops is None else f"{profile.compute_gflops:.1f} GFLOP/s (fp32 matmul)",
        ),
    ]
    if profile.shared_gpu_memory:
        rows.append(("gpu memory", "shared with the CPU"))
    if profile.notes:
        rows.append(("notes", profile.notes))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}} : {value}" for key, value in rows)


@click.command(name="profile")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the profile JSON here (e.g. my-device.json).",
)
@click.option("--name", help="Profile name stored in the JSON (default: the host name).")
@click.option(
    "--engines",
    default="ort,torch",
    show_default=True,
    callback=_parse_engines,
    help="Comma-separated engines whose baseline RSS to measure, or 'none'. "
    "Engines that are not installed are skipped.",
)
@click.option(
    "--reserve",
    callback=_parse_reserve,
    metavar="SIZE",
    help="Memory to keep for the OS and other services, e.g. 256MiB (default: 0, since "
    "available memory is measured directly).",
)
@click.option(
    "--bench-seconds",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Length of the fp32 matmul compute benchmark; 0 skips it.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def command(
    output: Path | None,
    name: str | None,
    engines: tuple[str, ...],
    reserve: int | None,
    bench_seconds: float,
    quiet: bool,
) -> None:
    """Measure this device's memory, CPU and runtime baselines.

    Reads total, available and swap memory (honouring container limits), the peak RSS of a
    fresh process per engine (python + numpy always; onnxruntime, torch), and fp32 GFLOP/s.
    Each engine is loaded in a subprocess, so this command itself never imports torch.

    \b
    Examples:
      edge-trady profile
      edge-trady profile -o my-device.json --name pi4-lab --reserve 256MiB
      edge-trady profile --engines ort --bench-seconds 0 -q -o my-device.json
    """

    from ..device.profile import measure_profile

    def progress(message: str) -> None:
        if not quiet:
            click.echo(f"{message} ...", err=True)

    profile = measure_profile(
        name=name,
        engines=engines,
        os_reserved_bytes=reserve,
        benchmark_seconds=bench_seconds,
        progress=progress,
    )
    if output is not None:
        profile.save(output)
    if quiet:
        return
    click.echo(summary(profile))
    if output is not None:
        click.echo(f"\nwrote {output}")
    else:
        click.echo("\nnot saved: pass -o my-device.json to write this profile for planning")
