"""Check the planner's memory model against reality.

For each engine, image size, batch size and budget: make a plan (this machine's measured profile;
for the portable engine the same profile with the onnxruntime baseline measured in the device
environment, ``benchlib.device_profile``), train one epoch in a fresh process (``edge-trady run``
on the exported artifact for ``portable`` (in .venv-device, plain onnxruntime) and ``ort``,
``edge-trady finetune`` for the torch engines; ``torch-full``: method ``full``), and compare the
process's real peak (VmHWM) with the prediction. ``--runs fresh resumed`` adds, for each point, a
run of two epochs SIGKILLed after the epoch-1 checkpoint and resumed in a fresh process (the peak
is the resumed process's): a resumed run must fit the same prediction.

    python bench/memory_check.py --engines portable ort torch-sparse torch-masked torch-full \\
        --image-sizes 64 128 --batch-sizes 8 32 --budgets 2%

Rows already in bench/results/memory_check.csv are kept (delete a row to measure it again).
Writes bench/results/memory_check.{csv,png} and docs/memory.md (table with the commands that
measured its rows, kept in bench/results/memory_check-commands.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from benchlib import RESULTS, ROOT, SETUPS, make_plan, train_fresh

MiB = 2**20
KEY = ("engine", "image_size", "batch_size", "budget", "run")
RUNS = ("fresh", "resumed")
TOLERANCE_PCT = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--budgets", nargs="+", default=["2%"])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--profile", default="this-workstation")
    parser.add_argument("--runs", nargs="+", default=["fresh"], choices=RUNS, help="fresh runs, resumed runs or both")
    parser.add_argument("--remeasure", action="store_true", help="measure every row again (replacing kept rows)")
    parser.add_argument(
        "--replan",
        action="store_true",
        help="keep the measured peaks of kept rows, predict them again with the current memory model",
    )
    parser.add_argument("--kept-only", action="store_true", help="measure no new row: only the kept ones")
    args = parser.parse_args()
    grid = [
        (str(s), str(b), g, run)
        for s in args.image_sizes
        for b in args.batch_sizes
        for g in args.budgets
        for run in args.runs
    ]
    wanted = [(e, *point) for point in grid for e in args.engines]
    csv_path = RESULTS / "memory_check.csv"
    every = {tuple(r[k] for k in KEY): r for r in _read(csv_path)}
    kept = {} if args.remeasure else dict(every)
    rows = []
    for key in wanted:
        if key not in kept and args.kept_only:
            continue
        if key not in kept:
            engine, size, batch, budget, run = key
            kept[key] = measure(engine, int(size), int(batch), budget, run, args)
            r = kept[key]
            print(
                f"{engine:13} {size:>4} px batch {batch:>3} budget {budget:>4} {run:7}: predicted "
                f"{r['predicted_mib']:7.1f} MiB, measured {r['measured_mib']:7.1f} MiB, error {r['error_pct']:+6.1f} %",
                flush=True,
            )
            _save([kept[k] for k in wanted if k in kept], csv_path)
        elif args.replan:
            kept[key] = predict(kept[key], args)
        rows.append(kept[key])
    rows += [row for key, row in every.items() if key not in wanted]  # other invocations' rows stay
    _save(rows, csv_path)
    plot(rows, RESULTS / "memory_check.png")
    write(rows, args)


def predict(row: dict, args: argparse.Namespace) -> dict:
    """``row`` with the current planner's prediction (the measured peak does not depend on it)."""
    with tempfile.TemporaryDirectory() as tmp:
        size, batch, path = int(row["image_size"]), int(row["batch_size"]), Path(tmp) / "plan.json"
        estimate = make_plan(row["engine"], size, batch, row["budget"], args.per_class, args.profile, path)
    return _row(row["engine"], size, batch, row["budget"], row["run"], estimate, row["measured_mib"] * MiB)


def measure(engine: str, size: int, batch: int, budget: str, run: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        done = train_fresh(engine, size, batch, budget, args.per_class, args.profile, Path(tmp), run == "resumed")
    return _row(engine, size, batch, budget, run, done["predicted"], done["measured_bytes"])


def _row(engine: str, size: int, batch: int, budget: str, run: str, estimate: dict, measured: float) -> dict:
    predicted = estimate["peak_bytes"]
    parts = {p["name"]: round(p["bytes"] / MiB, 1) for p in estimate["parts"]}
    return {
        "engine": engine,
        "image_size": str(size),
        "batch_size": str(batch),
        "budget": budget,
        "run": run,
        "predicted_mib": predicted / MiB,
        "measured_mib": measured / MiB,
        "error_pct": 100 * (predicted - measured) / measured,
        "parts_mib": json.dumps(parts),
    }


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    if rows and "image_size" not in rows[0]:
        return []  # written before image sizes were a key: measure again
    numbers = ("predicted_mib", "measured_mib", "error_pct")
    return [{**r, "run": r.get("run") or "fresh", **{k: float(r[k]) for k in numbers}} for r in rows]


def _save(rows: list[dict], path: Path) -> None:
    from edge_trady.core.atomic import replacing

    with replacing(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_trady.core.atomic import replacing

    fig, ax = plt.subplots(figsize=(7, 5))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == engine]
        ax.scatter([r["measured_mib"] for r in mine], [r["predicted_mib"] for r in mine], label=engine)
        for r in mine:
            ax.annotate(f"{r['image_size']}px/b{r['batch_size']}", (r["measured_mib"], r["predicted_mib"]), fontsize=6)
    top = 1.05 * max(max(r["measured_mib"], r["predicted_mib"]) for r in rows)
    ax.plot([0, top], [0, top], color="grey", lw=0.8, label="exact")
    for factor in (0.9, 1.1):
        ax.plot([0, top], [0, factor * top], color="grey", lw=0.5, ls="--")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured peak (VmHWM), MiB")
    ax.set_ylabel("predicted peak (edge-trady plan), MiB")
    ax.set_title("EfficientNet-Lite0, Fashion-MNIST, one epoch in a fresh process (dashed: ±10 %)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def table(rows: list[dict]) -> str:
    lines = [
        "| engine | px | batch | budget | run | predicted MiB | measured MiB (VmHWM) | error | within ±10 % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "yes" if abs(r["error_pct"]) <= TOLERANCE_PCT else "**no**"
        lines.append(
            f"| {r['engine']} | {r['image_size']} | {r['batch_size']} | {r['budget']} | {r['run']} | "
            f"{r['predicted_mib']:.1f} | "
            f"{r['measured_mib']:.1f} | {r['error_pct']:+.1f} % | {ok} |"
        )
    return "\n".join(lines)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    from edge_trady.core.atomic import write_text

    command = (
        f"python bench/memory_check.py --engines {' '.join(args.engines)} "
        f"--image-sizes {' '.join(map(str, args.image_sizes))} --batch-sizes {' '.join(map(str, args.batch_sizes))} "
        f"--budgets {' '.join(args.budgets)} --runs {' '.join(args.runs)} --per-class {args.per_class} "
        f"--profile {args.profile}"
    )
    commands_path = RESULTS / "memory_check-commands.json"
    commands = json.loads(commands_path.read_text()) if commands_path.exists() else []
    if not args.kept_only and command not in commands:
        commands.append(command)
        write_text(commands_path, json.dumps(commands, indent=1) + "\n")
    text = table(rows)
    misses = sum(abs(r["error_pct"]) > TOLERANCE_PCT for r in rows)
    print(text)
    print(f"{len(rows) - misses} of {len(rows)} rows within ±{TOLERANCE_PCT:g} %")
    doc = ROOT / "docs" / "memory.md"
    tail = doc.read_text().split("<!-- table -->")[-1] if doc.exists() else "\n"
    write_text(
        doc,
        "# Predicted vs measured peak memory\n\nCommands: "
        + "; ".join(f"`{c}`" for c in commands)
        + "\n\nEfficientNet-Lite0, Fashion-MNIST "
        f"({args.per_class} images/class, train + val), one epoch in a fresh process (*resumed*: two epochs, "
        "SIGKILL after the epoch-1 checkpoint, `--resume` in a fresh process); measured = the process's "
        f"VmHWM (training, checkpoints, final model export). Raw rows with the predicted parts: "
        f"`bench/results/memory_check.csv`; plot `bench/results/memory_check.png`. "
        f"{len(rows) - misses} of {len(rows)} rows within ±{TOLERANCE_PCT:g} %.\n\n{text}\n\n<!-- table -->{tail}",
    )


if __name__ == "__main__":
    main()
