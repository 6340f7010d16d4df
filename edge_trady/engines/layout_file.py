"""What the engines' layout files (ORT-training ``layout.json``, portable ``portable.json``) share:
reading the JSON and building the dataclass with its version and fields checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from ..core import fields as f
from ..core.json_file import read_json
from ..core.layers import LayerCost
from ..errors import ArtifactError

T = TypeVar("T")


def read_layout_json(directory: Path, name: str, kind: str) -> tuple[Any, str]:
    """The parsed ``directory/name`` and its path as text; ArtifactError if missing or unreadable."""
    path = Path(directory) / name
    return read_json(path, ArtifactError, f"not found (is {directory} a {kind}?)"), str(path)


def build_layout(cls: type[T], data: Any, where: str, rules: dict[str, f.Rule], version: int, what: str) -> T:
    """``cls(**data)`` with ``layers`` as LayerCost, after checking the version (``what`` names the
    format in the message), that every field is known, and ``rules``."""
    found = data.get("version") if isinstance(data, dict) else None
    if found != version:
        raise ArtifactError(
            f"{where}: {what} version {found!r}, this edge-trady reads version {version}: "
            "export the artifact again with this version"
        )
    names = {field.name for field in dataclasses.fields(cls)}
    if not set(data) <= names:
        raise ArtifactError(f"{where}: unknown fields {sorted(set(data) - names)}")
    f.check_fields(data, rules, where, ArtifactError)
    try:
        fields = {k: v for k, v in data.items() if k != "layers"}
        return cls(**fields, layers=[LayerCost.from_dict(d) for d in data["layers"]])
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{where}: incomplete or malformed ({exc})") from exc
