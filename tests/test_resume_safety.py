"""The shared loop's safety, on a numpy engine (fast, engine-agnostic): resume checks its origin,
keeps two checkpoints and falls back from a corrupt one, validates what it reads, stops on
divergence without saving anything non-finite; run folders refuse, overwrite only what is
theirs, stay final once finished, and lock out a second process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from numpy_engine import NumpyEngine, sampler

from edge_trady.device.checkpoint import CHECKPOINTS, LATEST, STATE_FILE, checkpoint_folders
from edge_trady.device.data import IMAGENET, load_dataset
from edge_trady.device.loop import TrainConfig, train
from edge_trady.device.progress import Progress
from edge_trady.device.rundir import LOCK_FILE, TRAINING_OUTPUTS, open_run_folder
from edge_trady.errors import EXIT_BUSY, EXIT_DIVERGED, CheckpointError, Diverged, RunFolderBusy, RunFolderError

SIZE = 8


class Lines(Progress):
    """Progress that records its lines."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)


def _data(per_class: int = 12, split: str = "train"):
    return load_dataset("synthetic:3", split, SIZE, IMAGENET, per_class, 0)


class Interrupted(Exception):
    pass


def _train(out: Path, resume: bool = False, progress: Progress | None = None, per_class: int = 12, **config):
    """Train in ``out`` (12 images per class: 36 images, 5 steps of 8 per epoch, checkpoints every
    2 steps); ``stop_after`` steps raises Interrupted like a kill would (nothing saved after)."""
    stop_after = config.pop("stop_after", None)
    loss_after = config.pop("nan_loss_after", None)
    settings = {"epochs": 3, "batch_size": 8, "lr": 0.05, "seed": 0, "checkpoint_every": 2} | config
    engine = NumpyEngine(SIZE, 3)
    if stop_after is not None:
        step, steps = engine.train_step, {"n": 0}

        def interrupting(x, y, lr):
            steps["n"] += 1
            if steps["n"] > stop_after:
                raise Interrupted
            return step(x, y, lr)

        engine.train_step = interrupting
    if loss_after is not None:
        real, calls = engine.train_step, {"n": 0}

        def nan_loss(x, y, lr):
            calls["n"] += 1
            loss, correct = real(x, y, lr)
            return (float("nan") if calls["n"] > loss_after else loss), correct

        engine.train_step = nan_loss
    result = train(
        engine,
        sampler(settings["seed"]),
        _data(per_class),
        _data(4, "val"),
        TrainConfig(**settings),
        out,
        progress or Lines(),
        resume=resume,
        origin={"artifact_sha256": "abc"},
    )
    return engine, result


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> tuple[NumpyEngine, object, Path]:
    out = tmp_path_factory.mktemp("whole")
    engine, result = _train(out)
    return engine, result, out


def _stopped_after(out: Path, epochs: int) -> None:
    """Interrupted in the step after ``epochs`` epochs: the newest checkpoint is the end of epoch
    ``epochs``, the previous one its step 4."""
    with pytest.raises(Interrupted):
        _train(out, stop_after=5 * epochs + 1)
    assert [p.name for p in checkpoint_folders(out / CHECKPOINTS)] == [
        f"epoch{epochs:04d}-step000000",
        f"epoch{epochs - 1:04d}-step000004",
    ]


def test_resume_equals_uninterrupted_and_reports_the_start_accuracy(whole, tmp_path: Path) -> None:
    engine, result, _ = whole
    out = tmp_path / "run"
    _stopped_after(out, 1)
    lines = Lines()
    resumed_engine, resumed = _train(out, resume=True, progress=lines)
    assert any(line.startswith("resuming at epoch 2") for line in lines.lines)
    assert np.array_equal(resumed_engine.weight, engine.weight) and np.array_equal(resumed_engine.bias, engine.bias)
    assert resumed.resumed and not result.resumed
    assert resumed.initial_val_acc == result.initial_val_acc is not None  # the checkpoint's, not re-evaluated
    assert [m["train_loss"] for m in resumed.epochs] == [m["train_loss"] for m in result.epochs]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 1}, "seed"),
        ({"per_class": 9}, "train_data"),
        ({"epochs": 4}, "epochs"),
        ({"batch_size": 4}, "batch_size"),
        ({"lr": 0.01}, "lr"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_run(whole, tmp_path: Path, change: dict, named: str) -> None:
    out = tmp_path / "run"
    _stopped_after(out, 1)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(CheckpointError, match=rf"was made by another run: {named} .* there, .* here"):
        _train(out, resume=True, **change)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused before writing


def test_resume_refuses_another_artifact(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _stopped_after(out, 1)
    engine = NumpyEngine(SIZE, 3)
    config = TrainConfig(3, 8, 0.05, None, 0, 2)
    with pytest.raises(CheckpointError, match=r"artifact_sha256 'abc' there, 'other' here"):
        origin = {"artifact_sha256": "other"}
        train(engine, sampler(), _data(), _data(4, "val"), config, out, Lines(), None, True, origin)


def test_two_checkpoints_are_kept_and_a_user_folder_survives(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / CHECKPOINTS / "my-notes").mkdir(parents=True)
    _train(out)
    names = sorted(p.name for p in (out / CHECKPOINTS).iterdir())
    assert names == [LATEST, "epoch0002-step000004", "epoch0003-step000000", "my-notes"]
    assert (out / CHECKPOINTS / LATEST).read_text() == "epoch0003-step000000"


def _corrupt_weights(folder: Path) -> None:
    path = folder / "weights.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _out_of_range(folder: Path) -> None:
    record = json.loads((folder / STATE_FILE).read_text())
    record["state"]["epoch"] = 99
    (folder / STATE_FILE).write_text(json.dumps(record))


def _bad_selection(folder: Path) -> None:
    record = json.loads((folder / STATE_FILE).read_text())
    record["state"].update(step_in_epoch=1, seen=8, selection={"epoch": 1, "cost": 1.0, "channels": {"fc": [7]}})
    (folder / STATE_FILE).write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("breaker", "reason"),
    [
        (_corrupt_weights, "weights.npz: content does not match the checkpoint's hash"),
        (lambda f: (f / STATE_FILE).write_text('{"version": 2, "sta'), "loop_state.json: unreadable"),
        (_out_of_range, "epoch 99 (step 0) is past the run's 3"),
        (_bad_selection, "channels of 'fc' must be distinct sorted indices in [0, 3)"),
    ],
)
def test_a_bad_latest_checkpoint_falls_back_to_the_previous(whole, tmp_path: Path, breaker, reason: str) -> None:
    engine, _, _ = whole
    out = tmp_path / "run"
    _stopped_after(out, 2)  # newest epoch0002-step000000, previous epoch0001-step000004
    newest, previous = checkpoint_folders(out / CHECKPOINTS)
    breaker(newest)
    lines = Lines()
    resumed, _ = _train(out, resume=True, progress=lines)
    warning = next(line for line in lines.lines if line.startswith("warning:"))
    assert reason in warning and f"falling back to the previous checkpoint {previous.name}" in warning
    assert np.array_equal(resumed.weight, engine.weight)  # the previous one resumed to the same end


def test_no_usable_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _stopped_after(out, 2)
    for folder in checkpoint_folders(out / CHECKPOINTS):
        _out_of_range(folder)
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*start again with --overwrite"):
        _train(out, resume=True)


def test_latest_pointing_elsewhere_is_ignored(whole, tmp_path: Path) -> None:
    engine, _, _ = whole
    out = tmp_path / "run"
    _stopped_after(out, 1)
    (out / CHECKPOINTS / LATEST).write_text("../../other-run/checkpoints/epoch0002-step000000")
    lines = Lines()
    resumed, _ = _train(out, resume=True, progress=lines)
    assert any("using the newest checkpoint folder epoch0001-step000000" in line for line in lines.lines)
    assert np.array_equal(resumed.weight, engine.weight)


def test_divergence_stops_keeps_the_last_good_checkpoint_and_saves_nothing_non_finite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _stopped_after(out, 1)  # good checkpoints first ...
    good = {p: p.read_bytes() for p in (out / CHECKPOINTS).rglob("*") if p.is_file()}
    with pytest.raises(Diverged, match="epoch 2/3, step 1: loss nan at learning rate") as err:
        _train(out, resume=True, nan_loss_after=0)
    assert "the last good checkpoint" in str(err.value) and "epoch0001-step000000 is kept" in str(err.value)
    assert {p: p.read_bytes() for p in (out / CHECKPOINTS).rglob("*") if p.is_file()} == good
    with pytest.raises(Diverged, match="training diverged at epoch 1/1, step .*: loss .* at learning rate") as err:
        _train(tmp_path / "fresh", lr=1e38, epochs=1)
    assert err.value.exit_code == EXIT_DIVERGED == 4
    assert "no checkpoint had been written" in str(err.value)
    assert not checkpoint_folders(tmp_path / "fresh" / CHECKPOINTS)


def test_non_finite_weights_stop_the_run_before_any_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Weights that went inf while the loss of the step was still finite (it is computed first)."""
    calls = {"n": 0}
    real = NumpyEngine.train_step

    def step(self, x, y, lr):
        loss, correct = real(self, x, y, lr)
        calls["n"] += 1
        if calls["n"] == 2:
            self.weight[0, 0, 0] = np.inf
        return loss, correct

    monkeypatch.setattr(NumpyEngine, "train_step", step)
    with pytest.raises(Diverged, match="epoch 1/3, step 2: non-finite weights"):
        _train(tmp_path / "run")
    assert not checkpoint_folders(tmp_path / "run" / CHECKPOINTS)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"lr": float("nan")}, "learning rate must be a finite number > 0"),
        ({"lr": float("inf")}, "learning rate must be a finite number > 0"),
        ({"lr": -1.0}, "learning rate must be a finite number > 0"),
        ({"seed": -1}, "seed .* must be >= 0"),
    ],
)
def test_train_config_refuses_impossible_settings(config: dict, message: str) -> None:
    with pytest.raises(Exception, match=message):
        TrainConfig(**({"epochs": 1} | config))


# Run folders


def _fill(out: Path) -> dict[str, bytes]:
    """A run folder with our files, a user's file and a user's folder inside checkpoints/."""
    files = {
        "metrics.jsonl": b"{}\n",
        "summary.json": b"{}",
        "checkpoints/epoch0001-step000000/weights.npz": b"w",
        "checkpoints/LATEST": b"epoch0001-step000000",
        "checkpoints/mine/keep.txt": b"user",
        "notes.txt": b"user",
    }
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return files


def test_a_non_empty_folder_is_refused_without_resume_or_overwrite(tmp_path: Path) -> None:
    _fill(tmp_path)
    with pytest.raises(RunFolderError) as err:
        open_run_folder(tmp_path, TRAINING_OUTPUTS, False, False, Lines())
    message = str(err.value)
    assert "is not empty (checkpoints/, metrics.jsonl, notes.txt, summary.json)" in message
    assert "--resume continues the run there, --overwrite replaces" in message and err.value.exit_code == 2
    with pytest.raises(RunFolderError, match="exclude each other"):
        open_run_folder(tmp_path, TRAINING_OUTPUTS, True, True, Lines())


def test_overwrite_removes_only_what_edge_trady_wrote(tmp_path: Path) -> None:
    _fill(tmp_path)
    lines = Lines()
    with open_run_folder(tmp_path / "sub" / "..", TRAINING_OUTPUTS, False, True, lines) as folder:
        assert folder.path == tmp_path.resolve() and not folder.resume
        assert (tmp_path / LOCK_FILE).is_file()
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ["checkpoints", "checkpoints/mine", "checkpoints/mine/keep.txt", "notes.txt"]
    assert lines.lines == [
        f"--overwrite: removed checkpoints/LATEST, checkpoints/epoch0001-step000000, metrics.jsonl, summary.json "
        f"from {tmp_path.resolve()}; kept what edge-trady did not write: checkpoints/mine, notes.txt"
    ]


def _snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def test_a_finished_run_is_final(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with open_run_folder(out, TRAINING_OUTPUTS, False, False, Lines()) as folder:
        _train(folder.path, epochs=1)
        folder.finish("test")
    snapshot = _snapshot(tmp_path)
    folder = open_run_folder(out, TRAINING_OUTPUTS, True, False, Lines())
    assert folder.finished and not folder.resume
    folder.release()
    assert _snapshot(tmp_path) == snapshot  # not even a lock file came and went
    with pytest.raises(RunFolderError, match="holds a finished run"):
        open_run_folder(out, TRAINING_OUTPUTS, False, False, Lines())
    assert _snapshot(tmp_path) == snapshot


def test_resume_without_a_checkpoint_starts_afresh_only_over_our_own_files(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")  # a run killed before its first checkpoint
    with open_run_folder(tmp_path, TRAINING_OUTPUTS, True, False, Lines()) as folder:
        assert not folder.resume and not folder.finished
    (tmp_path / "notes.txt").write_text("user")
    with pytest.raises(RunFolderError, match="is not empty"):
        open_run_folder(tmp_path, TRAINING_OUTPUTS, True, False, Lines())


def test_the_lock_refuses_a_second_process_and_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with open_run_folder(out, TRAINING_OUTPUTS, False, False, Lines()):
        with pytest.raises(RunFolderBusy, match=rf"in use by another edge-trady process \(PID {os.getpid()}") as err:
            open_run_folder(out, TRAINING_OUTPUTS, True, False, Lines())
        assert err.value.exit_code == EXIT_BUSY == 5
    assert not (out / LOCK_FILE).exists()  # released and removed
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from edge_trady.device.rundir import *; "
            "from edge_trady.device.progress import Progress; "
            f"open_run_folder(Path({str(out)!r}), TRAINING_OUTPUTS, False, False, Progress(True)); "
            "print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderBusy, match=rf"PID {holder.pid}"):
        open_run_folder(out, TRAINING_OUTPUTS, True, False, Lines())
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_FILE).is_file()  # left behind by the kill
    lines = Lines()
    deadline = time.monotonic() + 10
    with open_run_folder(out, TRAINING_OUTPUTS, True, False, lines):
        assert time.monotonic() < deadline
    assert any(f"taking over the stale lock of PID {holder.pid}" in line for line in lines.lines)
