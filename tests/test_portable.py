"""Portable format: the step graph's gradients equal torch autograd, per layer kind and on whole
networks; SGD leaves unselected entries bit-identical; what the graph keeps; clear export errors."""

import copy

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_batchnorm
from torch import nn

from edge_trady.core.budget import Budget
from edge_trady.core.layers import full_units
from edge_trady.core.selection import Selection
from edge_trady.core.slices import ChannelSlice
from edge_trady.device.data import MINUS_ONE_TO_ONE, load_dataset
from edge_trady.device.loop import TrainConfig, train
from edge_trady.device.progress import Progress
from edge_trady.device.runner import channel_sampler
from edge_trady.engines.portable import PortableEngine
from edge_trady.engines.torch_sparse import TorchSparseEngine
from edge_trady.errors import ArtifactError, EdgeTradyError
from edge_trady.workstation.cost_trace import trace_layers
from edge_trady.workstation.export.liveness import step_liveness
from edge_trady.workstation.export.portable import export_portable_artifact
from edge_trady.workstation.export.step_graph import OPSET
from edge_trady.workstation.models import build_model

RTOL = 1e-5


class Block(nn.Module):
    """One layer kind between a stem conv and a pooled linear head (every conv / linear trainable)."""

    def __init__(self, body: nn.Module, pool: nn.Module | None = None, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.body = body
        self.pool = pool or nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem_bn(self.stem(x)))
        return self.head(torch.flatten(self.pool(self.body(x)), 1))


class Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class HiddenLinear(nn.Module):
    """Conv features -> flatten -> Linear -> ReLU -> classifier (a trainable hidden Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.hidden = nn.Linear(6 * 3 * 3, 7)
        self.head = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardtanh(self.conv(x), -1.0, 1.0)
        return self.head(torch.relu(self.hidden(x.flatten(1))))


def conv_bn_relu(conv: nn.Conv2d, act: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), act or nn.ReLU())


KINDS = {
    "dense stride 2 pad 1": lambda: Block(conv_bn_relu(nn.Conv2d(8, 8, 3, stride=2, padding=1))),
    "dense dilation 2": lambda: Block(conv_bn_relu(nn.Conv2d(8, 8, 3, padding=2, dilation=2))),
    "dense padding same": lambda: Block(conv_bn_relu(nn.Conv2d(8, 8, (3, 2), padding="same"))),
    "static same padding": lambda: Block(nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2))),
    "pointwise stride 2": lambda: Block(conv_bn_relu(nn.Conv2d(8, 12, 1, stride=2)), channels=12),
    "grouped": lambda: Block(conv_bn_relu(nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)), channels=12),
    "grouped one output": lambda: Block(conv_bn_relu(nn.Conv2d(8, 4, 3, padding=1, groups=4)), channels=4),
    "depthwise 3x3": lambda: Block(conv_bn_relu(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6())),
    "depthwise 5x5 stride 2": lambda: Block(conv_bn_relu(nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8))),
    "depthwise multiplier 2": lambda: Block(conv_bn_relu(nn.Conv2d(8, 16, 3, padding=1, groups=8)), channels=16),
    "hardtanh": lambda: Block(nn.Sequential(nn.Conv2d(8, 8, 1), nn.Hardtanh(-0.5, 0.5))),
    "residual add": lambda: Block(Residual(conv_bn_relu(nn.Conv2d(8, 8, 3, padding=1, groups=2)))),
    "average pooling": lambda: Block(conv_bn_relu(nn.Conv2d(8, 8, 1)), nn.AvgPool2d(2), channels=8 * 4 * 4),
    "average pooling no pad count": lambda: Block(
        conv_bn_relu(nn.Conv2d(8, 8, 1)), nn.AvgPool2d(3, 2, 1, count_include_pad=False), channels=8 * 4 * 4
    ),
    "hidden linear": HiddenLinear,
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine (eval mode), so that folding matters."""
    return randomize_batchnorm(model, torch.Generator().manual_seed(seed))


def export(model: nn.Module, size: int, directory, trainable: list[str] | None = None, classifier: str = "head"):
    layers = trace_layers(model, size)
    names = trainable or [layer.name for layer in layers if layer.name != classifier]
    export_portable_artifact(model, layers, names, classifier, size, directory)
    return PortableEngine(directory), {layer.name: layer for layer in layers}


def torch_gradients(model: nn.Module, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """Loss and autograd gradients of ``model`` with ``weights`` loaded (eval mode)."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    for param in params.values():
        param.requires_grad_(False)
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(torch.from_numpy(value))
    leaves = [params[name].requires_grad_() for name in weights]
    loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    return float(loss), dict(zip(weights, (g.numpy() for g in torch.autograd.grad(loss, leaves)), strict=True))


def assert_gradients_match(engine: PortableEngine, model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    loss, _, grads = engine.gradients(x, y)
    expected_loss, expected = torch_gradients(model, dict(engine.trainable_state()), x, y)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    layer_of = engine.layout.layer_of
    for name, grad in grads.items():
        reference = expected[name]
        if name in layer_of:
            reference = engine._slices[layer_of[name]].gather(reference)
        assert grad.shape == reference.shape, name
        scale = max(float(np.linalg.norm(reference)), 1e-12)
        assert np.linalg.norm(grad - reference) <= RTOL * scale, name


def batch(n: int, size: int, classes: int = 5, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, size, size), dtype=np.float32), rng.integers(0, classes, n)


def some_channels(costs: dict, seed: int, empty: str | None = None) -> Selection:
    """About half of every candidate's input channels (none for ``empty``)."""
    rng = np.random.default_rng(seed)
    chosen = {
        name: np.sort(rng.choice(layer.in_channels, max(1, layer.in_channels // 2), replace=False))
        for name, layer in costs.items()
    }
    if empty:
        chosen[empty] = np.zeros(0, dtype=np.int64)
    return Selection(0, chosen, 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_equal_autograd_per_layer_kind(kind: str, tmp_path) -> None:
    """Before and after SGD steps (a refreshed grouped weight then differs from the session's), with
    one candidate's selection empty, and again after a new selection (a new session)."""
    torch.manual_seed(0)
    model = randomize(KINDS[kind]())
    engine, costs = export(model, 8, tmp_path)
    candidates = {name: costs[name] for name in engine.layers}
    x, y = batch(4, 8)
    engine.set_selection(some_channels(candidates, 0, empty=next(iter(candidates))))
    assert_gradients_match(engine, model, x, y)
    for _ in range(2):
        engine.train_step(x, y, 0.5)
    assert_gradients_match(engine, model, *batch(4, 8, seed=2))
    engine.set_selection(some_channels(candidates, 1))
    assert_gradients_match(engine, model, x, y)


@pytest.mark.parametrize(("size", "form"), [(8, "DepthToSpace"), (16, "ConvTranspose")])
def test_strided_grouped_input_gradient_form_by_size(size: int, form: str, tmp_path) -> None:
    """A strided depthwise conv's input gradient spreads it with zeros (DepthToSpace) on a small input,
    is a ConvTranspose on an input of TRANSPOSE_FROM pixels or more: the same gradients either way."""
    torch.manual_seed(0)
    model = randomize(KINDS["depthwise 5x5 stride 2"]())
    engine, costs = export(model, size, tmp_path)
    step = onnx.load(tmp_path / engine.layout.step_model)
    ops = {n.op_type for n in step.graph.node if n.name.startswith("/body/body.0/Conv/grad_input/")}
    assert form in ops, ops
    engine.set_selection(some_channels({name: costs[name] for name in engine.layers}, 0))
    x, y = batch(4, size)
    engine.train_step(x, y, 0.5)
    assert_gradients_match(engine, model, x, y)


def test_unselected_entries_stay_bit_identical_and_empty_selection_trains_the_head(tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize(KINDS["residual add"]())
    engine, costs = export(model, 8, tmp_path)
    selection = some_channels({name: costs[name] for name in engine.layers}, 0)
    before = {name: value.copy() for name, value in engine.trainable_state().items()}
    engine.set_selection(selection)
    x, y = batch(8, 8)
    for _ in range(3):
        engine.train_step(x, y, 0.5)
    after = engine.trainable_state()
    for name, layer in engine.layout.layer_of.items():
        part = ChannelSlice(costs[layer], selection.channels[layer])
        outside = np.ones(before[name].shape, dtype=bool)
        part.scatter_(outside, np.zeros(part.shape, dtype=bool))
        assert np.array_equal(after[name][outside], before[name][outside]), name
        assert not np.array_equal(part.gather(after[name]), part.gather(before[name])), name
    engine.set_selection(Selection(1, {}, 0.0))
    moved = {name: value.copy() for name, value in engine.trainable_state().items()}
    engine.train_step(x, y, 0.5)
    for name, value in engine.trainable_state().items():
        assert np.array_equal(value, moved[name]) == (name in engine.layout.layer_of), name


def test_graphs_use_default_domain_ops_at_opset_17_only(tmp_path) -> None:
    torch.manual_seed(0)
    engine, _ = export(randomize(KINDS["grouped"]()), 8, tmp_path)
    for file in (engine.layout.step_model, engine.layout.inference_model):
        model = onnx.load(tmp_path / file)
        assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)], file
        assert {node.domain for node in model.graph.node} <= {""}, file
        onnx.checker.check_model(model)


@pytest.fixture(scope="module")
def mobilenet():
    """MobileNetV2-w0.35 at 32 px, BatchNorm calibrated (build_model), its layers."""
    built = build_model("mobilenetv2-w0.35", num_classes=10, image_size=32, seed=0)
    return built, trace_layers(built.module, 32)


def test_mobilenetv2_gradients_equal_autograd(mobilenet, tmp_path) -> None:
    built, layers = mobilenet
    model = randomize(copy.deepcopy(built.module))  # random BatchNorm: no ReLU6 input within rounding of 0
    names = [layer.name for layer in layers if layer.name != built.classifier]
    engine, costs = export(model, 32, tmp_path, names[len(names) // 3 :], built.classifier)
    engine.set_selection(some_channels({name: costs[name] for name in engine.layers}, 0))
    x, y = batch(6, 32, classes=10)
    assert_gradients_match(engine, model, x, y)
    engine.train_step(x, y, 0.05)
    assert_gradients_match(engine, model, *batch(6, 32, classes=10, seed=3))


class Factory(nn.Module):
    """A test-written factory model: grouped and depthwise convs, a residual block, a hidden Linear."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = conv_bn_relu(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU6())
        self.grouped = conv_bn_relu(nn.Conv2d(16, 24, 3, padding=1, groups=4))
        self.block = Residual(
            nn.Sequential(
                conv_bn_relu(nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.ReLU6()),
                nn.Conv2d(24, 24, 1),
                nn.BatchNorm2d(24),
            )
        )
        self.down = conv_bn_relu(nn.Conv2d(24, 32, 3, stride=2, padding=1, groups=8))
        self.hidden = nn.Linear(32, 20)
        self.head = nn.Linear(20, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.block(self.grouped(self.stem(x))))
        return self.head(F.relu(self.hidden(x.mean((2, 3)))))


def test_factory_model_with_grouped_convs_and_a_hidden_linear(tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize(Factory())
    engine, costs = export(model, 16, tmp_path)
    assert {costs[name].kind for name in engine.layers} == {"conv", "gconv", "dwconv", "linear"}
    engine.set_selection(some_channels({name: costs[name] for name in engine.layers}, 0))
    x, y = batch(8, 16)
    assert_gradients_match(engine, model, x, y)
    for _ in range(2):
        engine.train_step(x, y, 0.2)
    assert_gradients_match(engine, model, *batch(8, 16, seed=4))


def test_one_epoch_equals_the_torch_sparse_engine(tmp_path) -> None:
    """The training loop, same seed, data and selection, 4 steps: every trainable weight within 1e-4."""
    torch.manual_seed(0)
    model = randomize(Factory(4))
    layers = trace_layers(model, 16)
    engine, costs = export(model, 16, tmp_path / "artifact")
    reference = TorchSparseEngine(copy.deepcopy(model), layers, "head")
    data = load_dataset("synthetic:4", "train", 16, MINUS_ONE_TO_ONE, per_class=8, seed=0)
    candidates = [costs[name] for name in engine.layers]
    config = TrainConfig(epochs=1, batch_size=8, lr=0.1, warmup_epochs=0, seed=0)
    budget = Budget(0.3 * full_units(candidates), "units")
    for name, trainer in (("portable", engine), ("torch", reference)):
        sampler = channel_sampler("trady", candidates, list(engine.layers), budget, 8, 0, "skip")
        train(trainer, sampler, data, None, config, tmp_path / name, Progress(quiet=True))
    trained = dict(reference.model.named_parameters())
    initial = dict(model.named_parameters())
    moved = []
    for name, value in engine.trainable_state().items():
        expected = trained[name].detach().numpy()
        moved.append(np.abs(expected - initial[name].detach().numpy()).max())
        assert moved[-1] > 0, name  # it trained
        assert np.abs(value - expected).max() <= 1e-4, name
    assert max(moved) > 1e-2


def efficientnet_case(size: int, trainable: slice, tmp_path, seed: int = 0):
    built = build_model("efficientnet-lite0", num_classes=10, image_size=size, seed=0)
    layers = trace_layers(built.module, size)
    names = [layer.name for layer in layers if layer.name != built.classifier][trainable]
    engine, costs = export(built.module, size, tmp_path, names, built.classifier)
    engine.set_selection(some_channels({name: costs[name] for name in engine.layers}, seed))
    return built.module, engine


def test_efficientnet_lite0_gradients_equal_autograd_small(tmp_path) -> None:
    """Its last blocks (static-same padded 5x5 depthwise, projections, head) at 32 px."""
    model, engine = efficientnet_case(32, slice(-12, None), tmp_path)
    assert_gradients_match(engine, model, *batch(4, 32, classes=10))


@pytest.mark.slow
def test_efficientnet_lite0_gradients_equal_autograd(tmp_path) -> None:
    """Every layer from the second block on trainable, 64 px, batch 16, before and after steps."""
    model, engine = efficientnet_case(64, slice(3, None), tmp_path)
    x, y = batch(16, 64, classes=10)
    assert_gradients_match(engine, model, x, y)
    engine.train_step(x, y, 0.01)
    assert_gradients_match(engine, model, *batch(16, 64, classes=10, seed=5))


class Swish(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = act
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def test_a_layer_the_exporter_cannot_differentiate_is_named_at_export(tmp_path) -> None:
    with pytest.raises(ArtifactError) as raised:
        export(Swish(nn.Hardswish()).eval(), 8, tmp_path)
    assert str(raised.value).startswith("the portable format cannot differentiate layer 'act' (HardSwish, ONNX node")
    assert "--format ort-training" in str(raised.value) and "torch-sparse" in str(raised.value)


def test_state_round_trips_and_the_exported_model_predicts_like_the_engine(tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize(KINDS["depthwise 3x3"]())
    engine, costs = export(model, 8, tmp_path / "artifact")
    selection = some_channels({name: costs[name] for name in engine.layers}, 0)
    engine.set_selection(selection)
    x, y = batch(8, 8)
    engine.train_step(x, y, 0.5)
    engine.save_state(tmp_path)
    engine.export_inference(tmp_path / "model.onnx")
    logits = engine.predict(x)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"input": x})[0], logits)
    restored = PortableEngine(tmp_path / "artifact")
    restored.load_state(tmp_path)
    assert np.array_equal(restored.predict(x), logits)
    fresh = PortableEngine(tmp_path / "artifact")
    fresh.load_trainable_state(engine.trainable_state())
    fresh.set_selection(selection)
    assert fresh.train_step(x, y, 0.5) == engine.train_step(x, y, 0.5)
    assert all(np.array_equal(a, fresh.trainable_state()[n]) for n, a in engine.trainable_state().items())
    with pytest.raises(ValueError):
        engine.trainable_state()["head.bias"][0] = 1.0  # read-only views
    with pytest.raises(ArtifactError, match="missing tensors \\['head.bias'\\]"):
        fresh.load_trainable_state({n: a for n, a in engine.trainable_state().items() if n != "head.bias"})
    with pytest.raises(EdgeTradyError, match="layer 'stem': selected input channel 3 is out of range"):
        fresh.set_selection(Selection(0, {"stem": np.array([3])}, 0.0))


def test_the_step_keeps_only_selected_channels_masks_and_the_head_input(mobilenet, tmp_path) -> None:
    """ONNX Runtime's own account of one MobileNetV2 step: what is alive when the loss is computed."""
    built, layers = mobilenet
    names = [layer.name for layer in layers if layer.name != built.classifier]
    engine, costs = export(built.module, 32, tmp_path, names[-24:], built.classifier)
    selection = some_channels({name: costs[name] for name in engine.layers}, 0)
    engine.set_selection(selection)
    x, y = batch(16, 32, classes=10)
    live = step_liveness(engine, x, y)
    kinds = live.by_kind()
    selected = sum(4 * len(idx) * 16 * costs[name].act_units_per_channel for name, idx in selection.channels.items())
    assert kinds["selected"] == selected
    assert kinds["classifier input"] == 4 * 16 * costs[built.classifier].in_channels
    assert kinds["masks"] == 16 * clamp_values_after(built.module, 32, set(engine.layers)) // 8  # 1 bit each
    weights = sum(ChannelSlice(costs[name], idx).size for name, idx in selection.channels.items())
    assert kinds["slice differences"] <= 4 * weights
    assert kinds["other"] <= 4 * 8 * selection.channel_count + 4096  # int64 index vectors, logits, loss


def clamp_values_after(model: nn.Module, size: int, candidates: set[str]) -> int:
    """Output values (one sample) of the ReLU / ReLU6 / Hardtanh calls after the earliest candidate."""
    names = {module: name for name, module in model.named_modules()}
    calls: list[tuple[str, int]] = []
    hooks = [
        module.register_forward_hook(lambda m, _, out: calls.append((names[m], out.numel())))
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.ReLU, nn.Hardtanh))
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    earliest = min(i for i, (name, _) in enumerate(calls) if name in candidates)
    modules = dict(model.named_modules())
    return sum(n for name, n in calls[earliest + 1 :] if isinstance(modules[name], (nn.ReLU, nn.Hardtanh)))
