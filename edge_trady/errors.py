"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class EdgeTradyError(Exception):
    """An error caused by the user's input or environment, with a message that says what to fix."""

    exit_code = 2


class DataError(EdgeTradyError):
    """Bad data: missing path, empty class, corrupt image, wrong shapes, labels out of range."""


class ProfileError(EdgeTradyError):
    """A device profile that is missing fields or has wrong values."""


class PlanError(EdgeTradyError):
    """A plan that cannot be made or loaded (e.g. nothing fits the device)."""


class ArtifactError(EdgeTradyError):
    """A training artifact that is missing, corrupt, or of another format version."""


class MemoryGuardError(EdgeTradyError):
    """The device does not have the memory the plan needs."""


class FleetError(EdgeTradyError):
    """Fleet fine-tuning cannot go on: a refused or malformed update, too few clients, a run folder
    that belongs to another artifact."""
