"""Atomic writes: a temporary file in the same folder, fsync, rename over the target, fsync of the
folder. A crash or a kill at any point leaves either the previous file or the new one, never a
truncated one. Every result file of the tool (models, summaries, plans, profiles, manifests,
checkpoints) is written through this module."""

from __future__ import annotations

import contextlib
import json
import os
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
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
