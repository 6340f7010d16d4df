"""Defaults that never make a model worse: the default plan, trained on real Fashion-MNIST, ends
above training the classifier alone, on this workstation's profile and on a Raspberry Pi 4's.

Slow (a few minutes on 2 cores): ``python -m pytest -m slow tests/test_defaults.py``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_trady.core.plan import Plan

COMMON = ["--data", "fashion-mnist", "--per-class", "60", "--quiet"]


def _cli(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "edge_trady", *args], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr


def _final(out: Path) -> tuple[float, float]:
    summary = json.loads((out / "summary.json").read_text())
    return summary["initial_val_acc"], summary["final_val_acc"]


@pytest.fixture(scope="module")
def classifier_only(tmp_path_factory) -> float:
    out = tmp_path_factory.mktemp("classifier-only") / "run"
    _cli("finetune", "--method", "classifier-only", "--engine", "torch-sparse", "--out", str(out), *COMMON)
    return _final(out)[1]


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["this-workstation", "raspberry-pi-4-2gb"])
def test_default_plan_ends_above_classifier_only(profile: str, classifier_only: float, tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    _cli("plan", "--profile", profile, "-o", str(plan_path), *COMMON)
    plan = Plan.load(plan_path)
    assert plan.method == "trady" and any("default budget" in note for note in plan.notes)
    out = tmp_path / "run"
    # the plan's engine is ONNX Runtime; torch-sparse trains the same weights (tests/test_ort.py), faster here
    _cli("finetune", "--plan", str(plan_path), "--engine", "torch-sparse", "--out", str(out), *COMMON)
    before, after = _final(out)
    assert after > before
    assert after > classifier_only, f"default plan {after:.4f} <= classifier-only {classifier_only:.4f}"
