"""PyTorch masked-gradient engine: full backward, then unselected gradient entries zeroed.

This is what the paper simulated: it saves no memory (every trainable layer keeps its whole
input and computes its whole weight gradient) but is the reference the other engines match.
The model runs in ``eval()`` mode: BatchNorm statistics and affine frozen, no dropout.
Only Conv2d/Linear weights are trained (and the classifier's bias); plain SGD.

``train_shifts`` names normalization layers (BatchNorm, LayerNorm) whose shift (bias) trains every
epoch; they stay frozen otherwise.
``batchnorm="train"`` is full fine-tuning as users run it: during training steps the BatchNorm
layers use batch statistics and update their running statistics, and every parameter of the model
trains (BatchNorm affine and biases too); prediction uses the running statistics. Dropout stays off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import LayerCost
from ..core.masks import channel_mask
from ..core.selection import Selection
from ..workstation.rgn import channel_grad_norms
from .torch_state import TorchModuleState, torch_inputs

GradObserver = Callable[[dict[str, torch.Tensor]], None]
BATCHNORM_MODES = ("frozen", "train")


class TorchMaskedEngine(TorchModuleState):
    name = "torch-masked"

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerCost],
        classifier: str,
        batchnorm: str = "frozen",
        train_shifts: Sequence[str] = (),
    ) -> None:
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
        self.model = model.eval()
        self.layers = {layer.name: layer for layer in layers}
        self.classifier = classifier
        self.batchnorm = batchnorm
        self.shifts = {name + ".bias": model.get_submodule(name).bias for name in train_shifts}
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.masks: dict[str, torch.Tensor] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.grad_observer: GradObserver | None = None
        self.record_grad_norms = False  # set by the loop for gradient-norm-weighted sampling
        self._norms: dict[str, np.ndarray] = {}
        self._selected: dict[str, np.ndarray] = {}
        for param in model.parameters():
            param.requires_grad_(False)

    def set_selection(self, selection: Selection) -> None:
        for param in self.params.values():
            param.requires_grad_(False)
        head = self.model.get_submodule(self.classifier)
        self.params = {self.classifier: head.weight}
        if head.bias is not None:
            self.params[self.classifier + ".bias"] = head.bias
        self.masks = {}
        self._selected = {name: np.unique(channels) for name, channels in selection.channels.items()}
        self._norms = {}
        for name, channels in selection.channels.items():
            layer = self.layers[name]
            self.params[name] = self.model.get_submodule(name).weight
            if len(channels) < layer.in_channels:
                self.masks[name] = torch.from_numpy(channel_mask(layer, channels))
        self.params.update(self.shifts)  # BatchNorm shifts trained every epoch
        if self.batchnorm == "train":  # full fine-tuning: every other parameter too (BN affine, biases)
            chosen = {id(p) for p in self.params.values()}
            self.params.update((n, p) for n, p in self.model.named_parameters() if id(p) not in chosen)
        for param in self.params.values():
            param.requires_grad_(True)

    def gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
        """Loss, logits and the unmasked gradients of the trainable weights for one batch."""
        training = self.batchnorm == "train"
        for norm in self.norms:
            norm.train(training)  # batch statistics; running statistics updated
        try:
            logits = self.model(*torch_inputs(x))
        finally:
            for norm in self.norms:
                norm.eval()
        loss = F.cross_entropy(logits, torch.from_numpy(y))
        grads = torch.autograd.grad(loss, list(self.params.values()))
        return float(loss.detach()), logits.detach(), dict(zip(self.params, grads, strict=True))

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, int]:
        loss, logits, grads = self.gradients(x, y)
        if self.grad_observer is not None:
            self.grad_observer(grads)
        if self.record_grad_norms:
            for name, channels in self._selected.items():
                norms = channel_grad_norms(self.layers[name], grads[name])
                self._norms[name] = norms.numpy().astype(np.float64)[channels]
        with torch.no_grad():
            for name, grad in grads.items():
                if name in self.masks:
                    grad = grad * self.masks[name]
                self.params[name].add_(grad, alpha=-lr)
        return loss, int((logits.argmax(1) == torch.from_numpy(y)).sum())

    def channel_grad_norms(self) -> dict[str, np.ndarray]:
        """Per selected layer, ``||dL/dW[:, c]||`` of its selected channels (sorted) at the last step."""
        return {name: self._norms.get(name, np.zeros(len(c))) for name, c in self._selected.items()}

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(*torch_inputs(x)).numpy()
