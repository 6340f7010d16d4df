"""``edge-trady report`` on a real finetune folder: the text, the picture's panels hold the run's
numbers, a resumed run is marked, no matplotlib still gives the text, bad folders are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edge_trady.cli import cli
from edge_trady.device.report import figure, load_report, text_summary
from edge_trady.device.runlog import read_jsonl

MiB = 2**20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """4 epochs of TraDy on synthetic data with the sparse engine (ranking computed first)."""
    out = tmp_path_factory.mktemp("report") / "trady"
    args = ["finetune", "--model", "mobilenetv2-w0.35", "--data", "synthetic:4", "--image-size", "32"]
    args += ["--batch-size", "16", "--per-class", "16", "--method", "trady", "--budget", "3%", "--epochs", "4"]
    args += ["--engine", "torch-sparse", "--quiet", "--out", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _report(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import sys; sys.modules['torch'] = None; from edge_trady.cli import main; main()"]
    return subprocess.run([*command, "report", *args], capture_output=True, text=True, timeout=120)


def test_report_of_a_finetune_folder_text_and_picture(run_dir: Path) -> None:
    done = _report(str(run_dir))  # torch cannot be imported: the report is device-side
    assert done.returncode == 0, done.stderr
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = done.stdout.splitlines()
    assert lines[0] == f"{run_dir}: mobilenetv2-w0.35, edge-trady finetune, engine torch-sparse, method trady"
    assert f"{summary['initial_val_acc']:.1%} before -> {metrics[-1]['val_acc']:.1%} after" in done.stdout
    assert f"peak RSS {max(m['peak_rss_bytes'] for m in metrics) / MiB:.1f} MiB in training" in done.stdout
    assert f"{len(summary['top_k'])} layers trained at least once" in done.stdout
    assert lines[-1] == f"  picture    {run_dir / 'report.png'}"
    with Image.open(run_dir / "report.png") as picture:
        assert picture.format == "PNG" and picture.width >= 1200 and picture.height >= 900


def test_picture_panels_hold_the_runs_numbers(run_dir: Path) -> None:
    report = load_report(run_dir)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    selections = read_jsonl(run_dir / "selection.jsonl")
    acc, loss, memory, budget, heat, channels, _ = figure(report).axes
    assert [np.asarray(line.get_ydata()).tolist() for line in acc.lines] == [
        [m["train_acc"] for m in metrics],
        [m["val_acc"] for m in metrics],
        [report.summary["initial_val_acc"]],
    ]
    assert np.asarray(loss.lines[1].get_ydata()).tolist() == [m["val_loss"] for m in metrics]
    assert np.asarray(memory.lines[0].get_ydata()).tolist() == [m["peak_rss_bytes"] / MiB for m in metrics]
    assert [bar.get_height() for bar in budget.patches] == [m["units_used"] for m in metrics]
    assert budget.lines[0].get_ydata()[0] == metrics[0]["budget_units"]  # the budget line
    assert np.asarray(channels.lines[0].get_ydata()).tolist() == [m["channels_selected"] for m in metrics]
    # heatmap: rows are the top-K layers in network order, cells the channels each epoch trained
    grid = np.ma.filled(heat.images[0].get_array(), 0)
    expected = [[len(s["channels"].get(name, [])) for s in selections] for name in report.layers]
    assert grid.tolist() == expected and set(report.layers) == set(report.summary["top_k"])
    assert [t.get_text() for t in heat.get_yticklabels()] == report.layers
    assert grid.sum() == sum(m["channels_selected"] for m in metrics)  # every channel trained is drawn


def test_resumed_run_is_marked_and_predicted_peak_comes_from_a_plan(run_dir: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert len({m["process"] for m in metrics}) == 1
    metrics[2]["process"] = metrics[3]["process"] = "another"  # resumed by another process at epoch 3
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (resumed / "selection.jsonl").write_text((run_dir / "selection.jsonl").read_text())
    report = load_report(resumed)  # no summary.json: unfinished
    assert report.kind == "unfinished" and report.new_process_at == [3] and report.method is None
    assert "4 epoch(s) (resumed at epoch 3)" in text_summary(report)
    memory = figure(report).axes[2]
    assert [line.get_xdata()[0] for line in memory.lines[1:]] == [2.5]  # dotted line before epoch 3

    class FakePlan:  # what load_report reads of a Plan
        layers = [{"name": "never.trained", "in_channels": 7}] + [{"name": n, "in_channels": 8} for n in report.layers]
        method = "trady"
        model = "mobilenetv2-w0.35"

        class estimate:  # noqa: N801
            peak_bytes = 300 * MiB

    planned = load_report(resumed, FakePlan())
    assert planned.layers[0] == "never.trained" and planned.heatmap()[0].tolist() == [0, 0, 0, 0]
    assert planned.predicted_peak_bytes == 300 * MiB and "(predicted 300.0 MiB, " in text_summary(planned)
    assert figure(planned).axes[2].lines[1].get_ydata()[0] == 300  # the predicted line, MiB


def test_without_matplotlib_the_text_still_prints(run_dir: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['matplotlib'] = None\n"
        "from edge_trady.cli import main; main()"
    )
    out = tmp_path / "r.png"
    command = [sys.executable, "-c", code, "report", str(run_dir), "-o", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "val_acc" in done.stdout and not out.exists()
    assert (
        done.stdout.splitlines()[-1]
        == "  picture    none: matplotlib is not installed (pip install 'edge-trady[report]')"
    )


def test_not_a_run_folder_is_one_clear_line(tmp_path: Path) -> None:
    done = _report(str(tmp_path))
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: {tmp_path}: no metrics.jsonl; expected the --out folder of 'edge-trady run' or 'finetune'"
    )
    (tmp_path / "metrics.jsonl").write_text("")
    assert "no epoch finished yet" in _report(str(tmp_path)).stderr
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_lo')
    assert "metrics.jsonl: unreadable" in _report(str(tmp_path)).stderr
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert "metrics.jsonl: line 1 lacks train_loss, train_acc, val_loss, val_acc, ..." in _report(str(tmp_path)).stderr
