import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_trady.core.memory import RunShape, estimate_memory
from edge_trady.core.plan import Plan
from edge_trady.core.selection import Selection
from edge_trady.device.profile import load_profile
from edge_trady.device.progress import Progress
from edge_trady.engines.torch_masked import TorchMaskedEngine
from edge_trady.workstation.cost_trace import trace_layers
from edge_trady.workstation.footprint import trace_footprint
from edge_trady.workstation.planner import PlanRequest, make_plan

ROOT = Path(__file__).resolve().parents[1]
RANKING_64 = ROOT / "bench" / "results" / "ranking-efficientnet-lite0-64px.json"


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_footprint_of_a_small_model_matches_hand_computed_bytes() -> None:
    model = TwoLinear()
    engine = TorchMaskedEngine(model, trace_layers(model, 2), "fc2")
    fp = trace_footprint(model, engine, Selection(0, {"fc1": np.arange(12)}, 0.0), example=2, num_classes=4)
    assert fp.weight_bytes == 4 * (12 * 8 + 8 + 8 * 4 + 4)
    assert fp.input_bytes_per_sample == 4 * 3 * 2 * 2
    assert fp.largest_activation_per_sample == 4 * 8  # fc1's output
    assert fp.forward_peak_per_sample == 4 * (12 + 8)  # fc1's input + output
    # autograd keeps, per sample: fc1's input (12 floats), the ReLU output (8), log-softmax (4), target (int64)
    assert fp.saved_bytes_per_sample == 4 * 12 + 4 * 8 + 4 * 4 + 8
    assert fp.trainable_weight_bytes == 4 * (12 * 8) + 4 * (8 * 4 + 4)  # fc1 weight + classifier


def test_memory_parts_add_up_by_phase() -> None:
    shape = RunShape(batch_size=4, weight_bytes=1000, input_bytes_per_sample=48, largest_activation_per_sample=32,
                     forward_peak_per_sample=80, saved_bytes_per_sample=104, saved_bytes_fixed=4,
                     gradient_bytes=528, dataset_bytes=3000, data_load_bytes=50_000,
                     runtime_baseline_bytes=100_000)  # fmt: skip
    estimate = estimate_memory("torch-masked", shape)
    parts = {p.name: p.bytes for p in estimate.parts}
    assert parts["frozen weights"] == 2000  # weights while loaded: file buffer + parameters
    assert parts["batch buffers"] == 2 * 4 * 48
    assert parts["forward working set"] == 4 * 80
    assert parts["stored activations + backprop chain"] == 4 * 104 + 4
    assert parts["backward transient"] == 2 * 4 * 32
    assert parts["optimizer state"] == 0
    train = 2000 + 384 + 320 + 420 + 528 + 256  # the weights load after the data: training phase
    always = 100_000 + 3000
    assert estimate.peak_bytes == always + max(50_000, train) == 153_000
    assert estimate_memory("torch-masked", RunShape(**{**shape.__dict__, "data_load_bytes": 0})).peak_bytes == (
        always + train
    )


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory) -> tuple[Plan, Path]:
    ranking = tmp_path_factory.mktemp("r") / "ranking.json"
    subprocess.run([sys.executable, "-m", "edge_trady", "rank", "--model", "mobilenetv2-w0.35", "--data",
                    "synthetic:4", "--per-class", "8", "--image-size", "32", "--epochs", "1", "--quiet",
                    "-o", str(ranking)], check=True)  # fmt: skip
    request = PlanRequest(model="mobilenetv2-w0.35", profile=load_profile("raspberry-pi-4-2gb"), image_size=32,
                          batch_size=16, engine="torch-sparse", ranking=str(ranking), data="synthetic:4",
                          per_class=8, epochs=2)  # fmt: skip
    return make_plan(request, Progress(quiet=True)), ranking


def test_plan_round_trips(small_plan, tmp_path: Path) -> None:
    plan, _ = small_plan
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    assert plan.estimate.peak_bytes <= plan.usable_memory_bytes


def test_default_budget_is_the_accuracy_efficient_share_not_all_that_fits(small_plan) -> None:
    from edge_trady.core.layers import full_units
    from edge_trady.workstation.cost_trace import trace_layers
    from edge_trady.workstation.models import build_model

    plan, ranking = small_plan
    units = full_units(trace_layers(build_model("mobilenetv2-w0.35", 4, 32).module, 32))
    assert plan.budget_unit == "units" and plan.budget == pytest.approx(0.025 * units)
    assert any("default budget 2.5%" in note for note in plan.notes)
    request = PlanRequest(model="mobilenetv2-w0.35", profile=load_profile("raspberry-pi-4-2gb"), image_size=32,
                          batch_size=16, engine="torch-sparse", ranking=str(ranking), data="synthetic:4",
                          per_class=8, budget="40%")  # fmt: skip
    assert make_plan(request, Progress(quiet=True)).estimate.peak_bytes > plan.estimate.peak_bytes  # more would fit


def test_sparse_plan_takes_the_largest_budget_that_fits(small_plan) -> None:
    plan, ranking = small_plan
    tight = load_profile("raspberry-pi-4-2gb")
    tight.available_memory_bytes = plan.estimate.peak_bytes - int(plan.budget_bytes) // 2  # the default no longer fits
    request = PlanRequest(model="mobilenetv2-w0.35", profile=tight, image_size=32, batch_size=16,
                          engine="torch-sparse", ranking=str(ranking), data="synthetic:4", per_class=8)  # fmt: skip
    smaller = make_plan(request, Progress(quiet=True))
    assert smaller.estimate.peak_bytes <= tight.usable_memory_bytes < plan.estimate.peak_bytes
    assert smaller.budget_unit == "bytes" and 0 < smaller.budget < plan.budget_bytes
    assert any("does not fit" in note for note in smaller.notes)


def test_plan_file_errors_are_clear(tmp_path: Path, small_plan) -> None:
    plan, _ = small_plan
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(json.dumps(plan.__dict__)), "version": 99}))
    with pytest.raises(Exception, match="version 99"):
        Plan.load(bad)
    bad.write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        Plan.load(bad)


@pytest.mark.parametrize("board", ["raspberry-pi-3b", "raspberry-pi-4-2gb", "jetson-nano-4gb"])
def test_efficientnet_plans_fit_the_named_boards(board: str, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = subprocess.run([sys.executable, "-m", "edge_trady", "plan", "--model", "efficientnet-lite0",
                             "--image-size", "64", "--profile", board, "--ranking", str(RANKING_64),
                             "--num-classes", "10", "--train-images", "1000", "-o", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = Plan.load(out)
    assert 0 < plan.estimate.peak_bytes <= plan.usable_memory_bytes
    assert "predicted peak" in result.stdout and "runtime baseline" in result.stdout


def test_impossible_budget_is_refused_with_what_would_fit(tmp_path: Path) -> None:
    profile = json.loads((ROOT / "edge_trady" / "profiles" / "raspberry-pi-zero-2w.json").read_text())
    profile |= {"name": "tiny-board", "total_memory_bytes": 400 * 2**20, "available_memory_bytes": 330 * 2**20,
                "os_reserved_bytes": 70 * 2**20}  # fmt: skip
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(profile))
    result = subprocess.run([sys.executable, "-m", "edge_trady", "plan", "--model", "efficientnet-lite0",
                             "--image-size", "64", "--profile", str(path), "--engine", "torch-masked",
                             "--ranking", str(RANKING_64), "--num-classes", "10", "--budget", "50%",
                             "-o", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "does not fit tiny-board" in result.stderr and "usable 330.0 MiB" in result.stderr
    assert "what would fit (training the classifier only): --method classifier-only" in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("part ") and "predicted peak" in result.stderr  # the parts, then one error line
    assert lines[-1].startswith("error: budget 50% does not fit tiny-board")
    assert not (tmp_path / "p.json").exists()


def test_plan_compares_the_other_engines(small_plan) -> None:
    _, ranking = small_plan
    zero = load_profile("raspberry-pi-zero-2w")  # aarch64: no onnxruntime-training wheel
    request = PlanRequest(model="mobilenetv2-w0.35", profile=zero, image_size=32, batch_size=16, engine="portable",
                          ranking=str(ranking), data="synthetic:4", per_class=8, compare_engines=True)  # fmt: skip
    plan = make_plan(request, Progress(quiet=True))
    rows = {row["engine"]: row for row in plan.engines}
    assert set(rows) == {"torch-sparse", "torch-masked", "ort"}
    assert rows["ort"]["fits"] == "no" and "no onnxruntime-training wheel exists for aarch64" in rows["ort"]["reason"]
    for name in ("torch-sparse", "torch-masked"):
        row = rows[name]
        assert row["smallest_bytes"] <= row["at_budget_bytes"]
        assert (row["fits"] == "yes") == (row["at_budget_bytes"] <= plan.usable_memory_bytes)
        assert (row["reason"] == "") == (row["fits"] == "yes")
    # the torch runtime alone costs more than the portable engine's whole prediction for the same run
    assert rows["torch-sparse"]["smallest_bytes"] > plan.estimate.peak_bytes
    from edge_trady.commands.plan import summary

    text = summary(plan)
    assert "other engines" in text and "no onnxruntime-training wheel" in text


@pytest.mark.slow
def test_pi_zero_2w_fits_efficientnet_at_128px_only_with_the_portable_engine(tmp_path: Path) -> None:
    """The 512 MB board (deploy/test-512mb.sh runs it): 128 px, batch 16 fits with the portable engine;
    the torch engines do not fit even for the classifier alone, ort has no aarch64 wheel."""
    out = tmp_path / "plan.json"
    result = subprocess.run([sys.executable, "-m", "edge_trady", "plan", "--model", "efficientnet-lite0",
                             "--image-size", "128", "--batch-size", "16", "--profile", "raspberry-pi-zero-2w",
                             "--ranking", str(ROOT / "bench" / "results" / "ranking-efficientnet-lite0-128px.json"),
                             "--num-classes", "10", "--train-images", "1000", "-o", str(out)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = Plan.load(out)
    assert plan.engine == "portable" and plan.budget > 0
    assert plan.estimate.peak_bytes <= plan.usable_memory_bytes
    assert {row["engine"]: row["fits"] for row in plan.engines} == {
        "torch-sparse": "no",
        "torch-masked": "no",
        "ort": "no",
    }
    assert "other engines" in result.stdout
