"""SIGKILL during each important write leaves the previous good file (or none, never a partial one),
and the next run cleans up and finishes.

The child process pauses at the worst moment of the write it is told to watch: the new content
is complete in its temporary file (or staging folder) and the rename over the target has not yet
happened; it is killed there. Slow (a process per case): ``python -m pytest -m slow``."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from cli_helpers import edge_trady

from edge_trady.device.manifest import Manifest

pytestmark = pytest.mark.slow

HOOK = """
import ctypes, os, sys, time
from pathlib import Path
import edge_trady.core.atomic as atomic

target, ready = os.environ["KILL_TARGET"], Path(os.environ["KILL_READY"])

def pause(dst):
    if Path(dst).name == target:
        ready.write_text(str(os.getpid()))
        time.sleep(600)

real_replace, real_exchange = os.replace, atomic._exchange
def replace(src, dst, *args, **kwargs):
    pause(dst)
    return real_replace(src, dst, *args, **kwargs)
def exchange(a, b):
    pause(b)
    return real_exchange(a, b)
os.replace, atomic._exchange = replace, exchange

from edge_trady.cli import main
main(sys.argv[1:])
"""
RUN = ["--train", "synthetic:4", "--per-class", "8", "--quiet"]


def _killed_while_writing(tmp_path: Path, target: str, *args: object) -> None:
    """Run ``edge-trady ARGS`` in a child; SIGKILL it while it writes ``target`` (a file name)."""
    ready = tmp_path / f"ready-{target}"
    env = {**os.environ, "KILL_TARGET": target, "KILL_READY": str(ready)}
    child = subprocess.Popen([sys.executable, "-c", HOOK, *map(str, args)], env=env)
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert child.poll() is None, f"the child ended (status {child.returncode}) before writing {target}"
        assert time.monotonic() < deadline, f"{target} was never written"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    ready.unlink()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*tmp-*"))


def test_plan_and_profile(small_artifact, tmp_path: Path) -> None:
    plan, _ = small_artifact
    good = tmp_path / "plan.json"
    shutil.copy(plan, good)
    before = _digest(good)
    _killed_while_writing(
        tmp_path, "plan.json", "plan", "--model", "mobilenetv2-w0.35", "--image-size", "32", "--profile",
        "this-workstation", "--num-classes", "4", "--method", "classifier-only", "-o", good, "--quiet",
    )  # fmt: skip
    assert _digest(good) == before
    profile = tmp_path / "device.json"
    code, _, err = edge_trady("profile", "-o", profile, "--engines", "none", "--bench-seconds", "0", "-q")
    assert code == 0, err
    before = _digest(profile)
    _killed_while_writing(tmp_path, "device.json", "profile", "-o", profile, "--engines", "none", "-q")
    assert _digest(profile) == before and json.loads(profile.read_text())["name"]


def test_artifact_replaced_as_a_whole(small_artifact, tmp_path: Path) -> None:
    plan, artifact = small_artifact
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    before = {p.name: _digest(p) for p in copy.iterdir()}
    _killed_while_writing(tmp_path, "artifact", "export", plan, "-o", copy, "--overwrite", "--quiet")
    assert {p.name: _digest(p) for p in copy.iterdir()} == before
    Manifest.load(copy)  # every hash still matches
    code, _, err = edge_trady("export", plan, "-o", copy, "--overwrite", "--quiet")
    assert code == 0, err


@pytest.fixture(scope="module")
def uninterrupted(small_artifact, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    code, _, err = edge_trady("run", small_artifact[1], *RUN, "--out", out)
    assert code == 0, err
    return out


def _weights(model: Path) -> dict[str, bytes]:
    return {init.name: init.SerializeToString() for init in onnx.load(model).graph.initializer}


@pytest.mark.parametrize("target", ["epoch0002-step000000", "model.onnx", "model.json", "summary.json", "done.json"])
def test_run_outputs_then_resume(small_artifact, uninterrupted: Path, tmp_path: Path, target: str) -> None:
    """Killed while writing the last checkpoint or an output: what was there is whole, nothing is
    half-written, and --resume ends with the weights of an uninterrupted run."""
    artifact = small_artifact[1]
    out = tmp_path / "run"
    _killed_while_writing(tmp_path, target, "run", artifact, *RUN, "--out", out)
    assert not (out / "done.json").exists() or target != "done.json"
    if target.startswith("epoch"):
        assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == [
            "LATEST",
            "epoch0001-step000000",
        ]
    for name in ("model.onnx", "model.json", "summary.json"):
        path = out / name
        assert not path.exists() or path.stat().st_size > 0
    assert _temporaries(out)  # the kill left the temporary
    code, _, err = edge_trady("run", artifact, *RUN, "--out", out, "--resume")
    assert code == 0, err
    assert _temporaries(out) == []  # the next run removed it
    assert _weights(out / "model.onnx") == _weights(uninterrupted / "model.onnx")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 and (out / "done.json").is_file()
