"""Helpers of the fleet benchmarks: a plan and artifact, per-node partitions, and a fleet of real
Flower processes on 127.0.0.1 (the tests' harness) with the peak memory of every process."""

from __future__ import annotations

import json
import sys
import threading
from collections import defaultdict
from pathlib import Path

import psutil
from benchlib import ROOT, cli, ensure_ranking

sys.path.insert(0, str(ROOT / "tests"))
from fleet_harness import Fleet  # noqa: E402

ROLES = {"flower-supernode": "supernode", "flower-superexec": "superexec", "flwr-clientapp": "clientapp"}


def make_plan(
    work: Path,
    image_size: int,
    budget: str,
    batch_size: int,
    lr: float,
    engine: str,
    per_class: int = 20,
    seed: int = 0,
) -> Path:
    """``work/plan-ENGINE.json``: a fleet node's plan (EfficientNet-Lite0, trady, ``plan --fleet``);
    ``seed``: the plan's (classifier initialisation, channel draws, batch order)."""
    work.mkdir(parents=True, exist_ok=True)
    plan = work / f"plan-{engine}.json"
    if plan.is_file():  # an earlier call's, with the same --work: it must be the plan asked for
        made = json.loads(plan.read_text())
        asked = {"lr": lr, "seed": seed, "image_size": image_size, "batch_size": batch_size}
        differs = {k: (made.get(k), v) for k, v in asked.items() if made.get(k) != v}
        if differs:
            raise SystemExit(f"{plan} was made with other settings {differs} (made, asked): use another --work")
    else:
        cli("plan", "--model", "efficientnet-lite0", "--image-size", str(image_size), "--profile",
            "this-workstation", "--engine", engine, "--budget", budget, "--batch-size", str(batch_size), "--lr",
            str(lr), "--data", "fashion-mnist", "--per-class", str(per_class), "--ranking",
            str(ensure_ranking(image_size)), "--seed", str(seed), "--fleet", "-o", str(plan), "--quiet")  # fmt: skip
    return plan


def make_artifact(
    work: Path,
    image_size: int,
    budget: str,
    batch_size: int,
    lr: float,
    per_class: int = 20,
    engine: str = "portable",
    seed: int = 0,
) -> Path:
    """``work/artifact-ENGINE``: the artifact of ``make_plan`` (format onnx for portable, ort-training for ort)."""
    artifact = work / f"artifact-{engine}"
    if not artifact.is_dir():
        plan = make_plan(work, image_size, budget, batch_size, lr, engine, per_class, seed)
        cli("export", str(plan), "-o", str(artifact), "--quiet")
    return artifact


class PeakWatcher:
    """Polls the VmHWM of every process of each node (SuperNode, SuperExec, ClientApps) while it runs."""

    def __init__(self, fleet: Fleet, labels: list[str], every: float = 0.2) -> None:
        self.fleet, self.labels, self.every = fleet, labels, every
        self.peaks: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # label -> role -> bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for label in self.labels:
                for member in self.fleet.family(label):
                    try:
                        command = " ".join(member.cmdline())
                        role = next((r for name, r in ROLES.items() if name in command), None)
                        peak = _vmhwm(member.pid)
                    except (psutil.Error, OSError):
                        continue
                    if role and peak:
                        self.peaks[label][role] = max(self.peaks[label][role], peak)


def _vmhwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
