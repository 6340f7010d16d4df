"""What the portable training step keeps between forward and backward, by ONNX Runtime's own
account, next to the theoretical minimum ``bench/savings.py`` computes.

EfficientNet-Lite0, TraDy selection of epoch 0 over the top-K of ``bench/results/ranking-...``, at a
few image sizes and budgets. For each: export the portable artifact, run one step under ONNX
Runtime's profiler (``edge_trady.workstation.export.liveness``: node order and output shapes from
the profile, readers from the optimized graph) and sum the tensors alive when the loss is computed,
by kind. The theoretical minimum (savings.py ``minimum``) counts the selected input channels and
1-bit ReLU6 masks after the earliest *selected* layer plus the classifier's input; the step keeps
masks after the earliest *candidate* layer (its graph is fixed for every selection), so both
earliest layers are shown. ``peak live`` is the most ONNX Runtime tensors alive at once during the
step (forward + backward working set included).

    python bench/portable_kept.py --image-sizes 64 128 --budgets 1% 2% 5%

Writes bench/results/portable_kept.{csv,json,png} and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

from benchlib import RESULTS, ensure_ranking
from savings import minimum

MODEL = "efficientnet-lite0"
MiB = 2**20
KINDS = ("selected", "masks", "classifier input", "slice differences", "other")


def measure(size: int, budgets: list[str], batch: int, seed: int, header: bool) -> list[dict]:
    import numpy as np

    from edge_trady.core.budget import parse_budget
    from edge_trady.core.layers import full_units
    from edge_trady.device.runner import channel_sampler
    from edge_trady.engines.portable import PortableEngine
    from edge_trady.workstation.cost_trace import trace_layers
    from edge_trady.workstation.export.liveness import step_liveness
    from edge_trady.workstation.export.portable import export_portable_artifact
    from edge_trady.workstation.models import build_model
    from edge_trady.workstation.ranking import Ranking

    built = build_model(MODEL, 10, size, seed)
    layers = trace_layers(built.module, size)
    candidates = [layer for layer in layers if layer.name != built.classifier]
    top_k = Ranking.load(ensure_ranking(size)).top_k()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_portable_artifact(built.module, layers, top_k, built.classifier, size, Path(tmp))
        engine = PortableEngine(Path(tmp), threads=1)
        order = [layer.name for layer in layers]
        earliest_candidate = min(top_k, key=order.index)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        y = rng.integers(0, 10, batch)
        for budget in budgets:
            amount = parse_budget(budget).resolve(full_units(layers))
            selection = channel_sampler("trady", candidates, top_k, amount, batch, seed, "skip").select(0)
            engine.set_selection(selection)
            live = step_liveness(engine, x, y)
            theory = minimum(built.module, layers, built.classifier, selection, size, batch)
            head = next(layer for layer in layers if layer.name == built.classifier)
            kept = live.by_kind()
            theory_kept = theory["selected_acts"] + theory["relu_masks"] + 4 * batch * head.in_channels
            rows.append(
                {
                    "image_size": size,
                    "budget": budget,
                    "batch_size": batch,
                    "layers": len(top_k),
                    "channels": selection.channel_count,
                    **{f"kept_{kind.replace(' ', '_')}_mib": kept[kind] / MiB for kind in KINDS},
                    "kept_total_mib": sum(kept.values()) / MiB,
                    "theory_selected_mib": theory["selected_acts"] / MiB,
                    "theory_masks_mib": theory["relu_masks"] / MiB,
                    "theory_classifier_input_mib": 4 * batch * head.in_channels / MiB,
                    "theory_kept_mib": theory_kept / MiB,
                    "ratio": sum(kept.values()) / theory_kept,
                    "peak_live_mib": live.peak_bytes / MiB,
                    "theory_bwd_transient_mib": theory["bwd_transient"] / MiB,
                    "earliest_selected": theory["earliest_layer"],
                    "earliest_candidate": earliest_candidate,
                }
            )
            print(table(rows[-1:], header=header and len(rows) == 1), flush=True)
    return rows


def table(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines += [
            "| px | budget | channels | kept: selected | masks | head input | slice diffs | other | total | "
            "theory: selected + masks + head input | kept / theory | peak live | earliest selected / candidate |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        lines.append(
            f"| {r['image_size']} | {r['budget']} | {r['channels']} | {r['kept_selected_mib']:.2f} | "
            f"{r['kept_masks_mib']:.2f} | {r['kept_classifier_input_mib']:.2f} | "
            f"{r['kept_slice_differences_mib']:.3f} | {r['kept_other_mib']:.3f} | **{r['kept_total_mib']:.2f}** | "
            f"{r['theory_selected_mib']:.2f} + "
            f"{r['theory_masks_mib']:.2f} + {r['theory_classifier_input_mib']:.2f} = {r['theory_kept_mib']:.2f} | "
            f"{r['ratio']:.2f} | {r['peak_live_mib']:.1f} | `{r['earliest_selected']}` / `{r['earliest_candidate']}` |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['image_size']} px\n{r['budget']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    bottom = [0.0] * len(rows)
    for kind in KINDS:
        values = [r[f"kept_{kind.replace(' ', '_')}_mib"] for r in rows]
        ax.bar([x - 0.2 for x in xs], values, 0.38, bottom=bottom, label=f"kept: {kind}")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.bar([x + 0.2 for x in xs], [r["theory_kept_mib"] for r in rows], 0.38, color="grey", label="theoretical minimum")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("MiB alive when the loss is computed")
    ax.set_title(f"{MODEL}, batch {rows[0]['batch_size']}: portable step (ONNX Runtime) vs theory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--budgets", nargs="+", default=["1%", "2%", "5%"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for size in args.image_sizes:
        rows += measure(size, args.budgets, args.batch_size, args.seed, header=not rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "portable_kept.json").write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1) + "\n")
    with open(RESULTS / "portable_kept.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, RESULTS / "portable_kept.png")
    print(f"\n{table(rows)}\n\nwritten to {RESULTS}/portable_kept.{{json,csv,png}}")


if __name__ == "__main__":
    main()
