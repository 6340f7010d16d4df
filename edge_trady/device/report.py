"""The report of a run folder: what ``metrics.jsonl``, ``selection.jsonl`` and ``summary.json``
say, as a short text and one picture (no torch; matplotlib only for the picture).

Works for every engine's folder (``edge-trady run`` and ``finetune``), finished or not, and for
resumed runs: each epoch record names the process that trained it, so the epochs where a new
process took over are marked. A plan (``plan.json`` or an artifact folder) adds what the run
folder does not keep: the candidate layers and their widths, and the predicted peak of a
``finetune`` run.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.atomic import replacing
from ..core.budget import format_bytes
from ..core.plan import Plan
from ..errors import EdgeTradyError
from .runlog import METRICS_FILE, SELECTION_FILE, EpochMetrics, read_jsonl

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.png"
PICTURE_EXTRA = "pip install 'edge-trady[report]'"
MiB = 2**20
METRIC_FIELDS = [f.name for f in fields(EpochMetrics) if f.default is MISSING and f.default_factory is MISSING]


class ReportError(EdgeTradyError):
    """A folder that is not a run folder, or run files that cannot be read."""


@dataclass
class RunReport:
    """One run folder, read: per-epoch records and what is known about the plan."""

    run_dir: Path
    kind: str  # "run" (device runner), "finetune", or "unfinished" (no summary.json yet)
    epochs: list[dict]  # metrics.jsonl, one record per epoch
    channels: list[dict[str, int]]  # per epoch: input channels trained per layer
    layers: list[str]  # candidate layers in network order (plan or top-K), else every layer trained
    layer_widths: dict[str, int] = field(default_factory=dict)  # in_channels, when a plan says
    summary: dict | None = None
    model: str | None = None
    method: str | None = None
    predicted_peak_bytes: int | None = None
    new_process_at: list[int] = field(default_factory=list)  # epochs (1-based) a resumed process began with

    @property
    def engine(self) -> str:
        return self.epochs[-1]["engine"]

    @property
    def run_peak_bytes(self) -> int | None:
        """Peak RSS of the whole (last) process by its end, export included: ``summary.json``."""
        return self.summary.get("peak_rss_bytes") if self.summary else None

    def describe(self) -> str:
        """``model, what ran, engine, method`` as far as known."""
        what = {"run": "edge-trady run", "finetune": "edge-trady finetune", "unfinished": "unfinished run"}
        parts = [self.model, what[self.kind], f"engine {self.engine}", self.method and f"method {self.method}"]
        return ", ".join(part for part in parts if part)

    def heatmap(self) -> np.ndarray:
        """Input channels trained, layers x epochs."""
        grid = [[counts.get(name, 0) for counts in self.channels] for name in self.layers]
        return np.array(grid, dtype=np.int64).reshape(len(self.layers), len(self.channels))


def load_report(run_dir: Path, plan: Plan | None = None) -> RunReport:
    """Read a run folder (raises ReportError when it is not one)."""
    run_dir = Path(run_dir)
    metrics_path, selection_path = run_dir / METRICS_FILE, run_dir / SELECTION_FILE
    if not metrics_path.is_file():
        problem = "no such folder" if not run_dir.is_dir() else f"no {METRICS_FILE}"
        raise ReportError(f"{run_dir}: {problem}; expected the --out folder of 'edge-trady run' or 'finetune'")
    epochs = _read_records(metrics_path, METRIC_FIELDS)
    if not epochs:
        raise ReportError(f"{metrics_path}: no epoch finished yet, nothing to report")
    selections = _read_records(selection_path, ("channels",)) if selection_path.is_file() else []
    if len(selections) == len(epochs):
        channels = [{name: len(idx) for name, idx in s["channels"].items()} for s in selections]
    else:  # the per-epoch counts of metrics.jsonl say the same
        channels = [dict(m.get("channels_per_layer", {})) for m in epochs]
    summary = _read_summary(run_dir / SUMMARY_FILE)
    kind = "unfinished" if summary is None else ("finetune" if "spec" in summary else "run")
    described = (summary["spec"] if kind == "finetune" else summary) if summary else {}
    model, method = described.get("model"), described.get("method")
    predicted = summary.get("predicted_peak_bytes") if summary else None
    layers = _layer_order(channels)
    widths: dict[str, int] = {}
    if plan is not None:
        planned = [layer["name"] for layer in plan.layers]
        layers = planned + [name for name in layers if name not in planned]
        widths = {layer["name"]: int(layer["in_channels"]) for layer in plan.layers}
        predicted = plan.estimate.peak_bytes
        model, method = model or plan.model, method or plan.method
    elif kind == "finetune" and summary.get("top_k"):  # top-K layers never drawn: last
        layers += [name for name in summary["top_k"] if name not in layers]
    return RunReport(
        run_dir=run_dir,
        kind=kind,
        epochs=epochs,
        channels=channels,
        layers=layers,
        layer_widths=widths,
        summary=summary,
        model=model,
        method=method,
        predicted_peak_bytes=predicted,
        new_process_at=_new_processes(epochs),
    )


def text_summary(report: RunReport) -> str:
    """A few lines: what ran, accuracy, memory against the prediction, budget use, selection."""
    first, last = report.epochs[0], report.epochs[-1]
    head = f"{report.run_dir}: {report.describe()}"
    epochs = f"{len(report.epochs)} epoch(s)"
    if report.new_process_at:
        epochs += f" (resumed at epoch {', '.join(map(str, report.new_process_at))})"
    lines = [head, f"  epochs     {epochs}, {sum(m['time_s'] for m in report.epochs):.0f} s"]

    vals = [m["val_acc"] for m in report.epochs]
    if all(v is not None for v in vals):
        before = _initial_val_acc(report)
        start = f"{before:.1%} before -> " if before is not None else ""
        best = int(np.argmax(vals))
        lines.append(f"  val_acc    {start}{vals[-1]:.1%} after (best {vals[best]:.1%} at epoch {best + 1})")
    lines.append(
        f"  train      loss {first['train_loss']:.4g} -> {last['train_loss']:.4g}, "
        f"accuracy {first['train_acc']:.1%} -> {last['train_acc']:.1%}"
    )

    peaks = [m.get("peak_rss_bytes") for m in report.epochs]
    if any(peaks):
        measured = max(p for p in peaks if p)
        memory = f"  memory     peak RSS {format_bytes(measured)} in training"
        if report.predicted_peak_bytes:
            ratio = measured / report.predicted_peak_bytes - 1
            memory += f" (predicted {format_bytes(report.predicted_peak_bytes)}, {ratio:+.0%})"
        if report.run_peak_bytes and report.run_peak_bytes > measured:
            memory += f", {format_bytes(report.run_peak_bytes)} by the run's end (model export)"
        lines.append(memory)

    budget, unit = last.get("budget_units"), last.get("budget_unit", "units")
    used = [m["units_used"] for m in report.epochs]
    if budget:
        lines.append(
            f"  budget     {_amount(budget, unit)}; used {_amount(min(used), unit)} to {_amount(max(used), unit)} "
            f"per epoch ({np.mean(used) / budget:.1%} on average)"
        )
    grid = report.heatmap()
    trained = int((grid.sum(axis=1) > 0).sum())
    per_epoch = np.mean([m["channels_selected"] for m in report.epochs])
    lines.append(
        f"  selection  {per_epoch:.0f} input channels per epoch; {trained} of {len(report.layers)} layers "
        f"trained at least once"
    )
    return "\n".join(lines)


def write_picture(report: RunReport, path: Path) -> Path:
    """The report's :func:`figure` as a 256-colour PNG (a third of the size, no visible change),
    written atomically. Needs matplotlib (``edge-trady[report]``); raises ModuleNotFoundError without it."""
    rendered = io.BytesIO()
    figure(report).savefig(rendered, format="png")
    with Image.open(rendered) as picture, replacing(Path(path)) as tmp:
        picture.convert("RGB").quantize(256).save(tmp, format="PNG", optimize=True)
    return Path(path)


def figure(report: RunReport):
    """A matplotlib Figure of the run. Its axes, in order: accuracy, loss, memory and budget per
    epoch, the layer x epoch heatmap of input channels trained, the budget panel's channel count
    (twin axis) and the heatmap's colour bar."""
    from matplotlib.figure import Figure

    epochs = np.array([m["epoch"] for m in report.epochs])
    grid = report.heatmap()
    heat_height = max(2.5, 0.21 * len(report.layers) + 1.2)
    fig = Figure(figsize=(13, 6.2 + heat_height), dpi=100, layout="constrained")
    rows = fig.add_gridspec(2, 1, height_ratios=[6.2, heat_height])
    top = rows[0].subgridspec(2, 2)
    ax_acc, ax_loss = fig.add_subplot(top[0, 0]), fig.add_subplot(top[0, 1])
    ax_mem, ax_budget = fig.add_subplot(top[1, 0]), fig.add_subplot(top[1, 1])
    ax_heat = fig.add_subplot(rows[1])

    _accuracy_panel(ax_acc, report, epochs)
    _loss_panel(ax_loss, report, epochs)
    _memory_panel(ax_mem, report, epochs)
    _budget_panel(ax_budget, report, epochs)
    _heatmap_panel(fig, ax_heat, report, epochs, grid)
    for ax in (ax_acc, ax_loss, ax_mem, ax_budget):
        _epoch_axis(ax, epochs, from_zero=ax is ax_acc and _initial_val_acc(report) is not None)
    for ax in (ax_acc, ax_loss, ax_mem, ax_budget, ax_heat):
        for epoch in report.new_process_at:
            ax.axvline(epoch - 0.5, color="0.4" if ax is not ax_heat else "white", linestyle=":", linewidth=1.5)
    title = f"{report.run_dir.resolve().name}: {report.describe()}"
    if report.new_process_at:
        title += f"  (dotted: resumed at epoch {', '.join(map(str, report.new_process_at))})"
    fig.suptitle(title, fontsize=13)
    return fig


# --- panels -------------------------------------------------------------------------------------


def _accuracy_panel(ax, report: RunReport, epochs: np.ndarray) -> None:
    ax.plot(epochs, [m["train_acc"] for m in report.epochs], "o-", label="train", color="#4c72b0")
    vals = [m["val_acc"] for m in report.epochs]
    if all(v is not None for v in vals):
        ax.plot(epochs, vals, "o-", label="validation", color="#dd8452")
        before = _initial_val_acc(report)
        if before is not None:
            ax.plot([0], [before], "s", color="#dd8452", label="validation before training (epoch 0)")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy per epoch")
    ax.legend(loc="best", fontsize=9)
    ax.grid(alpha=0.3)


def _loss_panel(ax, report: RunReport, epochs: np.ndarray) -> None:
    train = [m["train_loss"] for m in report.epochs]
    ax.plot(epochs, train, "o-", label="train", color="#4c72b0")
    vals = [m["val_loss"] for m in report.epochs]
    shown = train + ([v for v in vals if v is not None])
    if all(v is not None for v in vals):
        ax.plot(epochs, vals, "o-", label="validation", color="#dd8452")
    if min(shown) > 0 and max(shown) / min(shown) > 30:
        ax.set_yscale("log")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("loss per epoch")
    ax.legend(loc="best", fontsize=9)
    ax.grid(alpha=0.3)


def _memory_panel(ax, report: RunReport, epochs: np.ndarray) -> None:
    peaks = [m.get("peak_rss_bytes") for m in report.epochs]
    known = [(e, p / MiB) for e, p in zip(epochs, peaks, strict=True) if p]
    if known:
        ax.plot(*zip(*known, strict=True), "o-", color="#55a868", label="measured peak RSS (VmHWM)")
    if report.predicted_peak_bytes:
        predicted = report.predicted_peak_bytes / MiB
        ax.axhline(predicted, color="#c44e52", linestyle="--", label=f"predicted peak {predicted:.0f} MiB")
    end = report.run_peak_bytes / MiB if report.run_peak_bytes else None
    if end and (not known or end > known[-1][1] + 0.05):
        ax.plot([epochs[-1]], [end], "X", color="#55a868", markersize=9, label=f"by the run's end {end:.0f} MiB")
    values = [p for _, p in known] + [v / MiB for v in (report.predicted_peak_bytes, report.run_peak_bytes) if v]
    if values:
        ax.set_ylim(0, max(values) * 1.15)
    ax.set_ylabel("MiB")
    ax.set_title("memory: peak RSS of the process by the end of each epoch")
    ax.legend(loc="lower right", fontsize=9)
    ax.grid(alpha=0.3)


def _budget_panel(ax, report: RunReport, epochs: np.ndarray) -> None:
    unit = report.epochs[-1].get("budget_unit", "units")
    scale, label = (MiB, "MiB") if unit == "bytes" else (1.0, "units")
    used = np.array([m["units_used"] for m in report.epochs]) / scale
    ax.bar(epochs, used, color="#8172b2", width=0.7, label=f"used ({label})")
    budget = report.epochs[-1].get("budget_units")
    if budget:
        ax.axhline(budget / scale, color="#c44e52", linestyle="--", label=f"budget {_amount(budget, unit)}")
    twin = ax.twinx()
    twin.plot(epochs, [m["channels_selected"] for m in report.epochs], "k.-", label="input channels")
    twin.set_ylim(0, max(m["channels_selected"] for m in report.epochs) * 1.35 + 1)
    twin.set_ylabel("input channels trained")
    top = max([*used, (budget or 0) / scale])
    ax.set_ylim(0, top * 1.35 if top > 0 else 1)
    ax.set_ylabel(f"cost ({label})")
    ax.set_title("channel budget: cost of the channels trained each epoch")
    handles = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper right", fontsize=9, ncol=3)
    ax.grid(axis="y", alpha=0.3)


def _heatmap_panel(fig, ax, report: RunReport, epochs: np.ndarray, grid: np.ndarray) -> None:
    if not report.layers:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no input channels trained in any epoch (classifier only)", ha="center", va="center")
        return
    masked = np.ma.masked_equal(grid, 0)
    image = ax.imshow(
        masked,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(report.layers) - 0.5, -0.5),
    )
    ax.set_facecolor("#f2f2f2")  # zero channels: blank
    labels = [
        f"{name} ({report.layer_widths[name]})" if name in report.layer_widths else name for name in report.layers
    ]
    ax.set_yticks(range(len(labels)), labels, fontsize=8)  # rows are 0.21 inch (15 pt) high
    _epoch_axis(ax, epochs)
    if grid.size and len(report.layers) <= 60 and len(epochs) <= 40:
        high = np.percentile(grid[grid > 0], 60) if (grid > 0).any() else 0
        for row, col in zip(*np.nonzero(grid), strict=True):
            color = "black" if grid[row, col] > high else "white"
            ax.text(epochs[col], row, str(grid[row, col]), ha="center", va="center", fontsize=6.5, color=color)
    width = " (layer width in brackets)" if report.layer_widths else ""
    ax.set_title(f"input channels trained per layer and epoch{width}; blank: none")
    ax.set_ylabel("candidate layer (network order)")
    fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03, label="input channels trained")


def _epoch_axis(ax, epochs: Sequence[int], from_zero: bool = False) -> None:
    """Epoch ticks (at most ~25) and limits; ``from_zero`` also shows epoch 0 (before training)."""
    ticks = ([0] if from_zero else []) + list(epochs)
    step = max(1, int(np.ceil(len(ticks) / 25)))
    ax.set_xticks(ticks[::step])
    ax.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)
    ax.set_xlabel("epoch")


# --- reading ------------------------------------------------------------------------------------


def _read_records(path: Path, required: Sequence[str]) -> list[dict]:
    try:
        records = read_jsonl(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReportError(f"{path}: unreadable ({exc})") from exc
    for number, record in enumerate(records, 1):
        missing = [name for name in required if not isinstance(record, dict) or name not in record]
        if missing:
            listed = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
            raise ReportError(f"{path}: line {number} lacks {listed} (not written by edge-trady?)")
    return records


def _read_summary(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReportError(f"{path}: unreadable ({exc})") from exc
    return summary if isinstance(summary, dict) else None


def _layer_order(per_epoch: Sequence[dict[str, int]]) -> list[str]:
    """Every layer named in ``per_epoch``, in network order as far as the records tell it: each
    epoch lists its layers in that order, so keep every observed precedence (a topological sort)
    and break ties by the module path, numbers compared as numbers (``features.2`` < ``features.10``)."""
    after: dict[str, set[str]] = {}
    before_count: dict[str, int] = {}
    for names in per_epoch:
        names = list(names)
        for name in names:
            after.setdefault(name, set())
            before_count.setdefault(name, 0)
        for first, second in zip(names, names[1:], strict=False):
            if second not in after[first]:
                after[first].add(second)
                before_count[second] += 1
    ready = [name for name, count in before_count.items() if count == 0]
    order: list[str] = []
    while ready:
        ready.sort(key=_natural_key)
        name = ready.pop(0)
        order.append(name)
        for successor in after[name]:
            before_count[successor] -= 1
            if before_count[successor] == 0:
                ready.append(successor)
    return order + sorted(set(after) - set(order), key=_natural_key)  # contradictory records: by name


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]


def _new_processes(epochs: Sequence[dict]) -> list[int]:
    """Epochs trained by another process than the epoch before: where the run was resumed."""
    return [
        after["epoch"]
        for before, after in zip(epochs, epochs[1:], strict=False)
        if before.get("process") and after.get("process") and before["process"] != after["process"]
    ]


def _initial_val_acc(report: RunReport) -> float | None:
    return report.summary.get("initial_val_acc") if report.summary else None


def _amount(value: float, unit: str) -> str:
    return format_bytes(value) if unit == "bytes" else f"{value:,.0f} units"
