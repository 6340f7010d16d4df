"""ONNX Runtime engine: export, parity with the torch masked engine, torch-free device side."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import randomize_batchnorm
from torch import nn

from edge_trady.core.masks import channel_mask
from edge_trady.core.selection import Selection
from edge_trady.engines.ort_runtime import ArtifactLayout
from edge_trady.engines.ort_training import OrtEngine, export_inference
from edge_trady.engines.torch_masked import TorchMaskedEngine
from edge_trady.errors import ArtifactError
from edge_trady.workstation.cost_trace import trace_layers
from edge_trady.workstation.export.ort_training import export_training_artifact
from edge_trady.workstation.models import build_model

SIZE = 32
DW, PW, PROJECT, IDLE = (
    "features.15.conv.3",
    "features.16.conv.0",
    "features.16.conv.6",
    "features.3.conv.0",
)
REPO = Path(__file__).resolve().parents[1]


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affine and a larger head, so every gradient matters."""
    gen = torch.Generator().manual_seed(seed)
    randomize_batchnorm(model, gen, var_spread=1.5)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5, generator=gen)
    return model


def _batches(count: int, n: int = 8, size: int = SIZE, classes: int = 10, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((n, 3, size, size), dtype=np.float32), rng.integers(0, classes, n)) for _ in range(count)
    ]


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """MobileNetV2-w0.35 @ 32 px exported with a depthwise and two pointwise convs trainable,
    plus one trainable layer that no selection below uses."""
    built = build_model("mobilenetv2-w0.35", num_classes=10, image_size=SIZE, seed=0)
    model = _randomize(built.module)
    layers = trace_layers(model, SIZE)
    directory = tmp_path_factory.mktemp("artifact")
    layout = export_training_artifact(model, layers, [DW, PW, PROJECT, IDLE], built.classifier, SIZE, directory)
    return model, layers, layout, directory


def _selection() -> Selection:
    channels = {
        DW: np.array([1, 5, 7, 100]),
        PW: np.array([0, 3, 50]),
        PROJECT: np.arange(0, 336, 7),
    }
    return Selection(0, channels, 0.0)


def test_layout_round_trips_and_names_torch_parameters(mobilenet) -> None:
    model, _, layout, directory = mobilenet
    assert ArtifactLayout.load(directory) == layout
    assert ArtifactLayout.from_dict(layout.to_dict()) == layout
    names = dict(model.named_parameters())
    assert all(name in names for name in layout.trainable_params)
    assert layout.masks == {f"mask::{n}.weight": n for n in (DW, PW, PROJECT, IDLE)}
    ops = {node.op_type for node in onnx.load(directory / layout.training_model).graph.node}
    assert not ops & {"BatchNormalization", "BatchNormInternal", "Pad"}


def test_steps_match_the_torch_masked_engine(mobilenet) -> None:
    model, layers, layout, directory = mobilenet
    ort, ref = OrtEngine(directory), TorchMaskedEngine(copy.deepcopy(model), layers, "classifier")
    before = {name: ort.parameter(name) for name in layout.trainable_params}
    np.testing.assert_allclose(ort.predict(_batches(1)[0][0]), ref.predict(_batches(1)[0][0]), atol=1e-4)
    for engine in (ort, ref):
        engine.set_selection(_selection())
    for x, y in _batches(3):
        loss, correct = ort.train_step(x, y, 0.5)
        ref_loss, ref_correct = ref.train_step(x, y, 0.5)
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        assert correct == ref_correct
    trained = dict(ref.model.named_parameters())
    for name in layout.trainable_params:
        np.testing.assert_allclose(ort.parameter(name), trained[name].detach().numpy(), atol=1e-5)
    for name in (f"{DW}.weight", f"{PW}.weight", f"{PROJECT}.weight"):
        assert np.abs(ort.parameter(name) - before[name]).max() > 1e-4  # really trained


def test_unselected_and_frozen_parameters_stay_bit_identical(mobilenet) -> None:
    _, _, layout, directory = mobilenet
    engine = OrtEngine(directory)
    before = {name: engine.parameter(name) for name in engine.parameter_names()}
    selection = _selection()
    engine.set_selection(selection)
    for x, y in _batches(3):
        engine.train_step(x, y, 0.5)
    costs = {layer.name: layer for layer in layout.layers}
    for name, value in before.items():
        after = engine.parameter(name)
        layer = name.removesuffix(".weight")
        if layer in selection.channels:
            frozen = np.broadcast_to(channel_mask(costs[layer], selection.channels[layer]) == 0, after.shape)
            assert np.array_equal(after[frozen], value[frozen]), name
            assert not np.array_equal(after[~frozen], value[~frozen]), name
        elif not name.startswith("classifier."):
            assert np.array_equal(after, value), name  # frozen, or trainable but unselected (IDLE)


def test_device_side_imports_and_trains_without_torch(mobilenet) -> None:
    directory = mobilenet[3]
    script = f"""
import sys
import numpy as np
import edge_trady.engines.ort_training as ort
assert "torch" not in sys.modules and "onnx" not in sys.modules, "pulled in by onnxruntime"
sys.modules["torch"] = None
from edge_trady.core.selection import Selection
engine = ort.OrtEngine({str(directory)!r})
engine.set_selection(Selection(0, {{{PW!r}: np.array([1, 2])}}, 0.0))
x = np.zeros((4, 3, {SIZE}, {SIZE}), np.float32)
loss, correct = engine.train_step(x, np.array([0, 1, 2, 3]), 0.1)
print(round(loss, 3), engine.predict(x).shape)
"""
    blocked = "import sys; sys.modules['torch'] = None; import edge_trady.engines.ort_training"
    subprocess.run([sys.executable, "-c", blocked], check=True, cwd=REPO)
    done = subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, capture_output=True, text=True)
    assert done.stdout.strip().endswith("(4, 10)")


def test_inference_export_and_state_round_trip(mobilenet, tmp_path) -> None:
    directory = mobilenet[3]
    engine = OrtEngine(directory)
    engine.set_selection(_selection())
    (x, y), (x_test, _) = _batches(2)
    engine.train_step(x, y, 0.5)
    engine.save_state(tmp_path)
    engine.export_inference(tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    logits = engine.predict(x_test)
    np.testing.assert_allclose(session.run(None, {"input": x_test})[0], logits, atol=1e-4)
    restored = OrtEngine(directory)
    restored.load_state(tmp_path)
    assert np.array_equal(restored.predict(x_test), logits)
    export_inference(directory, tmp_path, tmp_path / "again.onnx")
    again = onnxruntime.InferenceSession(str(tmp_path / "again.onnx"))
    np.testing.assert_allclose(again.run(None, {"input": x_test})[0], logits, atol=1e-4)


class _Padded(nn.Module):
    """Asymmetric zero padding before a strided conv (as EfficientNet's same-padding conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv = nn.Conv2d(3, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 8, 1)
        self.bn_head = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_head(self.head(torch.relu(self.bn(self.conv(self.pad(x)))))))
        return self.fc(x.mean((2, 3)))


def test_pads_merge_into_conv_and_batchnorm_is_gone(tmp_path) -> None:
    torch.manual_seed(0)
    model = _Padded().eval()
    with torch.no_grad():
        for bn in (model.bn, model.bn_head):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    layers = trace_layers(model, 16)
    layout = export_training_artifact(model, layers, ["head"], "fc", 16, tmp_path)
    graph = onnx.load(tmp_path / layout.eval_model).graph
    assert {"Pad", "BatchNormalization"}.isdisjoint(node.op_type for node in graph.node)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OrtEngine(tmp_path).predict(x), expected, atol=1e-5)


class _Tiny(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.volume = nn.Conv3d(1, 1, 1)
        self.act = act
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.volume(x.unsqueeze(1)).squeeze(1)
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize(
    ("act", "trainable", "message"),
    [
        (nn.ReLU(), ["volume"], "'volume' is a Conv3d"),
        (nn.Hardswish(), ["conv"], "HardSwish in layer 'act'"),
    ],
)
def test_unsupported_layers_and_ops_raise_artifact_error(tmp_path, act, trainable, message) -> None:
    model = _Tiny(act).eval()
    with pytest.raises(ArtifactError, match=message):
        export_training_artifact(model, trace_layers(model, 8), trainable, "fc", 8, tmp_path)


@pytest.mark.slow
def test_efficientnet_lite0_matches_torch(tmp_path) -> None:
    """Pretrained ReLU6 nets have pre-activations within 1e-6 of 0: an fp32 rounding difference
    flips a few ReLU6 gradients (ORT agreed with a float64 reference where torch fp32 did not),
    so weights are compared relative to how far they moved."""
    built = build_model("efficientnet-lite0", num_classes=10, image_size=64, seed=0)
    layers = trace_layers(built.module, 64)
    names = [layer.name for layer in layers if layer.name != built.classifier]
    trainable = names[len(names) // 2 :]
    layout = export_training_artifact(built.module, layers, trainable, built.classifier, 64, tmp_path)
    ops = {node.op_type for node in onnx.load(tmp_path / layout.training_model).graph.node}
    assert not ops & {"BatchNormalization", "BatchNormInternal", "Pad"}
    costs = {layer.name: layer for layer in layers}
    rng = np.random.default_rng(0)
    channels = {n: np.sort(rng.choice(costs[n].in_channels, 8, replace=False)) for n in trainable[::3]}
    ort = OrtEngine(tmp_path)
    ref = TorchMaskedEngine(copy.deepcopy(built.module), layers, built.classifier)
    before = {name: ort.parameter(name) for name in layout.trainable_params}
    x = _batches(1, size=64)[0][0]
    np.testing.assert_allclose(ort.predict(x), ref.predict(x), atol=1e-4)
    for engine in (ort, ref):
        engine.set_selection(Selection(0, channels, 0.0))
    for x, y in _batches(3, size=64):
        loss, _ = ort.train_step(x, y, 0.01)
        assert loss == pytest.approx(ref.train_step(x, y, 0.01)[0], rel=1e-4)
    trained = dict(ref.model.named_parameters())
    for name in layout.trainable_params:
        moved = np.abs(trained[name].detach().numpy() - before[name]).max()
        diff = np.abs(ort.parameter(name) - trained[name].detach().numpy()).max()
        assert diff <= 1e-5 + 0.1 * moved, name
