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
  their output right after it is produced, 1 bit per value (a float ``MatMul`` with the powers of
  two packs 8 values per byte; a ``Gather`` from a 256-row table unpacks them); 1 byte per value
  when a sample's size is not a multiple of 8.

Nothing else of the forward is read by the backward, and nothing below the earliest candidate
layer is differentiated. The backward rules live in ``rules/``, one module per family, each
registered with what it keeps (``rules.base``); this module walks the graph and dispatches.

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
from .forward import INPUT, LABELS, LOGITS
from .rules import (
    RULES,
    SELECTED,
    TAPS,
    ArithmeticRules,
    ClampRules,
    ConvRules,
    Keep,
    KeptTensor,
    LinearRules,
    ShapeRules,
    cannot_differentiate,
    node_attr,
)
from .rules.conv import fold_affines

OPSET = 17  # ScatterElements with reduction: opset >= 16
IR_VERSION = 8
LOSS, CORRECT = "loss", "correct"
CHANNELS_PREFIX, SLICE_PREFIX, GRAD_PREFIX = "channels::", "slice::", "grad::"
_FLOAT = TensorProto.FLOAT


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
    kept: dict[str, KeptTensor] = field(default_factory=dict)  # forward tensor kept for backward -> what, size


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


class StepBuilder(ClampRules, ArithmeticRules, ShapeRules, LinearRules, ConvRules):
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
        self.layer_of_weight = {f"{layer.name}.weight": layer.name for layer in candidates}
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
        self.graph, self.scales = fold_affines(self.graph, self.constants, set(self.layer_of_weight))
        self.weights = [f"{name}.weight" for name in self.candidates] + head_params
        self.channel_inputs = {name: CHANNELS_PREFIX + name for name in self.candidates}
        self.refreshed = [f"{n}.weight" for n, layer in self.candidates.items() if layer.kind in ("dwconv", "gconv")]
        self.slice_inputs = {weight: SLICE_PREFIX + weight for weight in self.refreshed}
        self.users = self._users()
        self.needs_grad = self._needs_grad()
        self.grads: dict[str, str] = {}  # forward tensor -> its accumulated gradient
        self.weight_grads: dict[str, str] = {}
        self.kept: dict[str, KeptTensor] = {}
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
            rule = RULES.get(node.op_type)
            if (rule is not None and rule.backward is None) or not needs.intersection(node.input):
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
            if node.op_type == "Conv" and node.input[1] in self.layer_of_weight:
                self._candidate_conv(node)
            else:
                forward.append(node)
            for output in node.output:
                self._tap(output)
            if node.op_type in TAPS:
                TAPS[node.op_type](self, node)
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

    def _tap(self, name: str) -> None:
        """The selected input channels of each candidate layer that reads ``name``, taken right away."""
        for user in self.users.get(name, []):
            layer = self.layer_of_weight.get(user.input[1]) if len(user.input) > 1 else None
            if layer is not None and user.input[0] == name and layer not in self.taps:
                hint = f"{layer}/keep"
                kept = self.emit.op("Gather", [name, CHANNELS_PREFIX + layer], hint, axis=1)
                if user.op_type == "Conv":  # [n, B, H, W]: the weight gradient reduces over B, H, W
                    kept = self.emit.op("Transpose", [kept], hint, perm=[1, 0, 2, 3])
                self.taps[layer] = kept
                per_channel = 4 * self.candidates[layer].act_units_per_channel
                self._record(kept, SELECTED, f"selected input channels of {layer}", per_channel, layer=layer)

    def _record(self, tensor: str, keep: Keep, why: str, per_sample: int, fixed: int = 0, layer: str = "") -> None:
        """Note that the step keeps ``tensor`` (declared by its rule as ``keep``) and its size."""
        self.kept[tensor] = KeptTensor(keep, why, per_sample, fixed, layer)

    def _after(self, t: str, gate: str, hint: str) -> str:
        """``t`` unchanged (a Reshape, no copy) but computed only once ``gate`` exists: with the
        priority-based order nothing that reads it can run before (see the module docstring). The
        gate is ``Size(gate) * 0``: ONNX Runtime cannot fold it (``Shape(gate, start=0, end=0)``,
        an always-empty shape, may be folded into a constant, which would undo the gate)."""
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
        rule = RULES.get(node.op_type)
        if not any(grads) or (rule is not None and rule.backward is None):
            return
        if rule is None:
            raise cannot_differentiate(node, node.op_type)
        rule.backward(self, node, grads[0])

    def _wants(self, name: str) -> bool:
        return bool(name) and name in self.needs_grad and name not in self.weights

    def _add_grad(self, name: str, grad: str) -> None:
        if name in self.grads:
            grad = self.emit.op("Add", [self.grads[name], grad], f"{name}/grad")
        self.grads[name] = grad


def _fold(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> np.ndarray | None:
    """The value of a Constant, or of a Cast / Identity of a constant (e.g. hardtanh bounds)."""
    if node.op_type == "Constant":
        attr = node.attribute[0]
        return numpy_helper.to_array(attr.t) if attr.name == "value" else np.asarray(helper.get_attribute_value(attr))
    if node.op_type in ("Cast", "Identity") and node.input[0] in constants:
        value = constants[node.input[0]]
        return value.astype(helper.tensor_dtype_to_np_dtype(node_attr(node, "to"))) if node.op_type == "Cast" else value
    return None
