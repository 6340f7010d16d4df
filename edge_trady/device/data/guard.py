"""The memory guard of the loaders: caps on what one input may make a loader hold, each with an
environment variable that overrides it."""

from __future__ import annotations

import os

from ...errors import DataError

MAX_IMAGE_PIXELS = 4096 * 4096  # decoded images larger than this are refused (max_image_pixels)
MAX_IMAGE_PIXELS_ENV = "EDGE_TRADY_MAX_IMAGE_PIXELS"


def env_limit(variable: str, default: int, what: str) -> int:
    """``$variable`` as a positive integer, or ``default`` when unset; DataError when malformed."""
    value = os.environ.get(variable, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise DataError(f"${variable}={value!r}: expected a positive number of {what}")
    return int(value)


def max_image_pixels() -> int:
    """Largest image (width x height, after JPEG draft scaling) the loader decodes: decoding holds
    the whole image (3-4 bytes per pixel, twice while converting), whatever the size it is
    resized to. ``$EDGE_TRADY_MAX_IMAGE_PIXELS`` overrides the default."""
    return env_limit(MAX_IMAGE_PIXELS_ENV, MAX_IMAGE_PIXELS, "pixels")


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"
