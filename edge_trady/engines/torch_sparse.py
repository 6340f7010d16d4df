"""PyTorch sparse engine: stores and differentiates only the selected input channels.

Same training as ``TorchMaskedEngine`` (frozen BN, no dropout, plain SGD on the selected entries and
the whole classifier) but with real memory savings. The engine trains a *view* of the model: a copy
of its module tree that shares every Parameter and buffer, where

- Conv2d / Linear keep ``x[:, S]`` of a training layer (a Linear on tokens ``[B, T.., C]``:
  ``x[..., S]``) and compute the gradient of its selected entries only; a frozen layer keeps just its
  weight (shared) to pass the gradient down;
- BatchNorm (eval) is a per-channel scale in backward; ReLU / ReLU6 / Hardtanh keep a mask;
- LayerNorm is left to autograd (it keeps its input, mean and inverse std where the gradient flows
  through it); a trained LayerNorm shift is added after it and keeps nothing;
- layers below the earliest training layer build no graph (nothing there requires grad).

Anything else is left to autograd and keeps what autograd keeps where the gradient flows: SiLU,
Hardswish, GELU, Sigmoid / Hardsigmoid their input, Softmax its output, the gating product of
squeeze-excitation and the attention ``matmul``s both operands (functional activations called inside
a ``forward`` too). ``saved_bytes`` reports those as ``"other"``.
The model keeps its classes, and its ``state_dict`` is the engine's state.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.layers import LayerCost
from ..core.selection import Selection
from ..errors import EdgeTradyError
from .sparse_ops import (
    ROLE_ATTR,
    ClampMask,
    ConvGeometry,
    FrozenBatchNorm,
    SparseConv2d,
    SparseLinear,
    WeightSlice,
)
from .torch_state import TorchModuleState, torch_inputs

ROLES = ("selected", "classifier", "masks", "other", "shared")


class _Trainable(nn.Module):
    """Wraps a Conv2d/Linear: which of its entries train, and their gradient leaves during a step."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, groups: int) -> None:
        super().__init__()
        if not layer.weight.is_contiguous():
            raise EdgeTradyError("torch-sparse needs contiguous weights")
        self.layer = layer
        self.groups = groups
        self.part: WeightSlice | None = None
        self.train_bias = False
        self.free: Tensor | None = None
        self.free_bias: Tensor | None = None
        self.record_norms = False  # keep the selected channels' gradient norms of the last step
        self.norms: Tensor | None = None

    def select(self, channels: Tensor | None, train_bias: bool) -> None:
        """Train ``channels`` (None: all, empty: none) and, if asked, the bias."""
        empty = channels is not None and len(channels) == 0
        self.part = None if empty else WeightSlice(self.layer.weight.shape, channels, self.groups)
        self.train_bias = train_bias and self.layer.bias is not None

    def freeze(self) -> None:
        self.part, self.train_bias = None, False

    def open(self) -> list[Tensor]:
        """Fresh leaves for this step's gradients: the selected weight entries, then the bias."""
        if self.part is not None:
            self.free = self.part.gather(self.layer.weight).requires_grad_()
        if self.train_bias:
            self.free_bias = self.layer.bias.detach().requires_grad_()
        return [leaf for _, leaf in self.named_leaves()]

    def named_leaves(self) -> list[tuple[str, Tensor]]:
        """This step's gradient leaves, named by the parameter they stand for."""
        return [(kind, t) for kind, t in (("weight", self.free), ("bias", self.free_bias)) if t is not None]

    def close(self) -> None:
        self.free = self.free_bias = None

    def grad_bytes(self) -> int:
        """Bytes of this layer's gradient (the trained entries)."""
        weight = self.layer.weight
        count = math.prod(self.part.shape) if self.part is not None else 0
        count += weight.shape[0] if self.train_bias else 0
        return count * weight.element_size()

    def sgd_(self, grads: Iterator[Tensor | None], lr: float) -> None:
        """Apply this layer's gradients, taken from ``grads`` in ``open`` order."""
        if self.part is not None and (grad := next(grads)) is not None:
            if self.record_norms:
                self.norms = self.part.channel_norms(grad, self.groups)
            self.part.sgd_(self.layer.weight, grad, lr)
        if self.train_bias and (grad := next(grads)) is not None:
            self.layer.bias.add_(grad, alpha=-lr)

    def _graph_needed(self, x: Tensor) -> bool:
        return self.free is not None or self.free_bias is not None or x.requires_grad


class _Conv2d(_Trainable):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv, conv.groups)
        self.geometry = conv_geometry(conv)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.layer.weight, self.layer.bias
        if not (torch.is_grad_enabled() and self._graph_needed(x)):
            return self.geometry.conv(x, weight, bias)
        return SparseConv2d.apply(x, weight, bias, self.free, self.geometry, self.part)


class _Linear(_Trainable):
    def __init__(self, linear: nn.Linear, role: str) -> None:
        super().__init__(linear, 1)
        self.role = role

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.layer.weight, self.layer.bias
        if not (torch.is_grad_enabled() and self._graph_needed(x)):
            return F.linear(x, weight, bias)
        bias = self.free_bias if self.free_bias is not None else bias
        return SparseLinear.apply(x, weight, bias, self.free, self.part, self.role)


class _Norm(nn.Module):
    """A frozen normalization layer whose shift (bias) may train (``train_shift``)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.train_shift = False
        self.free: Tensor | None = None

    def open(self) -> list[Tensor]:
        if self.train_shift:
            self.free = self.norm.bias.detach().requires_grad_()
        return [leaf for _, leaf in self.named_leaves()]

    def named_leaves(self) -> list[tuple[str, Tensor]]:
        return [("bias", self.free)] if self.free is not None else []

    def close(self) -> None:
        self.free = None

    def sgd_(self, grads: Iterator[Tensor | None], lr: float) -> None:
        if self.train_shift and (grad := next(grads)) is not None:
            self.norm.bias.add_(grad, alpha=-lr)


class _BatchNorm(_Norm):
    """Frozen BatchNorm (running statistics): a per-channel scale in backward."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        if bn.running_mean is None or bn.running_var is None:
            raise EdgeTradyError("torch-sparse needs BatchNorm layers with running statistics")
        super().__init__(bn)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.norm
        bias = self.free if self.free is not None else bn.bias
        if not (torch.is_grad_enabled() and (x.requires_grad or self.free is not None)):
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bias, False, 0.0, bn.eps)
        return FrozenBatchNorm.apply(x, bn.running_mean, bn.running_var, bn.weight, bias, bn.eps)


class _LayerNorm(_Norm):
    """LayerNorm, left to autograd; a trained shift is added after it, so that training the shift
    alone keeps nothing (autograd's layer norm would keep its input as soon as its bias trains)."""

    def forward(self, x: Tensor) -> Tensor:
        ln = self.norm
        if self.free is None:
            return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        return F.layer_norm(x, ln.normalized_shape, ln.weight, None, ln.eps) + self.free


class _Clamp(nn.Module):
    def __init__(self, low: float, high: float | None, packed: bool) -> None:
        super().__init__()
        self.low, self.high, self.packed = low, high, packed

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return torch.relu(x) if self.high is None else F.hardtanh(x, self.low, self.high)
        return ClampMask.apply(x, self.low, self.high, self.packed)


def conv_geometry(conv: nn.Conv2d) -> ConvGeometry:
    """The conv's hyper-parameters, with ``padding="same"`` or a static-padding module made explicit."""
    if conv.padding_mode != "zeros":
        raise EdgeTradyError(f"torch-sparse: padding_mode {conv.padding_mode!r} is not supported")
    static = getattr(conv, "static_padding", None)  # efficientnet_lite_pytorch.Conv2dStaticSamePadding
    if static is None and type(conv).forward is not nn.Conv2d.forward:
        raise EdgeTradyError(f"torch-sparse: {type(conv).__name__} has its own forward; not supported")
    pad, padding = None, conv.padding
    if isinstance(static, nn.ZeroPad2d):
        pad = tuple(static.padding)
    elif static is not None and type(static).__name__ != "Identity":
        raise EdgeTradyError(f"torch-sparse: unsupported static padding {type(static).__name__}")
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":  # as torch does it: the odd pixel goes right / bottom
        height, width = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
        pad, padding = (width // 2, width - width // 2, height // 2, height - height // 2), (0, 0)
    if pad is not None and min(pad) < 0:
        raise EdgeTradyError("torch-sparse: negative (cropping) padding is not supported")
    return ConvGeometry(tuple(conv.stride), tuple(padding), tuple(conv.dilation), conv.groups, pad)


def sparse_view(model: nn.Module, classifier: str, packed: bool) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A copy of ``model``'s module tree sharing its tensors, with sparse-aware modules substituted;
    also returns the Conv2d/Linear and normalization wrappers by qualified name. ``packed``: 1-bit
    activation masks."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    net = copy.deepcopy(model, memo=shared).eval()
    replaced: dict[int, nn.Module] = {}
    trainable: dict[str, nn.Module] = {}
    for name, module in list(net.named_modules(remove_duplicate=False)):
        if id(module) not in replaced:
            substitute = _substitute(module, name == classifier, packed)
            if substitute is None:
                continue
            replaced[id(module)] = substitute
            if isinstance(substitute, (_Trainable, _Norm)):
                trainable[name] = substitute
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent), attr, replaced[id(module)])
    return net, trainable


def _substitute(module: nn.Module, is_classifier: bool, packed: bool) -> nn.Module | None:
    if isinstance(module, nn.Conv2d):
        return _Conv2d(module)
    if isinstance(module, nn.Linear):
        if type(module).forward is not nn.Linear.forward:
            raise EdgeTradyError(f"torch-sparse: {type(module).__name__} has its own forward; not supported")
        return _Linear(module, "classifier" if is_classifier else "selected")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _BatchNorm(module)
    if isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward:
        return _LayerNorm(module)
    if isinstance(module, nn.ReLU):
        return _Clamp(0.0, None, packed)
    if isinstance(module, nn.Hardtanh):  # ReLU6 too
        return _Clamp(module.min_val, module.max_val, packed)
    return None


class SavedTensorLedger:
    """Bytes autograd saves for backward while active, by role; each storage is counted once.

    Roles: ``selected`` (input channels kept for a layer's weight gradient), ``classifier`` (the
    head's input), ``masks`` (bool/uint8: activation masks), ``other``, and ``shared`` (storage of a
    model Parameter or buffer: no extra memory, not in ``total``).
    """

    def __init__(self, shared: Iterable[Tensor]) -> None:
        self.shared = {t.untyped_storage().data_ptr() for t in shared}
        self.storages: dict[int, tuple[str, int]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer and pointer not in self.storages:
            self.storages[pointer] = (self._role(tensor, pointer), storage.nbytes())
        return tensor

    def _role(self, tensor: Tensor, pointer: int) -> str:
        if pointer in self.shared:
            return "shared"
        if hasattr(tensor, ROLE_ATTR):
            return getattr(tensor, ROLE_ATTR)
        return "masks" if tensor.dtype in (torch.bool, torch.uint8) else "other"

    def totals(self) -> dict[str, int]:
        totals = dict.fromkeys(ROLES, 0)
        for role, size in self.storages.values():
            totals[role] += size
        totals["total"] = sum(size for role, size in totals.items() if role != "shared")
        return totals

    def __enter__(self) -> SavedTensorLedger:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class TorchSparseEngine(TorchModuleState):
    """Trains the selected input channels of a model with plain SGD, storing only what they need."""

    name = "torch-sparse"

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerCost],
        classifier: str,
        packed_masks: bool = False,
        train_shifts: Sequence[str] = (),
    ) -> None:
        self.model = model.eval()
        self.layers = {layer.name: layer for layer in layers}
        self.classifier = classifier
        for param in model.parameters():
            param.requires_grad_(False)
        self.net, wrappers = sparse_view(model, classifier, packed_masks)
        self.trainable = {name: m for name, m in wrappers.items() if isinstance(m, _Trainable)}
        self._names = {id(module): name for name, module in wrappers.items()}
        self.shifts: list[_Norm] = [wrappers[name] for name in train_shifts]
        for norm in self.shifts:
            norm.train_shift = True
        self.active: list[_Trainable] = []
        self.record_grad_norms = False  # set by the loop for gradient-norm-weighted sampling
        self._selected: dict[str, np.ndarray] = {}
        self.set_selection(Selection(0, {}, 0.0))

    def set_selection(self, selection: Selection) -> None:
        for module in self.active:
            module.freeze()
        wanted: dict[str, np.ndarray | None] = {self.classifier: None, **selection.channels}
        self._selected = {name: np.unique(channels) for name, channels in selection.channels.items()}
        self.active = []
        for name, channels in wanted.items():
            index = None if channels is None else np.unique(channels).astype(np.int64)
            partial = index is not None and len(index) < self.layers[name].in_channels
            module = self.trainable[name]
            module.select(torch.from_numpy(index) if partial else None, train_bias=name == self.classifier)
            module.record_norms, module.norms = self.record_grad_norms and name != self.classifier, None
            self.active.append(module)

    def channel_grad_norms(self) -> dict[str, np.ndarray]:
        """Per selected layer, ``||dL/dW[:, c]||`` of its selected channels (sorted) at the last step."""
        norms = {}
        for name, channels in self._selected.items():
            module = self.trainable[name]
            found = module.norms.numpy().astype(np.float64) if module.norms is not None else None
            norms[name] = found if found is not None else np.zeros(len(channels))
        return norms

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, int]:
        target = torch.from_numpy(y)
        with self._leaves() as leaves:
            logits = self.net(*torch_inputs(x))
            loss = F.cross_entropy(logits, target)
            grads = iter(torch.autograd.grad(loss, leaves, allow_unused=True))
        with torch.no_grad():
            for module in [*self.active, *self.shifts]:
                module.sgd_(grads, lr)
        return float(loss.detach()), int((logits.detach().argmax(1) == target).sum())

    def gradients(self, x: np.ndarray, y: np.ndarray) -> dict[str, Tensor]:
        """One batch's gradients of what trains, without a step: ``LAYER.weight`` (the selected
        entries, shaped as ``WeightSlice``: ``[C', |S|]`` for a Linear), ``LAYER.bias`` (the
        classifier) and ``NORM.bias`` (trained shifts)."""
        with self._leaves() as leaves:
            modules = [*self.active, *self.shifts]
            named = [f"{self._names[id(m)]}.{kind}" for m in modules for kind, _ in m.named_leaves()]
            loss = F.cross_entropy(self.net(*torch_inputs(x)), torch.from_numpy(y))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return dict(zip(named, grads, strict=True))

    def saved_bytes(self, x: np.ndarray, y: np.ndarray) -> dict[str, int]:
        """Bytes one step on this batch keeps for backward (``SavedTensorLedger`` roles), plus the
        gradient leaves: ``weight_grads`` (selected entries) and ``classifier_grads`` (head)."""
        shared = itertools.chain(self.model.parameters(), self.model.buffers())
        with SavedTensorLedger(shared) as ledger:
            self.forward_loss(x, y)
        head = self.trainable[self.classifier]
        totals = ledger.totals()
        totals["weight_grads"] = sum(m.grad_bytes() for m in self.active if m is not head)
        totals["weight_grads"] += sum(n.norm.bias.numel() * n.norm.bias.element_size() for n in self.shifts)
        totals["classifier_grads"] = head.grad_bytes()
        return totals

    def forward_loss(self, x: np.ndarray, y: np.ndarray) -> Tensor:
        """The loss of a training step's forward, with its graph (for tracing what autograd saves)."""
        with self._leaves():
            return F.cross_entropy(self.net(*torch_inputs(x)), torch.from_numpy(y))

    @contextmanager
    def _leaves(self) -> Iterator[list[Tensor]]:
        modules = [*self.active, *self.shifts]
        try:
            yield [leaf for module in modules for leaf in module.open()]
        finally:
            for module in modules:
                module.close()

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.net(*torch_inputs(x)).numpy()

    def trainable_state(self) -> dict[str, np.ndarray]:
        """Copies of the tensors that can train: the weight of every layer the engine was given,
        the classifier's weight and bias; named as in the model's ``state_dict``."""
        return {name: tensor.detach().numpy().copy() for name, tensor in self._trainable_tensors().items()}

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        """Overwrite the trainable tensors with ``state`` (as ``trainable_state`` returns it)."""
        tensors = self._trainable_tensors()
        if set(state) != set(tensors):
            missing, unknown = sorted(set(tensors) - set(state)), sorted(set(state) - set(tensors))
            raise EdgeTradyError(f"trainable state: missing {missing[:3]}, unknown {unknown[:3]}")
        for name, tensor in tensors.items():
            value = np.asarray(state[name])
            if value.shape != tuple(tensor.shape) or value.dtype != np.float32:
                expected = f"{tuple(tensor.shape)} float32"
                raise EdgeTradyError(f"{name}: {value.shape} {value.dtype}, the model has {expected}")
            with torch.no_grad():
                tensor.copy_(torch.from_numpy(value))

    def _trainable_tensors(self) -> dict[str, Tensor]:
        tensors = {f"{name}.weight": self.trainable[name].layer.weight for name in self.layers}
        bias = self.trainable[self.classifier].layer.bias
        if bias is not None:
            tensors[f"{self.classifier}.bias"] = bias
        return tensors
