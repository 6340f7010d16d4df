"""User-facing errors: the CLI prints their message on one line and exits with their status.

Exit statuses (listed by ``edge-trady --help``; systemd units and scripts may rely on them):

====  =========================================================================================
0     done (also: ``--resume`` on a run that had already finished, which changes nothing)
1     internal error: a bug in edge-trady (one line; ``EDGE_TRADY_DEBUG=1`` shows the traceback)
2     bad input or environment: options, data, plan, profile, artifact, checkpoint, run folder,
      files that cannot be read or written (permissions, disk full)
3     memory: the memory guard refused to start, or the process ran out of memory
4     training diverged (a non-finite loss or weight); the last good checkpoint is kept
5     the run folder is in use by another edge-trady process (its lock file names the PID)
130   stopped by SIGINT/SIGTERM after saving a checkpoint (``--resume`` continues)
====  =========================================================================================
"""

import errno

EXIT_DONE = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_MEMORY = 3
EXIT_DIVERGED = 4
EXIT_BUSY = 5
EXIT_STOPPED = 130

EXIT_STATUSES: dict[int, str] = {
    EXIT_DONE: "done (or --resume on a finished run: nothing to do, nothing changed)",
    EXIT_INTERNAL: "internal error (a bug; EDGE_TRADY_DEBUG=1 shows the traceback); 'health': unhealthy",
    EXIT_INPUT: "bad input or environment (options, data, plan, profile, artifact, checkpoint, run folder, I/O)",
    EXIT_MEMORY: "memory guard refused to start, or out of memory",
    EXIT_DIVERGED: "training diverged (non-finite loss or weights); last good checkpoint kept",
    EXIT_BUSY: "run folder locked by another edge-trady process",
    EXIT_STOPPED: "stopped by SIGINT/SIGTERM after a checkpoint (--resume continues)",
}


class EdgeTradyError(Exception):
    """An error caused by the user's input or environment, with a message that says what to fix.
    ``details`` (e.g. a table of figures) is printed before the one ``error: ...`` line."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str = "", details: str = "") -> None:
        super().__init__(message)
        self.details = details


class DataError(EdgeTradyError):
    """Bad data: missing path, empty class, corrupt image, wrong shapes, labels out of range."""


class ProfileError(EdgeTradyError):
    """A device profile that is missing fields or has wrong values."""


class PlanError(EdgeTradyError):
    """A plan that cannot be made or loaded (e.g. nothing fits the device)."""


class ArtifactError(EdgeTradyError):
    """A training artifact that is missing, corrupt, or of another format version."""


class CheckpointError(EdgeTradyError):
    """A checkpoint that cannot be used: corrupt, out of range, or made by another run."""


class RunFolderError(EdgeTradyError):
    """An output folder the command refuses to write into (not empty, finished, not ours)."""


class RunFolderBusy(EdgeTradyError):
    """Another live process holds the run folder's lock."""

    exit_code = EXIT_BUSY


class UntrustedCodeError(EdgeTradyError):
    """A model reference that would execute Python code the user did not say to trust."""


class MemoryGuardError(EdgeTradyError):
    """The device does not have the memory the plan needs."""

    exit_code = EXIT_MEMORY


class OutOfMemory(EdgeTradyError):
    """An allocation failed (numpy, ONNX Runtime, PyTorch) while running."""

    exit_code = EXIT_MEMORY


# Messages of allocation failures raised as RuntimeError (or ORT's own exception types) by ONNX
# Runtime (C++ std::bad_alloc, its BFC arena) and PyTorch ("DefaultCPUAllocator: can't allocate").
_OOM_MARKERS = ("bad_alloc", "failed to allocate", "can't allocate memory", "cannot allocate memory", "out of memory")


def out_of_memory(exc: BaseException) -> OutOfMemory | None:
    """``exc`` as an OutOfMemory error if it reports a failed allocation, else None."""
    text = str(exc)
    if isinstance(exc, OutOfMemory):
        return exc
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return OutOfMemory(f"out of memory ({text or type(exc).__name__}): free memory, raise the limit or re-plan")
    if not isinstance(exc, OSError) and any(marker in text.lower() for marker in _OOM_MARKERS):
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return OutOfMemory(f"out of memory ({first[:300]}): free memory, raise the limit or re-plan")
    return None


class Diverged(EdgeTradyError):
    """Training produced a non-finite loss or weight."""

    exit_code = EXIT_DIVERGED


class Stopped(EdgeTradyError):
    """Training stopped by a signal after saving a checkpoint."""

    exit_code = EXIT_STOPPED


class FleetError(EdgeTradyError):
    """Fleet fine-tuning cannot go on: a refused or malformed update, too few clients, a run folder
    that belongs to another artifact."""
