"""Trace a torch model once to get the LayerCost of every Conv2d and Linear layer."""

from __future__ import annotations

import torch
from torch import nn

from ..core.layers import LayerCost
from ..errors import EdgeTradyError


def trace_layers(model: nn.Module, image_size: int) -> list[LayerCost]:
    """Conv2d/Linear layers in execution order, with shapes seen on a ``[1, 3, S, S]`` input."""
    seen: dict[str, LayerCost] = {}
    order: list[str] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        name = names[module]
        if name in seen:
            raise EdgeTradyError(
                f"layer {name!r} is called twice in one forward pass (shared weights are not supported)"
            )
        seen[name] = _layer_cost(name, module, inputs[0], output)
        order.append(name)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    _probe_forward(model, handles, image_size)
    return [seen[name] for name in order]


def _probe_forward(model: nn.Module, handles: list, image_size: int) -> None:
    """One eval-mode forward of a ``[1, 3, S, S]`` zero image; then ``handles`` are removed and
    the model's train/eval mode is restored."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _layer_cost(name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerCost:
    if isinstance(module, nn.Linear):
        if x.dim() != 2:
            raise EdgeTradyError(f"layer {name!r}: Linear on a {x.dim()}-D input is not supported")
        return LayerCost(name, "linear", module.in_features, module.out_features, (1, 1), 1, (1, 1), (1, 1))
    assert isinstance(module, nn.Conv2d)
    if module.groups == 1:
        kind = "conv"
    elif module.groups == module.in_channels:
        kind = "dwconv"
    else:
        kind = "gconv"
    return LayerCost(
        name,
        kind,
        module.in_channels,
        module.out_channels,
        tuple(module.kernel_size),
        module.groups,
        (x.shape[2], x.shape[3]),
        (y.shape[2], y.shape[3]),
    )


def following_batchnorms(model: nn.Module, image_size: int) -> dict[str, str]:
    """Conv2d name -> the BatchNorm that normalises its output directly (conv -> BN pairs)."""
    produced: dict[int, str] = {}
    pairs: dict[str, str] = {}
    names = {module: name for name, module in model.named_modules()}

    def after_conv(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        produced[id(output)] = names[module]

    def before_norm(module: nn.Module, inputs: tuple) -> None:
        conv = produced.get(id(inputs[0]))
        if conv is not None:
            pairs[conv] = names[module]

    handles = [m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [
        m.register_forward_pre_hook(before_norm)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    _probe_forward(model, handles, image_size)
    return pairs
