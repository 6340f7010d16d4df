"""Parse and format memory budgets: units (``27946``), bytes (``110KiB``) or a share (``2%``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import EdgeTradyError
from .layers import LayerCost, full_units

_BYTE_SUFFIXES = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """A channel budget: ``amount`` in ``unit`` ("units", "bytes" or "share" of full FT units)."""

    amount: float
    unit: str

    def resolve(self, full_units: int) -> Budget:
        """Turn a share into units; units and bytes are returned unchanged."""
        if self.unit == "share":
            return Budget(self.amount * full_units, "units")
        return self

    def __str__(self) -> str:
        if self.unit == "share":
            return f"{self.amount * 100:g}%"
        if self.unit == "bytes":
            return format_bytes(self.amount)
        return f"{self.amount:,.0f} units"


def parse_budget(text: str) -> Budget:
    """``"27946"`` -> units, ``"110KiB"``/``"64MB"`` -> bytes, ``"2%"`` -> share of full FT."""
    match = _PATTERN.match(str(text))
    if not match:
        raise EdgeTradyError(f"cannot read budget {text!r}: use units (27946), bytes (110KiB, 64MiB) or a share (2%)")
    number, suffix = float(match.group(1)), match.group(2).lower()
    if suffix in ("", "u", "units"):
        return Budget(number, "units")
    if suffix == "%":
        if not 0 < number <= 100:
            raise EdgeTradyError(f"budget share {text!r} must be in (0%, 100%]")
        return Budget(number / 100.0, "share")
    if suffix in _BYTE_SUFFIXES:
        return Budget(number * _BYTE_SUFFIXES[suffix], "bytes")
    raise EdgeTradyError(f"unknown budget suffix {match.group(2)!r} in {text!r} (KiB, MiB, GiB, %)")


def parse_bytes(text: str) -> int:
    """Parse a memory size such as ``512MiB`` or ``2GB`` into bytes."""
    budget = parse_budget(text)
    if budget.unit != "bytes":
        raise EdgeTradyError(f"expected a memory size with a unit (e.g. 512MiB), got {text!r}")
    return int(budget.amount)


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``1.5 MiB``."""
    value = float(n)
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or suffix == "GiB":
            return f"{value:.0f} {suffix}" if suffix == "B" else f"{value:.1f} {suffix}"
        value /= 1024
    raise AssertionError("unreachable")


def cap_budget(budget: Budget, layers: list[LayerCost], batch_size: int) -> tuple[Budget, str | None]:
    """A resolved budget (units or bytes) above what full fine-tuning of ``layers`` costs is capped
    to that, with a note saying so; otherwise returned unchanged with no note."""
    if budget.unit == "units":
        full = float(full_units(layers))
    elif budget.unit == "bytes":
        full = float(sum(layer.bytes_per_channel(batch_size) * layer.in_channels for layer in layers))
    else:
        raise ValueError(f"resolve a {budget.unit} budget before capping it")
    if budget.amount <= full:
        return budget, None
    capped = Budget(full, budget.unit)
    return capped, f"budget {budget} exceeds full fine-tuning ({capped}): capped to it"
