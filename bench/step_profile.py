"""Where the portable training step's time goes: per phase and per node type, next to the inference
pass of the same network and the step's FLOP floor.

EfficientNet-Lite0, real Fashion-MNIST, batch 32, TraDy at a 2 % budget (top-K of
bench/results/ranking-...), the plan's epoch-0 selection; for each image size the portable artifact
is exported and a worker in the torch-free device environment (.venv-device, plain onnxruntime)
measures with ``--threads`` intra-op threads:

- **step**: ``session.run`` of the training step (``PortableEngine.gradients``), the numpy SGD update
  (``apply_gradients``) and the data loading of a batch (``Dataset.batch``), median CPU time
  (``time.process_time``) over ``--steps`` steps after ``--warmup``;
- **session re-creation**: what an epoch switch costs, i.e. the first predict after training (the
  inference session made with the current weights) and the first step of the next epoch's selection
  (the step session made again), each minus a steady-state call;
- **inference pass**: ``PortableEngine.predict`` on the same batch (the runner's inference session);
- **profile**: the same step session with ONNX Runtime's profiler on; each node's kernel time goes to
  its phase (``edge_trady.workstation.export.step_profile.node_phases``: forward, forward corrections
  of the refreshed layers, kept channels, masks, loss, input gradients, weight gradients) and its op
  type; *executor* is the run's time outside the kernels. Profiled times are wall clock, so they are
  scaled to the step's measured CPU time (the shares are the profile's);
- **FLOP floor**: multiply-adds of the forward + the input gradients of every layer above the earliest
  candidate + the selected channels' weight gradients (``step_flops``), in inference passes; the floor
  *time* is that many inference passes.

    flock /work/locks/timing.lock python bench/step_profile.py --image-sizes 64 128
    flock /work/locks/timing.lock python bench/step_profile.py --ab BEFORE_DIR AFTER_DIR   # two --keep folders

Writes bench/results/step_profile.{csv,json,png} (``--tag NAME``: step_profile-NAME.* in
bench/results/step_profile/, for comparisons) and prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchlib import RESULTS, cli, device_python, make_plan

MiB = 2**20


def phases() -> tuple[str, ...]:
    """The step's phases (``step_profile.PHASES``) and the time between kernels; imported here, not
    at the top, because the device worker has no onnx."""
    from edge_trady.workstation.export.step_profile import PHASES

    return (*PHASES, "executor")


def worker(cfg: dict) -> dict:
    """Timings and profiles of one artifact in this fresh (device) process."""
    import numpy as np

    from edge_trady.core.plan import Plan
    from edge_trady.device.data import Normalization, epoch_order, load_dataset
    from edge_trady.device.heap import pin_mmap_threshold
    from edge_trady.device.runner import plan_sampler
    from edge_trady.engines.portable import PortableEngine, session_options

    pin_mmap_threshold()  # as the runner
    plan = Plan.load(Path(cfg["plan"]))
    norm = Normalization.from_dict(plan.normalization)
    data = load_dataset("fashion-mnist", "train", plan.image_size, norm, cfg["per_class"], plan.seed)
    order = epoch_order(len(data), plan.seed, 0)
    batch = plan.batch_size
    indices = [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]
    sampler = plan_sampler(plan)
    engine = PortableEngine(Path(cfg["artifact"]), threads=cfg["threads"])
    engine.set_selection(sampler.select(0))
    cpu, wall = time.process_time, time.perf_counter
    times: dict[str, list[float]] = {"step": [], "step_wall": [], "optimizer update": [], "data loading": []}
    x, y = data.batch(indices[0])
    engine.train_step(x, y, plan.lr)  # creates the step session
    for index in range(cfg["warmup"] + cfg["steps"]):
        started = cpu()
        x, y = data.batch(indices[index % len(indices)])
        loaded, loaded_wall = cpu(), wall()
        _, _, grads = engine.gradients(x, y)
        stepped, stepped_wall = cpu(), wall()
        engine.apply_gradients(grads, plan.lr)
        if index >= cfg["warmup"]:
            times["data loading"].append(loaded - started)
            times["step"].append(stepped - loaded)
            times["step_wall"].append(stepped_wall - loaded_wall)
            times["optimizer update"].append(cpu() - stepped)
    result = {key: statistics.median(values) for key, values in times.items()}
    started = cpu()
    engine.predict(x)  # an epoch switch: the inference session made with the current weights
    first_predict = cpu() - started
    inference = []
    for _ in range(cfg["warmup"] + cfg["steps"]):
        started = cpu()
        engine.predict(x)
        inference.append(cpu() - started)
    result["inference"] = statistics.median(inference[cfg["warmup"] :])
    engine.set_selection(sampler.select(1))
    started = cpu()
    engine.gradients(x, y)  # the next epoch's first step: the step session made again
    result["session re-creation"] = first_predict - result["inference"] + cpu() - started - result["step"]
    out = Path(cfg["out"])
    for mode in ("step", "predict"):  # the same sessions again, profiled
        options = session_options(cfg["threads"], step=mode == "step")
        options.enable_profiling = True
        options.profile_file_prefix = str(out / f"profile-{mode}")
        options.optimized_model_filepath = str(out / f"optimized-{mode}.onnx")
        import onnxruntime

        session = onnxruntime.InferenceSession(engine.graph_bytes(mode), options, providers=["CPUExecutionProvider"])
        feeds = engine.step_feeds(x, y) if mode == "step" else {engine.layout.input_name: x}
        for _ in range(cfg["warmup"] + cfg["profiled"]):
            session.run(None, feeds)
        result[f"profile_{mode}"] = session.end_profiling()
        del session
    result["onnxruntime"] = onnxruntime.__version__
    result["images"] = len(data)
    result["input_checksum"] = float(np.asarray(x, np.float64).sum())
    return result


def ab_worker(cfg: dict) -> dict:
    """Interleaved rounds over artifact folders (``<size>px/{plan.json,artifact}`` each): the median
    over rounds of each one's median step CPU ms (session.run + SGD update), and its inference ms."""
    import numpy as np

    from edge_trady.core.plan import Plan
    from edge_trady.device.heap import pin_mmap_threshold
    from edge_trady.device.runner import plan_sampler
    from edge_trady.engines.portable import PortableEngine

    pin_mmap_threshold()
    size, folders = cfg["size"], cfg["folders"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((cfg["batch"], 3, size, size), dtype=np.float32)
    y = rng.integers(0, 10, cfg["batch"])
    engines = []
    for folder in folders:
        base = Path(folder) / f"{size}px"
        engine = PortableEngine(base / "artifact", threads=1)
        engine.set_selection(plan_sampler(Plan.load(base / "plan.json")).select(0))
        engine.train_step(x, y, 0.0)
        engines.append(engine)
    steps: dict[str, list[float]] = {f: [] for f in folders}
    inference: dict[str, list[float]] = {f: [] for f in folders}
    for _ in range(cfg["rounds"]):
        for folder, engine in zip(folders, engines, strict=True):
            for mode, times in (("step", steps), ("predict", inference)):
                measured = []
                for index in range(1 + cfg["steps"]):
                    started = time.process_time()
                    engine.train_step(x, y, 0.0) if mode == "step" else engine.predict(x)
                    if index:  # the first call of a mode may create its session
                        measured.append(time.process_time() - started)
                times[folder].append(statistics.median(measured))
    return {f: {"step_ms": 1e3 * statistics.median(steps[f]), "inference_ms": 1e3 * statistics.median(inference[f])}
            for f in folders}  # fmt: skip


def run_worker(cfg: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
    command = [str(device_python()), str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed:\n{done.stderr[-3000:]}")
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def measure(size: int, args: argparse.Namespace, directory: Path) -> dict:
    """Export, time and profile at ``size``; the row of the summary and the per-op-type rows."""
    import onnx

    from edge_trady.core.plan import Plan
    from edge_trady.device.runner import plan_sampler
    from edge_trady.engines.portable_format import PortableLayout
    from edge_trady.workstation.export.step_profile import kernel_times, node_phases, step_flops

    here = directory / f"{size}px"
    plan_path, artifact = here / "plan.json", here / "artifact"
    if not args.reuse:
        make_plan("portable", size, args.batch_size, args.budget, args.per_class, args.profile, plan_path)
        cli("export", str(plan_path), "-o", str(artifact), "--quiet")
    cfg = {
        "plan": str(plan_path),
        "artifact": str(artifact),
        "out": str(here),
        "threads": args.threads,
        "per_class": args.per_class,
        "warmup": args.warmup,
        "steps": args.steps,
        "profiled": args.profiled,
    }
    timed = run_worker(cfg)
    layout = PortableLayout.load(artifact)
    forward = onnx.load(artifact / layout.inference_model)
    step = onnx.load(artifact / layout.step_model, load_external_data=False)
    optimized = onnx.load(here / "optimized-step.onnx", load_external_data=False)
    events = json.loads(Path(timed["profile_step"]).read_text())
    micros, ops, run_us = kernel_times(events, args.profiled)
    phases = node_phases(step.graph, optimized.graph, forward.graph, ops)
    scale = timed["step"] * 1e3 / (run_us / 1e3)  # profiled wall ms -> measured CPU ms
    by_phase: Counter = Counter()
    by_op: dict[tuple[str, str], list[float]] = {}
    for name, us in micros.items():
        phase = phases[name]
        by_phase[phase] += us / 1e3 * scale
        entry = by_op.setdefault((ops[name], phase), [0.0, 0])
        entry[0] += us / 1e3 * scale
        entry[1] += 1
    by_phase["executor"] = timed["step"] * 1e3 - sum(by_phase.values())
    infer_events = json.loads(Path(timed["profile_predict"]).read_text())
    infer_micros, infer_ops, infer_run = kernel_times(infer_events, args.profiled)
    infer_scale = timed["inference"] * 1e3 / (infer_run / 1e3)
    infer_by_op: Counter = Counter()
    for name, us in infer_micros.items():
        infer_by_op[infer_ops[name]] += us / 1e3 * infer_scale
    selection = plan_sampler(Plan.load(plan_path)).select(0)
    flops = step_flops(forward, layout, selection, args.batch_size)
    inference_ms = timed["inference"] * 1e3
    step_ms = timed["step"] * 1e3
    total_ms = step_ms + 1e3 * timed["optimizer update"]  # data loading is the inference pass's too
    row = {
        "image_size": size,
        "batch_size": args.batch_size,
        "budget": args.budget,
        "threads": args.threads,
        "channels": selection.channel_count,
        "step_ms": step_ms,
        "step_wall_ms": timed["step_wall"] * 1e3,
        **{f"{p.replace(' ', '_')}_ms": by_phase.get(p, 0.0) for p in phases()},
        "optimizer_update_ms": timed["optimizer update"] * 1e3,
        "data_loading_ms": timed["data loading"] * 1e3,
        "session_recreation_ms": timed["session re-creation"] * 1e3,
        "total_ms": total_ms,
        "inference_ms": inference_ms,
        "step_over_inference": total_ms / inference_ms,
        "forward_gmacs": flops.forward / 1e9,
        "input_gradient_gmacs": flops.input_gradients / 1e9,
        "weight_gradient_gmacs": flops.weight_gradients / 1e9,
        "floor_passes": flops.floor_passes,
        "floor_ms": flops.floor_passes * inference_ms,
        "step_over_floor": total_ms / (flops.floor_passes * inference_ms),
        "nodes_run": len(micros),
        "onnxruntime": timed["onnxruntime"],
    }
    op_rows = [
        {"image_size": size, "op_type": op, "phase": phase, "ms": ms, "nodes": count}
        for (op, phase), (ms, count) in sorted(by_op.items(), key=lambda kv: -kv[1][0])
    ]
    op_rows += [
        {"image_size": size, "op_type": op, "phase": "inference pass", "ms": ms, "nodes": 0}
        for op, ms in infer_by_op.most_common()
    ]
    return {"row": row, "ops": op_rows}


def compare(args: argparse.Namespace) -> None:
    """``--ab``: the step and inference CPU time of each kept artifact set, interleaved in one worker."""
    lines = ["| px | artifacts | step ms | inference ms | step / inference | vs the first |", "|---" * 6 + "|"]
    for size in args.image_sizes:
        folders = [str(f) for f in args.ab]
        cfg = {"size": size, "folders": folders, "batch": args.batch_size, "rounds": 4, "steps": 5, "threads": 1}
        result = run_worker(cfg)
        first = result[cfg["folders"][0]]["step_ms"]
        for folder in cfg["folders"]:
            r = result[folder]
            ratio = r["step_ms"] / r["inference_ms"]
            lines.append(
                f"| {size} | {Path(folder).name} | {r['step_ms']:.1f} | {r['inference_ms']:.1f} | {ratio:.2f}x | "
                f"{100 * (r['step_ms'] / first - 1):+.1f} % |"
            )
    print("\n".join(lines) + f"\n\n(load {os.getloadavg()[0]:.1f})")


def render(path: Path) -> None:
    """The tables of ``path`` (a JSON this script wrote), the step total and ratios derived again."""
    data = json.loads(path.read_text())
    for r in data["rows"]:
        r["total_ms"] = r["step_ms"] + r["optimizer_update_ms"]
        r["step_over_inference"] = r["total_ms"] / r["inference_ms"]
        r["step_over_floor"] = r["total_ms"] / r["floor_ms"]
    rows, ops = data["rows"], data["ops"]
    print("\n\n".join([summary_table(rows), phase_table(rows), *(op_table(ops, r["image_size"], 15) for r in rows)]))
    print(f"\n(measured {data['meta']['measured']}, load {data['meta']['load']:.1f}: {data['meta']['command']})")
    write(path.parent, path.stem, data["meta"], rows, ops)


def write(folder: Path, stem: str, meta: dict, rows: list[dict], ops: list[dict]) -> None:
    from edge_trady.core.atomic import write_json

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{stem}.json", {"meta": meta, "rows": rows, "ops": ops})
    with open(folder / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, folder / f"{stem}.png")


def phase_table(rows: list[dict]) -> str:
    sizes = " | ".join(f"{r['image_size']} px ms | share" for r in rows)
    head = f"| part of a step (CPU time, {rows[0]['threads']} thread) | {sizes} |"
    lines = [head, "|---" * (1 + 2 * len(rows)) + "|"]
    for part in (*phases(), "optimizer update"):
        key = f"{part.replace(' ', '_')}_ms"
        cells = " | ".join(f"{r[key]:.1f} | {100 * r[key] / r['total_ms']:.0f} %" for r in rows)
        lines.append(f"| {part} | {cells} |")
    lines.append("| **step** | " + " | ".join(f"**{r['total_ms']:.1f}** | 100 %" for r in rows) + " |")
    loading = " | ".join(f"{r['data_loading_ms']:.1f} | " for r in rows)
    lines.append(f"| data loading (not in the step) | {loading} |")
    lines.append("| *inference pass (reference)* | " + " | ".join(f"{r['inference_ms']:.1f} | " for r in rows) + " |")
    lines.append("| *FLOP floor (reference)* | " + " | ".join(f"{r['floor_ms']:.1f} | " for r in rows) + " |")
    lines.append(
        "| session re-creation, per epoch | " + " | ".join(f"{r['session_recreation_ms']:.1f} | " for r in rows) + " |"
    )
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    lines = [
        "| px | channels | step ms | inference ms | step / inference | floor (inference passes) | step / floor "
        "| nodes run | ONNX Runtime |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['image_size']} | {r['channels']} | {r['total_ms']:.1f} | {r['inference_ms']:.1f} | "
            f"**{r['step_over_inference']:.2f}x** | {r['floor_passes']:.2f} | {r['step_over_floor']:.2f}x | "
            f"{r['nodes_run']} | {r['onnxruntime']} |"
        )
    return "\n".join(lines)


def op_table(ops: list[dict], size: int, top: int) -> str:
    mine = [o for o in ops if o["image_size"] == size and o["phase"] != "inference pass"]
    lines = [f"| {size} px: op type | phase | ms | nodes |", "|---|---|---|---|"]
    lines += [f"| {o['op_type']} | {o['phase']} | {o['ms']:.2f} | {o['nodes']} |" for o in mine[:top]]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_trady.core.atomic import replacing

    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        left = 0.0
        for part in (*phases(), "optimizer update"):
            value = r[f"{part.replace(' ', '_')}_ms"]
            ax.barh(2, value, left=left, label=part)
            left += value
        ax.barh(1, r["inference_ms"], color="grey")
        ax.barh(0, r["floor_ms"], color="black")
        ax.set_yticks([0, 1, 2], ["FLOP floor", "inference pass", "training step"])
        ax.set_xlabel(f"ms per batch of {r['batch_size']} (CPU time, {r['threads']} thread)")
        ratios = f"step {r['step_over_inference']:.2f}x inference, {r['step_over_floor']:.2f}x floor"
        ax.set_title(f"{r['image_size']} px: {ratios}")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"EfficientNet-Lite0 portable step, TraDy {rows[0]['budget']}")
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget", default="2%")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--profile", default="this-workstation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--profiled", type=int, default=4, help="profiled runs (after --warmup)")
    parser.add_argument("--tag", help="write bench/results/step_profile/step_profile-TAG.* instead")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (artifacts, profiles)")
    parser.add_argument(
        "--reuse", action="store_true", help="profile the plans and artifacts already in --keep (e.g. exported earlier)"
    )
    parser.add_argument(
        "--ab", type=Path, nargs="+", help="compare kept artifact sets (folders as --keep makes), interleaved"
    )
    parser.add_argument("--render", type=Path, help="the tables of an earlier run's JSON again (and its files)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        render(args.render)
        return
    if args.reuse and not args.keep:
        parser.error("--reuse needs --keep DIR")
    if args.worker:
        cfg = json.loads(args.worker)
        print("RESULT " + json.dumps(ab_worker(cfg) if "folders" in cfg else worker(cfg)), flush=True)
        return
    if args.ab:
        compare(args)
        return
    started = time.monotonic()
    load = os.getloadavg()[0]
    rows, ops = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.image_sizes:
            measured = measure(size, args, args.keep or Path(tmp))
            rows.append(measured["row"])
            ops += measured["ops"]
            print(summary_table(rows[-1:]), flush=True)
    load = max(load, os.getloadavg()[0])
    text = "\n\n".join([summary_table(rows), phase_table(rows), *(op_table(ops, r["image_size"], 15) for r in rows)])
    print(f"\n{text}")
    folder, stem = (RESULTS / "step_profile", f"step_profile-{args.tag}") if args.tag else (RESULTS, "step_profile")
    meta = {
        "command": "python bench/step_profile.py " + " ".join(sys.argv[1:]),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": time.monotonic() - started,
        "load": load,
    }
    write(folder, stem, meta, rows, ops)
    print(f"\nwritten to {folder}/{stem}.{{json,csv,png}} (load {load:.1f})")


if __name__ == "__main__":
    main()
