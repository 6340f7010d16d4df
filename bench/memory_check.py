"""Check the planner's memory model against reality.

For each engine, batch size and budget: make a plan (this machine's measured profile), run one epoch
of training in a fresh process, and compare the process's real peak (VmHWM) with the prediction.

    python bench/memory_check.py

Writes bench/results/memory_check.csv and docs/memory.md (table with the command).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from benchlib import RESULTS, ROOT, cli, ensure_ranking

MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["torch-masked", "torch-sparse", "ort"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--budgets", nargs="+", default=["1%", "5%"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--profile", default="this-workstation")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        metavar="ENGINE:BATCH:BUDGET",
        help="explicit rows instead of engines x batch sizes x budgets",
    )
    args = parser.parse_args()
    ranking = ensure_ranking(args.image_size)
    wanted = (
        [tuple(r.split(":")) for r in args.rows]
        if args.rows
        else [(e, str(b), g) for e in args.engines for b in args.batch_sizes for g in args.budgets]
    )
    csv_path = RESULTS / "memory_check.csv"
    rows = [r for r in _read(csv_path) if (r["engine"], r["batch_size"], r["budget"]) in wanted]
    done = {(r["engine"], r["batch_size"], r["budget"]) for r in rows}
    for engine, batch, budget in wanted:
        if (engine, batch, budget) in done:
            continue
        rows.append(measure(engine, int(batch), budget, ranking, args))
        r = rows[-1]
        print(
            f"{engine:13} batch {batch:>3} budget {budget:>4}: predicted {r['predicted_mib']:7.1f} MiB, "
            f"measured {r['measured_mib']:7.1f} MiB, error {r['error_pct']:+6.1f} %",
            flush=True,
        )
        _save(rows, csv_path)
    write(rows, args)


def measure(engine: str, batch: int, budget: str, ranking: Path, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "plan.json"
        cli(
            "plan",
            "--model",
            "efficientnet-lite0",
            "--image-size",
            str(args.image_size),
            "--profile",
            args.profile,
            "--engine",
            engine,
            "--batch-size",
            str(batch),
            "--budget",
            budget,
            "--ranking",
            str(ranking),
            "--data",
            "fashion-mnist",
            "--per-class",
            str(args.per_class),
            "--epochs",
            "1",
            "--quiet",
            "-o",
            str(plan),
        )
        predicted = json.loads(plan.read_text())["memory"]
        run = Path(tmp) / "run"
        if engine == "ort":
            artifact = Path(tmp) / "artifact"
            cli("export", str(plan), "-o", str(artifact))
            cli(
                "run",
                str(artifact),
                "--train",
                "fashion-mnist",
                "--per-class",
                str(args.per_class),
                "--out",
                str(run),
                "--quiet",
                "--force",
            )
        else:
            cli(
                "finetune",
                "--plan",
                str(plan),
                "--data",
                "fashion-mnist",
                "--per-class",
                str(args.per_class),
                "--out",
                str(run),
                "--quiet",
            )
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run / "summary.json").read_text())
    # the whole process: training, checkpoints and the final model export
    measured = max([m["peak_rss_bytes"] for m in metrics] + [summary["peak_rss_bytes"]])
    peak = predicted["peak_bytes"]
    parts = {p["name"]: round(p["bytes"] / MiB, 1) for p in predicted["parts"]}
    return {
        "engine": engine,
        "batch_size": batch,
        "budget": budget,
        "predicted_mib": peak / MiB,
        "measured_mib": measured / MiB,
        "error_pct": 100 * (peak - measured) / measured,
        "parts_mib": json.dumps(parts),
    }


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as handle:
        return [
            {**r, **{k: float(r[k]) for k in ("predicted_mib", "measured_mib", "error_pct")}}
            for r in csv.DictReader(handle)
        ]


def _save(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    command = (
        "python bench/memory_check.py --rows "
        + " ".join(f"{r['engine']}:{r['batch_size']}:{r['budget']}" for r in rows)
        + f" --image-size {args.image_size} --per-class {args.per_class}"
    )
    lines = [
        "| engine | batch | budget | predicted MiB | measured MiB (VmHWM) | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = "" if abs(r["error_pct"]) <= 10 else " ⚠"
        lines.append(
            f"| {r['engine']} | {r['batch_size']} | {r['budget']} | {r['predicted_mib']:.1f} | "
            f"{r['measured_mib']:.1f} | {r['error_pct']:+.1f} %{flag} |"
        )
    table = "\n".join(lines)
    print(table)
    doc = ROOT / "docs" / "memory.md"
    tail = doc.read_text().split("<!-- table -->")[-1] if doc.exists() else "\n"
    doc.write_text(
        f"# Predicted vs measured peak memory\n\nCommand: `{command}`\n\nEfficientNet-Lite0, "
        f"{args.image_size} px, Fashion-MNIST ({args.per_class} images/class, train + val), one epoch "
        f"in a fresh process; measured = the process's VmHWM. Raw rows with the predicted parts: "
        f"`bench/results/memory_check.csv`.\n\n{table}\n\n<!-- table -->{tail}"
    )


if __name__ == "__main__":
    main()
