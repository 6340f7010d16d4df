"""Helpers shared by the benchmark scripts (run as ``python bench/<script>.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def cli(*args: str) -> None:
    """Run ``edge-trady ARGS`` in a fresh process; fail loudly if it fails."""
    subprocess.run([sys.executable, "-m", "edge_trady", *args], check=True)


def ensure_ranking(
    image_size: int, per_class: int = 20, seed: int = 0, model: str = "efficientnet-lite0", path: Path | None = None
) -> Path:
    """The layer ranking of ``model`` at ``image_size`` (computed once: 1 epoch, lr 0.01)."""
    path = path or RESULTS / f"ranking-{model}-{image_size}px.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cli("rank", "--model", model, "--data", "fashion-mnist", "--per-class", str(per_class),
            "--image-size", str(image_size), "--epochs", "1", "--lr", "0.01", "--seed", str(seed), "--quiet",
            "-o", str(path))  # fmt: skip
    return path


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
