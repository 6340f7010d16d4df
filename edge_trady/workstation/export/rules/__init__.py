"""The backward rules of the portable step graph, one module per family (``base.FAMILIES``); the
table itself is ``base.RULES``."""

from .arithmetic import ArithmeticRules
from .base import (
    FAMILIES,
    RULES,
    SELECTED,
    TAPS,
    Keep,
    KeptTensor,
    Rule,
    cannot_differentiate,
    markdown_table,
    module_of,
    node_attr,
)
from .clamps import ClampRules
from .conv import ConvRules
from .linear import LinearRules
from .shapes import ShapeRules

__all__ = [
    "FAMILIES",
    "RULES",
    "SELECTED",
    "TAPS",
    "ArithmeticRules",
    "ClampRules",
    "ConvRules",
    "Keep",
    "KeptTensor",
    "LinearRules",
    "Rule",
    "ShapeRules",
    "cannot_differentiate",
    "markdown_table",
    "module_of",
    "node_attr",
]
