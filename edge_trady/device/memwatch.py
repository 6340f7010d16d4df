"""The process's real memory: peak and current resident set size."""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
from pathlib import Path


def _status_field(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def peak_rss_bytes() -> int:
    """Peak RSS of this process (``VmHWM``; ``ru_maxrss`` where /proc is absent)."""
    peak = _status_field("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def current_rss_bytes() -> int:
    return _status_field("VmRSS") or peak_rss_bytes()


def release_free_memory() -> None:
    """Give the heap memory freed so far back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks of a process's heap resident; after a transient such as loading a
    checkpoint they would stay under every later peak."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to do
        ctypes.CDLL(None).malloc_trim(0)
