"""Run folders (``--out`` of ``run`` and ``finetune``): what may be written where, and when.

- A folder that is not empty is refused unless ``--resume`` (continue the run there) or
  ``--overwrite`` (remove the files edge-trady wrote there, then start afresh). Files and folders
  edge-trady did not write are never removed.
- ``done.json``, written atomically after every other output, makes a run final: ``--resume`` on
  it returns at once and changes no file (a service restarted at boot does nothing).
- ``.edge-trady.lock`` holds the PID of the process working in the folder, under an exclusive
  ``flock``: a second process is refused; a lock left by a killed process is taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.atomic import remove_stale_temporaries, temporary_owner, write_json
from ..errors import RunFolderBusy, RunFolderError
from .checkpoint import CHECKPOINTS, OWNED_IN_CHECKPOINTS, has_checkpoint
from .heartbeat import HEARTBEAT_FILE
from .progress import Progress
from .runlog import METRICS_FILE, SELECTION_FILE

LOCK_FILE = ".edge-trady.lock"
DONE_FILE = "done.json"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class Outputs:
    """What a command writes in its run folder: top-level files, and folders in which the entries
    whose names match a pattern are its own."""

    files: frozenset[str]
    folders: dict[str, re.Pattern] = field(default_factory=dict)

    def with_files(self, *names: str) -> Outputs:
        return Outputs(self.files | set(names), self.folders)

    def with_folder(self, name: str, pattern: str) -> Outputs:
        return Outputs(self.files, {**self.folders, name: re.compile(pattern)})

    def owns(self, entry: Path) -> bool:
        """True for a top-level entry of a run folder this command may have written."""
        if entry.name in self.folders:
            return entry.is_dir() and not entry.is_symlink()
        return entry.name in self.files and (entry.is_file() or entry.is_symlink())


# Every training command writes these; commands add their model files.
TRAINING_OUTPUTS = Outputs(
    frozenset({METRICS_FILE, SELECTION_FILE, SUMMARY_FILE, DONE_FILE, HEARTBEAT_FILE})
).with_folder(CHECKPOINTS, OWNED_IN_CHECKPOINTS)


@dataclass
class RunFolder:
    """An opened run folder. ``finished``: a completed run, nothing to do. ``resume``: a
    checkpoint is there to continue from. Use as a context manager: leaving releases the lock."""

    path: Path
    outputs: Outputs
    finished: bool = False
    resume: bool = False
    _lock_fd: int | None = None

    def finish(self, command: str) -> None:
        """Mark the run complete: call after every other output is written."""
        write_json(self.path / DONE_FILE, {"command": command, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def release(self) -> None:
        if self._lock_fd is None:
            return
        try:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
        finally:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_run_folder(out: Path, outputs: Outputs, resume: bool, overwrite: bool, progress: Progress) -> RunFolder:
    """Check ``out`` against the rules above, lock it and, with ``overwrite``, clear our files.

    A refusal, and ``resume`` on a finished run, change nothing (the checks run before the lock
    is taken, and again once it is held)."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: continue the run, or replace it")
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path}: exists and is not a folder")
    if path.is_dir() and _decide(path, outputs, resume, overwrite) == "finished":
        return RunFolder(path, outputs, finished=True)  # final: no lock taken, nothing written
    path.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(path, outputs, _lock_fd=_lock(path, progress))
    try:
        for root in (path, path / CHECKPOINTS):
            if root.is_dir():
                remove_stale_temporaries(root)
        action = _decide(path, outputs, resume, overwrite)  # again: another process may have been here
        folder.finished, folder.resume = action == "finished", action == "resume"
        if action == "overwrite":
            _overwrite(path, outputs, progress)
        elif action == "fresh" and resume and _entries(path):
            progress.line(f"{path}: no checkpoint yet; starting afresh")
    except BaseException:
        folder.release()
        raise
    return folder


def run_finished(out: Path) -> bool:
    """True when ``out`` holds a finished run (its completion marker)."""
    return (Path(out).expanduser() / DONE_FILE).is_file()


def _decide(path: Path, outputs: Outputs, resume: bool, overwrite: bool) -> str:
    """What to do with an existing folder: "finished", "resume", "overwrite" or "fresh"; raises
    RunFolderError for a folder that must not be written into."""
    if resume and run_finished(path):
        return "finished"
    entries = _entries(path)
    if not entries:
        return "fresh"
    if overwrite:
        return "overwrite"
    if resume and has_checkpoint(path):
        return "resume"
    if resume and all(outputs.owns(e) for e in entries):
        return "fresh"  # our leftovers of a run stopped before its first checkpoint
    what = "holds a finished run" if run_finished(path) else "is not empty"
    raise RunFolderError(
        f"{path}: {what} ({_listing(entries)}); --resume continues the run there, --overwrite replaces "
        "the files edge-trady wrote there, or give a new folder"
    )


def _entries(path: Path) -> list[Path]:
    """What a run folder holds, besides the lock and temporaries."""
    return sorted(e for e in path.iterdir() if e.name != LOCK_FILE and temporary_owner(e.name) is None)


def _overwrite(path: Path, outputs: Outputs, progress: Progress) -> None:
    """Remove what this command wrote in ``path``; say what went and what stayed."""
    removed: list[str] = []
    kept: list[str] = []
    for entry in _entries(path):
        if not outputs.owns(entry):
            kept.append(entry.name)
        elif entry.name not in outputs.folders:
            entry.unlink()
            removed.append(entry.name)
        else:
            pattern = outputs.folders[entry.name]
            for child in sorted(entry.iterdir()):
                name = f"{entry.name}/{child.name}"
                if not (pattern.match(child.name) or temporary_owner(child.name) is not None):
                    kept.append(name)
                elif child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                    removed.append(name)
                else:
                    child.unlink()
                    removed.append(name)
            if not any(entry.iterdir()):
                entry.rmdir()
    also = f"; kept what edge-trady did not write: {_listing_names(kept)}" if kept else ""
    progress.line(f"--overwrite: removed {_listing_names(removed) or 'nothing'} from {path}{also}")


def _lock(path: Path, progress: Progress) -> int:
    """Take the folder's lock file (exclusive flock, our PID inside); returns its descriptor."""
    lock = path / LOCK_FILE
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise RunFolderBusy(
                f"{path}: in use by another edge-trady process (PID {holder or 'unknown'}, lock file {lock}); "
                "wait for it to end or stop it"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and flock: try again
            os.close(fd)
            continue
        previous = _lock_holder(fd)
        if previous and previous != os.getpid():
            progress.line(f"{path}: taking over the stale lock of PID {previous} (that process has ended)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode() + b"\n", 0)
        os.fsync(fd)
        return fd


def _lock_holder(fd: int) -> int | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
        return int(data["pid"]) if isinstance(data, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _listing(entries: list[Path], most: int = 5) -> str:
    return _listing_names([e.name + ("/" if e.is_dir() else "") for e in entries], most)


def _listing_names(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
