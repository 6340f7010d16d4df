"""The heartbeat: written by the training loop while it makes progress, read by `edge-trady health`
(the image's HEALTHCHECK), and pinging a systemd watchdog."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_trady.cli import cli
from edge_trady.core.selection import CandidateLayer, ChannelSampler, Selection
from edge_trady.device import heartbeat as hb
from edge_trady.device.data import MINUS_ONE_TO_ONE, load_dataset
from edge_trady.device.loop import Stopped, TrainConfig, train
from edge_trady.device.progress import Progress
from edge_trady.errors import EdgeTradyError


class RecordingEngine:
    """A linear classifier on mean pixel colours that records the heartbeat seen at each step."""

    name = "recording"

    def __init__(self, run_dir: Path, fail_at: int | None = None, stop_at: int | None = None) -> None:
        self.run_dir, self.fail_at, self.stop_at = run_dir, fail_at, stop_at
        self.w = np.zeros((3, 4), np.float32)
        self.steps = 0
        self.seen: list[dict | None] = []

    def weights_finite(self) -> bool:
        return bool(np.isfinite(self.w).all())

    def set_selection(self, selection: Selection) -> None:
        pass

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, int]:
        self.steps += 1
        path = self.run_dir / hb.HEARTBEAT_FILE
        self.seen.append(json.loads(path.read_text()) if path.exists() else None)
        if self.steps == self.fail_at:
            raise RuntimeError("engine failure")
        if self.steps == self.stop_at:
            os.kill(os.getpid(), 15)  # SIGTERM: the loop checkpoints and stops after this step
        feats = x.mean(axis=(2, 3))
        logits = feats @ self.w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = float(-np.log(p[np.arange(len(y)), y] + 1e-9).mean())
        p[np.arange(len(y)), y] -= 1
        self.w -= lr * feats.T @ p / len(y)
        return loss, int((logits.argmax(1) == y).sum())

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x.mean(axis=(2, 3)) @ self.w

    def save_state(self, directory: Path) -> None:
        np.save(directory / "w.npy", self.w)

    def load_state(self, directory: Path) -> None:
        self.w = np.load(directory / "w.npy")


def _train(run_dir: Path, engine: RecordingEngine, every: int, epochs: int = 2, resume: bool = False) -> None:
    data = load_dataset("synthetic:4", "train", 8, MINUS_ONE_TO_ONE, per_class=10, seed=0)  # 40 images
    sampler = ChannelSampler("trady", [CandidateLayer("conv", 8, 1.0)], 4.0, seed=0)
    config = TrainConfig(epochs=epochs, batch_size=4, lr=0.1, seed=0, heartbeat_every=every)
    train(engine, sampler, data, None, config, run_dir, Progress(quiet=True), resume=resume)


def _beat(run_dir: Path) -> dict:
    return json.loads((run_dir / hb.HEARTBEAT_FILE).read_text())


def test_loop_beats_every_n_steps_and_at_epoch_ends(tmp_path: Path) -> None:
    engine = RecordingEngine(tmp_path)
    _train(tmp_path, engine, every=3)  # 10 steps per epoch, 2 epochs
    steps = [(b["epoch"], b["step"]) for b in engine.seen]
    # before step k+1 the file holds the last multiple of 3 (or the start / epoch-end beat)
    assert steps[:10] == [(1, 0), (1, 0), (1, 0), (1, 3), (1, 3), (1, 3), (1, 6), (1, 6), (1, 6), (1, 9)]
    assert steps[10:13] == [(2, 0), (2, 0), (2, 0)]  # the epoch-end beat opens epoch 2
    assert {b["status"] for b in engine.seen} == {hb.TRAINING}
    assert len({b["time"] for b in engine.seen}) == 8  # start, steps 3, 6, 9 of each epoch, epoch 1 end
    last = _beat(tmp_path)
    assert (last["status"], last["epoch"], last["epochs"], last["step"]) == (hb.FINISHED, 2, 2, 0)
    assert last["steps_per_epoch"] == 10 and last["pid"] == os.getpid()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temporary left


def test_failure_and_stop_leave_a_last_beat(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _train(tmp_path / "a", RecordingEngine(tmp_path / "a", fail_at=5), every=100)
    beat = _beat(tmp_path / "a")
    assert (beat["status"], beat["epoch"], beat["step"]) == (hb.FAILED, 1, 4)  # after 4 good steps
    with pytest.raises(Stopped):
        _train(tmp_path / "b", RecordingEngine(tmp_path / "b", stop_at=13), every=100)
    beat = _beat(tmp_path / "b")
    assert (beat["status"], beat["epoch"], beat["step"]) == (hb.STOPPED, 2, 3)
    healthy, why = hb.health(tmp_path / "b", 600)
    assert not healthy and "not running: stopped at epoch 2/2, step 3/10" in why
    _train(tmp_path / "b", RecordingEngine(tmp_path / "b"), every=100, resume=True)
    assert _beat(tmp_path / "b")["status"] == hb.FINISHED


def test_resume_of_a_finished_run_writes_no_heartbeat(tmp_path: Path) -> None:
    _train(tmp_path, RecordingEngine(tmp_path), every=5)
    before = (tmp_path / hb.HEARTBEAT_FILE).read_bytes()
    mtime = (tmp_path / hb.HEARTBEAT_FILE).stat().st_mtime_ns
    _train(tmp_path, RecordingEngine(tmp_path), every=5, resume=True)
    assert (tmp_path / hb.HEARTBEAT_FILE).read_bytes() == before
    assert (tmp_path / hb.HEARTBEAT_FILE).stat().st_mtime_ns == mtime


def _write(run_dir: Path, **change) -> None:
    beat = hb.Beat(hb.TRAINING, 2, 5, 30, 63, 1000.0, 500.0, "boot-a", 42)
    (run_dir / hb.HEARTBEAT_FILE).write_text(json.dumps(dataclasses.asdict(dataclasses.replace(beat, **change))))


@pytest.mark.parametrize(
    ("change", "healthy", "words"),
    [
        ({}, True, "making progress: training at epoch 2/5, step 30/63, 100 s ago"),
        ({"monotonic": 300.0}, False, "no progress for 300 s (limit 200 s)"),
        ({"status": hb.FINISHED, "monotonic": 0.0}, True, "training finished"),
        ({"status": hb.FAILED}, False, "not running: failed"),
        ({"boot_id": "boot-b", "time": 700.0}, False, "no progress for 1300 s"),  # other boot: wall clock
    ],
)
def test_health_by_age_and_status(tmp_path, monkeypatch, change, healthy, words) -> None:
    monkeypatch.setattr(hb, "_boot_id", lambda: "boot-a")
    monkeypatch.setattr(hb.time, "monotonic", lambda: 600.0)
    monkeypatch.setattr(hb.time, "time", lambda: 2000.0)
    _write(tmp_path, **change)
    ok, why = hb.health(tmp_path, 200)
    assert ok is healthy and words in why


def test_health_command_exit_status_for_docker(tmp_path: Path, monkeypatch) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["health", str(tmp_path)])
    assert result.exit_code == 1 and "unhealthy: no heartbeat in" in result.output
    (tmp_path / hb.HEARTBEAT_FILE).write_text("{not json")
    assert runner.invoke(cli, ["health", str(tmp_path)]).exit_code == 1
    _train(tmp_path, RecordingEngine(tmp_path), every=5, epochs=1)
    monkeypatch.setenv("EDGE_TRADY_RUN", str(tmp_path))  # the image's default run folder
    result = runner.invoke(cli, ["health", "--max-age", "1m"])
    assert result.exit_code == 0 and result.output.startswith("ok: training finished")
    _write(tmp_path, boot_id="", time=0.0)
    monkeypatch.setenv("EDGE_TRADY_HEALTH_MAX_AGE", "2h")
    result = runner.invoke(cli, ["health"])
    assert result.exit_code == 1 and "(limit 7200 s)" in result.output
    result = runner.invoke(cli, ["health", "--max-age", "soon"])  # main() prints it as one error line
    assert isinstance(result.exception, EdgeTradyError) and "cannot read duration 'soon'" in str(result.exception)


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400), (" 2M ", 120)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert hb.parse_duration(text) == seconds


def test_parse_duration_refuses_garbage() -> None:
    with pytest.raises(EdgeTradyError, match="cannot read duration '10 minutes'"):
        hb.parse_duration("10 minutes")


def test_beats_ping_the_systemd_watchdog(tmp_path: Path, monkeypatch) -> None:
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        _train(tmp_path / "run", RecordingEngine(tmp_path / "run"), every=4, epochs=1)  # 10 steps
        pings = []
        server.settimeout(0.2)
        while True:
            try:
                pings.append(server.recv(64))
            except TimeoutError:
                break
    assert pings == [b"WATCHDOG=1"] * 4  # start, steps 4 and 8, the epoch end
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    _train(tmp_path / "run2", RecordingEngine(tmp_path / "run2"), every=4, epochs=1)  # no error
