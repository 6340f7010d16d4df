"""Reweighted gradient norms (METHOD.md): per input channel and per layer, and their sums over the
steps of the ranking's fine-tuning."""

from __future__ import annotations

import torch

from ..core.layers import LayerCost


def channel_grad_norms(layer: LayerCost, grad: torch.Tensor) -> torch.Tensor:
    """``g_c = ||dL/dW[:, c]||_2`` for every input channel ``c`` of ``layer`` (shape ``[C]``)."""
    if layer.kind == "linear":
        return grad.pow(2).sum(0).sqrt()
    squares = grad.pow(2).sum(dim=(2, 3))  # [C', C/g]
    if layer.groups == 1:
        return squares.sum(0).sqrt()
    per_group = squares.reshape(layer.groups, layer.out_channels // layer.groups, -1).sum(1)
    return per_group.reshape(-1).sqrt()  # channel index = group * (C/g) + j


def channel_rgn(layer: LayerCost, grad: torch.Tensor) -> torch.Tensor:
    """``RGN_c = g_c / (Cw + Ca)``."""
    return channel_grad_norms(layer, grad) / layer.unit_cost


def layer_lara(layer: LayerCost, grad: torch.Tensor) -> float:
    """LaRa (MeDyate): ``||dL/dW||_2 / sum_c (Cw + Ca)``."""
    return float(grad.norm()) / layer.total_units


class LayerScores:
    """RGN and LaRa of each layer summed over the steps whose full weight gradients it observes
    (``observe`` is a ``TorchMaskedEngine.grad_observer``); gradients of other tensors are ignored."""

    def __init__(self, layers: list[LayerCost]) -> None:
        self.layers = {layer.name: layer for layer in layers}
        self.rgn = dict.fromkeys(self.layers, 0.0)
        self.lara = dict.fromkeys(self.layers, 0.0)

    def observe(self, grads: dict[str, torch.Tensor]) -> None:
        for name, grad in grads.items():
            if name in self.layers:
                self.rgn[name] += float(channel_rgn(self.layers[name], grad).sum())
                self.lara[name] += layer_lara(self.layers[name], grad)
