"""Plots a person would rather look at than read (matplotlib, workstation only)."""

from __future__ import annotations

from pathlib import Path

from ..core.atomic import replacing
from ..core.memory import MemoryEstimate


def plot_memory(estimate: MemoryEstimate, usable: int, title: str, path: Path) -> None:
    """Horizontal bars of the predicted peak's parts (MiB), with the device's usable memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in estimate.parts if p.bytes > 0]
    colors = {"always": "#4c72b0", "load": "#dd8452", "train": "#55a868"}
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(parts) + 1.6))
    ax.barh([p.name for p in parts], [p.bytes / 2**20 for p in parts], color=[colors[p.phase] for p in parts])
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    peak = estimate.peak_bytes / 2**20
    ax.set_title(f"{title}: predicted peak {peak:.0f} MiB of {usable / 2**20:.0f} MiB usable ({estimate.engine})")
    for phase, color in colors.items():
        ax.bar(0, 0, color=color, label=phase)
    ax.legend(title="phase", loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with replacing(Path(path)) as tmp:  # the temporary keeps the suffix: the format
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
