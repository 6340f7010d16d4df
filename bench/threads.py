"""Wall-clock images/s of ``edge-trady run`` (portable artifact, plain onnxruntime) at 1, 2, ...
threads, each in a fresh process of the torch-free device environment.

EfficientNet-Lite0, real Fashion-MNIST, batch 32, TraDy 2 % (the plan of ``benchlib.make_plan``).
Each measurement is one ``edge-trady run --threads N --epochs E`` (training, per-epoch evaluation,
session re-creation, checkpoints, the final export): **images/s** = training images x epochs / the
sum of the epochs' wall time (``metrics.jsonl``), **process** = the same over the whole process.
Thread counts are interleaved and repeated; the median is reported with the 1-minute load average
before and after each measurement. The machine is shared, so ``--max-load L`` waits (up to
``--wait-minutes``) until the load is at most L before each measurement, and ``--lock FILE`` holds
an exclusive ``flock`` on FILE during each measurement (not while waiting).

    python bench/threads.py --image-sizes 64 128 --threads 1 2 --max-load 2.5 --lock /work/locks/timing.lock

Writes bench/results/threads.{csv,json,png} and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchlib import RESULTS, cli, device_python, make_plan


def wait_for_load(max_load: float | None, minutes: float) -> None:
    """Sleep until the 1-minute load average is at most ``max_load`` (or ``minutes`` have passed)."""
    deadline = time.monotonic() + 60 * minutes
    while max_load is not None and os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(20)


@contextmanager
def locked(path: Path | None) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` while the block runs (nothing when ``path`` is None)."""
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def measure(artifact: Path, threads: int, args: argparse.Namespace, out: Path) -> dict:
    """One fresh ``edge-trady run`` at ``threads``; its wall-clock figures and the load around it."""
    load_before = os.getloadavg()[0]
    command = [
        str(device_python()), "-m", "edge_trady", "run", str(artifact), "--train", "fashion-mnist",
        "--per-class", str(args.per_class), "--epochs", str(args.epochs), "--threads", str(threads),
        "--out", str(out), "--overwrite", "--quiet",
    ]  # fmt: skip
    started, cpu = time.perf_counter(), os.times()
    subprocess.run(command, check=True)
    seconds, after = time.perf_counter() - started, os.times()
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    images = sum(e["images"] for e in epochs)
    training = sum(e["time_s"] for e in epochs)
    return {
        "threads": threads,
        "images": images,
        "training_s": training,
        "process_s": seconds,
        "process_cpu_s": after.children_user + after.children_system - cpu.children_user - cpu.children_system,
        "images_per_s": images / training,
        "process_images_per_s": images / seconds,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def summarize(size: int, runs: list[dict], base: float) -> list[dict]:
    rows = []
    for threads in sorted({r["threads"] for r in runs}):
        mine = [r for r in runs if r["threads"] == threads]
        speed = statistics.median(r["images_per_s"] for r in mine)
        rows.append(
            {
                "image_size": size,
                "threads": threads,
                "runs": len(mine),
                "images_per_s": speed,
                "process_images_per_s": statistics.median(r["process_images_per_s"] for r in mine),
                "scaling": speed / base if base else 1.0,
                "cpu_per_image_ms": 1e3 * statistics.median(r["process_cpu_s"] / r["images"] for r in mine),
                "load_min": min(min(r["load_before"], r["load_after"]) for r in mine),
                "load_max": max(max(r["load_before"], r["load_after"]) for r in mine),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| px | threads | runs | images/s (training, wall) | images/s (whole process) | x 1 thread "
        "| CPU ms per image | load (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['image_size']} | {r['threads']} | {r['runs']} | **{r['images_per_s']:.1f}** | "
            f"{r['process_images_per_s']:.1f} | {r['scaling']:.2f}x | {r['cpu_per_image_ms']:.2f} | "
            f"{r['load_min']:.1f}-{r['load_max']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_trady.core.atomic import replacing

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for size in sorted({r["image_size"] for r in rows}):
        mine = [r for r in rows if r["image_size"] == size]
        ax.plot([r["threads"] for r in mine], [r["images_per_s"] for r in mine], marker="o", label=f"{size} px")
    ax.set_xlabel("--threads")
    ax.set_ylabel("training images/s (wall clock)")
    ax.set_title("edge-trady run, EfficientNet-Lite0, TraDy 2 %, batch 32")
    ax.legend()
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget", default="2%")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--profile", default="this-workstation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-load", type=float, default=None, help="wait until the 1-minute load is at most this")
    parser.add_argument("--wait-minutes", type=float, default=20, help="longest wait for --max-load per measurement")
    parser.add_argument("--lock", type=Path, help="hold an exclusive flock on this file during each measurement")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.image_sizes:
            here = Path(tmp) / f"{size}px"
            make_plan("portable", size, args.batch_size, args.budget, args.per_class, args.profile, here / "plan.json")
            cli("export", str(here / "plan.json"), "-o", str(here / "artifact"), "--quiet")
            runs = []
            for repeat in range(args.repeats):
                for threads in args.threads:
                    wait_for_load(args.max_load, args.wait_minutes)
                    with locked(args.lock):
                        runs.append({"image_size": size, **measure(here / "artifact", threads, args, here / "run")})
                    r = runs[-1]
                    print(
                        f"{size} px, {threads} thread(s), repeat {repeat + 1}: {r['images_per_s']:.1f} images/s "
                        f"(load {r['load_before']:.1f} -> {r['load_after']:.1f})",
                        flush=True,
                    )
            raw += runs
            base = statistics.median(r["images_per_s"] for r in runs if r["threads"] == min(args.threads))
            rows += summarize(size, runs, base)
    text = table(rows)
    print(f"\n{text}")
    from edge_trady.core.atomic import write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/threads.py " + " ".join(sys.argv[1:]), "measured": started}
    write_json(RESULTS / "threads.json", {"meta": meta, "rows": rows, "runs": raw})
    with open(RESULTS / "threads.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, RESULTS / "threads.png")


if __name__ == "__main__":
    main()
