"""Training speed and peak memory of the ONNX Runtime runner and the PyTorch engines, same plan.

One plan (``edge-trady plan --engine ort``: EfficientNet-Lite0, 64 px, batch 32, TraDy, 2 % budget,
top-K of bench/results/ranking-efficientnet-lite0-64px.json) exported as an artifact
(``edge-trady export``). Then, each in a FRESH process with one thread (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``, ORT ``intra_op_num_threads=1``), on the same Fashion-MNIST batches and
the plan's epoch-0 selection:

- ``ort``: ``engines.ort_training.OrtEngine`` on the artifact (numpy + onnxruntime only, as ``edge-trady run``);
- ``torch-masked`` / ``torch-sparse``: the PyTorch engines, model built from the plan's seed;
- ``torch-full``: every Conv/Linear weight trained (torch-masked engine, method ``full``).

Per engine: 2 warm-up + N timed training steps; images/s from the median ``time.process_time()``
per step (CPU time: the machine is shared) and from the median wall time; VmHWM of the whole process
and of the training phase (VmHWM reset by ``/proc/self/clear_refs`` after setup).

    python bench/speed.py

Writes bench/results/speed.csv and docs/speed.md (keeps the text after ``<!-- discussion -->``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import RESULTS, ROOT, cli, ensure_ranking, reset_peak_rss

DOC = ROOT / "docs" / "speed.md"
MODEL = "efficientnet-lite0"
MiB = 2**20
MARKER = "<!-- discussion -->"
ENGINES = ("ort", "torch-masked", "torch-sparse", "torch-full")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def worker(cfg: dict) -> dict:
    """One engine in this (fresh) process: set up, time training steps, read the peaks."""
    from edge_trady.core.budget import Budget
    from edge_trady.device.data import Normalization, epoch_order, load_dataset
    from edge_trady.device.manifest import Manifest
    from edge_trady.device.memwatch import current_rss_bytes, peak_rss_bytes
    from edge_trady.device.runner import channel_sampler, plan_sampler

    started = time.monotonic()
    artifact = Path(cfg["artifact"])
    manifest = Manifest.load(artifact)
    plan = manifest.plan
    norm = Normalization.from_dict(manifest.normalization)
    data = load_dataset("fashion-mnist", "train", plan.image_size, norm, cfg["per_class"], plan.seed)
    selection = plan_sampler(plan).select(0)
    name = cfg["engine"]
    if name == "ort":
        from edge_trady.engines.ort_training import C, OrtEngine

        options = C.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        engine = OrtEngine(artifact, options=options)
    else:
        import torch

        torch.set_num_threads(1)
        from edge_trady.engines.torch_masked import TorchMaskedEngine
        from edge_trady.engines.torch_sparse import TorchSparseEngine
        from edge_trady.workstation.cost_trace import trace_layers
        from edge_trady.workstation.models import build_model

        built = build_model(plan.model, plan.num_classes, plan.image_size, plan.seed)
        layers = trace_layers(built.module, plan.image_size)
        if name == "torch-sparse":
            engine = TorchSparseEngine(built.module, layers, built.classifier)
        else:
            engine = TorchMaskedEngine(built.module, layers, built.classifier)
        if name == "torch-full":
            candidates = [layer for layer in layers if layer.name != built.classifier]
            full = channel_sampler("full", candidates, None, Budget(0, "units"), plan.batch_size, 0, "skip")
            selection = full.select(0)
    engine.set_selection(selection)
    batches = [b for b in data.batches(plan.batch_size, epoch_order(len(data), plan.seed, 0))]
    batches = [b for b in batches if len(b[1]) == plan.batch_size]
    engine.predict(batches[0][0])
    setup_peak = peak_rss_bytes()
    setup_rss = current_rss_bytes()
    reset = reset_peak_rss()
    cpu, wall = [], []
    for step in range(cfg["warmup"] + cfg["steps"]):
        x, y = batches[step % len(batches)]
        started_cpu, started_wall = time.process_time(), time.perf_counter()
        engine.train_step(x, y, plan.lr)
        if step >= cfg["warmup"]:
            cpu.append(time.process_time() - started_cpu)
            wall.append(time.perf_counter() - started_wall)
    train_peak = peak_rss_bytes()
    return {
        "channels": selection.channel_count,
        "layers": len(selection.channels),
        "setup_rss": setup_rss,
        "setup_peak": setup_peak,
        "train_peak": train_peak,
        "process_peak": max(setup_peak, train_peak) if reset else train_peak,
        "hwm_reset": reset,
        "cpu_step_s": statistics.median(cpu),
        "wall_step_s": statistics.median(wall),
        "torch_loaded": "torch" in sys.modules,
        "seconds": time.monotonic() - started,
    }


def make_artifact(directory: Path, args: argparse.Namespace) -> Path:
    ranking = ensure_ranking(args.image_size, per_class=args.per_class)
    common = ["--model", MODEL, "--data", "fashion-mnist", "--per-class", str(args.per_class), "--quiet"]
    plan = directory / "plan.json"
    cli("plan", *common, "--image-size", str(args.image_size), "--profile", args.profile, "--engine", "ort",
         "--batch-size", str(args.batch_size), "--budget", args.budget, "--ranking", str(ranking),
         "--epochs", "1", "-o", str(plan))  # fmt: skip
    artifact = directory / "artifact"
    cli("export", str(plan), "-o", str(artifact), "--quiet")
    return artifact


def run_worker(cfg: dict) -> dict:
    env = {**os.environ, **ONE_THREAD}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed for {cfg['engine']}:\n{done.stderr[-3000:]}")
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def summarize(engine: str, results: list[dict], batch: int) -> dict:
    cpu = statistics.median(r["cpu_step_s"] for r in results)
    wall = statistics.median(r["wall_step_s"] for r in results)
    return {
        "engine": engine,
        "layers": results[0]["layers"],
        "channels": results[0]["channels"],
        "cpu_step_s": cpu,
        "wall_step_s": wall,
        "images_per_s_cpu": batch / cpu,
        "images_per_s_wall": batch / wall,
        "process_peak_mib": max(r["process_peak"] for r in results) / MiB,
        "train_peak_mib": max(r["train_peak"] for r in results) / MiB,
        "setup_rss_mib": statistics.median(r["setup_rss"] for r in results) / MiB,
        "torch_loaded": results[0]["torch_loaded"],
        "processes": len(results),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| engine | trained layers / channels | CPU s/step | images/s (CPU time) | wall s/step "
        "| images/s (wall) | process peak MiB | training-phase peak MiB | RSS after setup MiB | torch loaded |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['layers']} / {r['channels']} | {r['cpu_step_s']:.3f} | "
            f"{r['images_per_s_cpu']:.1f} | {r['wall_step_s']:.3f} | {r['images_per_s_wall']:.1f} | "
            f"{r['process_peak_mib']:.1f} | {r['train_peak_mib']:.1f} | {r['setup_rss_mib']:.1f} | "
            f"{'yes' if r['torch_loaded'] else 'no'} |"
        )
    return "\n".join(lines)


def write(rows: list[dict], meta: dict, args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "speed.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = table(rows)
    print(text)
    tail = DOC.read_text().split(MARKER, 1)[1] if DOC.exists() and MARKER in DOC.read_text() else "\n"
    DOC.write_text(
        f"# Training speed and memory: ONNX Runtime runner vs PyTorch engines\n\n"
        f"Command: `{meta['command']}` ({meta['minutes']:.0f} min on {meta['machine']}; torch "
        f"{meta['torch']}, onnxruntime {meta['onnxruntime']}). Raw rows: `bench/results/speed.csv`.\n\n"
        f"One plan for all engines: `edge-trady plan --engine ort` ({MODEL}, {args.image_size} px, "
        f"batch {args.batch_size}, TraDy, budget {args.budget}, top-K of "
        f"`bench/results/ranking-{MODEL}-{args.image_size}px.json`, profile `{args.profile}`), "
        f"exported with `edge-trady export`. Fashion-MNIST, {args.per_class} train images per class "
        f"(full batches only), the plan's epoch-0 selection, its learning rate. Every engine runs in "
        f"{args.repeats} fresh process(es) with one thread (`OMP_NUM_THREADS=1`, "
        f"`torch.set_num_threads(1)`, ORT `intra_op_num_threads=1`): {args.warmup} warm-up + "
        f"{args.steps} timed steps. **CPU s/step** = median `time.process_time()` per step (median over "
        f"processes); images/s = batch / that. The machine is shared with other jobs (2 cores, "
        f"load {meta['load']:.1f}): wall time is shown but is not reliable. Peaks are the maximum over the "
        f"processes. **process peak** = VmHWM of "
        f"the whole process (imports, data loading, model/artifact, training); **training-phase peak** "
        f"= VmHWM after it was reset (`/proc/self/clear_refs`) at the end of the setup, i.e. the "
        f"highest RSS while training. `torch-full` trains every Conv/Linear weight.\n\n{text}\n\n"
        f"{MARKER}{tail}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget", default="2%")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--profile", default="this-workstation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per engine")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    started = time.monotonic()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        artifact = make_artifact(Path(tmp), args)
        cfg = {"artifact": str(artifact), "per_class": args.per_class, "warmup": args.warmup,
               "steps": args.steps}  # fmt: skip
        results: dict[str, list[dict]] = {engine: [] for engine in args.engines}
        for _ in range(args.repeats):  # interleaved: load changes hit every engine alike
            for engine in args.engines:
                result = run_worker({**cfg, "engine": engine})
                results[engine].append(result)
                print(
                    f"{engine:13} CPU {result['cpu_step_s']:.3f} s/step, wall {result['wall_step_s']:.3f} "
                    f"s/step, peak {result['process_peak'] / MiB:.1f} MiB "
                    f"(training phase {result['train_peak'] / MiB:.1f} MiB)",
                    flush=True,
                )
        rows = [summarize(engine, results[engine], args.batch_size) for engine in args.engines]
    import onnxruntime
    import torch

    command = (
        f"python bench/speed.py --engines {' '.join(args.engines)} --image-size {args.image_size} "
        f"--batch-size {args.batch_size} --budget {args.budget} --per-class {args.per_class} "
        f"--profile {args.profile} --warmup {args.warmup} --steps {args.steps} --repeats {args.repeats}"
    )
    meta = {
        "command": command,
        "minutes": (time.monotonic() - started) / 60,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load": max(load, os.getloadavg()[0]),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    write(rows, meta, args)


if __name__ == "__main__":
    main()
