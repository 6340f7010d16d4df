"""Training speed and peak memory of every engine, side by side, each in fresh processes.

EfficientNet-Lite0, real Fashion-MNIST, 64 px, batch 32, TraDy at a 2 % budget (top-K of
bench/results/ranking-efficientnet-lite0-64px.json). For each engine ``benchlib.train_fresh`` makes
the plan (``edge-trady plan --engine E``; same ranking, budget and seed, so the same selection) and
trains one epoch with the real command in a fresh process:

- ``portable``: ``edge-trady run`` on the ``--format onnx`` artifact, in .venv-device (plain
  onnxruntime 1.32, no torch);
- ``ort``: ``edge-trady run`` on the ``--format ort-training`` artifact (onnxruntime-training 1.19.2);
- ``torch-sparse`` / ``torch-masked``: ``edge-trady finetune --plan``;
- ``torch-full``: full fine-tuning (every Conv/Linear weight; ``--method full-frozen-bn``, masked engine).

**Whole-process peak** = that process's VmHWM (imports, data loading, artifact/model, training,
evaluation, checkpoint, final model export). **Inference-only peak** = VmHWM of a fresh process of
the same runtime that loads the same data the same way, then the fine-tuned model (plain
onnxruntime / onnxruntime-training's onnxruntime with torch blocked, as the runner; torch in
``eval()`` under ``no_grad``) and predicts every training batch; the ONNX Runtime workers pin glibc's
mmap threshold as the runner does (``device/heap.py``). **Training overhead** = whole-process peak
minus its runtime's inference-only peak.

Speed: a worker process per engine (one thread: ``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``,
ORT ``intra_op_num_threads=1``) runs the engine on the same batches with the plan's epoch-0
selection: warm-up + timed training steps. Images/s = batch / median ``time.process_time()`` per step
(CPU time: the machine is shared, so wall time is not a measure of the engines).
The workers also give the training-phase peak (VmHWM reset by ``/proc/self/clear_refs`` after set-up).

    python bench/speed.py

Reference rows (with ``portable``): the inference pass of the same network and the step's FLOP floor
(``step_profile.step_flops``, in inference passes). Prints the table and the targets of issue 9 item 4
and issue 23; writes bench/results/speed.{csv,json,png} and docs/speed.md (keeps the text after
``<!-- discussion -->``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import MODEL, RESULTS, ROOT, SETUPS, device_python, make_plan, reset_peak_rss, train_fresh

from edge_trady.device.heap import pin_mmap_threshold

DOC = ROOT / "docs" / "speed.md"
MiB = 2**20
MARKER = "<!-- discussion -->"
RAW = RESULTS / "speed-raw.json"  # every measurement, saved as it is made (--resume)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
RUNTIMES = {  # engine -> the runtime whose inference-only peak it is compared with
    "portable": "onnxruntime",
    "ort": "onnxruntime-training",
    "torch-sparse": "torch",
    "torch-masked": "torch",
    "torch-full": "torch",
}


def worker(cfg: dict) -> dict:
    """One engine (or, for ``infer:RUNTIME``, inference only) in this fresh process."""
    from edge_trady.core.plan import Plan
    from edge_trady.device.data import Normalization, epoch_order, load_dataset, validation_source
    from edge_trady.device.memwatch import peak_rss_bytes
    from edge_trady.device.runner import plan_sampler

    plan = Plan.load(Path(cfg["plan"]))
    norm = Normalization.from_dict(plan.normalization)
    data = load_dataset("fashion-mnist", "train", plan.image_size, norm, cfg["per_class"], plan.seed)
    val_spec, val_split = validation_source(None, "fashion-mnist")
    load_dataset(val_spec, val_split, plan.image_size, norm, cfg["per_class"], plan.seed)  # as the runner does
    batches = [b for b in data.batches(plan.batch_size, epoch_order(len(data), plan.seed, 0))]
    batches = [b for b in batches if len(b[1]) == plan.batch_size]
    name = cfg["engine"]
    step = _predictor(name, cfg) if name.startswith("infer:") else _trainer(name, cfg, plan, plan_sampler(plan))
    step(*batches[0])
    setup_peak = peak_rss_bytes()
    reset = reset_peak_rss()
    cpu = []
    for index in range(cfg["warmup"] + cfg["steps"]):
        x, y = batches[index % len(batches)]
        started = time.process_time()
        step(x, y)
        if index >= cfg["warmup"]:
            cpu.append(time.process_time() - started)
    phase_peak = peak_rss_bytes()
    return {
        "phase_peak": phase_peak,
        "process_peak": max(setup_peak, phase_peak) if reset else phase_peak,
        "cpu_step_s": statistics.median(cpu),
        "torch_loaded": "torch" in sys.modules,
    }


def _trainer(name: str, cfg: dict, plan, sampler):
    """``step(x, y)``: one training step of engine ``name`` with the plan's epoch-0 selection."""
    if name in ("portable", "ort"):
        pin_mmap_threshold()  # as the runner's open_engine
    if name == "portable":
        from edge_trady.engines.portable import PortableEngine

        engine = PortableEngine(Path(cfg["artifact"]), threads=1)
    elif name == "ort":
        from edge_trady.engines.ort_training import C, OrtEngine

        options = C.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        engine = OrtEngine(Path(cfg["artifact"]), options=options)
    else:
        import torch

        torch.set_num_threads(1)
        from edge_trady.engines.torch_masked import TorchMaskedEngine
        from edge_trady.engines.torch_sparse import TorchSparseEngine
        from edge_trady.workstation.cost_trace import trace_layers
        from edge_trady.workstation.models import build_model

        built = build_model(plan.model, plan.num_classes, plan.image_size, plan.seed)
        layers = trace_layers(built.module, plan.image_size)
        kind = TorchSparseEngine if name == "torch-sparse" else TorchMaskedEngine
        engine = kind(built.module, layers, built.classifier)
    selection = sampler.select(0)
    engine.set_selection(selection)
    cfg["channels"], cfg["layers"] = selection.channel_count, len(selection.channels)
    return lambda x, y: engine.train_step(x, y, plan.lr)


def _predictor(name: str, cfg: dict):
    """``step(x, y)``: inference only of the fine-tuned model on runtime ``name`` (``infer:...``)."""
    if name == "infer:torch":
        import torch

        torch.set_num_threads(1)
        from edge_trady.core.plan import Plan
        from edge_trady.workstation.models import build_model

        plan = Plan.load(Path(cfg["plan"]))
        model = build_model(plan.model, plan.num_classes, plan.image_size, plan.seed).module.eval()

        def step(x, y):
            with torch.no_grad():
                model(torch.from_numpy(x))

        return step
    from edge_trady.engines.ort_runtime import ort_bindings

    ort_bindings()  # as the runners: onnxruntime without letting it import torch
    pin_mmap_threshold()  # as the runners: the same heap behaviour, so the overhead is training's alone
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(cfg["model"], options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x, y: session.run(None, {input_name: x})


def run_worker(cfg: dict, device: bool) -> dict:
    env = {**os.environ, **ONE_THREAD}
    python = device_python() if device else sys.executable
    command = [str(python), str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed for {cfg['engine']}:\n{done.stderr[-3000:]}")
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def measure(args: argparse.Namespace, directory: Path, raw: dict) -> tuple[list[dict], list[dict]]:
    """The engines' rows and the runtimes' inference-only rows. ``raw`` holds every measurement as
    it is made (saved to RAW after each one); with ``--resume`` the ones already in it are kept."""
    plans = {}
    for engine in args.engines:  # the real commands: whole-process peaks, the fine-tuned models
        here = directory / engine
        if engine in raw["runs"]:  # measured before: only the plan (the current model's prediction)
            make_plan(
                engine, args.image_size, args.batch_size, args.budget, args.per_class, args.profile, here / "plan.json"
            )
        else:
            done = train_fresh(
                engine, args.image_size, args.batch_size, args.budget, args.per_class, args.profile, here
            )
            raw["runs"][engine] = {"measured_bytes": done["measured_bytes"]}
            _save_raw(raw)
        plans[engine] = here / "plan.json"
        print(f"{engine:13} whole-process peak {raw['runs'][engine]['measured_bytes'] / MiB:.1f} MiB", flush=True)
    base = {"per_class": args.per_class, "warmup": args.warmup, "steps": args.steps}
    inference = {}  # runtime -> the config of its inference-only worker
    for engine in args.engines:
        runtime = RUNTIMES[engine]
        if runtime not in inference:
            model = directory / engine / "run" / "model.onnx"
            cfg = {**base, "engine": f"infer:{runtime}", "plan": str(plans[engine]), "model": str(model)}
            inference[runtime] = (cfg, SETUPS[engine].device)
    for repeat in range(args.repeats):  # interleaved: load changes hit every engine alike
        for engine in args.engines:
            done = raw["trained"].setdefault(engine, [])
            if len(done) <= repeat:
                artifact = directory / engine / "artifact"
                cfg = {**base, "engine": engine, "plan": str(plans[engine]), "artifact": str(artifact)}
                done.append(run_worker(cfg, SETUPS[engine].device))
                _save_raw(raw)
            r = done[repeat]
            print(f"{engine:13} CPU {r['cpu_step_s']:.3f} s/step, training-phase peak {r['phase_peak'] / MiB:.1f} MiB")
        for runtime, (cfg, device) in inference.items():
            done = raw["inferred"].setdefault(runtime, [])
            if len(done) <= repeat:
                done.append(run_worker(cfg, device))
                _save_raw(raw)
            r = done[repeat]
            print(f"{'infer ' + runtime:13} CPU {r['cpu_step_s']:.3f} s/batch, peak {r['process_peak'] / MiB:.1f} MiB")
    infer_rows = {runtime: summarize(raw["inferred"][runtime], args.batch_size) for runtime in inference}
    rows = []
    for engine in args.engines:
        row = summarize(raw["trained"][engine], args.batch_size)
        ref = infer_rows[RUNTIMES[engine]]
        peak = raw["runs"][engine]["measured_bytes"] / MiB
        layers, channels = _selection_size(plans[engine])
        rows.append(
            {
                "engine": engine,
                "runtime": RUNTIMES[engine],
                "layers": layers,
                "channels": channels,
                "process_peak_mib": peak,
                "predicted_peak_mib": json.loads(plans[engine].read_text())["memory"]["peak_bytes"] / MiB,
                "inference_peak_mib": ref["worker_peak_mib"],
                "overhead_mib": peak - ref["worker_peak_mib"],
                **row,
                "torch_loaded": SETUPS[engine].runner == "finetune",
            }
        )
    if "portable" in args.engines:  # reference rows: the same network's inference pass and the step's floor
        rows += reference_rows(directory / "portable", plans["portable"], infer_rows["onnxruntime"], args.batch_size)
    return rows, [{"runtime": runtime, **row} for runtime, row in infer_rows.items()]


def reference_rows(folder: Path, plan_path: Path, inference: dict, batch: int) -> list[dict]:
    """The inference pass of the portable artifact's network (plain onnxruntime) and the step's FLOP
    floor (``step_profile.step_flops``: that many inference passes), as rows of the engine table."""
    import onnx

    from edge_trady.core.plan import Plan
    from edge_trady.device.runner import plan_sampler
    from edge_trady.engines.portable_format import PortableLayout
    from edge_trady.workstation.export.step_profile import step_flops

    layout = PortableLayout.load(folder / "artifact")
    forward = onnx.load(folder / "artifact" / layout.inference_model)
    flops = step_flops(forward, layout, plan_sampler(Plan.load(plan_path)).select(0), batch)
    seconds = inference["cpu_step_s"]
    floor = f"{flops.floor_passes:.2f} inference passes"
    rows = [("inference pass", "onnxruntime", seconds), ("FLOP floor of the step", floor, seconds * flops.floor_passes)]
    return [
        {"engine": name, "runtime": runtime, "cpu_step_s": t, "images_per_s_cpu": batch / t, "reference": True}
        for name, runtime, t in rows
    ]


def _selection_size(plan_path: Path) -> tuple[int, int]:
    """Trained layers and channels of the plan's epoch-0 selection (what the workers train)."""
    from edge_trady.core.plan import Plan
    from edge_trady.device.runner import plan_sampler

    selection = plan_sampler(Plan.load(plan_path)).select(0)
    return len(selection.channels), selection.channel_count


def _save_raw(raw: dict) -> None:
    from edge_trady.core.atomic import write_json

    write_json(RAW, raw)


def summarize(results: list[dict], batch: int) -> dict:
    """Median CPU time per step (images/s from it) and the highest peaks over the worker processes."""
    cpu = statistics.median(r["cpu_step_s"] for r in results)
    return {
        "cpu_step_s": cpu,
        "images_per_s_cpu": batch / cpu,
        "phase_peak_mib": _highest(results, "phase_peak"),
        "worker_peak_mib": _highest(results, "process_peak"),
        "processes": len(results),
    }


def _highest(results: list[dict], key: str) -> float | None:
    """The largest ``key`` over the worker results in MiB (None: not recorded)."""
    values = [r[key] for r in results if r.get(key) is not None]
    return max(values) / MiB if values else None


def targets(rows: list[dict]) -> list[dict]:
    """Issue 9 item 4's and issue 23's targets, each with the figures it compares."""
    by = {r["engine"]: r for r in rows}
    checks = []
    if {"portable", "inference pass"} <= set(by):
        step, passes = by["portable"]["cpu_step_s"], by["inference pass"]["cpu_step_s"]
        checks.append(("portable step <= 3.0x the inference pass (CPU time)", step / passes, 3.0, "<="))
    if not {"portable", "ort", "torch-sparse", "torch-full"} <= set(by):
        return _checked(checks)
    p, o, s, f = by["portable"], by["ort"], by["torch-sparse"], by["torch-full"]
    checks += [
        ("portable peak <= 0.5x ORT-training runner's", p["process_peak_mib"], 0.5 * o["process_peak_mib"], "<="),
        ("portable peak < torch-sparse's", p["process_peak_mib"], s["process_peak_mib"], "<"),
        ("portable images/s >= torch-sparse's", p["images_per_s_cpu"], s["images_per_s_cpu"], ">="),
        ("portable images/s >= 1.5x ORT-training's", p["images_per_s_cpu"], 1.5 * o["images_per_s_cpu"], ">="),
        ("portable overhead <= full fine-tuning's / 10", p["overhead_mib"], f["overhead_mib"] / 10, "<="),
    ]
    return _checked(checks)


def _checked(checks: list[tuple]) -> list[dict]:
    met = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b}
    return [{"target": t, "value": v, "bound": b, "met": met[op](v, b)} for t, v, b, op in checks]


def table(rows: list[dict]) -> str:
    """The engines' rows, then the reference rows (inference pass, FLOP floor: speed only)."""
    lines = [
        "| engine | runtime | trained layers / channels | whole-process peak MiB | predicted MiB "
        "| inference-only peak MiB | training overhead MiB | CPU s/step | images/s (CPU time) "
        "| training-phase peak MiB | torch loaded |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("reference"):
            speed = f"{r['cpu_step_s']:.3f} | {r['images_per_s_cpu']:.1f}"
            lines.append(f"| *{r['engine']}* (reference) | {r['runtime']} | - | - | - | - | - | {speed} | - | - |")
            continue
        lines.append(
            f"| {r['engine']} | {r['runtime']} | {r['layers']} / {r['channels']} | **{r['process_peak_mib']:.1f}** | "
            f"{r['predicted_peak_mib']:.1f} | {r['inference_peak_mib']:.1f} | {r['overhead_mib']:.1f} | "
            f"{r['cpu_step_s']:.3f} | **{r['images_per_s_cpu']:.1f}** | "
            f"{r['phase_peak_mib']:.1f} | {'yes' if r['torch_loaded'] else 'no'} |"
        )
    return "\n".join(lines)


def inference_table(rows: list[dict]) -> str:
    lines = [
        "| runtime (inference only) | whole-process peak MiB | images/s (CPU time) |",
        "|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['runtime']} | {r['worker_peak_mib']:.1f} | {r['images_per_s_cpu']:.1f} |")
    return "\n".join(lines)


def targets_table(checks: list[dict]) -> str:
    lines = ["| target | value | bound | met |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['target']} | {c['value']:.2f} | {c['bound']:.2f} | {'yes' if c['met'] else '**no**'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_trady.core.atomic import replacing

    every = rows
    rows = [r for r in rows if not r.get("reference")]
    names = [r["engine"] for r in rows]
    xs = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = [r["inference_peak_mib"] for r in rows]
    left.bar(xs, base, color="lightgrey", label="inference-only peak (same runtime)")
    left.bar(xs, [r["overhead_mib"] for r in rows], bottom=base, color="tab:red", label="training overhead")
    left.scatter(xs, [r["predicted_peak_mib"] for r in rows], marker="_", s=400, color="k", label="planner prediction")
    left.set_xticks(list(xs), names, rotation=20)
    left.set_ylabel("whole-process peak (VmHWM), MiB")
    left.legend(fontsize=7)
    colors = ["lightgrey" if r.get("reference") else "tab:blue" for r in every]
    right.bar(range(len(every)), [r["images_per_s_cpu"] for r in every], color=colors)
    right.set_xticks(list(range(len(every))), [r["engine"] for r in every], rotation=20)
    right.set_ylabel("training images/s (CPU time, 1 thread)")
    fig.suptitle(f"{MODEL}, Fashion-MNIST, 64 px, batch 32, TraDy 2 % (full: every weight)")
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def write(rows: list[dict], infer: list[dict], checks: list[dict], meta: dict, args: argparse.Namespace) -> None:
    from edge_trady.core.atomic import replacing, write_json, write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    with replacing(RESULTS / "speed.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(dict.fromkeys(k for r in rows for k in r)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    write_json(RESULTS / "speed.json", {"meta": meta, "engines": rows, "inference": infer, "targets": checks})
    plot(rows, RESULTS / "speed.png")
    text = f"{table(rows)}\n\n{inference_table(infer)}\n\n{targets_table(checks)}"
    print(text)
    tail = DOC.read_text().split(MARKER, 1)[1] if DOC.exists() and MARKER in DOC.read_text() else "\n"
    write_text(
        DOC,
        f"# Training speed and memory of every engine, side by side\n\n"
        f"Command: `{meta['command']}` (measured {meta['measured']}, {meta['minutes']:.0f} min on {meta['machine']}; "
        f"torch {meta['torch']}, "
        f"onnxruntime-training {meta['onnxruntime_training']}, plain onnxruntime {meta['onnxruntime']} in "
        f".venv-device). Raw rows: `bench/results/speed.{{csv,json}}`, plot `bench/results/speed.png`.\n\n"
        f"{MODEL}, real Fashion-MNIST ({args.per_class} images per class, train + val), {args.image_size} px, "
        f"batch {args.batch_size}, TraDy at budget {args.budget} (same ranking, budget and seed for every engine, "
        f"so the same selection; `torch-full` trains every weight). **Whole-process peak**: VmHWM of one "
        f"epoch of the real command in a fresh process (`edge-trady run` for `portable` in .venv-device and "
        f"`ort`, `edge-trady finetune` for the torch engines), everything included (imports, data loading, "
        f"training, evaluation, checkpoint, model export); **predicted**: what `edge-trady plan` said for it. "
        f"**Inference-only peak**: a fresh process of the same runtime loading the same data and the "
        f"fine-tuned model, predicting every training batch; **training overhead** = peak minus that. "
        f"**images/s (CPU time)** = batch / median `time.process_time()` of a training step, {args.warmup} warm-up + "
        f"{args.steps} timed steps in each of {args.repeats} fresh worker processes per engine with one thread: "
        f"the machine is shared (2 cores, load {meta['load']:.1f}), so CPU time, not wall time, measures the "
        f"engines. **training-phase peak**: the workers' VmHWM while stepping "
        f"(reset after set-up). Reference rows: the *inference pass* of the same network (the portable "
        f"runner's fine-tuned model on plain onnxruntime, one thread, the same batches) and the *FLOP "
        f"floor of the step* (forward + input gradients above the earliest candidate + the selected "
        f"channels' weight gradients, `bench/step_profile.py`), as that many inference passes."
        f"\n\n{text}\n\n{MARKER}{tail}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget", default="2%")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--profile", default="this-workstation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="fresh worker processes per engine")
    parser.add_argument("--resume", action="store_true", help=f"keep the measurements already in {RAW.name}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "resume")}
    raw = json.loads(RAW.read_text()) if args.resume and RAW.exists() else {}
    if raw.get("settings") != settings:
        if args.resume and raw:
            raise SystemExit(f"error: {RAW} was measured with {raw.get('settings')}, not {settings}")
        raw = {"settings": settings, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "load": os.getloadavg()[0], "seconds": 0.0, "runs": {}, "trained": {}, "inferred": {}}  # fmt: skip
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        rows, infer = measure(args, Path(tmp), raw)
    raw["seconds"] += time.monotonic() - started
    raw["load"] = max(raw["load"], os.getloadavg()[0])
    _save_raw(raw)
    checks = targets(rows)
    import torch

    versions = subprocess.run(
        [str(device_python()), "-c", "import onnxruntime; print(onnxruntime.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    command = (
        f"python bench/speed.py --engines {' '.join(args.engines)} --image-size {args.image_size} "
        f"--batch-size {args.batch_size} --budget {args.budget} --per-class {args.per_class} "
        f"--profile {args.profile} --warmup {args.warmup} --steps {args.steps} --repeats {args.repeats}"
    )
    meta = {
        "command": command,
        "measured": raw["started"],
        "minutes": raw["seconds"] / 60,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load": raw["load"],
        "torch": torch.__version__,
        "onnxruntime": versions,
        "onnxruntime_training": importlib.metadata.version("onnxruntime-training-cpu"),
    }
    write(rows, infer, checks, meta, args)


if __name__ == "__main__":
    main()
