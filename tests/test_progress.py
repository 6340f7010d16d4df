"""What a person sees: plain progress lines off a terminal (rate, ETAs, RSS vs predicted peak), the
live bar on one, silence with quiet; the loop drives both for every engine."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_trady.cli import cli
from edge_trady.device.progress import EVERY_ENV, Progress
from edge_trady.device.runlog import read_jsonl
from edge_trady.errors import EdgeTradyError

MiB = 2**20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _progress(every_s: float, **kwargs) -> tuple[Progress, io.StringIO, Clock]:
    stream, clock = io.StringIO(), Clock()
    return Progress(every_s=every_s, stream=stream, clock=clock, **kwargs), stream, clock


def _epoch(progress: Progress, clock: Clock, epoch: int, steps: range, seconds_per_step: float = 2.0) -> None:
    for step in steps:
        clock.now += seconds_per_step
        progress.step(epoch, step, 32 * step, loss=1.0 / step)


def test_plain_lines_every_n_seconds_with_rate_etas_and_memory() -> None:
    progress, stream, clock = _progress(10, predicted_peak_bytes=252 * MiB)
    progress.start(epochs=2, steps_per_epoch=10, images_per_epoch=320)
    _epoch(progress, clock, 0, range(1, 11))  # 32 images every 2 s
    clock.now += 1  # evaluation
    progress.line("epoch 1/2 summary")
    _epoch(progress, clock, 1, range(1, 6))
    lines = stream.getvalue().splitlines()
    assert [line.split(" img/s")[0] for line in lines] == [
        "epoch 1/2 step 5/10 (50%) 16.0",  # t = 10 s
        "epoch 1/2 step 10/10 (100%) 16.0",  # t = 20 s
        "epoch 1/2 summary",
        "epoch 2/2 step 5/10 (50%) 16.0",  # t = 31 s: the epoch's rate starts after the summary
    ]
    assert "loss 0.2000 ETA epoch 0:10 run 0:30 RSS " in lines[0]  # 5 steps of 2 s left, 15 in the run
    assert "ETA epoch 0:00 run 0:20" in lines[1]
    assert "ETA epoch 0:10 run 0:10" in lines[3]  # run: 5 steps at 31 s / 15 steps
    rss = re.search(r"RSS ([\d.]+) MiB of predicted peak 252.0 MiB$", lines[0])
    assert rss and float(rss.group(1)) > 10  # this process's current RSS


def test_every_step_resumed_quiet_and_env() -> None:
    progress, stream, clock = _progress(0)  # 0: a line per step
    progress.start(epochs=3, steps_per_epoch=10, images_per_epoch=320, epoch=1, step=4, images=128)
    _epoch(progress, clock, 1, range(5, 8))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch 2/3 step 5/10 (50%) 16.0 img/s loss 0.2000")
    assert "ETA epoch 0:10 run 0:30" in lines[0] and lines[0].endswith("MiB")  # 15 steps left, no prediction

    quiet, stream, clock = _progress(0, quiet=True)
    quiet.start(epochs=1, steps_per_epoch=2, images_per_epoch=64)
    _epoch(quiet, clock, 0, range(1, 3))
    quiet.line("epoch 1/1 summary")
    assert stream.getvalue() == ""


def test_every_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVERY_ENV, "7.5")
    assert Progress(stream=io.StringIO()).every_s == 7.5
    assert Progress(every_s=2, stream=io.StringIO()).every_s == 2  # the option wins
    monkeypatch.delenv(EVERY_ENV)
    assert Progress(stream=io.StringIO()).every_s == 30
    monkeypatch.setenv(EVERY_ENV, "soon")
    with pytest.raises(EdgeTradyError, match=f"{EVERY_ENV}='soon'"):
        Progress(stream=io.StringIO())


def test_live_bar_shows_images_rate_loss_eta_and_memory() -> None:
    progress, stream, clock = _progress(30, live=True, predicted_peak_bytes=100 * MiB)
    progress.start(epochs=2, steps_per_epoch=10, images_per_epoch=320)
    _epoch(progress, clock, 0, range(1, 6))
    shown = stream.getvalue()
    assert "epoch 1/2" in shown and "img" in shown and "/320" in shown
    assert re.search(r"160/320 .*img/s, loss 0\.2000, run ETA 0:30, RSS \d+ MiB \(plan 100\)]", shown)
    progress.line("epoch 1/2 summary")
    assert stream.getvalue().endswith("epoch 1/2 summary\n")


def test_finetune_prints_progress_lines_off_a_terminal(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["finetune", "--model", "mobilenetv2-w0.35", "--data", "synthetic:4", "--image-size", "32"]
    args += ["--batch-size", "16", "--method", "d-full-random", "--epochs", "2", "--progress-every", "0"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    steps = re.findall(r"^epoch (\d)/2 step (\d+)/8 \(\d+%\) [\d.]+ img/s loss [\d.]+ ETA", result.stderr, re.M)
    assert steps == [(str(e), str(s)) for e in (1, 2) for s in range(1, 9)]  # 128 images / 16: 8 steps
    summaries = re.findall(r"^epoch (\d)/2 loss .* train_acc", result.stderr, re.M)
    assert summaries == ["1", "2"]
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]  # the JSON logs as before
