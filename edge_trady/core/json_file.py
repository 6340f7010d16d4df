"""Reading the JSON files that matter (plans, manifests, layouts, checkpoint records) with one
clear error for a missing or unreadable file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[Exception], missing: str, unreadable: str = "unreadable") -> Any:
    """The parsed content of ``path``. Raises ``error("<path>: <missing>")`` when it does not
    exist and ``error("<path>: <unreadable> (<reason>)")`` when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise error(f"{path}: {unreadable} ({reason})") from exc
