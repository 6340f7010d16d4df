"""Crash-safe checkpoints that know where they come from.

Each checkpoint is a folder ``checkpoints/epochEEEE-stepSSSSSS``: the engine's state files and
``loop_state.json`` (where the loop is, the run's *origin* and the sha256 of every state file). It
is built in a temporary folder, fsynced and renamed; ``LATEST`` (replaced atomically) names the
newest. The newest two are kept, so a corrupt latest one falls back to the one before.

Resuming checks the origin (artifact or model, data fingerprint, seed, batch size, steps per
epoch, schedule, budget: whatever the caller puts in it) against the run being resumed; any
difference refuses, naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..core.atomic import fsync_path, staging_sibling, temporary_owner, write_text
from ..core.json_file import read_json
from ..engines.base import Engine
from ..errors import CheckpointError, out_of_memory
from .manifest import sha256_file
from .progress import Progress

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
STATE_FILE = "loop_state.json"
STATE_VERSION = 2
KEEP = 2  # newest checkpoints kept: a corrupt latest one falls back to the previous
_NAME = re.compile(r"^epoch(\d{4})-step(\d{6})$")
OWNED_IN_CHECKPOINTS = r"^(epoch\d{4}-step\d{6}|LATEST)$"  # entries of checkpoints/ that are ours


class CorruptCheckpoint(CheckpointError):
    """A checkpoint that cannot be read or is inconsistent: the previous one may still serve."""


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
    initial_val_loss: float | None = None  # before any training (evaluated once, at the start)
    initial_val_acc: float | None = None


def checkpoint_name(state: LoopState) -> str:
    return f"epoch{state.epoch:04d}-step{state.step_in_epoch:06d}"


def save_checkpoint(run_dir: Path, engine: Engine, state: LoopState, origin: dict) -> Path:
    """Write a checkpoint of ``engine`` and ``state``; keep the newest ``KEEP``."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(state)
    final = root / name
    tmp = staging_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    engine.save_state(tmp)
    record = {"version": STATE_VERSION, "state": asdict(state), "origin": origin, "files": _hash_files(tmp)}
    (tmp / STATE_FILE).write_text(json.dumps(record))
    for path in sorted(tmp.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    write_text(root / LATEST, name)
    for old in checkpoint_folders(root)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_folders(root: Path) -> list[Path]:
    """The checkpoint folders under ``root``, newest first (names sort by epoch and step)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def has_checkpoint(run_dir: Path) -> bool:
    return bool(checkpoint_folders(run_dir / CHECKPOINTS))


def latest_checkpoint(run_dir: Path) -> Path | None:
    folders = checkpoint_folders(run_dir / CHECKPOINTS)
    return folders[0] if folders else None


def load_checkpoint(
    run_dir: Path,
    engine: Engine,
    origin: dict,
    check: Callable[[LoopState], None],
    progress: Progress,
) -> LoopState:
    """Restore the newest usable checkpoint into ``engine``; returns its loop state.

    ``check`` raises CorruptCheckpoint for a state out of range for this run. A corrupt checkpoint
    falls back to the previous one (saying so); a checkpoint of another run refuses."""
    root = run_dir / CHECKPOINTS
    folders = checkpoint_folders(root)
    if not folders:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from (nothing in {root})")
    _check_latest(root, folders[0], progress)
    problems = []
    for index, folder in enumerate(folders):
        try:
            record = _read_record(folder)
            check_origin(record.get("origin"), origin, folder)  # a mutated record may lack either
            state = _state(record.get("state"), folder)
            check(state)
            try:
                engine.load_state(folder)
            except CheckpointError:
                raise
            except Exception as exc:
                problem = CorruptCheckpoint(f"{folder}: the engine cannot load it ({_first_line(exc)})")
                raise out_of_memory(exc) or problem from exc
        except CorruptCheckpoint as exc:
            problems.append(str(exc))
            if index + 1 < len(folders):
                progress.line(f"warning: {exc}; falling back to the previous checkpoint {folders[index + 1].name}")
            continue
        return state
    raise CheckpointError(
        f"no usable checkpoint in {root} ({'; '.join(problems)}); start again with --overwrite or in a new folder"
    )


def check_origin(saved: object, current: dict, folder: Path) -> None:
    """Refuse a checkpoint whose origin differs from the run being resumed, naming what differs."""
    if not isinstance(saved, dict):
        raise CorruptCheckpoint(f"{folder / STATE_FILE}: no origin recorded")
    for key in [*current, *(key for key in saved if key not in current)]:  # the caller's order
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"{folder} was made by another run: {key} {_show(saved.get(key))} there, "
                f"{_show(current.get(key))} here; resume with that run's artifact, data and settings, "
                "or give a new --out"
            )


def _check_latest(root: Path, newest: Path, progress: Progress) -> None:
    """``LATEST`` is informational; say so when it disagrees with the newest folder."""
    latest = root / LATEST
    try:
        named = latest.read_text().strip() if latest.is_file() else None
    except (OSError, UnicodeDecodeError):
        named = "(unreadable)"
    if named is not None and named != newest.name:
        progress.line(f"note: {latest} names {named[:80]!r}; using the newest checkpoint folder {newest.name}")


def _read_record(folder: Path) -> dict:
    path = folder / STATE_FILE
    record = read_json(path, CorruptCheckpoint, "missing")
    if not isinstance(record, dict) or record.get("version") != STATE_VERSION:
        found = record.get("version") if isinstance(record, dict) else None
        raise CorruptCheckpoint(f"{path}: checkpoint format {found!r}, this edge-trady reads {STATE_VERSION}")
    files = record.get("files")
    if not (isinstance(files, dict) and files and all(isinstance(v, str) for v in files.values())):
        raise CorruptCheckpoint(f"{path}: no file hashes")
    for name, digest in files.items():
        file = (folder / name).resolve()
        if not (isinstance(name, str) and file.is_relative_to(folder.resolve()) and file.is_file()):
            raise CorruptCheckpoint(f"{folder / name}: missing from the checkpoint")
        if sha256_file(file) != digest:
            raise CorruptCheckpoint(f"{folder / name}: content does not match the checkpoint's hash")
    return record


_TYPES: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "step_in_epoch": (int,),
    "loss_sum": (int, float),
    "correct": (int,),
    "seen": (int,),
    "elapsed_s": (int, float),
    "selection": (dict, type(None)),
    "sampler": (dict, type(None)),
    "grad_norm_sums": (dict, type(None)),
    "initial_val_loss": (int, float, type(None)),
    "initial_val_acc": (int, float, type(None)),
}


def _state(data: object, folder: Path) -> LoopState:
    """A LoopState from JSON, with types and signs checked (ranges: the loop's ``check``)."""
    where = folder / STATE_FILE
    names = {f.name for f in fields(LoopState)}
    if not isinstance(data, dict) or set(data) != names:
        raise CorruptCheckpoint(f"{where}: the loop state must have exactly the fields {sorted(names)}")
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, _TYPES[name]):
            raise CorruptCheckpoint(f"{where}: {name} = {value!r} has the wrong type")
        if isinstance(value, int | float) and not (math.isfinite(value) and value >= 0):
            raise CorruptCheckpoint(f"{where}: {name} = {value!r} must be a finite number >= 0")
    return LoopState(**data)


def _hash_files(folder: Path) -> dict[str, str]:
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and temporary_owner(p.name) is None)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in paths}


def _show(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
