import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edge_trady.cli import cli
from edge_trady.device.runlog import read_jsonl

BASE = [
    "finetune",
    "--model",
    "mobilenetv2-w0.35",
    "--data",
    "synthetic:4",
    "--image-size",
    "32",
    "--batch-size",
    "16",
    "--quiet",
]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_trady", *args], capture_output=True, text=True, timeout=300)


def _finetune(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    result = CliRunner().invoke(cli, [*BASE, "--out", str(out), *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_finetune_writes_weights_metrics_and_selections(tmp_path: Path) -> None:
    out = _finetune(tmp_path, "trady", "--method", "trady", "--budget", "3%", "--epochs", "3")
    metrics = read_jsonl(out / "metrics.jsonl")
    selections = read_jsonl(out / "selection.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert all(0 < m["units_used"] <= m["budget_units"] for m in metrics)
    assert {"train_loss", "train_acc", "val_acc", "lr", "time_s", "channels_per_layer"} <= set(metrics[0])
    assert len({json.dumps(s["channels"], sort_keys=True) for s in selections}) == 3  # redrawn each epoch
    ranked = json.loads((out / "ranking.json").read_text())
    top_k = {layer["name"] for layer in ranked["layers"][: ranked["k"]]}
    assert all(set(s["channels"]) <= top_k for s in selections)  # TraDy draws from the top-K only
    state = torch.load(out / "model.pt", weights_only=True)
    assert "classifier.weight" in state


def test_static_method_keeps_selection_and_bytes_budget_holds(tmp_path: Path) -> None:
    out = _finetune(tmp_path, "s", "--method", "s-full-random", "--budget", "64KiB", "--epochs", "2")
    metrics = read_jsonl(out / "metrics.jsonl")
    selections = read_jsonl(out / "selection.jsonl")
    assert selections[0]["channels"] == selections[1]["channels"]
    assert all(m["budget_unit"] == "bytes" and m["units_used"] <= 64 * 1024 for m in metrics)


def test_det_rgn_oracle_runs(tmp_path: Path) -> None:
    out = _finetune(tmp_path, "det", "--method", "d-det-rgn", "--budget", "2%", "--epochs", "2")
    assert len(read_jsonl(out / "selection.jsonl")) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
        (["--model", "nosuchnet"], "unknown model"),
        (["--budget", "12 parsecs"], "budget"),
        (["--model", "missing.py:fn"], "missing.py"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = _run(*BASE, "--out", str(tmp_path / "x"), "--epochs", "1", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr and result.stderr.startswith("error:")


@pytest.mark.parametrize("weighting", ["uniform", "gradnorm"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path, weighting: str) -> None:
    """gradnorm: the next epoch's draw depends on this epoch's gradient norms, kept in checkpoints."""
    args = [
        *BASE,
        "--weighting",
        weighting,
        "--method",
        "trady",
        "--budget",
        "3%",
        "--epochs",
        "3",
        "--per-class",
        "48",
        "--checkpoint-every",
        "2",
        "--ranking",
        str(_ranking(tmp_path)),
    ]
    whole = tmp_path / "whole"
    assert _run(*args, "--out", str(whole)).returncode == 0
    broken = tmp_path / "broken"
    proc = subprocess.Popen([sys.executable, "-m", "edge_trady", *args, "--out", str(broken)])
    latest = broken / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        name = latest.read_text() if latest.exists() else ""
        if name.startswith("epoch0001-step") and not name.endswith("step000000"):
            break  # a mid-epoch checkpoint of the second epoch exists
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.read_text().startswith("epoch0001-step")  # killed inside the second epoch
    resumed = _run(*args, "--out", str(broken), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(broken / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(whole / "selection.jsonl") == read_jsonl(broken / "selection.jsonl")
    assert len(read_jsonl(broken / "metrics.jsonl")) == 3


def _ranking(tmp_path: Path) -> Path:
    path = tmp_path / "ranking.json"
    result = _run(
        "rank",
        "--model",
        "mobilenetv2-w0.35",
        "--data",
        "synthetic:4",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--quiet",
        "-o",
        str(path),
    )
    assert result.returncode == 0, result.stderr
    return path
