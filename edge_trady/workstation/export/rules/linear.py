"""Linear layers (the conv / gemm family with ``conv.py``): ``Gemm`` as ``nn.Linear`` exports it
and ``MatMul`` by a constant matrix.

A trained Gemm weight's gradient is ``gy^T @ x``: of a candidate layer from its kept selected
input features, of the classifier from its whole (pooled) input."""

from __future__ import annotations

import numpy as np
import onnx

from ....errors import ArtifactError
from .base import CONV_GEMM, SELECTED, Keep, cannot_differentiate, node_attr, rule

CLASSIFIER_INPUT = Keep("classifier input", "the classifier's whole input", 32, "its input features per sample")


class LinearRules:
    """Mixin of ``StepBuilder``: the Gemm and MatMul rules (uses its emitter and state)."""

    @rule("Gemm", family=CONV_GEMM, keeps=(SELECTED, CLASSIFIER_INPUT))
    def _d_gemm(self, node: onnx.NodeProto, gy: str) -> None:
        a, b = node.input[0], node.input[1]
        c = node.input[2] if len(node.input) > 2 else ""
        trans_b = node_attr(node, "transB", 0)
        if node_attr(node, "alpha", 1.0) != 1.0 or node_attr(node, "beta", 1.0) != 1.0 or node_attr(node, "transA", 0):
            raise ArtifactError(f"{node.name}: only Gemm with alpha = beta = 1 and transA = 0 can be differentiated")
        hint = f"{node.name}/grad"
        if b in self.weights:
            if not trans_b:
                raise ArtifactError(f"{node.name}: a trained Gemm weight must be transposed (transB = 1, as nn.Linear)")
            kept = self.taps.get(self.layer_of_weight[b], a) if b in self.layer_of_weight else a
            if kept == a:
                values = int(np.prod(self._info(a).shape))
                self._record(a, CLASSIFIER_INPUT, f"input of {node.name}", 4 * values)
            self.weight_grads[b] = self.emit.op("Gemm", [gy, kept], hint, transA=1)
        if c in self.weights:
            self.weight_grads[c] = self.emit.op("ReduceSum", [gy, self.emit.ints([0], hint)], hint, keepdims=0)
        if self._wants(a):
            if trans_b:
                self._add_grad(a, self.emit.op("MatMul", [gy, b], hint))
            else:
                self._add_grad(a, self.emit.op("Gemm", [gy, b], hint, transB=1))

    @rule("MatMul", family=CONV_GEMM)
    def _d_matmul(self, node: onnx.NodeProto, gy: str) -> None:
        a, b = node.input
        hint = f"{node.name}/grad"
        for x, other, left in ((a, b, False), (b, a, True)):
            if not self._wants(x):
                continue
            if other not in self.constants or self.constants[other].ndim != 2:
                raise cannot_differentiate(node, "MatMul without a constant 2-D operand")
            transposed = self.emit.const(np.ascontiguousarray(self.constants[other].T), hint)
            self._add_grad(x, self.emit.op("MatMul", [transposed, gy] if left else [gy, transposed], hint))
