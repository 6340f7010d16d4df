"""Are LayerNorm shifts worth their share of the budget? TraDy on the ViT-style factory with and
without ``--train-shifts``, same budget, paired seeds.

The ViT-style net of ``tests/model_factories.py`` (patch conv, 2 pre-norm blocks of hand-written
attention and a GELU MLP, class token; random init) on real Fashion-MNIST at 32 px, torch-sparse
engine, TraDy over the layers of one ranking (computed once), D-Full draw at the same budget for
every variant:

    none         the candidate layers' input channels only
    candidates   + the shifts (LayerNorm beta) of the norms feeding candidate Linears
    all          + the shifts of every norm feeding a Linear (and BatchNorm after convs: none here)

A shift's gradient is one value per channel (no stored activation): its cost is taken off the channel
budget. Each run is ``edge-trady finetune`` in a fresh process (its VmHWM is the run's peak RSS);
beside it, in this process, the bytes one step keeps for backward (``TorchSparseEngine.saved_bytes``,
batch 32) with and without the shifts, for the same selection.

    python bench/norm_shifts.py [--seeds 0 1 2] [--epochs 10] [--per-class 100] [--budget 5%] [--jobs 1]
        [--variants none candidates]   (``all`` equals ``candidates`` when the top-K holds every Linear)

Writes bench/results/norm-shifts.{csv,json,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import RESULTS, ROOT

FACTORY = f"{ROOT / 'tests' / 'model_factories.py'}:vit"
VARIANTS = ("none", "candidates", "all")
MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--budget", default="5%")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (fresh processes each)")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of the same settings in --work")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["none", "candidates"])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edge-trady-norm-shifts"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = ["--data", "fashion-mnist", "--per-class", str(args.per_class), "--image-size", "32"]
    ranking = args.work / "ranking.json"
    if not ranking.exists():
        _cli("rank", "--model", FACTORY, "--trust-model-code", *data, "--epochs", "1", "--quiet", "-o", str(ranking))

    def run(seed: int, variant: str) -> dict:
        out = args.work / f"{variant}-s{seed}"
        if not (args.reuse and _finished_alike(out / "summary.json", args, seed, variant)):
            _cli(
                "finetune", "--model", FACTORY, "--trust-model-code", *data, "--ranking", str(ranking),
                "--method", "trady", "--budget", args.budget, "--epochs", str(args.epochs), "--lr", str(args.lr),
                "--batch-size", "32", "--seed", str(seed), "--engine", "torch-sparse", "--train-shifts", variant,
                "--out", str(out), "--overwrite", "--quiet",
            )  # fmt: skip
        summary = json.loads((out / "summary.json").read_text())
        row = {
            "variant": variant,
            "seed": seed,
            "val_acc": summary["final_val_acc"],
            "initial_val_acc": summary["initial_val_acc"],
            "train_loss": summary["final_train_loss"],
            "shift_units": summary["shift_cost"],
            "budget_units": summary["budget_amount"],
            "peak_rss_mib": summary["peak_rss_bytes"] / MiB,
        }
        print(f"{variant} seed {seed}: val_acc {row['val_acc']:.4f} peak {row['peak_rss_mib']:.1f} MiB", flush=True)
        return row

    jobs = [(seed, variant) for seed in args.seeds for variant in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:  # each run is its own process, with its own VmHWM
        rows = list(pool.map(lambda job: run(*job), jobs))
    saved = _saved_bytes(ranking, args.budget)
    _write(rows, saved, args)


def _finished_alike(path: Path, args: argparse.Namespace, seed: int, variant: str) -> bool:
    """A finished run of these settings (``--reuse``: a bench stopped halfway goes on)."""
    if not path.is_file():
        return False
    spec = json.loads(path.read_text())["spec"]
    wanted = {"epochs": args.epochs, "per_class": args.per_class, "budget": args.budget, "lr": args.lr,
              "seed": seed, "train_shifts": variant, "engine": "torch-sparse"}  # fmt: skip
    return all(spec.get(key) == value for key, value in wanted.items())


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "edge_trady", *args], check=True)


def _saved_bytes(ranking: Path, budget: str) -> dict[str, dict[str, int]]:
    """Bytes one step keeps for backward (batch 32) with each variant's shifts, same selection."""
    import numpy as np

    from edge_trady.core.budget import parse_budget
    from edge_trady.core.layers import full_units
    from edge_trady.device.runner import channel_sampler
    from edge_trady.engines.torch_sparse import TorchSparseEngine
    from edge_trady.workstation.cost_trace import norm_pairs, trace_layers
    from edge_trady.workstation.models import build_model
    from edge_trady.workstation.ranking import Ranking

    built = build_model(FACTORY, 10, 32, trust_code=True)
    layers = trace_layers(built.module, 32)
    top = Ranking.load(ranking).top_k()
    pairs = norm_pairs(built.module, 32)
    units = parse_budget(budget).resolve(full_units(layers))
    selection = channel_sampler("trady", layers[:-1], top, units, 32, 0, "skip").select(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    scopes = {
        "none": [],
        "candidates": list(dict.fromkeys(pairs[n] for n in top if n in pairs)),
        "all": list(dict.fromkeys(pairs[layer.name] for layer in layers[:-1] if layer.name in pairs)),
    }
    result = {}
    for variant, shifts in scopes.items():
        engine = TorchSparseEngine(built.module, layers, built.classifier, train_shifts=shifts)
        engine.set_selection(selection)
        result[variant] = engine.saved_bytes(x, y) | {"shifts": len(shifts)}
    return result


def _write(rows: list[dict], saved: dict[str, dict[str, int]], args: argparse.Namespace) -> None:
    stem = RESULTS / "norm-shifts"
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = []
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        accs = [r["val_acc"] for r in mine]
        base = {r["seed"]: r["val_acc"] for r in rows if r["variant"] == "none"}
        diffs = [r["val_acc"] - base[r["seed"]] for r in mine]
        table.append(
            {
                "variant": variant,
                "val_acc_mean": statistics.mean(accs),
                "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "paired_diff_mean": statistics.mean(diffs),
                "shift_units": mine[0]["shift_units"],
                "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in mine),
                "saved_bytes_step": saved[variant]["total"],
                "weight_grad_bytes": saved[variant]["weight_grads"],
            }
        )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (stem.with_suffix(".json")).write_text(json.dumps({"settings": settings, "rows": rows, "table": table,
                                                        "saved": saved}, indent=1))  # fmt: skip
    lines = [
        "# LayerNorm shifts (`--train-shifts`) on the ViT-style factory",
        "",
        f"`python bench/norm_shifts.py --seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs} "
        f"--per-class {args.per_class} --budget {args.budget} --variants {' '.join(args.variants)}` "
        f"(Fashion-MNIST, 32 px, torch-sparse, TraDy, lr {args.lr}, batch 32; budget "
        f"{rows[0]['budget_units']:,.0f} units)",
        "",
        "| train-shifts | val acc (mean ± sd) | paired vs none | shift units | peak RSS MiB (median) | "
        "kept for backward, one step (bytes) | weight-gradient bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['variant']} | {row['val_acc_mean']:.4f} ± {row['val_acc_std']:.4f} | "
            f"{row['paired_diff_mean']:+.4f} | {row['shift_units']:,.0f} | {row['peak_rss_mib_median']:.1f} | "
            f"{row['saved_bytes_step']:,} | {row['weight_grad_bytes']:,} |"
        )
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, args.variants, stem.with_suffix(".png"))


def _plot(rows: list[dict], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, variant in enumerate(variants):
        accs = [r["val_acc"] for r in rows if r["variant"] == variant]
        ax.scatter([i] * len(accs), accs, color="#4c72b0")
        ax.bar(i, statistics.mean(accs), color="#4c72b0", alpha=0.3)
    ax.set_xticks(range(len(variants)), [f"--train-shifts {v}" for v in variants])
    ax.set_ylabel("validation accuracy")
    low = min(r["val_acc"] for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(r["val_acc"] for r in rows) + 0.03))
    ax.set_title("ViT-style factory, TraDy, same budget: LayerNorm shifts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
