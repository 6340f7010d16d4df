"""Does a resumed run cost what a fresh one does? Fresh vs resumed peak memory, per engine.

For each engine: plan EfficientNet-Lite0 (this machine's profile; portable and ort: export it and
train with the device runner, the torch engines with finetune), then in fresh processes
(1) train 2 epochs from scratch, (2) train again, SIGKILL the process once the end-of-epoch-1
checkpoint exists, and resume it with ``--resume``. Each row is the whole process's VmHWM
(summary.json: training, checkpoints and the final export) beside the plan's prediction.

    python bench/resume_memory.py                       # this checkout
    python bench/resume_memory.py --code /work/main --label before   # another checkout, same rows

Writes bench/results/resume_memory.csv and .json, bench/results/resume_memory.png and
docs/resume-memory.md (rows of every label measured so far).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import RESULTS, ROOT, ensure_ranking, kill_after_first_epoch

MiB = 2**20
CSV = RESULTS / "resume_memory.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["portable", "ort", "torch-sparse", "torch-masked"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget", default="1%")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--profile", default="this-workstation")
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose edge_trady runs (PYTHONPATH, cwd)")
    parser.add_argument("--label", default="after", help="name of these rows (e.g. before / after a change)")
    args = parser.parse_args()
    ranking = ensure_ranking(args.image_size)
    rows = [r for r in _read() if r["label"] != args.label or r["engine"] not in args.engines]
    for engine in args.engines:
        for row in measure(engine, ranking, args):
            rows.append(row)
            print(
                f"{row['label']:>7} {engine:13} {row['run']:8}: measured {row['measured_mib']:6.1f} MiB, "
                f"predicted {row['predicted_mib']:6.1f} MiB ({row['error_pct']:+.1f} %)",
                flush=True,
            )
    _write(rows, args)


def measure(engine: str, ranking: Path, args: argparse.Namespace) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(args.code)}

    def cli(*argv: str, wait: bool = True):
        command = [sys.executable, "-m", "edge_trady", *argv]  # cwd: -m looks there first
        if wait:
            return subprocess.run(command, env=env, check=True, cwd=args.code)
        return subprocess.Popen(command, env=env, cwd=args.code)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cli("plan", "--model", "efficientnet-lite0", "--image-size", str(args.image_size), "--profile", args.profile,
            "--engine", engine, "--batch-size", str(args.batch_size), "--budget", args.budget, "--ranking",
            str(ranking), "--data", "fashion-mnist", "--per-class", str(args.per_class), "--epochs", "2",
            "--quiet", "-o", str(work / "plan.json"))  # fmt: skip
        if engine in ("ort", "portable"):  # the device runner on the exported artifact
            cli("export", str(work / "plan.json"), "-o", str(work / "artifact"), "--quiet")
            job = ["run", str(work / "artifact"), "--train", "fashion-mnist", "--force"]
        else:
            job = ["finetune", "--plan", str(work / "plan.json"), "--data", "fashion-mnist"]
        job += ["--per-class", str(args.per_class), "--quiet"]
        cli(*job, "--out", str(work / "fresh"))
        killed = work / "resumed"
        proc = cli(*job, "--out", str(killed), wait=False)
        kill_after_first_epoch(proc, killed, engine)
        cli(*job, "--out", str(killed), "--resume")
        predicted = json.loads((work / "plan.json").read_text())["memory"]["peak_bytes"]
        rows = []
        for run in ("fresh", "resumed"):
            summary = json.loads((work / run / "summary.json").read_text())
            measured = summary["peak_rss_bytes"]
            rows.append(
                {
                    "label": args.label,
                    "engine": engine,
                    "run": run,
                    "batch_size": args.batch_size,
                    "budget": args.budget,
                    "predicted_mib": predicted / MiB,
                    "measured_mib": measured / MiB,
                    "error_pct": 100 * (predicted - measured) / measured,
                }
            )
        return rows


def _read() -> list[dict]:
    if not CSV.exists():
        return []
    with CSV.open() as handle:
        return [
            {
                **r,
                "batch_size": int(r["batch_size"]),
                **{k: float(r[k]) for k in ("predicted_mib", "measured_mib", "error_pct")},
            }
            for r in csv.DictReader(handle)
        ]


def _write(rows: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with CSV.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (RESULTS / "resume_memory.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "| code | engine | run | predicted MiB | measured MiB (VmHWM) | error | resumed - fresh |",
        "|---|---|---|---|---|---|---|",
    ]
    fresh = {(r["label"], r["engine"]): r["measured_mib"] for r in rows if r["run"] == "fresh"}
    for r in rows:
        delta = r["measured_mib"] - fresh.get((r["label"], r["engine"]), r["measured_mib"])
        extra = f"{delta:+.1f} MiB" if r["run"] == "resumed" else ""
        lines.append(
            f"| {r['label']} | {r['engine']} | {r['run']} | {r['predicted_mib']:.1f} | {r['measured_mib']:.1f} | "
            f"{r['error_pct']:+.1f} % | {extra} |"
        )
    table = "\n".join(lines)
    print(table)
    _plot(rows)
    doc = ROOT / "docs" / "resume-memory.md"
    tail = doc.read_text().split("<!-- table -->")[-1] if doc.exists() else "\n"
    engines = " ".join(dict.fromkeys(r["engine"] for r in rows))
    doc.write_text(
        "# Fresh vs resumed peak memory\n\n"
        f"Command: `python bench/resume_memory.py --engines {engines} --batch-size "
        f"{args.batch_size} --budget {args.budget} --image-size {args.image_size} --per-class {args.per_class}` "
        "(with `--code CHECKOUT --label NAME` for the rows of another checkout).\n\n"
        f"EfficientNet-Lite0, {args.image_size} px, Fashion-MNIST ({args.per_class} images/class), 2 epochs, "
        "batch 32; *resumed*: SIGKILL once the end-of-epoch-1 checkpoint exists, then `--resume` in a fresh "
        "process. Measured = that process's VmHWM (summary.json). Raw rows: `bench/results/resume_memory.csv`, "
        f"plot: `bench/results/resume_memory.png`.\n\n{table}\n\n<!-- table -->{tail}"
    )


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["label"], r["engine"]) for r in rows}, key=lambda g: (g[1], g[0] != "before", g[0]))
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 4))
    for i, group in enumerate(groups):
        for j, run in enumerate(("fresh", "resumed")):
            row = next((r for r in rows if (r["label"], r["engine"]) == group and r["run"] == run), None)
            if row:
                ax.bar(i + (j - 0.5) * 0.38, row["measured_mib"], 0.36, color=("#4c72b0", "#dd8452")[j],
                       label=run if i == 0 else None)  # fmt: skip
                ax.plot([i - 0.4, i + 0.4], [row["predicted_mib"]] * 2, color="black", lw=1)
    ax.set_xticks(range(len(groups)), [f"{engine}\n({label})" for label, engine in groups])
    ax.set_ylabel("peak RSS (VmHWM), MiB")
    ax.set_title("Fresh vs resumed run (black line: predicted peak)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "resume_memory.png", dpi=120)


if __name__ == "__main__":
    main()
