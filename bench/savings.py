"""Does the sparse engine really save the memory? Training overhead and step time per engine.

EfficientNet-Lite0 on Fashion-MNIST batches, TraDy selections (top-K of the ranking in
bench/results/) at a few budgets. For every engine and budget, in a FRESH process with one thread:

1. build data, model, engine and the epoch's selection; two no-grad forward passes (warm-up);
2. return freed heap to the OS (``malloc_trim``) and reset the peak RSS (``/proc/self/clear_refs``)
   so that the data-loading transient cannot hide training memory;
3. one no-grad forward pass: the inference peak (VmHWM);
4. training steps (``--warmup`` + ``--steps`` timed): the training peak (VmHWM); overhead = training -
   inference.

Per-step CPU time is ``time.process_time()`` (the machine is shared; wall time is reported too).
Diagnostics in the same process after the peaks are read: the bytes autograd saves for backward and
the torch-allocated peak of one step minus that of one inference (torch profiler), i.e. what the
overhead would be with an allocator that returns every freed byte at once.

Every row runs ``--repeats`` times with PYTHONHASHSEED = 0, 1, ... (the hash seed changes the
allocation order and with it glibc's heap layout: the peak RSS varies by tens of MiB between seeds;
a fixed seed reproduces it): the table shows medians and the overhead range; diagnostics come from
the first repeat. The theoretical minimum is computed, not measured (see ``minimum``). Rows:

    full            every Conv/Linear weight trained, torch-masked engine (budget-independent)
    masked          torch-masked engine (full backward of the selected layers, then masked)
    sparse          torch-sparse engine (bool ReLU masks)
    sparse-packed   torch-sparse engine, 1-bit ReLU masks
    ... +trim       malloc_trim(0) after every step (glibc)
    ... arena2      environment MALLOC_ARENA_MAX=2
    ... mmap64k     environment MALLOC_MMAP_THRESHOLD_=65536 (fixed: big blocks always mmap'ed)

    python bench/savings.py

Writes bench/results/savings.{csv,json,png} and docs/savings.md (keeps the text after the
``<!-- discussion -->`` marker); ``--rewrite`` redoes those from savings.json without measuring.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import RESULTS, ROOT, ensure_ranking, reset_peak_rss

DOC = ROOT / "docs" / "savings.md"
MODEL = "efficientnet-lite0"
MiB = 2**20
MARKER = "<!-- discussion -->"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
ROW_ORDER = (
    "full", "full +trim", "masked", "sparse", "sparse +trim", "sparse-packed", "sparse arena2",
    "sparse mmap64k", "min + bwd transient", "theoretical min",
)  # fmt: skip
ALLOCATORS = {
    "default": {},
    "trim": {},  # in-process: malloc_trim(0) after every step
    "arena2": {"MALLOC_ARENA_MAX": "2"},
    "mmap64k": {"MALLOC_MMAP_THRESHOLD_": "65536"},
}


# ----------------------------------------------------------------------------------------- worker


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


LIBC = _libc()


def malloc_trim() -> None:
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


def activation_trace(model, image_size: int) -> list[tuple[str, str, int, int]]:
    """(kind, module name, input numel, output numel) of every Conv2d/Linear ("layer") and
    ReLU/ReLU6/Hardtanh ("clamp") call in execution order, for one sample."""
    import torch
    from torch import nn

    names = {module: name for name, module in model.named_modules()}
    calls: list[tuple[str, str, int, int]] = []

    def hook(module, inputs, output) -> None:
        kind = "clamp" if isinstance(module, (nn.ReLU, nn.Hardtanh)) else "layer"
        calls.append((kind, names[module], inputs[0].numel(), output.numel()))

    kinds = (nn.Conv2d, nn.Linear, nn.ReLU, nn.Hardtanh)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def minimum(model, layers, classifier: str, selection, image_size: int, batch: int) -> dict[str, int]:
    """Bytes a step must keep beyond inference, fp32, exact from the model's activation shapes:

    - ``selected_acts``: batch * sum_l |S_l| * H_l * W_l * 4 (the selected input channels);
    - ``weight_grads``: sum_l |S_l| * Cw_l * 4;
    - ``classifier``: its input (batch * 1280 * 4) + its weight and bias gradients;
    - ``relu_masks``: 1 bit per output value of every ReLU6 call after the earliest selected layer
      (the backprop chain to the loss), times the batch;
    - ``bwd_transient`` (not in ``total``): the largest gradient pair (a layer's output and input
      gradient, or the earliest layer's output gradient) that back-propagation through the chain
      must hold at once: a lower bound of the backward working set.
    """
    by_name = {layer.name: layer for layer in layers}
    calls = activation_trace(model, image_size)
    layer_index = {name: i for i, (kind, name, _, _) in enumerate(calls) if kind == "layer"}
    chosen = [name for name, idx in selection.channels.items() if len(idx)]
    earliest = min((layer_index[name] for name in chosen), default=layer_index[classifier])
    acts = sum(len(selection.channels[n]) * by_name[n].act_units_per_channel for n in chosen)
    grads = sum(len(selection.channels[n]) * by_name[n].weight_units_per_channel for n in chosen)
    head = by_name[classifier]
    mask_values = sum(c[3] for c in calls[earliest + 1 :] if c[0] == "clamp")
    transient = max([calls[earliest][3]] + [c[2] + c[3] for c in calls[earliest + 1 :] if c[0] == "layer"])
    parts = {
        "selected_acts": 4 * batch * acts,
        "weight_grads": 4 * grads,
        "classifier": 4 * (batch * head.in_channels + head.in_channels * head.out_channels + head.out_channels),
        "relu_masks": (batch * mask_values + 7) // 8,
    }
    parts["total"] = sum(parts.values())
    parts["bwd_transient"] = 4 * batch * transient
    parts["earliest_layer"] = calls[earliest][1]  # type: ignore[assignment]
    return parts


def torch_peak(fn) -> int:
    """Peak of torch-allocated CPU bytes while ``fn`` runs, above the level at its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in deltas:
        level += nbytes
        peak = max(peak, level)
    return peak


def worker(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from edge_trady.core.budget import parse_budget
    from edge_trady.core.layers import full_units
    from edge_trady.device.data import epoch_order, load_dataset
    from edge_trady.device.memwatch import current_rss_bytes, peak_rss_bytes
    from edge_trady.device.runner import channel_sampler
    from edge_trady.engines.torch_masked import TorchMaskedEngine
    from edge_trady.engines.torch_sparse import SavedTensorLedger, TorchSparseEngine
    from edge_trady.workstation.cost_trace import trace_layers
    from edge_trady.workstation.models import build_model, model_normalization
    from edge_trady.workstation.ranking import Ranking

    size, batch, seed, engine_name = cfg["image_size"], cfg["batch_size"], cfg["seed"], cfg["engine"]
    data = load_dataset("fashion-mnist", "train", size, model_normalization(MODEL), cfg["per_class"], seed)
    built = build_model(MODEL, data.num_classes, size, seed)
    layers = trace_layers(built.module, size)
    candidates = [layer for layer in layers if layer.name != built.classifier]
    budget = parse_budget(cfg["budget"]).resolve(full_units(layers))
    method = "full" if engine_name == "full" else "trady"
    top_k = None if method == "full" else Ranking.load(Path(cfg["ranking"])).top_k()
    sampler = channel_sampler(method, candidates, top_k, budget, batch, seed, "skip")
    selection = sampler.select(0)
    if engine_name in ("full", "masked"):
        engine = TorchMaskedEngine(built.module, layers, built.classifier)
    else:
        engine = TorchSparseEngine(built.module, layers, built.classifier, engine_name == "sparse-packed")
    engine.set_selection(selection)
    order = epoch_order(len(data), seed, 0)
    batches = [b for b in data.batches(batch, order) if len(b[1]) == batch]
    x0, y0 = batches[0]
    for _ in range(2):
        engine.predict(x0)
    setup_peak = peak_rss_bytes()
    gc.collect()
    malloc_trim()
    reset = reset_peak_rss()
    engine.predict(x0)
    inference_peak = peak_rss_bytes()
    trim = cfg["allocator"] == "trim"
    cpu, wall = [], []
    for step in range(cfg["warmup"] + cfg["steps"]):
        x, y = batches[step % len(batches)]
        started_cpu, started_wall = time.process_time(), time.perf_counter()
        engine.train_step(x, y, 0.01)
        if trim:
            malloc_trim()
        if step >= cfg["warmup"]:
            cpu.append(time.process_time() - started_cpu)
            wall.append(time.perf_counter() - started_wall)
    train_peak = peak_rss_bytes()
    end_rss = current_rss_bytes()
    # Diagnostics (after the peaks were read): what autograd saves, what torch allocates.
    saved = torch_step = torch_infer = 0
    if not cfg["diagnostics"]:
        pass
    elif isinstance(engine, TorchSparseEngine):
        saved = engine.saved_bytes(x0, y0)["total"]
    else:
        shared = [*built.module.parameters(), *built.module.buffers()]
        with SavedTensorLedger(shared) as ledger:
            torch.nn.functional.cross_entropy(built.module(torch.from_numpy(x0)), torch.from_numpy(y0))
        saved = ledger.totals()["total"]
    if cfg["diagnostics"]:
        gc.collect()
        torch_step = torch_peak(lambda: engine.train_step(x0, y0, 0.01))
        torch_infer = torch_peak(lambda: engine.predict(x0))
    result = {
        "channels": selection.channel_count,
        "layers": len(selection.channels),
        "units": selection.cost,
        "budget_units": budget.amount,
        "setup_peak": setup_peak,
        "hwm_reset": reset,
        "inference_peak": inference_peak,
        "train_peak": train_peak,
        "end_rss": end_rss,
        "overhead": train_peak - inference_peak,
        "cpu_step_s": statistics.median(cpu),
        "wall_step_s": statistics.median(wall),
        "autograd_saved": saved,
        "torch_overhead": torch_step - torch_infer,
        "threads": torch.get_num_threads(),
    }
    if cfg.get("minimum"):
        result["minimum"] = minimum(built.module, layers, built.classifier, selection, size, batch)
    return result


# ----------------------------------------------------------------------------------------- parent


def run_row(cfg: dict) -> list[dict]:
    """Run ``cfg`` once per hash seed, each in a fresh process; results in seed order."""
    results = []
    for repeat in range(cfg["repeats"]):
        env = {**os.environ, **ONE_THREAD, **ALLOCATORS[cfg["allocator"]], "PYTHONHASHSEED": str(repeat)}
        task = {**cfg, "diagnostics": repeat == 0, "minimum": cfg["minimum"] and repeat == 0}
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"worker failed for {task}:\n{done.stderr[-3000:]}")
        line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]))
    return results


def plan_rows(args: argparse.Namespace) -> list[dict]:
    """The configurations to measure, in order."""
    rows = []
    smallest = args.budgets[0]
    for size in args.image_sizes:
        common = {
            "image_size": size,
            "batch_size": args.batch_size,
            "seed": 0,
            "per_class": args.per_class,
            "warmup": args.warmup,
            "steps": args.steps,
            "repeats": args.repeats,
            "ranking": str(ensure_ranking(size)),
        }
        for budget in args.budgets:
            first = budget == smallest
            engines = [("full", "default"), ("full", "trim")] if first else []
            engines += [("masked", "default"), ("sparse", "default")]
            if first:
                engines += [("sparse", "trim"), ("sparse-packed", "default")]
                engines += [] if args.quick else [("sparse", "arena2"), ("sparse", "mmap64k")]
            for engine, allocator in engines:
                minimum_here = engine == "sparse" and allocator == "default"
                rows.append(
                    {
                        **common,
                        "budget": budget,
                        "engine": engine,
                        "allocator": allocator,
                        "minimum": minimum_here,
                    }
                )
    return rows


def label(row: dict) -> str:
    allocator = row["allocator"]
    if allocator == "default":
        return row["engine"]
    return f"{row['engine']} +trim" if allocator == "trim" else f"{row['engine']} {allocator}"


def flatten(cfg: dict, results: list[dict]) -> dict:
    """One table row: medians over the repeats (and the range of the overhead)."""

    def median(key: str, scale: float = 1.0) -> float:
        return statistics.median(r[key] for r in results) / scale

    first = results[0]
    overheads = [r["overhead"] / MiB for r in results]
    return {
        "image_size": cfg["image_size"],
        "budget": cfg["budget"],
        "engine": label(cfg),
        "allocator": cfg["allocator"],
        "layers": first["layers"],
        "channels": first["channels"],
        "overhead_mib": statistics.median(overheads),
        "overhead_min_mib": min(overheads),
        "overhead_max_mib": max(overheads),
        "overheads_mib": " ".join(f"{o:.1f}" for o in overheads),
        "cpu_step_s": median("cpu_step_s"),
        "wall_step_s": median("wall_step_s"),
        "inference_peak_mib": median("inference_peak", MiB),
        "train_peak_mib": median("train_peak", MiB),
        "setup_peak_mib": median("setup_peak", MiB),
        "autograd_saved_mib": first["autograd_saved"] / MiB,
        "torch_overhead_mib": first["torch_overhead"] / MiB,
        "repeats": len(results),
    }


def theory_rows(cfg: dict, result: dict) -> list[dict]:
    parts = result["minimum"]
    base = {
        "image_size": cfg["image_size"],
        "budget": cfg["budget"],
        "allocator": "-",
        "layers": result["layers"],
        "channels": result["channels"],
    }
    return [
        {**base, "engine": "theoretical min", "overhead_mib": parts["total"] / MiB},
        {
            **base,
            "engine": "min + bwd transient",
            "overhead_mib": (parts["total"] + parts["bwd_transient"]) / MiB,
        },
    ]


def fmt(value, spec: str) -> str:
    return "" if value is None or value == "" else format(value, spec)


def spread(row: dict) -> str:
    if row.get("repeats", 1) < 2:
        return ""
    return f" ({row['overhead_min_mib']:.0f}-{row['overhead_max_mib']:.0f})"


def table(rows: list[dict]) -> str:
    lines = [
        "| px | budget | engine | layers / channels | overhead MiB (range) | x theory min | CPU s/step | wall s/step "
        "| autograd saved MiB | torch-allocated overhead MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['image_size']} | {r['budget']} | {r['engine']} | {r['layers']} / {r['channels']} | "
            f"{fmt(r['overhead_mib'], '.1f')}{spread(r)} | {fmt(r.get('x_min'), '.1f')} "
            f"| {fmt(r.get('cpu_step_s'), '.3f')} "
            f"| {fmt(r.get('wall_step_s'), '.3f')} | {fmt(r.get('autograd_saved_mib'), '.1f')} "
            f"| {fmt(r.get('torch_overhead_mib'), '.1f')} |"
        )
    return "\n".join(lines)


def add_ratios(rows: list[dict]) -> None:
    theory = {(r["image_size"], r["budget"]): r["overhead_mib"] for r in rows if r["engine"] == "theoretical min"}
    for r in rows:
        r["x_min"] = r["overhead_mib"] / theory[(r["image_size"], r["budget"])]


def find(rows: list[dict], size: int, budget: str, engine: str) -> dict | None:
    return next((r for r in rows if (r["image_size"], r["budget"], r["engine"]) == (size, budget, engine)), None)


def targets(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """One line per image size and target: met or missed, by how much."""
    lines = []
    smallest = args.budgets[0]
    for size in args.image_sizes:
        full = find(rows, size, smallest, "full")
        for variant in ("sparse", "sparse +trim"):
            sparse = find(rows, size, smallest, variant)
            if full and sparse:
                factor = full["overhead_mib"] / sparse["overhead_mib"]
                verdict = "met" if factor >= 10 else "MISSED"
                lines.append(
                    f"- {size} px, {smallest}, {variant}: {sparse['overhead_mib']:.1f} MiB "
                    "vs full fine-tuning "
                    f"{full['overhead_mib']:.1f} MiB = {factor:.1f}x lower (target >= 10x): **{verdict}**"
                )
        for budget in args.budgets:
            sparse = find(rows, size, budget, "sparse")
            masked = find(rows, size, budget, "masked")
            if not (sparse and masked):
                continue
            verdict = "met" if sparse["x_min"] <= 1.5 else "MISSED"
            best = min(
                (r for r in rows if (r["image_size"], r["budget"]) == (size, budget) and "sparse" in r["engine"]),
                key=lambda r: r["overhead_mib"],
            )
            speed = sparse["cpu_step_s"] / masked["cpu_step_s"]
            lines.append(
                f"- {size} px, {budget}: sparse {sparse['x_min']:.1f}x the theoretical minimum "
                f"(target <= 1.5x): **{verdict}** (best sparse variant, {best['engine']}: "
                f"{best['x_min']:.1f}x); CPU time per step "
                f"{speed:.2f}x the masked engine's: **{'met' if speed < 1 else 'MISSED'}**"
            )
    return lines


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [
        ("full", "k", "-", "o"),
        ("masked", "tab:orange", "-", "s"),
        ("sparse", "tab:blue", "-", "^"),
        ("sparse-packed", "tab:cyan", "--", "v"),
        ("sparse +trim", "tab:green", "-", "D"),
        ("sparse arena2", "tab:olive", "", "x"),
        ("sparse mmap64k", "tab:purple", "", "+"),
        ("min + bwd transient", "tab:red", ":", "."),
        ("theoretical min", "tab:gray", ":", "."),
    ]
    shares = [float(b.rstrip("%")) for b in args.budgets]
    fig, axes = plt.subplots(1, len(args.image_sizes), figsize=(6 * len(args.image_sizes), 5), sharey=True)
    axes = list(axes) if len(args.image_sizes) > 1 else [axes]
    for ax, size in zip(axes, args.image_sizes, strict=True):
        for engine, color, style, marker in engines:
            points = [(s, find(rows, size, b, engine)) for s, b in zip(shares, args.budgets, strict=True)]
            points = [(s, r["overhead_mib"]) for s, r in points if r is not None]
            if engine == "full" and points:  # budget-independent
                points = [(shares[0], points[0][1]), (shares[-1], points[0][1])]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, linestyle=style or "none", marker=marker, color=color, label=engine)
        ax.set_yscale("log")
        ax.set_xticks(shares, args.budgets)
        ax.set_xlabel("TraDy budget (share of full fine-tuning units)")
        ax.set_title(f"{MODEL}, {size} px, batch {args.batch_size}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("training overhead over inference (MiB, VmHWM)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)


def write(rows: list[dict], meta: dict, minima: dict, args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for r in rows for key in r))
    with (RESULTS / "savings.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(rows)
    (RESULTS / "savings.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, args, RESULTS / "savings.png")
    text = table(rows)
    checks = "\n".join(targets(rows, args))
    print(text)
    print(checks)
    parts = "\n".join(
        f"- {size} px, {budget}: earliest selected layer `{m['earliest_layer']}`; "
        + ", ".join(f"{k} {v / MiB:.2f}" for k, v in m.items() if k != "earliest_layer")
        + " MiB"
        for (size, budget), m in minima.items()
    )
    tail = DOC.read_text().split(MARKER, 1)[1] if DOC.exists() and MARKER in DOC.read_text() else "\n"
    DOC.write_text(
        f"# Training memory overhead and step time per engine\n\n"
        f"Command: `{meta['command']}` ({meta['minutes']:.0f} min on {meta['machine']}; "
        f"torch {meta['torch']}). Raw rows: `bench/results/savings.csv` / `.json`; plot: "
        f"`bench/results/savings.png`.\n\n"
        f"{MODEL}, Fashion-MNIST ({args.per_class} train images/class, only full batches), batch "
        f"{args.batch_size}, TraDy selection of epoch 0 from the top-K of "
        f"`bench/results/ranking-{MODEL}-<px>px.json`. Every row is a fresh process with one thread "
        f"(`torch.set_num_threads(1)`, `OMP_NUM_THREADS=1`), run {args.repeats} times with "
        f"`PYTHONHASHSEED` = 0..{args.repeats - 1}: the hash seed changes Python's allocation order and "
        f"with it glibc's heap layout, which moves the peak by tens of MiB (a fixed seed reproduces it "
        f"to 0.1 MiB); the table shows medians and the (min-max) range. **overhead** = VmHWM after "
        f"{args.warmup} + {args.steps} training steps minus VmHWM after one no-grad forward pass on the "
        f"same batch; before that forward pass the process returns its free heap (`malloc_trim(0)`) "
        f"and resets VmHWM (`/proc/self/clear_refs`), so the data-loading transient cannot hide "
        f"training memory. **CPU s/step** = median `time.process_time()` of the {args.steps} timed "
        f"steps, median over the repeats (the machine is shared with other jobs: wall time is shown but unreliable). "
        f"**autograd saved** = bytes autograd keeps for backward (storage counted once, model "
        f"tensors excluded); **torch-allocated overhead** = torch profiler peak of one training step "
        f"minus that of one inference (what an allocator that returns memory at once would show); "
        f"both from the first repeat. "
        f"**x theory min** = overhead / theoretical minimum.\n\n"
        f"Theoretical minimum (bytes, fp32): selected input channels (batch * sum |S| * H * W * 4) + "
        f"their weight gradients (sum |S| * Cw * 4) + classifier input and gradients + 1-bit ReLU6 "
        f"masks for every ReLU6 output after the earliest selected layer (the backprop chain to the "
        f"loss), counted exactly from the model's activation shapes. It leaves out the backward "
        f"working set; `min + bwd transient` adds its lower bound: the largest (output gradient + "
        f"input gradient) pair of one layer on that chain.\n\n{parts}\n\n{text}\n\n"
        f"Targets (computed by the script):\n\n{checks}\n\n{MARKER}{tail}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--budgets", nargs="+", default=["1%", "2.5%", "5%"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes (hash seeds) per row")
    parser.add_argument("--quick", action="store_true", help="skip the arena2 and mmap64k rows")
    parser.add_argument("--rewrite", action="store_true", help="rewrite outputs from savings.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.rewrite:  # tables, plot and doc again from savings.json, without measuring
        saved = json.loads((RESULTS / "savings.json").read_text())
        minima = {}
        for key, parts in saved["meta"]["minimum"].items():
            size, budget = key.split(" ")
            minima[(int(size.removesuffix("px")), budget)] = parts
        write(saved["rows"], saved["meta"], minima, args)
        return
    started = time.monotonic()
    rows: list[dict] = []
    minima: dict = {}
    for cfg in plan_rows(args):
        results = run_row(cfg)
        result = results[0]
        row = flatten(cfg, results)
        rows.append(row)
        print(
            f"{cfg['image_size']:4} px {cfg['budget']:>5} {row['engine']:16} "
            f"overhead {row['overhead_mib']:7.1f} MiB [{row['overheads_mib']}]"
            f"  CPU {row['cpu_step_s']:.3f} s/step  wall {row['wall_step_s']:.3f} s/step"
            f"  (torch {row['torch_overhead_mib']:.1f} MiB, saved {row['autograd_saved_mib']:.1f} MiB)",
            flush=True,
        )
        if "minimum" in result:
            rows.extend(theory_rows(cfg, result))
            minima[(cfg["image_size"], cfg["budget"])] = result["minimum"]
    order = {b: i for i, b in enumerate(args.budgets)}
    rank = {name: i for i, name in enumerate(ROW_ORDER)}
    rows.sort(key=lambda r: (r["image_size"], order[r["budget"]], rank.get(r["engine"], len(rank))))
    add_ratios(rows)
    command = (
        "python bench/savings.py --image-sizes "
        + " ".join(map(str, args.image_sizes))
        + " --budgets "
        + " ".join(args.budgets)
        + f" --batch-size {args.batch_size} --per-class {args.per_class}"
        + f" --warmup {args.warmup} --steps {args.steps} --repeats {args.repeats}"
        + (" --quick" if args.quick else "")
    )
    import torch

    meta = {
        "command": command,
        "minutes": (time.monotonic() - started) / 60,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "minimum": {f"{s}px {b}": m for (s, b), m in minima.items()},
    }
    write(rows, meta, minima, args)


if __name__ == "__main__":
    main()
