"""Helpers shared by the benchmark scripts (run as ``python bench/<script>.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEVICE_PYTHON = ROOT / ".venv-device" / "bin" / "python"  # plain onnxruntime, no torch (scripts/setup.sh)
MODEL = "efficientnet-lite0"


def cli(*args: str, python: str | Path = sys.executable) -> None:
    """Run ``edge-trady ARGS`` in a fresh process of ``python``; fail loudly if it fails."""
    subprocess.run([str(python), "-m", "edge_trady", *args], check=True)


def kill_after_first_epoch(proc: subprocess.Popen, run: Path, what: str) -> None:
    """SIGKILL ``proc`` as soon as the end-of-epoch-1 checkpoint of its run folder ``run`` exists."""
    latest = run / "checkpoints" / "LATEST"
    while proc.poll() is None and not (latest.is_file() and latest.read_text().startswith("epoch0001-step000000")):
        time.sleep(0.02)
    if proc.poll() is not None:
        raise SystemExit(f"{what}: the run ended before it could be killed after epoch 1")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def ensure_ranking(
    image_size: int, per_class: int = 20, seed: int = 0, model: str = MODEL, path: Path | None = None
) -> Path:
    """The layer ranking of ``model`` at ``image_size`` (computed once: 1 epoch, lr 0.01)."""
    path = path or RESULTS / f"ranking-{model}-{image_size}px.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cli("rank", "--model", model, "--data", "fashion-mnist", "--per-class", str(per_class),
            "--image-size", str(image_size), "--epochs", "1", "--lr", "0.01", "--seed", str(seed), "--quiet",
            "-o", str(path))  # fmt: skip
    return path


def device_python() -> Path:
    """The torch-free device environment (plain onnxruntime); an error says how to make it."""
    if not DEVICE_PYTHON.exists():
        raise SystemExit(f"error: {DEVICE_PYTHON} is missing: run 'bash scripts/setup.sh' first")
    return DEVICE_PYTHON


def device_profile(profile: str) -> Path:
    """``profile`` with its onnxruntime baseline re-measured in the device environment.

    The workstation's own profile measures the ``ort`` baseline with onnxruntime-training 1.19.2;
    the portable runner runs on plain onnxruntime (another build, another import footprint), as
    on a real device, where ``edge-trady profile`` measures it. Measured once, kept in
    bench/results/.
    """
    path = RESULTS / f"profile-{Path(profile).stem}-device-venv.json"
    if not path.exists():
        measured = RESULTS / "profile-device-venv.tmp.json"
        cli("profile", "--engines", "ort", "--bench-seconds", "0", "-q", "-o", str(measured), python=device_python())
        from edge_trady.core.atomic import write_json
        from edge_trady.device.profile import load_profile

        base = load_profile(profile).to_dict()
        baseline = json.loads(measured.read_text())["runtime_baseline_bytes"]["ort"]
        base["runtime_baseline_bytes"] = {**base["runtime_baseline_bytes"], "ort": baseline}
        base["name"] = f"{base['name']}-device-venv"
        base["notes"] = "ort baseline measured with plain onnxruntime in .venv-device (bench/benchlib.py)"
        write_json(path, base, indent=2)
        measured.unlink()
    return path


@dataclass(frozen=True)
class Setup:
    """How one engine of the benchmarks is planned and run in a fresh process."""

    name: str
    plan_engine: str  # edge-trady plan --engine
    method: str
    runner: str  # "run" (an exported artifact) or "finetune"
    device: bool = False  # runs in the torch-free device environment


SETUPS = {
    s.name: s
    for s in (
        Setup("portable", "portable", "trady", "run", device=True),
        Setup("ort", "ort", "trady", "run"),
        Setup("torch-sparse", "torch-sparse", "trady", "finetune"),
        Setup("torch-masked", "torch-masked", "trady", "finetune"),
        Setup("torch-full", "torch-masked", "full-frozen-bn", "finetune"),  # every weight, BN frozen as on the devices
    )
}


def make_plan(
    name: str, image_size: int, batch: int, budget: str, per_class: int, profile: str, path: Path, epochs: int = 1
) -> dict:
    """``edge-trady plan`` for engine ``name`` (its method, its profile) written to ``path``; its memory."""
    setup = SETUPS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    cli("plan", "--model", MODEL, "--image-size", str(image_size), "--engine", setup.plan_engine,
        "--method", setup.method, "--profile", str(device_profile(profile)) if setup.device else profile,
        "--batch-size", str(batch), "--budget", "100%" if setup.method.startswith("full") else budget,
        "--ranking", str(ensure_ranking(image_size)), "--data", "fashion-mnist", "--per-class", str(per_class),
        "--epochs", str(epochs), "--quiet", "-o", str(path))  # fmt: skip
    return json.loads(path.read_text())["memory"]


def train_fresh(
    name: str,
    image_size: int,
    batch: int,
    budget: str,
    per_class: int,
    profile: str,
    directory: Path,
    resumed: bool = False,
) -> dict:
    """Plan, export (artifact engines) and train one epoch of engine ``name`` in a fresh process;
    ``resumed``: two epochs, the process SIGKILLed once the end-of-epoch-1 checkpoint exists and the
    run continued with ``--resume`` in a fresh process (the peak is that process's).

    Returns the plan's predicted memory (``predicted``), the process's real peak (``measured_bytes``:
    VmHWM over the epoch records and the summary, i.e. training, checkpoints and the final model
    export) and the paths written under ``directory`` (``plan``, ``artifact``, ``run``).
    """
    setup = SETUPS[name]
    plan = directory / "plan.json"
    predicted = make_plan(name, image_size, batch, budget, per_class, profile, plan, epochs=2 if resumed else 1)
    run = directory / "run"
    artifact = None
    python: str | Path = sys.executable
    if setup.runner == "run":
        artifact = directory / "artifact"
        cli("export", str(plan), "-o", str(artifact), "--quiet")
        python = device_python() if setup.device else sys.executable
        job = ["run", str(artifact), "--train", "fashion-mnist", "--force"]
    else:
        job = ["finetune", "--plan", str(plan), "--data", "fashion-mnist"]
    job += ["--per-class", str(per_class), "--out", str(run), "--quiet"]
    if resumed:
        proc = subprocess.Popen([str(python), "-m", "edge_trady", *job])
        kill_after_first_epoch(proc, run, name)
        job.append("--resume")
    cli(*job, python=python)
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    measured = max([r["peak_rss_bytes"] for r in records if not resumed] + [summary["peak_rss_bytes"]])
    return {"predicted": predicted, "measured_bytes": measured, "plan": plan, "artifact": artifact, "run": run}


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
