import numpy as np
import torch
import torch.nn.functional as F

from edge_trady.core.masks import channel_mask
from edge_trady.core.selection import Selection
from edge_trady.device.data import load_dataset
from edge_trady.engines.torch_masked import TorchMaskedEngine


def _batch(seed: int = 0, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 32, 32)).astype(np.float32), rng.integers(0, 4, n)


def _selection(layers) -> Selection:
    by_kind = {}
    for layer in layers[:-1]:
        by_kind.setdefault(layer.kind, layer)
    chosen = {layer.name: np.array([0, 2]) for layer in by_kind.values()}  # a dense, a depthwise conv
    chosen[layers[20].name] = np.arange(0, layers[20].in_channels, 2)
    return Selection(0, chosen, 0.0)


def test_masked_step_equals_autograd_reference_on_the_same_mask(tiny_model) -> None:
    built, layers = tiny_model
    by_name = {layer.name: layer for layer in layers}
    selection = _selection(layers)
    reference = {k: v.clone() for k, v in built.module.state_dict().items()}
    x, y = _batch()
    # Reference: gradient of the loss w.r.t. W where only the selected slices are free variables.
    model = built.module
    weights = {name: model.get_submodule(name).weight for name in selection.channels}
    for param in model.parameters():
        param.requires_grad_(False)
    for name, weight in weights.items():
        mask = torch.from_numpy(channel_mask(by_name[name], selection.channels[name]))
        free = weight.detach().clone().requires_grad_(True)
        weights[name] = free
        model.get_submodule(name).weight = torch.nn.Parameter(free * mask + weight.detach() * (1 - mask))
    loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    ref_grads = torch.autograd.grad(loss, [model.get_submodule(n).weight for n in weights])
    ref_grads = {
        n: g * torch.from_numpy(channel_mask(by_name[n], selection.channels[n]))
        for n, g in zip(weights, ref_grads, strict=True)
    }
    model.load_state_dict(reference)
    for name in weights:  # restore plain parameters
        model.get_submodule(name).weight = torch.nn.Parameter(reference[name + ".weight"].clone())

    engine = TorchMaskedEngine(model, layers, built.classifier)
    engine.set_selection(selection)
    engine.train_step(x, y, lr=0.1)
    for name, grad in ref_grads.items():
        updated = model.get_submodule(name).weight.detach()
        expected = reference[name + ".weight"] - 0.1 * grad
        torch.testing.assert_close(updated, expected, rtol=1e-5, atol=1e-7)


def test_unselected_channels_and_layers_stay_bit_identical(tiny_model) -> None:
    built, layers = tiny_model
    by_name = {layer.name: layer for layer in layers}
    engine = TorchMaskedEngine(built.module, layers, built.classifier)
    before = {k: v.clone() for k, v in built.module.state_dict().items()}
    selection = _selection(layers)
    engine.set_selection(selection)
    for step in range(3):
        engine.train_step(*_batch(step), lr=0.2)
    after = built.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = {name + ".weight" for name in selection.channels} | {
        built.classifier + ".weight",
        built.classifier + ".bias",
    }
    assert changed == allowed  # every other tensor (BN stats too) is bit-identical
    for name, channels in selection.channels.items():
        mask = torch.from_numpy(channel_mask(by_name[name], channels)).expand_as(before[name + ".weight"])
        old, new = before[name + ".weight"], after[name + ".weight"]
        assert torch.equal(old[mask == 0], new[mask == 0])
        assert not torch.equal(old[mask == 1], new[mask == 1])


def test_training_lowers_the_loss_on_real_data() -> None:
    from edge_trady.workstation.cost_trace import trace_layers
    from edge_trady.workstation.models import build_model

    built = build_model("efficientnet-lite0", 10, 32)
    layers = trace_layers(built.module, 32)
    data = load_dataset("fashion-mnist", "train", 32, built.normalization, per_class=6)
    engine = TorchMaskedEngine(built.module, layers, built.classifier)
    engine.set_selection(Selection(0, {layers[-2].name: np.arange(0, 320, 4)}, 0.0))
    x, y = data.batch(np.arange(len(data)))
    first, _ = engine.train_step(x, y, 0.125)
    for _ in range(15):
        last, _ = engine.train_step(x, y, 0.125)
    assert last < 0.5 * first


def test_batchnorm_train_mode_is_full_fine_tuning_as_users_run_it(tiny_model) -> None:
    """`full`: one step equals plain PyTorch SGD on every parameter with BN in train mode (batch
    statistics, running statistics updated); prediction then uses the running statistics."""
    import copy

    built, layers = tiny_model
    reference = copy.deepcopy(built.module)
    for module in reference.modules():  # BatchNorm in train mode, dropout off
        module.train(isinstance(module, torch.nn.modules.batchnorm._BatchNorm))
    x, y = _batch()
    loss = F.cross_entropy(reference(torch.from_numpy(x)), torch.from_numpy(y))
    params = list(reference.parameters())
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for param, grad in zip(params, grads, strict=True):
            param.add_(grad, alpha=-0.1)
    reference.eval()

    engine = TorchMaskedEngine(built.module, layers, built.classifier, batchnorm="train")
    every = {layer.name: np.arange(layer.in_channels) for layer in layers[:-1]}
    engine.set_selection(Selection(0, every, 0.0))
    engine_loss, _ = engine.train_step(x, y, lr=0.1)
    assert abs(engine_loss - float(loss)) < 1e-5
    expected = reference.state_dict()
    for key, value in built.module.state_dict().items():  # weights, BN affine and running statistics
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not built.module.training and all(not m.training for m in built.module.modules())
    torch.testing.assert_close(
        torch.from_numpy(engine.predict(x)), reference(torch.from_numpy(x)), rtol=1e-4, atol=1e-5
    )
