"""The table of backward rules of the portable step graph.

Every ONNX op the step graph differentiates has one ``Rule``, registered by the ``rule`` decorator
on the method that emits its backward, in the module of its family (``FAMILIES``): the op, the
family, and the tensors it keeps from the forward for the backward (``Keep``), the way PyTorch's
``derivatives.yaml`` names the saved inputs or result of each formula. The docs table
(``docs/portable.md``) and the memory model read the declarations; the builder records each tensor
a rule really keeps (``KeptTensor``) with its size, and the tests check the two agree.

Ops that carry no gradient (shapes, comparisons, index arithmetic) are registered with
``backward=None``: the builder passes over them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from ....errors import ArtifactError

CLAMPS = "clamps"
SMOOTH = "smooth activations"
NORMALIZATION = "normalization"
ATTENTION = "matmul / attention"
SHAPES = "shape ops"
CONV_GEMM = "conv / gemm"
ARITHMETIC = "arithmetic / broadcast"
NO_GRADIENT = "no gradient"
FAMILIES = (CLAMPS, SMOOTH, NORMALIZATION, ATTENTION, SHAPES, CONV_GEMM, ARITHMETIC, NO_GRADIENT)


@dataclass(frozen=True)
class Keep:
    """A tensor a rule keeps from the forward for the backward (only when its gradient needs it).

    ``kind`` groups kept tensors for the accounts (``liveness``, the memory model); ``what`` names it
    relative to the node; ``bits`` per value it stores; ``size`` says its size in words."""

    kind: str
    what: str
    bits: int
    size: str


@dataclass(frozen=True)
class KeptTensor:
    """A tensor one built step graph keeps, and its size: ``per_sample`` bytes for each sample
    and ``fixed`` bytes once, both for each selected channel of ``layer`` when it is set."""

    keep: Keep
    why: str
    per_sample: int
    fixed: int = 0
    layer: str = ""

    def bytes(self, batch_size: int, selected: dict[str, int] | None = None) -> int:
        """Its bytes at ``batch_size`` with ``selected[layer]`` channels selected."""
        count = (selected or {}).get(self.layer, 0) if self.layer else 1
        return count * (self.fixed + batch_size * self.per_sample)


@dataclass(frozen=True)
class Rule:
    """How the step graph differentiates one ONNX op: ``backward(builder, node, gy)`` adds the
    gradients of the node's inputs given ``gy``, the gradient of its first output."""

    op: str
    family: str
    keeps: tuple[Keep, ...]
    backward: Callable[..., None] | None


RULES: dict[str, Rule] = {}
TAPS: dict[str, Callable[..., None]] = {}  # op -> what the forward takes right after the node runs


def rule(*ops: str, family: str, keeps: tuple[Keep, ...] = ()) -> Callable:
    """Register the decorated method as the backward rule of ``ops`` (see the module docstring)."""

    def register(method: Callable) -> Callable:
        for op in ops:
            if op in RULES:
                raise ValueError(f"two backward rules for {op}")
            RULES[op] = Rule(op, family, keeps, method)
        return method

    return register


def tap(*ops: str) -> Callable:
    """Register the decorated method as what the forward takes right after each node of ``ops``."""

    def register(method: Callable) -> Callable:
        for op in ops:
            TAPS[op] = method
        return method

    return register


def no_gradient(*ops: str) -> None:
    """Register ``ops`` as carrying no gradient."""
    for op in ops:
        RULES[op] = Rule(op, NO_GRADIENT, (), None)


def cannot_differentiate(node: onnx.NodeProto, what: str) -> ArtifactError:
    """The refusal that names the module and the ONNX node, and what to do instead."""
    return ArtifactError(
        f"the portable format cannot differentiate layer {module_of(node.name)!r} ({what}, ONNX node {node.name}): "
        "export it with --format ort-training, or fine-tune with a torch engine "
        "('edge-trady finetune --engine torch-sparse')"
    )


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node``, else ``default``."""
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def module_of(node_name: str) -> str:
    """The qualified module name of a node exported by torch ('/features/features.3/conv/conv.0/Conv'
    -> 'features.3.conv.0'); the node name itself when it has no scope."""
    parts = [p for p in node_name.split("/") if p][:-1]
    if not parts:
        return node_name
    name, previous = parts[0], parts[0]
    for part in parts[1:]:
        name += part[len(previous) :] if part.startswith(previous + ".") else "." + part
        previous = part
    return name


SELECTED = Keep(
    "selected",
    "the selected input channels of a candidate layer's input, Gather(x, S, axis=1)",
    32,
    "n x (one channel of the input) per sample, n channels selected",
)


def markdown_table() -> str:
    """The rule table as docs/portable.md shows it: family, ops, what each keeps and its size."""
    rows = ["| family | ops | keeps for the backward | size |", "|---|---|---|---|"]
    for family in FAMILIES:
        by_keeps: dict[tuple[Keep, ...], list[str]] = {}
        for op, entry in RULES.items():
            if entry.family == family:
                by_keeps.setdefault(entry.keeps, []).append(op)
        for keeps, ops in by_keeps.items():
            what = "; ".join(k.what for k in keeps) or "nothing"
            size = "; ".join(k.size for k in keeps) or "-"
            rows.append(f"| {family} | {', '.join(f'`{op}`' for op in ops)} | {what} | {size} |")
    return "\n".join(rows)
