"""The backward-rule table of the portable step graph: its declarations, the docs' copy of it, and
that a built step keeps only what its rules declare."""

from pathlib import Path

import torch
from test_portable import KINDS, randomize

from edge_trady.workstation.cost_trace import trace_layers
from edge_trady.workstation.export.portable import build_step
from edge_trady.workstation.export.rules import FAMILIES, RULES, markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs" / "portable.md"


def test_every_rule_has_a_family_and_a_backward_or_none() -> None:
    assert {rule.family for rule in RULES.values()} <= set(FAMILIES)
    for op, rule in RULES.items():
        assert rule.op == op
        assert rule.backward is not None or not rule.keeps, op


def test_the_docs_table_is_the_rule_table() -> None:
    text = DOCS.read_text()
    start = text.index("<!-- rules table")
    section = text[text.index("\n", start) + 1 : text.index("<!-- end of rules table -->")]
    assert section.strip() == markdown_table(), (
        "docs/portable.md's rules table is stale: paste the output of "
        "python -c 'from edge_trady.workstation.export.rules import markdown_table; print(markdown_table())'"
    )


def test_a_built_step_keeps_only_what_its_rules_declare() -> None:
    torch.manual_seed(0)
    model = randomize(KINDS["grouped"]())
    layers = trace_layers(model, 8)
    step, forward = build_step(model, layers, [layer.name for layer in layers if layer.name != "head"], "head", 8)
    declared = {keep for node in forward.graph.node for keep in RULES[node.op_type].keeps}
    assert step.kept and {kept.keep for kept in step.kept.values()} <= declared
    kinds = {kept.keep.kind for kept in step.kept.values()}
    assert kinds == {"selected", "masks", "classifier input", "slice differences"}
    selected = {kept.layer: kept for kept in step.kept.values() if kept.keep.kind == "selected"}
    body = next(layer for layer in layers if layer.name == "body.0")
    assert selected["body.0"].bytes(4, {"body.0": 3}) == 4 * 3 * 4 * body.act_units_per_channel
