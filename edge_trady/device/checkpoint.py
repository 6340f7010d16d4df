"""Crash-safe checkpoints: each one is written to a temporary folder, fsynced and renamed, and
``LATEST`` (itself replaced atomically) names the newest complete one. A power cut leaves either
the previous checkpoint or the new one, never a broken one."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.atomic import fsync_path, write_text
from ..engines.base import Engine
from ..errors import EdgeTradyError

LATEST = "LATEST"
STATE_FILE = "loop_state.json"


@dataclass
class LoopState:
    """Where the training loop is: the next step to run and the epoch's running sums."""

    epoch: int = 0
    step_in_epoch: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    elapsed_s: float = 0.0
    selection: dict | None = None  # the current epoch's selection (mid-epoch resume)
    sampler: dict | None = None  # ChannelSampler.state(): a static selection, gradient-norm history
    grad_norm_sums: dict | None = None  # gradnorm weighting: this epoch's per-channel norm sums so far


def save_checkpoint(run_dir: Path, engine: Engine, state: LoopState) -> Path:
    """Write a checkpoint of ``engine`` and ``state``; older ones are removed once it is safe."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch{state.epoch:04d}-step{state.step_in_epoch:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    engine.save_state(tmp)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
    for path in tmp.iterdir():
        fsync_path(path)
    fsync_path(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    write_text(root / LATEST, name)
    for old in root.iterdir():
        if old.is_dir() and old.name != name:  # older checkpoints and leftovers of a crash
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path, engine: Engine) -> LoopState:
    root = run_dir / "checkpoints"
    latest = root / LATEST
    if not latest.exists():
        raise EdgeTradyError(f"{run_dir}: no checkpoint to resume from (no {latest})")
    folder = root / latest.read_text().strip()
    try:
        state = LoopState(**json.loads((folder / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise EdgeTradyError(f"{folder}: unreadable checkpoint ({exc})") from exc
    engine.load_state(folder)
    return state


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / LATEST).exists()
