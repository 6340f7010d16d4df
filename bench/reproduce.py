"""What accuracy the budget buys: TraDy, its variants and the paper's baselines on real data, with a
fair protocol (EfficientNet-Lite -> Fashion-MNIST).

Protocol (docs/reproduction.md):
1. Learning rate per method, chosen on held-out data: seed 0's 200 training images per class are
   split 160 / 40; each method trains on the 160 and is scored on the 40 (the test set is never
   used) for lrs of the grid ``LR_GRID``, starting from the middle three and extended while the
   best is at an edge. Variants of TraDy (``trady+...``) use TraDy's lr unless swept themselves.
2. Final runs at the chosen lr: 200 training images per class, scored on 200 test images per
   class (Fashion-MNIST t10k), seeds 0, 1, 2 (each seed draws its own subsets, init and order).
3. Paired comparisons over seeds (same seed = same data, init and order) with a paired t-test.

Every run is a fresh process (one thread, its own VmHWM) and writes one JSON file under
``bench/results/reproduce/<setting>/``; finished runs are skipped, an interrupted run resumes from
its checkpoint. ``--jobs 2`` runs two at a time. Then the report:

    nice -n 10 python bench/reproduce.py --jobs 2          # run what is missing, then report
    python bench/reproduce.py --report-only                # docs/reproduction.md + plots
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchlib import RESULTS, ROOT, ensure_ranking

from edge_trady.core.atomic import write_text

OUT = RESULTS / "reproduce"
RUNS = RESULTS / "runs" / "reproduce"
LR_GRID = (0.0032, 0.008, 0.02, 0.05, 0.125, 0.3125, 0.78)
FIRST_LRS = (0.02, 0.05, 0.125)
SEEDS = (0, 1, 2)
SWEEP_SEED = 0
PER_CLASS = 200
HELD_OUT = 40  # of the PER_CLASS training images per class, for the lr sweep
EPOCHS = 20
BATCH = 32
MAIN_BUDGET = "2.5%"
PID_FILE = "worker.pid"

# bench method -> FinetuneSpec fields. Budgeted methods train with torch-sparse (same weights as the
# masked engine, faster); full fine-tuning with BatchNorm in train mode needs torch-masked.
METHODS: dict[str, dict] = {
    "classifier-only": {"method": "classifier-only", "engine": "torch-sparse"},
    "full": {"method": "full", "engine": "torch-masked"},
    "full-frozen-bn": {"method": "full-frozen-bn", "engine": "torch-sparse"},
    "trady": {"method": "trady", "engine": "torch-sparse"},
    "s-topk-random": {"method": "s-topk-random", "engine": "torch-sparse"},
    "d-full-random": {"method": "d-full-random", "engine": "torch-sparse"},
    "s-full-random": {"method": "s-full-random", "engine": "torch-sparse"},
    # what else the budget can buy, at TraDy's memory and learning rate
    "trady+gradnorm": {"method": "trady", "engine": "torch-sparse", "weighting": "gradnorm"},
    "trady+shifts": {"method": "trady", "engine": "torch-sparse", "train_shifts": "candidates"},
    "trady+budget-k": {"method": "trady", "engine": "torch-sparse", "k_rule": "budget"},
    "trady+lara": {"method": "trady", "engine": "torch-sparse", "rank_score": "lara"},
}
REFERENCES = ("classifier-only", "full", "full-frozen-bn")
VARIANTS = ("trady+gradnorm", "trady+shifts", "trady+budget-k", "trady+lara")
LR_OF: dict[str, str] = dict.fromkeys(VARIANTS, "trady")  # variant -> the method whose swept lr it uses


@dataclass(frozen=True)
class Setting:
    name: str
    model: str
    image_size: int
    methods: tuple[str, ...]  # swept and run at MAIN_BUDGET (references: no budget)
    budgets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # extra budgets (each swept)
    final: tuple[str, ...] | None = None  # methods run first (sweep, then final runs); default: all
    lr_from: str | None = None  # take the chosen lrs from this setting's sweep
    last: tuple[str, ...] = ()  # methods run after everything else


CORE = ("classifier-only", "full", "trady", "s-topk-random", "d-full-random", "s-full-random")
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting(
            "lite0-64",
            "efficientnet-lite0",
            64,
            (*CORE, *VARIANTS),
            budgets={"trady": ("1%", "10%")},
            final=CORE,
            last=("full-frozen-bn",),
        ),
        Setting(
            "lite0-32",
            "efficientnet-lite0",
            32,
            ("classifier-only", "full", "trady", "d-full-random"),
            final=("classifier-only", "full", "trady"),
        ),
        Setting(
            "lite1-64",
            "efficientnet-lite1",
            64,
            ("classifier-only", "full", "trady", "d-full-random"),
            final=("classifier-only", "full", "trady"),
            lr_from="lite0-64",
        ),
    ]
}


@dataclass(frozen=True)
class Job:
    setting: str
    phase: str  # "sweep" (held-out split) or "final" (test set)
    method: str
    budget: str
    lr: float
    seed: int
    epochs: int = EPOCHS

    @property
    def key(self) -> str:
        budget = self.budget.replace("%", "pct")
        return f"{self.phase}/{self.method}@{budget}-lr{self.lr:g}-s{self.seed}"

    @property
    def result_path(self) -> Path:
        return OUT / self.setting / f"{self.key}.json"

    @property
    def run_dir(self) -> Path:
        return RUNS / self.setting / self.key


def read_result(job: Job) -> dict | None:
    try:
        return json.loads(job.result_path.read_text())
    except FileNotFoundError:
        return None


# --- scheduling -----------------------------------------------------------------------------------


def chosen_lr(setting: Setting, method: str, budget: str) -> tuple[float | None, list[Job]]:
    """The lr the held-out sweep chose for ``method`` at ``budget``, or the sweep runs still needed."""
    source = SETTINGS[setting.lr_from] if setting.lr_from else setting
    swept = LR_OF.get(method, method)
    lrs = list(FIRST_LRS)
    while True:
        jobs = [Job(source.name, "sweep", swept, budget, lr, SWEEP_SEED) for lr in lrs]
        missing = [job for job in jobs if read_result(job) is None]
        if missing:
            return None, missing
        accuracy = {job.lr: read_result(job)["val_acc"] for job in jobs}
        best = max(lrs, key=lambda lr: (accuracy[lr], -lr))  # ties: the smaller lr
        index = LR_GRID.index(best)
        if best == lrs[0] and index > 0:
            lrs.insert(0, LR_GRID[index - 1])
        elif best == lrs[-1] and index < len(LR_GRID) - 1:
            lrs.append(LR_GRID[index + 1])
        else:
            return best, []


def priority_groups(setting: Setting) -> list[list[tuple[str, str]]]:
    """(method, budget) pairs of ``setting`` in four groups: the final methods at the main budget,
    the other methods at it, the extra budgets, the methods run last."""
    main = [(m, "-" if m in REFERENCES else MAIN_BUDGET) for m in setting.methods]
    first = [c for c in main if setting.final is None or c[0] in setting.final]
    extra = [(m, b) for m in setting.methods for b in setting.budgets.get(m, ())]
    last = [(m, "-" if m in REFERENCES else MAIN_BUDGET) for m in setting.last]
    return [first, [c for c in main if c not in first], extra, last]


def pending(settings: list[Setting]) -> Iterator[Job]:
    """Runs still missing in priority order: every setting's first group (``priority_groups``), then
    every setting's second, and so on; in a group the final runs of the methods whose lr is chosen,
    then the sweeps still needed."""
    for rank in range(4):
        for setting in settings:
            sweeps: list[Job] = []
            for method, budget in priority_groups(setting)[rank]:
                lr, sweep = chosen_lr(setting, method, budget)
                sweeps += sweep
                if lr is not None:
                    finals = [Job(setting.name, "final", method, budget, lr, seed) for seed in SEEDS]
                    yield from (job for job in finals if read_result(job) is None)
            yield from sweeps


def setting_ranking(setting: Setting) -> Path:
    """The layer ranking every run of ``setting`` plans with (computed once, by the first caller)."""
    return ensure_ranking(
        setting.image_size,
        per_class=50,
        seed=100,
        model=setting.model,
        path=OUT / f"ranking-{setting.model}-{setting.image_size}px.json",
    )


def drive(settings: list[Setting], jobs: int) -> None:
    for setting in {job.setting for job in pending(settings)}:  # here, not in two workers at once
        setting_ranking(SETTINGS[setting])
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    while True:
        todo = list({job.key + job.setting: job for job in pending(settings)}.values())
        elsewhere = sum(_busy(job) for job in todo if job.key + job.setting not in running)  # other drivers'
        waiting = [job for job in todo if job.key + job.setting not in running and not _busy(job)]
        while waiting and len(running) + elsewhere < jobs:
            job = waiting.pop(0)
            running[job.key + job.setting] = (job, _launch(job), time.monotonic())
        if not running and not elsewhere:
            return
        time.sleep(5)
        for name, (job, proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            result = read_result(job)
            status = f"val_acc {result['val_acc']:.4f}" if result else f"FAILED (exit {proc.returncode})"
            print(f"{job.setting} {job.key}: {status} ({time.monotonic() - started:.0f}s)", flush=True)
            if result is None:
                raise SystemExit(f"run failed; see {job.run_dir / 'log.txt'}")


def _busy(job: Job) -> bool:
    """True while another driver's worker runs ``job`` (its pid file names a live process)."""
    try:
        os.kill(int((job.run_dir / PID_FILE).read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def _launch(job: Job) -> subprocess.Popen:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    log = (job.run_dir / "log.txt").open("a")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(job))]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


# --- one run (a fresh process) ----------------------------------------------------------------------


def held_out_data(seed: int) -> Path:
    """Seed ``seed``'s PER_CLASS training images per class split into train / held-out (28 px npz)."""
    import numpy as np

    from edge_trady.core.atomic import replacing
    from edge_trady.device.data import MINUS_ONE_TO_ONE, load_dataset

    path = RUNS / f"held-out-s{seed}.npz"
    if path.exists():
        return path
    data = load_dataset("fashion-mnist", "train", 28, MINUS_ONE_TO_ONE, PER_CLASS, seed)  # 28 px: not resized
    rng = np.random.default_rng([seed, 12])
    held = np.concatenate([rng.permutation(np.flatnonzero(data.labels == c))[:HELD_OUT] for c in range(10)])
    keep = np.setdiff1d(np.arange(len(data)), held)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, tmp.open("wb") as handle:
        np.savez(
            handle,
            x=data.pixels[keep, :, :, 0],
            y=data.labels[keep],
            x_val=data.pixels[np.sort(held), :, :, 0],
            y_val=data.labels[np.sort(held)],
            class_names=np.array(data.class_names),
        )
    return path


def run_job(job: Job) -> dict:
    import torch

    from edge_trady.core.atomic import write_json
    from edge_trady.device.progress import Progress
    from edge_trady.workstation.finetune import FinetuneSpec, run_finetune

    torch.set_num_threads(1)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / PID_FILE).write_text(str(os.getpid()))
    setting = SETTINGS[job.setting]
    ranking = setting_ranking(setting)
    if job.phase == "sweep":
        data = {"data": str(held_out_data(job.seed)), "per_class": None}
    else:
        data = {"data": "fashion-mnist", "per_class": PER_CLASS}
    spec = FinetuneSpec(
        model=setting.model,
        image_size=setting.image_size,
        budget="100%" if job.budget == "-" else job.budget,
        epochs=job.epochs,
        batch_size=BATCH,
        lr=job.lr,
        seed=job.seed,
        ranking=str(ranking),
        eval_every=job.epochs,  # accuracy before and after training only
        **data,
        **METHODS[job.method],
    )
    cpu = time.process_time()
    run = job.run_dir / "run"  # the finetune folder: the driver's log and pid file stay beside it
    result = run_finetune(spec, run, Progress(quiet=False), resume=True)
    last = result.epochs[-1]
    row = {
        **asdict(job),
        "model": setting.model,
        "image_size": setting.image_size,
        "val_acc": result.final_val_acc,
        "initial_val_acc": result.initial_val_acc,
        "train_loss": result.final_train_loss,
        "units_used": last["units_used"],
        "budget_units": last["budget_units"],
        "full_units": result.full_units,
        "channels": last["channels_selected"],
        "top_k": len(result.top_k) if result.top_k else None,
        "shift_cost": result.shift_cost,
        "peak_rss_bytes": result.peak_rss_bytes,
        "cpu_s": time.process_time() - cpu,
        "wall_s": result.seconds,
        "spec": result.spec,
    }
    job.result_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(job.result_path, row, indent=1)
    for target in (run / "checkpoints", run / "model.pt", job.run_dir / PID_FILE):  # keep logs, not weights
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    return row


# --- report ---------------------------------------------------------------------------------------


def finals(setting: str) -> dict[tuple[str, str], dict[int, dict]]:
    """(method, budget) -> seed -> result row, for the final runs of ``setting``."""
    cells: dict[tuple[str, str], dict[int, dict]] = {}
    for path in sorted((OUT / setting / "final").glob("*.json")):
        row = json.loads(path.read_text())
        cells.setdefault((row["method"], row["budget"]), {})[row["seed"]] = row
    return cells


def paired(a: dict[int, dict], b: dict[int, dict]) -> tuple[float, float, int]:
    """Mean difference a - b (points) over common seeds and the paired t-test's two-sided p."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(a) & set(b))
    x = [100 * a[s]["val_acc"] for s in seeds]
    y = [100 * b[s]["val_acc"] for s in seeds]
    diff = statistics.mean(x) - statistics.mean(y) if seeds else math.nan
    if len(seeds) < 2 or all(u == v for u, v in zip(x, y, strict=True)):
        return diff, math.nan, len(seeds)
    return diff, float(ttest_rel(x, y).pvalue), len(seeds)


def mean_std(rows: dict[int, dict], key: str = "val_acc", scale: float = 100) -> tuple[float, float]:
    values = [scale * row[key] for row in rows.values()]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


LABELS = {
    "lite0-64": "EfficientNet-Lite0, 64 px (main setting)",
    "lite0-32": "EfficientNet-Lite0, 32 px",
    "lite1-64": "EfficientNet-Lite1, 64 px",
}
GENERATED_END = "<!-- end of generated part -->"


def sweep_rows(setting: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((OUT / setting / "sweep").glob("*.json"))]


def _p(value: float) -> str:
    return "–" if math.isnan(value) else (f"{value:.3f}" if value >= 0.001 else "<0.001")


def _delta(a: dict[int, dict], b: dict[int, dict] | None) -> str:
    if not b:
        return "–"
    diff, p, n = paired(a, b)
    return f"{diff:+.2f} (p {_p(p)}, n={n})"


def setting_report(setting: Setting) -> tuple[list[str], dict]:
    """Markdown lines for one setting and the cells (for targets and plots)."""
    cells = finals(setting.name)
    if not cells:
        return [
            f"## {LABELS.get(setting.name, setting.name)}",
            "",
            "No final runs yet.",
            "",
            *sweep_table(setting),
            "",
        ], cells
    reference = cells.get(("classifier-only", "-"))
    trady = cells.get(("trady", MAIN_BUDGET))
    full_units = next(iter(next(iter(cells.values())).values()))["full_units"]
    lines = [
        f"## {LABELS.get(setting.name, setting.name)}",
        "",
        f"Test accuracy (%) after {EPOCHS} epochs, mean ± std over seeds; Δ = paired difference in points with the "
        f"paired t-test's two-sided p. Full fine-tuning = {full_units:,} units. Peak = measured VmHWM of the "
        "training process (fresh process; torch-sparse for budgeted methods and classifier-only, torch-masked for "
        "`full`).",
        "",
        "| method | budget | lr | test acc | Δ vs classifier-only | Δ vs TraDy | units used | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = list(METHODS)
    for (method, budget), rows in sorted(
        cells.items(), key=lambda kv: (order.index(kv[0][0]), _budget_value(kv[0][1]))
    ):
        mean, std = mean_std(rows)
        first = next(iter(rows.values()))
        units = statistics.mean(r["units_used"] + r.get("shift_cost", 0.0) for r in rows.values())
        share = "–" if budget == "-" else f"{units:,.0f} ({100 * units / full_units:.2f} %)"
        peak = statistics.mean(r["peak_rss_bytes"] for r in rows.values()) / 2**20
        lines.append(
            f"| {method} | {budget} | {first['lr']:g} | {mean:.2f} ± {std:.2f} (n={len(rows)}) | "
            f"{_delta(rows, reference) if method != 'classifier-only' else '–'} | "
            f"{_delta(rows, trady) if (method, budget) != ('trady', MAIN_BUDGET) else '–'} | {share} | {peak:.0f} |"
        )
    lines += ["", *sweep_table(setting), ""]
    return lines, cells


def _budget_value(budget: str) -> float:
    return -1.0 if budget == "-" else float(budget.rstrip("%"))


def sweep_table(setting: Setting) -> list[str]:
    rows = sweep_rows(setting.lr_from or setting.name)
    if not rows:
        return []
    if setting.lr_from:
        return [f"Learning rates: chosen by the held-out sweep of `{setting.lr_from}`."]
    lrs = sorted({r["lr"] for r in rows})
    acc: dict[tuple[str, str], dict[float, float]] = {}
    for r in rows:
        acc.setdefault((r["method"], r["budget"]), {})[r["lr"]] = 100 * r["val_acc"]
    lines = [
        f"Held-out learning-rate sweep (seed {SWEEP_SEED}: {PER_CLASS - HELD_OUT} training / {HELD_OUT} held-out "
        "images per class from the training split; accuracy %, best in bold):",
        "",
        "| method | budget | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|---|" + "---|" * len(lrs),
    ]
    for (method, budget), by_lr in acc.items():
        best = max(by_lr.values())
        cells = [
            "" if lr not in by_lr else (f"**{by_lr[lr]:.2f}**" if by_lr[lr] == best else f"{by_lr[lr]:.2f}")
            for lr in lrs
        ]
        lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    return lines


def targets(cells: dict) -> list[str]:
    """Issue 12's targets on the main setting, checked on the numbers."""
    need = [("classifier-only", "-"), ("full", "-"), ("trady", MAIN_BUDGET)]
    if any(k not in cells for k in need):
        return ["Targets: not all runs are in yet."]
    c, f, t = (mean_std(cells[k])[0] for k in need)
    bar = c + 0.6 * (f - c)
    lines = [
        "Targets (main setting, TraDy at 2.5 %):",
        "",
        f"- TraDy >= classifier-only + 0.6 x (full - classifier-only) = {c:.2f} + 0.6 x {f - c:.2f} = {bar:.2f}: "
        f"TraDy {t:.2f} -> **{'met' if t >= bar else 'missed'}**",
    ]
    for other in ("s-topk-random", "s-full-random", "d-full-random"):
        if (other, MAIN_BUDGET) in cells:
            diff, p, n = paired(cells[("trady", MAIN_BUDGET)], cells[(other, MAIN_BUDGET)])
            lines.append(
                f"- ahead of {other}: {diff:+.2f} points (p {_p(p)}, n={n}) -> **{'met' if diff > 0 else 'missed'}**"
            )
    diff, p, n = paired(cells[("trady", MAIN_BUDGET)], cells[("classifier-only", "-")])
    verdict = "met" if diff > 0 and p < 0.05 else "missed"
    lines.append(f"- significantly ahead of classifier-only: {diff:+.2f} points (p {_p(p)}, n={n}) -> **{verdict}**")
    return lines


def against_trady(cells: dict) -> list[str]:
    """Issue 12's item 3 and the budget curve: each TraDy variant and budget, paired with TraDy at
    the main budget (a variant wins when it is ahead with p < 0.05)."""
    trady = cells.get(("trady", MAIN_BUDGET))
    others = [k for k in cells if k[0] in VARIANTS or (k[0] == "trady" and k[1] != MAIN_BUDGET)]
    if not trady or not others:
        return []
    lines = [f"Against TraDy at {MAIN_BUDGET} (paired over seeds; a variant becomes the default only if it wins):", ""]
    for method, budget in sorted(others, key=lambda k: (k[0] != "trady", _budget_value(k[1]), k[0])):
        rows = cells[(method, budget)]
        diff, p, n = paired(rows, trady)
        if diff > 0 and p < 0.05:
            verdict = "wins significantly"
        elif diff < 0 and p < 0.05:
            verdict = "significantly worse"
        else:
            verdict = "no significant difference"
        peak = statistics.mean(r["peak_rss_bytes"] for r in rows.values()) / 2**20
        lines.append(
            f"- {method} at {budget}: {mean_std(rows)[0]:.2f} %, {diff:+.2f} points (p {_p(p)}, n={n}), "
            f"peak {peak:.0f} MiB -> {verdict}"
        )
    return [*lines, ""]


def write_report(settings: list[Setting]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    body = [
        "# Reproduction: what accuracy the budget buys (EfficientNet-Lite -> Fashion-MNIST)",
        "",
        "Commands (each run is a fresh one-thread process; finished runs are skipped, so the same command",
        "continues an interrupted campaign):",
        "",
        "```sh",
        "nice -n 10 python bench/reproduce.py --jobs 2    # sweeps, final runs, then this page and the plots",
        "python bench/reproduce.py --report-only          # only this page and the plots",
        "```",
        "",
        f"Protocol: Fashion-MNIST from the Debian package, {PER_CLASS} training and {PER_CLASS} test images per class "
        f"(seeded subsets of the train and t10k splits), batch {BATCH}, {EPOCHS} epochs, plain SGD, linear warm-up "
        f"(2 epochs) then cosine decay. Each method's learning rate is chosen on held-out training data: seed "
        f"{SWEEP_SEED}'s {PER_CLASS} training images per class split {PER_CLASS - HELD_OUT} / {HELD_OUT}, lrs "
        f"{', '.join(f'{lr:g}' for lr in FIRST_LRS)} first, extended along {', '.join(f'{lr:g}' for lr in LR_GRID)} "
        "while the best is at an edge (ties: the smaller lr). Variants of TraDy (`trady+...`) use TraDy's lr. Final "
        f"runs: seeds {', '.join(map(str, SEEDS))} at the chosen lr (a seed fixes the subsets, the new head's init and "
        "the data order, shared by all methods: comparisons are paired). Raw per-run JSON: "
        "`bench/results/reproduce/<setting>/{sweep,final}/`; flat table `bench/results/reproduce.csv`; plot "
        "`bench/results/reproduce.png` (accuracy against measured peak memory).",
        "",
    ]
    main_cells: dict = {}
    for setting in settings:
        lines, cells = setting_report(setting)
        body += lines
        if setting.name == "lite0-64":
            main_cells = cells
            body += [*targets(cells), "", *against_trady(cells)]
    body.append(GENERATED_END)
    report = ROOT / "docs" / "reproduction.md"
    old = report.read_text() if report.exists() else ""
    tail = old.split(GENERATED_END, 1)[1] if GENERATED_END in old else "\n"
    write_text(report, "\n".join(body) + tail)
    write_csv(settings)
    if main_cells:
        plot_memory(main_cells, RESULTS / "reproduce.png")


def write_csv(settings: list[Setting]) -> None:
    import csv

    fields = ["setting", "phase", "method", "budget", "lr", "seed", "val_acc", "initial_val_acc", "train_loss",
              "units_used", "shift_cost", "budget_units", "full_units", "channels", "top_k", "peak_rss_bytes",
              "cpu_s", "wall_s"]  # fmt: skip
    rows = []
    for setting in settings:
        rows += sweep_rows(setting.name)
        rows += [r for cell in finals(setting.name).values() for r in cell.values()]
    table = io.StringIO()
    writer = csv.DictWriter(table, fields, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(RESULTS / "reproduce.csv", table.getvalue())


def plot_memory(cells: dict, path: Path) -> None:
    """Test accuracy against the measured peak memory of each method (main setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    curve = sorted((k for k in cells if k[0] == "trady"), key=lambda k: _budget_value(k[1]))
    if len(curve) > 1:
        xs = [statistics.mean(r["peak_rss_bytes"] for r in cells[k].values()) / 2**20 for k in curve]
        ax.plot(xs, [mean_std(cells[k])[0] for k in curve], "-", color="#4c72b0", alpha=0.5, zorder=1)
    markers = {"classifier-only": "s", "full": "D", "full-frozen-bn": "d"}
    for (method, budget), rows in sorted(cells.items()):
        mean, std = mean_std(rows)
        peak = statistics.mean(r["peak_rss_bytes"] for r in rows.values()) / 2**20
        label = method if budget == "-" else f"{method} {budget}"
        color = "#4c72b0" if method == "trady" else None
        ax.errorbar(peak, mean, yerr=std, fmt=markers.get(method, "o"), capsize=3, label=label, color=color)
    ax.set_xlabel("measured peak memory of the training process (VmHWM, MiB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"EfficientNet-Lite0 -> Fashion-MNIST, 64 px, {EPOCHS} epochs, {len(SEEDS)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each one thread)")
    parser.add_argument("--list", action="store_true", help="print the runs still missing and stop")
    parser.add_argument("--report-only", action="store_true", help="only rebuild docs/reproduction.md and plots")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_job(Job(**json.loads(args.worker)))
        return
    settings = [SETTINGS[name] for name in args.settings]
    if args.list:
        for job in pending(settings):
            print(job.setting, job.key)
        return
    if not args.report_only:
        drive(settings, args.jobs)
    write_report([SETTINGS[name] for name in SETTINGS])


if __name__ == "__main__":
    main()
