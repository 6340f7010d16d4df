"""Give freed memory back to the system promptly (glibc), so a long run's RSS follows what it holds."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default, kept fixed


def pin_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at its default 128 KiB instead of letting it grow.

    By default glibc raises the threshold to the size of every large block freed, after which
    blocks of that size come from the heap and stay in the process's RSS when freed. A runner that
    frees and re-creates ONNX Runtime sessions and tensors of a few MiB would then grow by the
    sessions' size each time. With the threshold fixed, large blocks are mapped and unmapped.
    Returns False where this does not apply (not Linux, or not glibc, e.g. musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
