"""Silence third-party prints."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator


@contextlib.contextmanager
def suppress_stdout() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()):
        yield
