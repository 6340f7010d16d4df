"""What the torch-sparse engine keeps for backward on networks beyond ReLU CNNs, op by op.

torch-sparse has its own backward for Conv2d / Linear (only the selected input channels), frozen
BatchNorm (nothing) and the clamps (a mask); every other op (SiLU, Hardswish, GELU, Sigmoid /
Hardsigmoid gates, LayerNorm, Softmax, the attention ``matmul``s, the squeeze-excitation product) is
left to autograd, which keeps what its derivative formula needs wherever the gradient flows. This
script walks the autograd graph of one training step (the engine's ``forward_loss``) and adds up the
tensors each node keeps (``grad_fn._saved_*``; each storage once; model parameters and buffers
excluded), for the three factories of ``tests/model_factories.py`` and a tiny BertModel, at a TraDy
selection of ``--budget`` over every layer (D-Full draw, seed 0), batch 32.

    python bench/sparse_kept.py [--budget 5%]

Writes bench/results/sparse-kept.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import numpy as np
import torch
from benchlib import RESULTS, ROOT

sys.path.insert(0, str(ROOT / "tests"))

FACTORIES = ("mobilenetv3_small", "efficientnet_b0", "vit", "vit_mha", "tiny_bert")
BATCH = 32


def kept_by_op(loss: torch.Tensor, owned: set[int]) -> dict[str, int]:
    """Bytes each autograd node type keeps for backward, reachable from ``loss``."""
    totals: dict[str, int] = defaultdict(int)
    seen_storage: set[int] = set()
    seen_node: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_node:
            continue
        seen_node.add(id(node))
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:  # freed or not a tensor
                continue
            for tensor in value if isinstance(value, tuple) else (value,):
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    pointer = storage.data_ptr()
                    if pointer and pointer not in seen_storage and pointer not in owned:
                        seen_storage.add(pointer)
                        totals[type(node).__name__] += storage.nbytes()
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return dict(totals)


def measure(factory: str, budget: str) -> dict:
    import model_factories

    from edge_trady.core.budget import parse_budget
    from edge_trady.core.layers import full_units
    from edge_trady.device.runner import channel_sampler
    from edge_trady.engines.torch_sparse import TorchSparseEngine
    from edge_trady.workstation.attention import split_multihead_attention
    from edge_trady.workstation.cost_trace import trace_layers
    from edge_trady.workstation.example_input import ImageInput
    from edge_trady.workstation.models import classifier_name

    torch.manual_seed(0)
    model = getattr(model_factories, factory)(num_classes=10)
    split_multihead_attention(model)
    example = getattr(model, "example_input", ImageInput(32))
    layers = trace_layers(model, example)
    head = classifier_name(model)
    candidates = [layer for layer in layers if layer.name != head]
    units = parse_budget(budget).resolve(full_units(layers))
    selection = channel_sampler("d-full-random", candidates, None, units, BATCH, 0, "skip").select(0)
    engine = TorchSparseEngine(model, layers, head, packed_masks=True)
    engine.set_selection(selection)
    rng = np.random.default_rng(0)
    x = example.arrays(BATCH)
    if isinstance(example, ImageInput):
        x = (rng.standard_normal(x[0].shape).astype(np.float32),)
    y = rng.integers(0, 10, BATCH)
    roles = engine.saved_bytes(x, y)
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    ops = kept_by_op(engine.forward_loss(x, y), owned)
    return {"factory": factory, "channels": sum(len(c) for c in selection.channels.values()), "roles": roles,
            "ops": ops}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="5%")
    args = parser.parse_args()
    rows = [measure(factory, args.budget) for factory in FACTORIES]
    lines = [
        f"# What torch-sparse keeps for backward (batch {BATCH}, D-Full Random {args.budget}, 1-bit masks)",
        "",
        f"`python bench/sparse_kept.py --budget {args.budget}`; KiB per training step. 'selected' / 'classifier' /",
        "'masks' are torch-sparse's own (input channels of the selected layers, the head's input, clamp masks);",
        "'other' is what autograd keeps for the ops left to it, broken down by autograd node below.",
        "",
        "| model | channels | selected | classifier | masks | other | total |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row["roles"]
        cells = " | ".join(f"{r[k] / 1024:,.1f}" for k in ("selected", "classifier", "masks", "other", "total"))
        lines.append(f"| {row['factory']} | {row['channels']} | {cells} |")
    lines += ["", "| model | autograd node: KiB kept (largest first) |", "|---|---|"]
    for row in rows:
        ops = sorted(row["ops"].items(), key=lambda kv: -kv[1])
        lines.append(f"| {row['factory']} | " + ", ".join(f"{name} {size / 1024:,.1f}" for name, size in ops) + " |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "sparse-kept.md").write_text(text)
    (RESULTS / "sparse-kept.json").write_text(json.dumps({"budget": args.budget, "batch": BATCH, "rows": rows}))
    print(text)


if __name__ == "__main__":
    main()
