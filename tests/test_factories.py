"""The model factories of ``tests/model_factories.py`` (MobileNetV3-, EfficientNet-B0-, ViT-style and a
tiny BertModel) through the planner and the torch engines, as a user runs them: ``inspect``, ``rank``,
``plan --plot``, ``finetune --engine torch-sparse|torch-masked`` with the loss falling."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import edge_trady
from model_factories import tiny_bert

from edge_trady.core.plan import Plan
from edge_trady.core.selection import Selection
from edge_trady.device.profile import load_profile
from edge_trady.device.progress import Progress
from edge_trady.engines.torch_masked import TorchMaskedEngine
from edge_trady.workstation.cost_trace import trace_layers
from edge_trady.workstation.finetune import FinetuneSpec, run_finetune
from edge_trady.workstation.planner import PlanRequest, make_plan
from edge_trady.workstation.ranking import build_ranking
from edge_trady.workstation.rgn import LayerScores

FACTORIES = Path(__file__).with_name("model_factories.py")
SMALL = ["--image-size", "32", "--data", "synthetic:4", "--per-class", "8", "--batch-size", "8", "--seed", "0"]


@pytest.mark.parametrize("factory", ["mobilenetv3_small", "efficientnet_b0", "vit_mha"])
def test_plan_ranks_and_fits_every_factory(factory: str, tmp_path) -> None:
    model = f"{FACTORIES}:{factory}"
    plan_path, picture = tmp_path / "plan.json", tmp_path / "plan.png"
    code, out, err = edge_trady(
        "plan", "--model", model, "--trust-model-code", *SMALL, "--profile", "raspberry-pi-4-2gb",
        "--budget", "5%", "-o", plan_path, *(["--plot", picture] if factory == "vit_mha" else []),
    )  # fmt: skip
    assert code == 0, err
    plan = Plan.load(plan_path)
    assert plan.layers and plan.memory["peak_bytes"] < plan.usable_memory_bytes
    assert "fits: yes" in out
    if factory == "vit_mha":  # the split attention's projections and the MLP, on 17 tokens
        names = {layer["name"]: layer for layer in plan.layers}
        assert any(".attn.mha." in name for name in names) and all(x["in_hw"] == [17, 1] for x in names.values())
        assert picture.stat().st_size > 0
    code, out, err = edge_trady("inspect", "--model", model, "--trust-model-code", "--image-size", "32", "--json")
    assert code == 0, err
    assert {layer["name"] for layer in plan.layers} < {layer["name"] for layer in json.loads(out)}


def test_rank_orders_the_vit_layers(tmp_path) -> None:
    code, out, err = edge_trady(
        "rank", "--model", f"{FACTORIES}:vit", "--trust-model-code", *SMALL, "--epochs", "1", "-o", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, err
    ranking = json.loads((tmp_path / "r.json").read_text())
    assert len(ranking["layers"]) == 13 and ranking["layers"][0]["rgn"] > 0  # patch conv + 12 token Linears
    assert "blocks.1.fc2" in out


@pytest.mark.parametrize(("factory", "engine"), [("efficientnet_b0", "torch-masked"), ("vit_mha", "torch-sparse")])
def test_torch_engines_fine_tune_the_factories(factory: str, engine: str, tmp_path) -> None:
    """Two of the ten pairs (all ten: the slow test below)."""
    _fine_tune(factory, engine, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch-sparse", "torch-masked"])
@pytest.mark.parametrize("factory", ["mobilenetv3_small", "efficientnet_b0", "vit", "vit_mha", "vit_mean"])
def test_torch_engines_fine_tune_every_factory(factory: str, engine: str, tmp_path) -> None:
    _fine_tune(factory, engine, tmp_path)


def _fine_tune(factory: str, engine: str, tmp_path: Path) -> None:
    """D-Full Random at 20 % (no ranking epoch), 3 epochs of 4 steps: the training loss falls, the
    budget holds."""
    spec = FinetuneSpec(
        model=f"{FACTORIES}:{factory}", data="synthetic:4", image_size=32, per_class=8, method="d-full-random",
        budget="20%", epochs=3, batch_size=8, lr=0.05, engine=engine, trust_model_code=True,
    )  # fmt: skip
    result = run_finetune(spec, tmp_path / "run", Progress(quiet=True))
    losses = [epoch["train_loss"] for epoch in result.epochs]
    assert losses[-1] < losses[0], losses
    assert all(0 < epoch["units_used"] <= result.budget_amount for epoch in result.epochs)


def test_a_tiny_bert_is_ranked_and_planned(tmp_path) -> None:
    """RGN ranking from token batches (ids + mask), then ``plan`` on the factory, which declares its
    token input: the encoder's Linears are the candidates, each seeing 16 tokens."""
    torch.manual_seed(0)
    model = tiny_bert(4)
    layers = trace_layers(model, model.example_input)
    engine = TorchMaskedEngine(model, layers, "classifier")
    scores = LayerScores(layers[:-1])
    engine.grad_observer = scores.observe
    engine.set_selection(Selection(0, {layer.name: np.arange(layer.in_channels) for layer in layers[:-1]}, 0.0))
    rng = np.random.default_rng(0)
    for _ in range(3):
        ids = rng.integers(1, 100, (8, 16))
        engine.train_step((ids, np.ones_like(ids)), rng.integers(0, 4, 8), 0.01)
    ranking = build_ranking("tiny-bert", 32, scores.rgn, scores.lara, threshold=0.9)
    assert all(layer.rgn > 0 for layer in ranking.layers) and 0 < ranking.k < 12
    ranking.save(tmp_path / "ranking.json")
    request = PlanRequest(
        model=f"{FACTORIES}:tiny_bert", profile=load_profile("raspberry-pi-4-2gb"), batch_size=8, engine="torch-sparse",
        budget="5%", ranking=str(tmp_path / "ranking.json"), num_classes=4, threshold=0.9, trust_model_code=True,
    )  # fmt: skip
    plan = make_plan(request, Progress(quiet=True))
    assert sorted(layer["name"] for layer in plan.layers) == sorted(ranking.top_k())
    assert all(layer["in_hw"] == [16, 1] and layer["kind"] == "linear" for layer in plan.layers)
    assert plan.classifier["name"] == "classifier" and plan.memory["peak_bytes"] < plan.usable_memory_bytes


@pytest.mark.slow
def test_the_pretrained_minilm_is_planned(tmp_path) -> None:
    """all-MiniLM-L6-v2 at 64 tokens: 36 encoder Linears (Q, K, V, attention output, MLP in and out of
    6 layers), each a candidate seeing 64 tokens; embeddings and LayerNorms frozen."""
    request = PlanRequest(
        model=f"{FACTORIES}:minilm", profile=load_profile("raspberry-pi-4-2gb"), batch_size=16, engine="torch-sparse",
        method="d-full-random", budget="2%", num_classes=8, trust_model_code=True,
    )  # fmt: skip
    plan = make_plan(request, Progress(quiet=True))
    assert len(plan.layers) == 36 and plan.classifier["in_hw"] == [1, 1]
    assert all(layer["kind"] == "linear" and layer["in_hw"] == [64, 1] for layer in plan.layers)
    widths = {(layer["in_channels"], layer["out_channels"]) for layer in plan.layers}
    assert widths == {(384, 384), (384, 1536), (1536, 384)}
    assert plan.memory["peak_bytes"] < plan.usable_memory_bytes
