"""Checks of fields read from JSON files (plans, manifests, layouts, model info): each returns a
description of what is wrong, or None. Files are read on devices and written by other machines
(or edited by hand), so a wrong type or range must end in one clear error, not deep in numpy."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

Rule = Callable[[Any], str | None]  # value -> what is wrong with it, or None


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int | None = None, high: int | None = None) -> Rule:
    def rule(value: Any) -> str | None:
        if not is_int(value):
            return "an integer"
        if (low is not None and value < low) or (high is not None and value > high):
            return f"an integer in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        return None

    return rule


def number(low: float | None = None, positive: bool = False) -> Rule:
    """A finite number (>= ``low``; > 0 with ``positive``)."""

    def rule(value: Any) -> str | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (low is not None and value < low) or (positive and value <= 0):
            return "a finite number" + (" > 0" if positive else f" >= {low}" if low is not None else "")
        return None

    return rule


def text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def one_of(*choices: object) -> Rule:
    return lambda value: None if value in choices else f"one of {', '.join(map(repr, choices))}"


def optional(rule: Rule) -> Rule:
    return lambda value: None if value is None else rule(value)


def of_type(kind: type, name: str) -> Rule:
    return lambda value: None if isinstance(value, kind) else name


def list_of(rule: Rule, name: str, length: int | None = None) -> Rule:
    def check(value: Any) -> str | None:
        if not isinstance(value, list | tuple) or (length is not None and len(value) != length):
            return name
        return name if any(rule(item) for item in value) else None

    return check


def mapping(key: Rule, value: Rule, name: str) -> Rule:
    """An object whose every key and value pass ``key`` and ``value``."""

    def rule(data: Any) -> str | None:
        ok = isinstance(data, dict) and all(not key(k) and not value(v) for k, v in data.items())
        return None if ok else name

    return rule


def relative_path(value: Any) -> str | None:
    """A relative path that stays inside its folder (no absolute path, no ``..``)."""
    if not isinstance(value, str) or not value or "\\" in value or "\0" in value:
        return "a relative path"
    path = PurePosixPath(value)
    return "a relative path inside the folder" if path.is_absolute() or ".." in path.parts else None


def normalization(value: Any) -> str | None:
    three = list_of(number(), "x", 3)
    ok = isinstance(value, dict) and set(value) == {"mean", "std"} and not three(value["mean"])
    ok = ok and not three(value["std"]) and min(value["std"]) > 0
    return None if ok else '{"mean": [3 numbers], "std": [3 numbers > 0]}'


def layer_cost(value: Any) -> str | None:
    """The fields of a ``LayerCost`` (core/layers.py), consistent with each other."""
    expected = "a layer: name, kind, in/out channels, kernel, groups, in_hw, out_hw"
    names = {"name", "kind", "in_channels", "out_channels", "kernel", "groups", "in_hw", "out_hw"}
    if not isinstance(value, dict) or set(value) != names:
        return expected
    pair = list_of(integer(1, 1 << 20), "x", 2)
    rules = {
        "name": text,
        "kind": one_of("conv", "dwconv", "gconv", "linear"),
        "in_channels": integer(1, 1 << 24),
        "out_channels": integer(1, 1 << 24),
        "groups": integer(1, 1 << 24),
        "kernel": pair,
        "in_hw": pair,
        "out_hw": pair,
    }
    if any(rule(value[key]) for key, rule in rules.items()):
        return expected
    groups = value["groups"]
    if value["in_channels"] % groups or value["out_channels"] % groups:
        return f"{expected} (groups dividing the channels)"
    return None


def check_fields(data: dict, rules: dict[str, Rule], where: str, error: type[Exception]) -> None:
    """Raise ``error`` naming the first field of ``data`` that breaks its rule (missing fields are
    the caller's business)."""
    for name, rule in rules.items():
        if name in data and (expected := rule(data[name])):
            raise error(f"{where}: field {name!r} must be {expected}, got {_show(data[name])}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
