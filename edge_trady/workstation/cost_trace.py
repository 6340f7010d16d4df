"""Trace a torch model once to get the LayerCost of every Conv2d and Linear layer.

The model runs once (eval mode, no gradient) on an example input (``example_input``: images, or
token ids and a mask); forward hooks see each layer's real input and output shapes. A Linear takes
any number of leading dimensions: on ``[B, T1, .., C]`` its input channel is feature ``c`` (the last
axis) and it sees ``T = T1 * ..`` tokens per sample, recorded as ``in_hw = out_hw = (T, 1)``
(``core.layers``). Only layers called as modules are seen: a weight used through a functional call
(``F.linear(x, self.w)``) is not a candidate (``nn.MultiheadAttention`` is split into modules first,
``workstation.attention``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.layers import LayerCost
from ..engines.torch_state import torch_inputs
from ..errors import EdgeTradyError
from .example_input import ExampleInput, as_example

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def trace_layers(model: nn.Module, example: ExampleInput | int) -> list[LayerCost]:
    """Conv2d/Linear layers in execution order, with the shapes seen on one sample of ``example``
    (an int: an image size)."""
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
    _probe_forward(model, handles, example)
    _refuse_shared_weights(model, order)
    return [seen[name] for name in order]


def _probe_forward(model: nn.Module, handles: list, example: ExampleInput | int) -> None:
    """One eval-mode forward of a one-sample ``example``; then ``handles`` are removed and the
    model's train/eval mode is restored."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*torch_inputs(as_example(example).arrays(1)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _refuse_shared_weights(model: nn.Module, names: list[str]) -> None:
    owner: dict[int, str] = {}
    for name in names:
        weight = model.get_submodule(name).weight
        if id(weight) in owner:
            raise EdgeTradyError(
                f"layers {owner[id(weight)]!r} and {name!r} share one weight (shared weights are not supported)"
            )
        owner[id(weight)] = name


def _layer_cost(name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerCost:
    if isinstance(module, nn.Linear):
        if x.dim() < 2:
            raise EdgeTradyError(f"layer {name!r}: Linear on a {x.dim()}-D input (no batch axis) is not supported")
        tokens = math.prod(x.shape[1:-1])
        return LayerCost(name, "linear", module.in_features, module.out_features, (1, 1), 1, (tokens, 1), (tokens, 1))
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


def norm_pairs(model: nn.Module, example: ExampleInput | int) -> dict[str, str]:
    """Layer name -> the normalization whose shift (bias) belongs to it: a BatchNorm that normalises a
    Conv2d's output directly (conv -> BN), or a LayerNorm whose output a Linear reads directly
    (LN -> Linear: pre-norm blocks' q/k/v and MLP input, post-norm BERT's next layer). Norms without
    a bias are left out."""
    conv_out: dict[int, tuple[torch.Tensor, str]] = {}  # the tensor kept alive: its id stays unique
    norm_out: dict[int, tuple[torch.Tensor, str]] = {}
    pairs: dict[str, str] = {}
    names = {module: name for name, module in model.named_modules()}

    def after_conv(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        conv_out[id(output)] = output, names[module]

    def after_norm(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.LayerNorm):
            norm_out[id(output)] = output, names[module]

    def before_norm(module: nn.Module, inputs: tuple) -> None:
        conv = conv_out.get(id(inputs[0]))
        if conv is not None and isinstance(module, nn.modules.batchnorm._BatchNorm):
            pairs[conv[1]] = names[module]

    def before_linear(module: nn.Module, inputs: tuple) -> None:
        norm = norm_out.get(id(inputs[0]))
        if norm is not None:
            pairs[names[module]] = norm[1]

    modules = list(model.modules())
    handles = [m.register_forward_hook(after_conv) for m in modules if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_pre_hook(before_linear) for m in modules if isinstance(m, nn.Linear)]
    norms = [m for m in modules if isinstance(m, NORMS) and getattr(m, "bias", None) is not None]
    handles += [m.register_forward_pre_hook(before_norm) for m in norms]
    handles += [m.register_forward_hook(after_norm) for m in norms]
    _probe_forward(model, handles, example)
    return pairs
