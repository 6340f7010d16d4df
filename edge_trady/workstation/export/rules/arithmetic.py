"""Arithmetic and broadcasting: ``Add`` / ``Sub`` (the gradient summed over the broadcast axes),
``Mul`` / ``Div`` by a constant, and the means (``ReduceMean``, ``GlobalAveragePool``: the gradient
spread back evenly). None of them keeps anything."""

from __future__ import annotations

import numpy as np
import onnx

from ....errors import ArtifactError
from .base import ARITHMETIC, cannot_differentiate, node_attr, rule


class ArithmeticRules:
    """Mixin of ``StepBuilder``: the arithmetic rules (uses its emitter and state)."""

    @rule("Add", "Sub", family=ARITHMETIC)
    def _d_add(self, node: onnx.NodeProto, gy: str) -> None:
        for index, x in enumerate(node.input):
            if self._wants(x):
                grad = gy
                if node.op_type == "Sub" and index == 1:
                    grad = self.emit.op("Neg", [gy], f"{node.name}/grad")
                self._add_grad(x, self._unbroadcast(grad, x, node.output[0], node.name))

    @rule("Mul", "Div", family=ARITHMETIC)
    def _d_mul(self, node: onnx.NodeProto, gy: str) -> None:
        a, b = node.input
        for x, other in ((a, b), (b, a)):
            if not self._wants(x):
                continue
            if other not in self.constants or (node.op_type == "Div" and x == b):
                raise cannot_differentiate(node, f"{node.op_type} of two trained tensors")
            grad = self.emit.op(node.op_type, [gy, other], f"{node.name}/grad")
            self._add_grad(x, self._unbroadcast(grad, x, node.output[0], node.name))

    def _unbroadcast(self, grad: str, x: str, y: str, where: str) -> str:
        """Sum ``grad`` (shaped like ``y``) over the axes ``x`` was broadcast along."""
        xs, ys = self._info(x), self._info(y)
        rank, offset = len(ys.shape), len(ys.shape) - len(xs.shape)
        padded = (1,) * offset + xs.shape
        axes = [
            i
            for i in range(rank)
            if padded[i] == 1 and (ys.shape[i] != 1 or (i in ys.batch_axes and i - offset not in xs.batch_axes))
        ]
        if not axes and not offset:
            return grad
        hint = f"{where}/unbroadcast"
        if axes:
            grad = self.emit.op("ReduceSum", [grad, self.emit.ints(axes, hint)], hint, keepdims=1)
        if not offset:
            return grad
        return self.emit.op("Reshape", [grad, self.emit.ints(xs.reshape_target(), hint)], hint)

    @rule("GlobalAveragePool", family=ARITHMETIC)
    def _d_global_average_pool(self, node: onnx.NodeProto, gy: str) -> None:
        x = node.input[0]
        if self._wants(x):
            shape = self._info(x).shape
            self._spread(node, gy, x, list(range(2, len(shape))))

    @rule("ReduceMean", family=ARITHMETIC)
    def _d_reduce_mean(self, node: onnx.NodeProto, gy: str) -> None:
        x = node.input[0]
        if not self._wants(x):
            return
        rank = len(self._info(x).shape)
        axes = node_attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self._const(node.input[1]).tolist()
        axes = sorted(a % rank for a in (axes if axes is not None else range(rank)))
        if node_attr(node, "keepdims", 1) == 0:
            gy = self.emit.op("Unsqueeze", [gy, self.emit.ints(axes, node.name)], f"{node.name}/grad")
        self._spread(node, gy, x, axes)

    def _spread(self, node: onnx.NodeProto, gy: str, x: str, axes: list[int]) -> None:
        """Gradient of a mean over ``axes``: ``gy / count`` broadcast back to ``x``'s shape."""
        info = self._info(x)
        if any(a in info.batch_axes for a in axes):
            raise ArtifactError(f"{node.name}: a mean over the batch axis cannot be differentiated")
        hint = f"{node.name}/grad"
        count = int(np.prod([info.shape[a] for a in axes]))
        scaled = self.emit.op("Div", [gy, self.emit.const(np.float32(count), hint)], hint)
        target = [1 if a in info.batch_axes else d for a, d in enumerate(info.shape)]
        self._add_grad(x, self.emit.op("Expand", [scaled, self.emit.ints(target, hint)], hint))
