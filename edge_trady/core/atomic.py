"""Atomic writes: a temporary file in the same folder, fsync, rename over the target, fsync of the
folder. A crash or a kill at any point leaves either the previous file or the new one, never a
truncated one. Every result file of the tool (models, summaries, plans, profiles, manifests,
checkpoints) is written through this module; whole folders (artifacts) are built in a staging
folder and swapped in with ``replace_folder``."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temporary_sibling(path: Path) -> Path:
    """A hidden name next to ``path`` (same folder, so the rename stays on one file system);
    the suffix is kept for tools that look at it (``.onnx``)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed onto ``path``.

    For writers that want a path (``onnx.save``, ``torch.save``, ONNX Runtime's model export). On
    an exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename in (str(tmp), tmp):  # name the file the user asked for
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    fsync_path(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(data, indent=indent) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync (logs: a kill loses at most the line being written)."""
    with open(path, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_sibling(path: Path) -> Path:
    """A hidden folder next to ``path`` to build a whole folder in before it replaces ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)(\.[^.]*)?$")


def temporary_owner(name: str) -> int | None:
    """PID of the process whose temporary file or folder ``name`` is (``temporary_sibling``,
    ``staging_sibling``), or None when ``name`` is no temporary of this module."""
    match = _TEMPORARY.match(name)
    return int(match.group(1)) if match else None


def process_alive(pid: int) -> bool:
    """True when a process ``pid`` exists (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Remove the temporaries of dead processes in ``folder`` (left by a kill); returns their names."""
    removed = []
    for entry in Path(folder).iterdir():
        pid = temporary_owner(entry.name)
        if pid is None or pid == os.getpid() or process_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def replace_folder(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` in place of ``target`` (which may exist) in one step.

    Linux ``renameat2(RENAME_EXCHANGE)`` swaps the two atomically, then the previous folder (now
    at ``staging``) is removed; elsewhere the previous one is renamed aside first. Every file of
    ``staging`` is fsynced before."""
    staging, target = Path(staging), Path(target)
    for path in sorted(staging.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(staging)
    if not target.exists():
        os.replace(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging)
    else:
        aside = target.with_name(f".{target.name}.tmp-{os.getpid()}.old")
        os.replace(target, aside)
        os.replace(staging, target)
        shutil.rmtree(aside)
    fsync_path(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unavailable."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or file system
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
