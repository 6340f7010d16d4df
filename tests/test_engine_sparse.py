import copy
import gc

import numpy as np
import pytest
import torch
from torch import nn

from edge_trady.core.masks import channel_mask
from edge_trady.core.selection import Selection
from edge_trady.engines.sparse_ops import pack_bits, unpack_bits
from edge_trady.engines.torch_masked import TorchMaskedEngine
from edge_trady.engines.torch_sparse import SavedTensorLedger, TorchSparseEngine
from edge_trady.workstation.cost_trace import trace_layers
from edge_trady.workstation.models import build_model, classifier_name


def _batch(seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """8 random images and labels of 4 classes."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((8, 3, size, size)).astype(np.float32), rng.integers(0, 4, 8)


@pytest.fixture
def mobilenet(tiny_model):
    """The tiny MobileNetV2 with BatchNorm statistics of one random batch, variance floored: gradients
    neither vanish (random init) nor blow float noise up over a few steps (tiny variances)."""
    built, layers = tiny_model
    bns = [m for m in built.module.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0
    built.module.train()
    with torch.no_grad():
        built.module(torch.from_numpy(_batch(99)[0]))
    built.module.eval()
    for bn in bns:
        bn.running_var.clamp_(min=0.01)
    return built, layers


def _pick(layer, rng: np.random.Generator, share: float = 0.3) -> np.ndarray:
    count = max(1, int(layer.in_channels * share))
    return np.sort(rng.choice(layer.in_channels, count, replace=False))


def _selections(layers, epochs: int = 3) -> list[Selection]:
    """Different channels each epoch of: the stem, a 1x1, a depthwise, a middle and the last two convs."""
    convs = layers[:-1]
    pointwise = next(layer for layer in convs[1:] if layer.kind == "conv" and layer.kernel == (1, 1))
    depthwise = next(layer for layer in convs if layer.kind == "dwconv")
    chosen = [convs[0], pointwise, depthwise, convs[len(convs) // 2], convs[-2], convs[-1]]
    rng = np.random.default_rng(1)
    return [Selection(e, {layer.name: _pick(layer, rng) for layer in chosen}, 0.0) for e in range(epochs)]


def _twins(model: nn.Module, layers, classifier: str, **options):
    masked = TorchMaskedEngine(model, layers, classifier)
    sparse = TorchSparseEngine(copy.deepcopy(model), layers, classifier, **options)
    return masked, sparse


def _assert_same_training(masked, sparse, selections, size: int, lr: float) -> None:
    before = {k: v.clone() for k, v in masked.model.state_dict().items()}
    for selection in selections:
        masked.set_selection(selection)
        sparse.set_selection(selection)
        for step in range(2):
            x, y = _batch(10 * selection.epoch + step, size=size)
            loss_masked, correct_masked = masked.train_step(x, y, lr)
            loss_sparse, correct_sparse = sparse.train_step(x, y, lr)
            assert loss_sparse == pytest.approx(loss_masked, rel=1e-5)
            assert correct_sparse == correct_masked
    expected, actual = masked.model.state_dict(), sparse.model.state_dict()
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-6, msg=key)
    trained = {name + ".weight" for s in selections for name in s.channels}
    assert all(not torch.equal(before[key], expected[key]) for key in trained)  # the test trains something


def test_mobilenet_matches_the_masked_engine_over_changing_selections(mobilenet) -> None:
    built, layers = mobilenet
    masked, sparse = _twins(built.module, layers, built.classifier)
    _assert_same_training(masked, sparse, _selections(layers), size=32, lr=0.02)
    assert [type(m) for m in sparse.model.modules()] == [type(m) for m in built.module.modules()]


def test_efficientnet_lite_matches_the_masked_engine_over_changing_selections() -> None:
    built = build_model("efficientnet-lite0", num_classes=4, image_size=32, seed=0)
    layers = trace_layers(built.module, 32)
    masked, sparse = _twins(built.module, layers, built.classifier)
    _assert_same_training(masked, sparse, _selections(layers), size=32, lr=0.1)


class _GroupedNet(nn.Module):
    """Grouped (not depthwise) conv, 'same' padding with an even kernel, a conv bias, ReLU and ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            nn.ZeroPad2d((1, 0, 0, 1)),
            nn.Conv2d(16, 12, 4, padding="same", groups=2),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(12, 4)
        for bn in (self.features[1], self.features[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_grouped_convolutions_match_the_masked_engine() -> None:
    torch.manual_seed(0)
    model = _GroupedNet().eval()
    layers = trace_layers(model, 16)
    assert [layer.kind for layer in layers] == ["conv", "gconv", "gconv", "linear"]
    rng = np.random.default_rng(0)
    selections = [Selection(e, {layer.name: _pick(layer, rng, 0.4) for layer in layers[:3]}, 0.0) for e in range(3)]
    selections[-1].channels[layers[1].name] = np.arange(layers[1].in_channels)  # a whole grouped conv
    masked, sparse = _twins(model, layers, classifier_name(model), packed_masks=True)
    _assert_same_training(masked, sparse, selections, size=16, lr=0.1)


def test_unselected_entries_stay_bit_identical(mobilenet) -> None:
    built, layers = mobilenet
    by_name = {layer.name: layer for layer in layers}
    engine = TorchSparseEngine(built.module, layers, built.classifier)
    before = {k: v.clone() for k, v in built.module.state_dict().items()}
    selection = _selections(layers, epochs=1)[0]
    engine.set_selection(selection)
    for step in range(3):
        engine.train_step(*_batch(step), lr=0.02)
    after = built.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = {name + ".weight" for name in selection.channels}
    assert changed == allowed | {built.classifier + ".weight", built.classifier + ".bias"}
    for name, channels in selection.channels.items():
        mask = torch.from_numpy(channel_mask(by_name[name], channels)).expand_as(before[name + ".weight"])
        old, new = before[name + ".weight"], after[name + ".weight"]
        assert torch.equal(old[mask == 0], new[mask == 0])
        assert not torch.equal(old[mask == 1], new[mask == 1])


def _masked_saved(engine: TorchMaskedEngine, x: np.ndarray, y: np.ndarray) -> dict[str, int]:
    model = engine.model
    with SavedTensorLedger([*model.parameters(), *model.buffers()]) as ledger:
        engine.gradients(x, y)
    return ledger.totals()


def test_saves_only_the_selected_channels(mobilenet) -> None:
    built, layers = mobilenet
    x, y = _batch(0)
    selection = _selections(layers, epochs=1)[0]
    masked, sparse = _twins(built.module, layers, built.classifier)
    masked.set_selection(selection)
    sparse.set_selection(selection)
    saved = sparse.saved_bytes(x, y)
    by_name = {layer.name: layer for layer in layers}
    expected = sum(len(c) * by_name[n].act_units_per_channel for n, c in selection.channels.items())
    assert saved["selected"] == len(x) * expected * 4
    weights = sum(len(c) * by_name[n].weight_units_per_channel for n, c in selection.channels.items())
    assert saved["weight_grads"] == weights * 4
    assert saved["classifier"] == len(x) * by_name[built.classifier].in_channels * 4
    assert saved["other"] <= len(x) * 4 * 4 + len(x) * 8 + 8  # the loss: log-softmax, targets, weight
    assert saved["total"] < _masked_saved(masked, x, y)["total"] / 5
    packed = TorchSparseEngine(built.module, layers, built.classifier, packed_masks=True)
    packed.set_selection(selection)
    assert packed.saved_bytes(x, y)["masks"] <= saved["masks"] / 8 + 64

    sparse.set_selection(Selection(0, {}, 0.0))  # classifier only: nothing below it keeps anything
    head_only = sparse.saved_bytes(x, y)
    assert head_only["selected"] == head_only["masks"] == head_only["shared"] == 0
    assert head_only["total"] == head_only["classifier"] + head_only["other"]


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def test_alternating_selections_do_not_leak(mobilenet) -> None:
    built, layers = mobilenet
    engine = TorchSparseEngine(built.module, layers, built.classifier)
    first, second = _selections(layers, epochs=2)
    x, y = _batch(0)
    engine.set_selection(first)
    saved_first = engine.saved_bytes(x, y)
    for step in range(4):  # warm up both selections
        engine.set_selection((first, second)[step % 2])
        engine.train_step(x, y, lr=0.01)
    live = _live_tensors()
    for step in range(20):
        engine.set_selection((first, second)[step % 2])
        engine.train_step(*_batch(step), lr=0.01)
    assert _live_tensors() == live
    assert all(m.free is None and m.free_bias is None for m in engine.trainable.values())
    engine.set_selection(first)
    assert engine.saved_bytes(x, y) == saved_first


def test_predict_and_state_round_trip(mobilenet, tmp_path) -> None:
    built, layers = mobilenet
    engine = TorchSparseEngine(built.module, layers, built.classifier)
    x, y = _batch(0)
    with torch.no_grad():
        expected = built.module(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(engine.predict(x), expected)
    engine.save_state(tmp_path)
    engine.set_selection(_selections(layers, epochs=1)[0])
    engine.train_step(x, y, lr=0.5)
    assert not np.array_equal(engine.predict(x), expected)
    engine.load_state(tmp_path)
    np.testing.assert_array_equal(engine.predict(x), expected)


def test_bit_packing_round_trips() -> None:
    mask = torch.rand(3, 5, 7) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_channel_gradient_norms_agree_between_engines(mobilenet) -> None:
    """gradnorm weighting: both engines report ||dL/dW[:, c]|| of the selected channels (dense,
    depthwise, a whole layer, the linear head excluded), equal to autograd's full gradient."""
    from edge_trady.workstation.rgn import channel_grad_norms

    built, layers = mobilenet
    masked, sparse = _twins(built.module, layers, built.classifier)
    selection = _selections(layers, epochs=1)[0]
    selection.channels[layers[3].name] = np.arange(layers[3].in_channels)  # a whole layer too
    for engine in (masked, sparse):
        engine.record_grad_norms = True
        engine.set_selection(selection)
    x, y = _batch(5)
    _, _, grads = masked.gradients(x, y)  # before the step: the gradient both engines use
    by_name = {layer.name: layer for layer in layers}
    masked.train_step(x, y, 0.01)
    sparse.train_step(x, y, 0.01)
    got_masked, got_sparse = masked.channel_grad_norms(), sparse.channel_grad_norms()
    assert got_masked.keys() == got_sparse.keys() == selection.channels.keys()
    for name, channels in selection.channels.items():
        expected = channel_grad_norms(by_name[name], grads[name]).numpy()[channels]
        assert expected.max() > 0
        np.testing.assert_allclose(got_masked[name], expected, rtol=1e-5)
        np.testing.assert_allclose(got_sparse[name], expected, rtol=1e-4, atol=1e-9)


def test_batchnorm_shifts_train_alike_in_both_engines_and_nothing_else_moves(mobilenet) -> None:
    from edge_trady.workstation.cost_trace import norm_pairs

    built, layers = mobilenet
    pairs = norm_pairs(built.module, 32)
    selections = _selections(layers)
    shifts = [pairs[name] for name in selections[0].channels if name in pairs]
    before = {k: v.clone() for k, v in built.module.state_dict().items()}
    masked = TorchMaskedEngine(built.module, layers, built.classifier, train_shifts=shifts)
    sparse = TorchSparseEngine(copy.deepcopy(built.module), layers, built.classifier, train_shifts=shifts)
    _assert_same_training(masked, sparse, selections, size=32, lr=0.02)
    after = sparse.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    weights = {name + ".weight" for s in selections for name in s.channels}
    head = {built.classifier + ".weight", built.classifier + ".bias"}
    assert changed == weights | head | {name + ".bias" for name in shifts}  # BN scale and statistics frozen
