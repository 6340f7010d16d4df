"""Reproduce the paper's comparison on real data: EfficientNet-Lite0 -> Fashion-MNIST.

Methods x budgets (share of full fine-tuning units) x seeds, with the PyTorch masked engine.
Rows already in the CSV are skipped, so an interrupted run continues where it stopped.

    python bench/reproduce.py --per-class 200 --image-size 48 --epochs 4 --seeds 0 1 2

Writes bench/results/reproduce.csv, bench/results/reproduce.png and docs/reproduction.md. Seeds can run
in parallel processes with their own CSVs (``--csv bench/results/reproduce-s1.csv``); the report merges
every ``bench/results/reproduce*.csv``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

from benchlib import RESULTS, ROOT, ensure_ranking

BUDGETED = ["trady", "s-topk-random", "d-full-random", "s-full-random", "d-det-rgn"]
REFERENCES = ["full", "classifier-only"]
FIELDS = [
    "method",
    "budget",
    "seed",
    "val_acc",
    "initial_val_acc",
    "train_loss",
    "units_used",
    "budget_units",
    "full_units",
    "seconds",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=200, help="train and test images per class")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", nargs="+", default=["1%", "2.5%", "5%"])
    parser.add_argument("--methods", nargs="+", default=BUDGETED + REFERENCES)
    parser.add_argument("--csv", type=Path, default=RESULTS / "reproduce.csv")
    parser.add_argument("--lr", type=float, default=0.125, help="peak learning rate (the paper's 0.125)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args()
    if not args.report_only:
        run_all(args)
    rows = [row for path in sorted(RESULTS.glob("reproduce*.csv")) for row in _read(path)]
    write_report(rows, args)


def run_all(args: argparse.Namespace) -> None:
    from edge_trady.device.progress import Progress
    from edge_trady.workstation.finetune import FinetuneSpec, run_finetune

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    ranking = ensure_ranking(args.image_size, per_class=50, seed=100)  # once, on a disjoint subset
    suffix = "" if args.lr == 0.125 else f" @lr{args.lr:g}"
    done = {(r["method"], r["budget"], r["seed"]) for r in _read(args.csv)}
    jobs = [(m, b, s) for s in args.seeds for m in args.methods for b in (args.budgets if m in BUDGETED else ["-"])]
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        if new:
            writer.writeheader()
        for i, (method, budget, seed) in enumerate(jobs):
            if (method + suffix, budget, str(seed)) in done:
                continue
            started = time.monotonic()
            spec = FinetuneSpec(
                model="efficientnet-lite0",
                data="fashion-mnist",
                image_size=args.image_size,
                per_class=args.per_class,
                method=method,
                lr=args.lr,
                budget=budget if budget != "-" else "100%",
                epochs=args.epochs,
                seed=seed,
                ranking=str(ranking),
            )
            out = RESULTS / "runs" / f"{method}-{budget}-{seed}"
            result = run_finetune(spec, out, Progress(quiet=True))
            last = result.epochs[-1]
            writer.writerow(
                {
                    "method": method + suffix,
                    "budget": budget,
                    "seed": seed,
                    "val_acc": last["val_acc"],
                    "initial_val_acc": result.initial_val_acc,
                    "train_loss": last["train_loss"],
                    "units_used": last["units_used"],
                    "budget_units": last["budget_units"],
                    "full_units": result.full_units,
                    "seconds": time.monotonic() - started,
                }
            )
            handle.flush()
            print(
                f"[{i + 1}/{len(jobs)}] {method:16} {budget:>5} seed {seed}: val_acc {last['val_acc']:.4f} "
                f"({time.monotonic() - started:.0f}s)",
                flush=True,
            )


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def write_report(rows: list[dict], args: argparse.Namespace) -> None:
    budgets = args.budgets
    labels = list(dict.fromkeys(r["method"] for r in rows))  # method, or "method @lrX" for other learning rates
    methods = [m for m in labels if m.split(" @")[0] in args.methods]
    cell: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        cell.setdefault((row["method"], row["budget"]), []).append(100 * float(row["val_acc"]))

    def fmt(values: list[float] | None) -> str:
        if not values:
            return "–"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {std:.2f} (n={len(values)})"

    full_units = int(rows[0]["full_units"]) if rows else 0
    lines = [
        "| method | " + " | ".join(f"budget {b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for method in methods:
        if method.split(" @")[0] in REFERENCES:
            lines.append(f"| {method} | " + " | ".join([fmt(cell.get((method, "-")))] * len(budgets)) + " |")
        else:
            lines.append(f"| {method} | " + " | ".join(fmt(cell.get((method, b))) for b in budgets) + " |")
    table = "\n".join(lines)
    print(table)
    command = " ".join(
        [
            "python bench/reproduce.py",
            f"--per-class {args.per_class}",
            f"--image-size {args.image_size}",
            f"--epochs {args.epochs}",
            "--seeds " + " ".join(map(str, args.seeds)),
        ]
    )
    (ROOT / "docs").mkdir(exist_ok=True)
    report = ROOT / "docs" / "reproduction.md"
    body = report.read_text().split("<!-- table -->")[-1] if report.exists() else "\n"
    report.write_text(
        "# Reproduction: EfficientNet-Lite0 -> Fashion-MNIST\n\n"
        f"Command: `{command}`\n\n"
        f"Validation top-1 accuracy (%), mean ± std over seeds; full fine-tuning = {full_units:,} units at "
        f"{args.image_size} px. Raw rows: `bench/results/reproduce*.csv`; plot: `bench/results/reproduce.png`.\n\n"
        f"{table}\n\n<!-- table -->{body}"
    )
    _plot(cell, methods, budgets, RESULTS / "reproduce.png", args.image_size)


def _plot(cell: dict, methods: list[str], budgets: list[str], path: Path, image_size: int) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(b.rstrip("%")) for b in budgets]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    diverged = []
    for method in methods:
        reference = method.split(" @")[0] in REFERENCES
        keys = [(method, "-")] * len(budgets) if reference else [(method, b) for b in budgets]
        means = [statistics.mean(cell[k]) if cell.get(k) else float("nan") for k in keys]
        stds = [statistics.stdev(cell[k]) if len(cell.get(k, [])) > 1 else 0.0 for k in keys]
        if min(means) < 50:  # diverged at this learning rate: listed, not drawn (it would flatten the rest)
            diverged.append(f"{method} ({min(means):.0f}-{max(means):.0f} %)")
            continue
        ax.errorbar(xs, means, yerr=stds, fmt="--" if reference else "-o", capsize=3, label=method)
    if diverged:
        ax.text(
            0.01,
            0.02,
            "diverged at lr 0.125, not drawn: " + ", ".join(diverged),
            transform=ax.transAxes,
            fontsize=7,
            color="gray",
        )
    ax.set_xlabel("budget (% of full fine-tuning units)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"EfficientNet-Lite0 -> Fashion-MNIST, {image_size} px")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}%" for x in xs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
