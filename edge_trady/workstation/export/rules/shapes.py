"""Shape ops: they move values without changing them, so the gradient is moved back the same way
and nothing is kept."""

from __future__ import annotations

import numpy as np
import onnx

from ....errors import ArtifactError
from .base import SHAPES, no_gradient, node_attr, rule


class ShapeRules:
    """Mixin of ``StepBuilder``: the shape-op rules (uses its emitter and state)."""

    @rule("Identity", family=SHAPES)
    def _d_identity(self, node: onnx.NodeProto, gy: str) -> None:
        if self._wants(node.input[0]):
            self._add_grad(node.input[0], gy)

    @rule("Reshape", "Flatten", "Squeeze", "Unsqueeze", family=SHAPES)
    def _d_reshape(self, node: onnx.NodeProto, gy: str) -> None:
        x = node.input[0]
        if self._wants(x):
            hint = f"{node.name}/grad"
            self._add_grad(x, self.emit.op("Reshape", [gy, self.emit.ints(self._info(x).reshape_target(), hint)], hint))

    @rule("Transpose", family=SHAPES)
    def _d_transpose(self, node: onnx.NodeProto, gy: str) -> None:
        if self._wants(node.input[0]):
            perm = node_attr(node, "perm", list(reversed(range(len(self._info(node.input[0]).shape)))))
            inverse = [int(i) for i in np.argsort(perm)]
            self._add_grad(node.input[0], self.emit.op("Transpose", [gy], f"{node.name}/grad", perm=inverse))

    @rule("Concat", family=SHAPES)
    def _d_concat(self, node: onnx.NodeProto, gy: str) -> None:
        axis = node_attr(node, "axis", 0) % len(self._info(node.output[0]).shape)
        start = 0
        for x in node.input:
            size = self._info(x).shape[axis]
            if self._wants(x):
                hint = f"{node.name}/grad"
                bounds = [self.emit.ints([v], hint) for v in (start, start + size, axis)]
                self._add_grad(x, self.emit.op("Slice", [gy, *bounds], hint))
            start += size

    @rule("Pad", family=SHAPES)
    def _d_pad(self, node: onnx.NodeProto, gy: str) -> None:
        x = node.input[0]
        if not self._wants(x):
            return
        pads = self._const(node.input[1]).astype(int)
        if (
            node_attr(node, "mode", b"constant") != b"constant"
            or (len(node.input) > 3 and node.input[3])
            or (pads < 0).any()
        ):
            raise ArtifactError(f"{node.name}: only constant, non-negative padding can be differentiated")
        shape, rank = self._info(x), len(pads) // 2
        axes = [i for i in range(rank) if pads[i] or pads[rank + i]]
        if any(a in shape.batch_axes for a in axes):
            raise ArtifactError(f"{node.name}: padding along the batch axis cannot be differentiated")
        hint = f"{node.name}/grad"
        starts = [int(pads[a]) for a in axes]
        ends = [int(pads[a]) + shape.shape[a] for a in axes]
        inputs = [gy, self.emit.ints(starts, hint), self.emit.ints(ends, hint), self.emit.ints(axes, hint)]
        self._add_grad(x, self.emit.op("Slice", inputs, hint))


no_gradient("Shape", "Size", "Constant", "ArgMax", "Equal", "Greater", "Less", "Cast")
