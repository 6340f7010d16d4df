"""The portable training step: a forward ONNX graph plus its reverse-mode gradient, as one graph of
default-domain ONNX operators (opset ``OPSET``) that plain ``onnxruntime`` runs on any CPU.

Inputs: the image batch, the labels, per candidate layer an int64 vector of its selected input
channels (any length, 0 included), and the weights that can change: the full weight of every dense
candidate layer, the current value of the selected slice (``core.slices`` layout) of every grouped
or depthwise candidate (whose full weight is a *refreshed* initializer, see ``conv_rules``), and the
classifier's weight and bias. Outputs: the mean cross-entropy loss, the number of correct
predictions, the gradient of each candidate layer's selected slice and the classifier's gradients.
Frozen weights are constants.

What the step keeps between forward and backward:

- ``Gather(x, S, axis=1)``: the selected input channels of every candidate layer, taken right
  after ``x`` is produced (the classifier keeps its whole, pooled input);
- the masks of the clamp activations (ReLU, ReLU6, Hardtanh) whose gradient is needed, taken from
  their output right after it is produced, 1 bit per value (``MatMulInteger`` with the powers of
  two packs 8 values per byte; a ``Gather`` from a 256-row table unpacks them); 1 byte per value
  when a sample's size is not a multiple of 8.

Nothing else of the forward is read by the backward, and nothing below the earliest candidate
layer is differentiated. The backward rules cover the op set ``SUPPORTED``.

The forward taps are placed right after their producer and the backward nodes in reverse order:
ONNX Runtime must run the graph with ``ExecutionOrder.PRIORITY_BASED`` (node index order among
ready nodes), else its default order computes the taps late and keeps the full activations. Its
graph optimizations add nodes (fused and NCHWc convs) with indices above every backward node, so a
backward node whose inputs all exist during the forward would run early and its output would live
through the forward: each backward node reads the gradient it belongs to (a ``Reshape`` to a shape
computed from it where nothing else does, e.g. a mask's ``Cast``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...core.layers import LayerCost
from ...errors import ArtifactError
from .conv_rules import ConvRules, node_attr
from .forward import INPUT, LABELS, LOGITS

OPSET = 17  # ScatterElements with reduction: opset >= 16
IR_VERSION = 8
LOSS, CORRECT = "loss", "correct"
CHANNELS_PREFIX, SLICE_PREFIX, GRAD_PREFIX = "channels::", "slice::", "grad::"
SUPPORTED = (
    "Conv", "Gemm", "MatMul", "Relu", "Clip", "Add", "Sub", "Mul", "Div", "GlobalAveragePool",
    "ReduceMean", "AveragePool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose",
    "Pad", "Concat",
)  # fmt: skip
_FLOAT = TensorProto.FLOAT
_NOT_DIFFERENTIABLE = ("Shape", "Size", "Constant", "ArgMax", "Equal", "Greater", "Less", "Cast")


@dataclass(frozen=True)
class TensorInfo:
    """Shape of a forward tensor at batch 1, which axes scale with the batch, and its element type."""

    shape: tuple[int, ...]
    batch_axes: tuple[int, ...]
    dtype: int

    def reshape_target(self) -> list[int]:
        """Its shape for ``Reshape`` (-1 on the batch axis)."""
        if len(self.batch_axes) > 1:
            raise ArtifactError("a tensor with more than one batch axis cannot be differentiated")
        return [-1 if axis in self.batch_axes else d for axis, d in enumerate(self.shape)]


@dataclass
class StepGraph:
    """The built step graph and the names the runner feeds and reads."""

    model: onnx.ModelProto
    channel_inputs: dict[str, str]  # layer -> its int64 channel-vector input
    weights: dict[str, list[int]]  # trainable tensor -> full shape
    inputs: dict[str, str]  # trainable tensor -> the graph input that feeds it (full or slice)
    refreshed: list[str]  # trainable tensors that are initializers, written in when a session starts
    grads: dict[str, str]  # trainable tensor -> its gradient output
    kept: dict[str, str] = field(default_factory=dict)  # forward tensor kept for backward -> why


class _Emitter:
    """Appends nodes and constants with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}#{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [self.fresh(f"{hint}/{op_type}") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=names[0], **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.fresh(f"{hint}/const")
        self.constants.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, values: list[int], hint: str) -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)


class StepBuilder(ConvRules):
    """Builds the step graph of ``forward`` (see the module docstring)."""

    def __init__(
        self,
        forward: onnx.ModelProto,
        infos: dict[str, TensorInfo],
        candidates: list[LayerCost],
        classifier: str,
        head_params: list[str],
    ) -> None:
        self.graph = forward.graph
        self.infos = infos
        self.candidates = {layer.name: layer for layer in candidates}
        self.classifier = classifier
        self.head_params = head_params
        self.emit = _Emitter()
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        for node in self.graph.node:
            value = _fold(node, self.constants)
            if value is not None:
                self.constants[node.output[0]] = value
        self.weights = [f"{name}.weight" for name in self.candidates] + head_params
        self.layer_of_weight = {f"{name}.weight": name for name in self.candidates}
        self.channel_inputs = {name: CHANNELS_PREFIX + name for name in self.candidates}
        self.refreshed = [f"{n}.weight" for n, layer in self.candidates.items() if layer.kind in ("dwconv", "gconv")]
        self.slice_inputs = {weight: SLICE_PREFIX + weight for weight in self.refreshed}
        self.users = self._users()
        self.needs_grad = self._needs_grad()
        self.grads: dict[str, str] = {}  # forward tensor -> its accumulated gradient
        self.weight_grads: dict[str, str] = {}
        self.kept: dict[str, str] = {}
        self.taps: dict[str, str] = {}  # layer -> kept Gather of its input channels
        self.masks: dict[str, str] = {}  # clamp output -> its mask
        self.group_index: dict[str, dict[str, str]] = {}
        self.deltas: dict[str, str] = {}  # grouped layer -> its slice difference
        self.packed: set[str] = set()  # masks stored as 8 values per byte
        self.unpack_table: str | None = None  # [256, 8] float: the bits of every byte

    # ---------------------------------------------------------------------------------- set-up

    def _users(self) -> dict[str, list[onnx.NodeProto]]:
        users: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                users.setdefault(name, []).append(node)
        for weight in self.weights:
            found = users.get(weight, [])
            if weight not in self.constants:
                raise ArtifactError(
                    f"parameter {weight!r} is not an initializer of the exported graph "
                    "(shared or transformed weights are not supported)"
                )
            if len(found) != 1 or found[0].op_type not in ("Conv", "Gemm"):
                what = ", ".join(f"{n.op_type} {n.name}" for n in found) or "no node"
                raise ArtifactError(f"parameter {weight!r} must feed exactly one Conv or Gemm (it feeds {what})")
            if weight != found[0].input[1] and weight not in self.head_params:
                raise ArtifactError(f"parameter {weight!r} is not the weight input of {found[0].name}")
        return users

    def _needs_grad(self) -> set[str]:
        needs = set(self.weights)
        for node in self.graph.node:
            if node.op_type in _NOT_DIFFERENTIABLE or not needs.intersection(node.input):
                continue
            needs.update(o for o in node.output if o and self._info(o).dtype == _FLOAT)
        if LOGITS not in needs:
            raise ArtifactError("the logits do not depend on any trainable weight")
        return needs

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise ArtifactError(f"no shape known for tensor {name!r} of the exported graph") from None

    # ------------------------------------------------------------------------------ the graph

    def build(self) -> StepGraph:
        forward = []
        self._tap(INPUT)
        forward.extend(self._take())
        for node in self.graph.node:
            if node.op_type == "Conv" and node.input[1] in self.slice_inputs:
                raw = onnx.NodeProto()
                raw.CopyFrom(node)
                raw.output[0] = self.emit.fresh(f"{node.name}/refreshed")
                forward.append(raw)
                self._refreshed_conv(node, raw.output[0], node.output[0])
            else:
                forward.append(node)
            for output in node.output:
                self._tap(output, node)
            forward.extend(self._take())
        loss_nodes = self._loss()
        for node in reversed(self.graph.node):
            self._backward(node)
        backward = self._take()
        missing = [w for w in self.weights if w not in self.weight_grads]
        if missing:
            raise ArtifactError(f"parameter {missing[0]!r} does not affect the loss")
        grads = {weight: GRAD_PREFIX + weight for weight in self.weights}
        renames = [helper.make_node("Identity", [self.weight_grads[w]], [g], name=g) for w, g in grads.items()]
        fed = {w: self.slice_inputs.get(w, w) for w in self.weights}
        inputs = [
            helper.make_tensor_value_info(INPUT, _FLOAT, ["batch", *self._info(INPUT).shape[1:]]),
            helper.make_tensor_value_info(LABELS, TensorProto.INT64, ["batch"]),
            *(
                helper.make_tensor_value_info(n, TensorProto.INT64, [f"n_{layer}"])
                for layer, n in self.channel_inputs.items()
            ),
            *(
                helper.make_tensor_value_info(fed[w], _FLOAT, self._fed_shape(w, w in self.slice_inputs))
                for w in self.weights
            ),
        ]
        outputs = [
            helper.make_tensor_value_info(LOSS, _FLOAT, []),
            helper.make_tensor_value_info(CORRECT, TensorProto.INT64, []),
            *(
                helper.make_tensor_value_info(g, _FLOAT, self._fed_shape(w, w in self.layer_of_weight))
                for w, g in grads.items()
            ),
        ]
        fed_names = set(self.weights) - set(self.refreshed)
        initializers = [i for i in self.graph.initializer if i.name not in fed_names]
        graph = helper.make_graph(
            forward + loss_nodes + backward + renames,
            "edge-trady training step",
            inputs,
            outputs,
            initializers + self.emit.constants,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-trady", ir_version=IR_VERSION
        )
        weights = {w: list(self.constants[w].shape) for w in self.weights}
        return StepGraph(model, dict(self.channel_inputs), weights, fed, list(self.refreshed), grads, dict(self.kept))

    def _fed_shape(self, weight: str, sliced: bool) -> list:
        """Shape of a trainable tensor, or of its selected slice (``n`` channels, ``core.slices``)."""
        shape = list(self.constants[weight].shape)
        if not sliced:
            return shape
        layer = self.candidates[self.layer_of_weight[weight]]
        n = f"n_{layer.name}"
        if layer.kind in ("dwconv", "gconv"):
            return [n, layer.out_channels // layer.groups, *shape[2:]]
        return [shape[0], n, *shape[2:]]

    def _take(self) -> list[onnx.NodeProto]:
        nodes, self.emit.nodes = self.emit.nodes, []
        return nodes

    def _tap(self, name: str, node: onnx.NodeProto | None = None) -> None:
        """Forward-time copies the backward needs: selected channels of candidate inputs, masks."""
        for user in self.users.get(name, []):
            layer = self.layer_of_weight.get(user.input[1]) if len(user.input) > 1 else None
            if layer is not None and user.input[0] == name and layer not in self.taps:
                hint = f"{layer}/keep"
                kept = self.emit.op("Gather", [name, CHANNELS_PREFIX + layer], hint, axis=1)
                if user.op_type == "Conv":  # [n, B, H, W]: the weight gradient reduces over B, H, W
                    kept = self.emit.op("Transpose", [kept], hint, perm=[1, 0, 2, 3])
                self.taps[layer] = kept
                self.kept[kept] = f"selected input channels of {layer}"
        if node is not None and node.op_type in ("Relu", "Clip") and node.input[0] in self.needs_grad:
            mask = self._mask(node, name)
            if int(np.prod(self._info(name).shape)) % 8 == 0:  # 8 values of one sample per byte
                mask = self._packed(mask, f"{node.name}/mask")
                self.kept[mask] = f"mask of {node.name}, 1 bit per value"
            else:
                self.kept[mask] = f"mask of {node.name}, 1 byte per value"
            self.masks[name] = mask

    def _packed(self, mask: str, hint: str) -> str:
        """``mask`` (bool) as uint8 [values / 8, 1]: ``MatMulInteger`` of each 8 with the powers of 2."""
        e = self.emit
        flat = e.op("Reshape", [e.op("Cast", [mask], hint, to=TensorProto.UINT8), e.ints([-1, 8], hint)], hint)
        bits = e.const((2 ** np.arange(8)).astype(np.uint8)[:, None], hint)
        packed = e.op("Cast", [e.op("MatMulInteger", [flat, bits], hint)], hint, to=TensorProto.UINT8)
        self.packed.add(packed)
        return packed

    def _mask(self, node: onnx.NodeProto, y: str) -> str:
        """bool, True where the clamp passes its gradient: ``low < y < high`` (from the output)."""
        e, hint = self.emit, f"{node.name}/mask"
        if node.op_type == "Relu":
            return e.op("Greater", [y, e.const(np.float32(0), hint)], hint)
        bounds = [*node.input[1:3], "", ""][:2]
        parts = [
            e.op(op, [y, e.const(np.float32(self._const(bound)), hint)], hint)
            for op, bound in zip(("Greater", "Less"), bounds, strict=True)
            if bound
        ]
        if not parts:  # a Clip without bounds passes every gradient
            return e.op("Not", [e.op("IsNaN", [y], hint)], hint)
        return parts[0] if len(parts) == 1 else e.op("And", parts, hint)

    def _after(self, t: str, gate: str, hint: str) -> str:
        """``t`` unchanged (a Reshape, no copy) but computed only once ``gate`` exists: with the
        priority-based order nothing that reads it can run before (see the module docstring)."""
        e = self.emit
        zero = e.op("Mul", [e.op("Size", [gate], hint), e.ints([0], hint)], hint)
        return e.op("Reshape", [t, e.op("Add", [e.op("Shape", [t], hint), zero], hint)], hint, allowzero=1)

    def _const(self, name: str) -> np.ndarray:
        if name not in self.constants:
            raise ArtifactError(f"tensor {name!r} must be a constant for the portable export")
        return self.constants[name]

    def _loss(self) -> list[onnx.NodeProto]:
        """Mean cross-entropy, correct count, and the gradient of the logits."""
        e, hint = self.emit, "loss"
        _, log_prob = e.op("SoftmaxCrossEntropyLoss", [LOGITS, LABELS], hint, outputs=2, reduction="mean")
        e.nodes[-1].output[0] = LOSS
        classes = self._info(LOGITS).shape[1]
        onehot = e.op("OneHot", [LABELS, e.ints([classes], hint), e.const(np.array([0, 1], np.float32), hint)], hint)
        batch = e.op(
            "Cast", [e.op("Gather", [e.op("Shape", [LOGITS], hint), e.ints([0], hint)], hint)], hint, to=_FLOAT
        )
        self.grads[LOGITS] = e.op("Div", [e.op("Sub", [e.op("Exp", [log_prob], hint), onehot], hint), batch], hint)
        predicted = e.op("ArgMax", [LOGITS], hint, axis=1, keepdims=0)
        hits = e.op("Cast", [e.op("Equal", [predicted, LABELS], hint)], hint, to=TensorProto.INT64)
        e.nodes.append(helper.make_node("ReduceSum", [hits], [CORRECT], name=CORRECT, keepdims=0))
        return self._take()

    # ---------------------------------------------------------------------------- backward

    def _backward(self, node: onnx.NodeProto) -> None:
        grads = [self.grads.get(o) for o in node.output]
        if not any(grads) or node.op_type in _NOT_DIFFERENTIABLE:
            return
        rule = getattr(self, f"_d_{node.op_type}", None)
        if rule is None:
            raise ArtifactError(
                f"the portable format cannot differentiate layer {_module_of(node.name)!r} ({node.op_type}, ONNX "
                f"node {node.name}): export it with --format ort-training, or fine-tune with a torch engine "
                "('edge-trady finetune --engine torch-sparse')"
            )
        rule(node, grads[0])

    def _wants(self, name: str) -> bool:
        return bool(name) and name in self.needs_grad and name not in self.weights

    def _add_grad(self, name: str, grad: str) -> None:
        if name in self.grads:
            grad = self.emit.op("Add", [self.grads[name], grad], f"{name}/grad")
        self.grads[name] = grad

    def _d_Identity(self, node: onnx.NodeProto, gy: str) -> None:
        if self._wants(node.input[0]):
            self._add_grad(node.input[0], gy)

    def _d_Reshape(self, node: onnx.NodeProto, gy: str) -> None:
        x = node.input[0]
        if self._wants(x):
            hint = f"{node.name}/grad"
            self._add_grad(x, self.emit.op("Reshape", [gy, self.emit.ints(self._info(x).reshape_target(), hint)], hint))

    _d_Flatten = _d_Squeeze = _d_Unsqueeze = _d_Reshape

    def _d_Transpose(self, node: onnx.NodeProto, gy: str) -> None:
        if self._wants(node.input[0]):
            perm = node_attr(node, "perm", list(reversed(range(len(self._info(node.input[0]).shape)))))
            inverse = [int(i) for i in np.argsort(perm)]
            self._add_grad(node.input[0], self.emit.op("Transpose", [gy], f"{node.name}/grad", perm=inverse))

    def _d_Relu(self, node: onnx.NodeProto, gy: str) -> None:
        if not self._wants(node.input[0]):
            return
        e, hint = self.emit, f"{node.name}/grad"
        mask = self._after(self.masks[node.output[0]], gy, hint)
        if self.masks[node.output[0]] in self.packed:
            if self.unpack_table is None:
                table = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1
                self.unpack_table = e.const(table.astype(np.float32), "unpack")
            index = e.op("Cast", [mask], hint, to=TensorProto.INT64)
            mask = e.op("Gather", [self.unpack_table, index], hint, axis=0)  # [M, 1, 8] floats
        else:
            mask = e.op("Cast", [mask], hint, to=_FLOAT)  # Cast + Mul: 7x faster than Where
        mask = e.op("Reshape", [mask, e.op("Shape", [gy], hint)], hint)
        self._add_grad(node.input[0], e.op("Mul", [gy, mask], hint))

    _d_Clip = _d_Relu

    def _d_Add(self, node: onnx.NodeProto, gy: str, negate_second: bool = False) -> None:
        for index, x in enumerate(node.input):
            if self._wants(x):
                grad = gy
                if negate_second and index == 1:
                    grad = self.emit.op("Neg", [gy], f"{node.name}/grad")
                self._add_grad(x, self._unbroadcast(grad, x, node.output[0], node.name))

    def _d_Sub(self, node: onnx.NodeProto, gy: str) -> None:
        self._d_Add(node, gy, negate_second=True)

    def _d_Mul(self, node: onnx.NodeProto, gy: str, op: str = "Mul") -> None:
        a, b = node.input
        for x, other in ((a, b), (b, a)):
            if not self._wants(x):
                continue
            if other not in self.constants or (op == "Div" and x == b):
                raise ArtifactError(
                    f"the portable format cannot differentiate layer {_module_of(node.name)!r} ({node.op_type} of two "
                    f"trained tensors, ONNX node {node.name}): export it with --format ort-training, or fine-tune "
                    "with a torch engine ('edge-trady finetune --engine torch-sparse')"
                )
            grad = self.emit.op(op, [gy, other], f"{node.name}/grad")
            self._add_grad(x, self._unbroadcast(grad, x, node.output[0], node.name))

    def _d_Div(self, node: onnx.NodeProto, gy: str) -> None:
        self._d_Mul(node, gy, op="Div")

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

    def _d_Concat(self, node: onnx.NodeProto, gy: str) -> None:
        axis = node_attr(node, "axis", 0) % len(self._info(node.output[0]).shape)
        start = 0
        for x in node.input:
            size = self._info(x).shape[axis]
            if self._wants(x):
                hint = f"{node.name}/grad"
                bounds = [self.emit.ints([v], hint) for v in (start, start + size, axis)]
                self._add_grad(x, self.emit.op("Slice", [gy, *bounds], hint))
            start += size

    def _d_Pad(self, node: onnx.NodeProto, gy: str) -> None:
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

    def _d_GlobalAveragePool(self, node: onnx.NodeProto, gy: str) -> None:
        x = node.input[0]
        if self._wants(x):
            shape = self._info(x).shape
            self._spread(node, gy, x, list(range(2, len(shape))))

    def _d_ReduceMean(self, node: onnx.NodeProto, gy: str) -> None:
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

    def _d_Gemm(self, node: onnx.NodeProto, gy: str) -> None:
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
                self.kept[a] = f"input of {node.name}"
            self.weight_grads[b] = self.emit.op("Gemm", [gy, kept], hint, transA=1)
        if c in self.weights:
            self.weight_grads[c] = self.emit.op("ReduceSum", [gy, self.emit.ints([0], hint)], hint, keepdims=0)
        if self._wants(a):
            if trans_b:
                self._add_grad(a, self.emit.op("MatMul", [gy, b], hint))
            else:
                self._add_grad(a, self.emit.op("Gemm", [gy, b], hint, transB=1))

    def _d_MatMul(self, node: onnx.NodeProto, gy: str) -> None:
        a, b = node.input
        hint = f"{node.name}/grad"
        for x, other, left in ((a, b, False), (b, a, True)):
            if not self._wants(x):
                continue
            if other not in self.constants or self.constants[other].ndim != 2:
                raise ArtifactError(
                    f"the portable format cannot differentiate layer {_module_of(node.name)!r} (MatMul without a "
                    f"constant 2-D operand, ONNX node {node.name}): export it with --format ort-training"
                )
            transposed = self.emit.const(np.ascontiguousarray(self.constants[other].T), hint)
            self._add_grad(x, self.emit.op("MatMul", [transposed, gy] if left else [gy, transposed], hint))


def _fold(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> np.ndarray | None:
    """The value of a Constant, or of a Cast / Identity of a constant (e.g. hardtanh bounds)."""
    if node.op_type == "Constant":
        attr = node.attribute[0]
        return numpy_helper.to_array(attr.t) if attr.name == "value" else np.asarray(helper.get_attribute_value(attr))
    if node.op_type in ("Cast", "Identity") and node.input[0] in constants:
        value = constants[node.input[0]]
        return value.astype(helper.tensor_dtype_to_np_dtype(node_attr(node, "to"))) if node.op_type == "Cast" else value
    return None


def _module_of(node_name: str) -> str:
    """The qualified module name of a node exported by torch ('/features/features.3/conv/conv.0/Conv'
    -> 'features.3.conv.0'); the node name itself when it has no scope."""
    parts = [p for p in node_name.split("/") if p][:-1]
    if not parts:
        return node_name
    name, previous = parts[0], parts[0]
    for part in parts[1:]:
        name += part[len(previous) :] if part.startswith(previous + ".") else "." + part
        previous = part
    return name
