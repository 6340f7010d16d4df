"""Where a portable training step's time goes, by ONNX Runtime's own account (workstation diagnostic).

Two things, both read from the artifact's graphs:

- ``node_phases``: the phase of every node ONNX Runtime ran (forward, the refreshed layers' forward
  corrections, the kept channels, the clamp masks, the loss, input gradients, weight gradients).
  The step graph's builder names every node it adds ``<hint>/<Op>#<n>`` with a hint that says what
  it is for (``step_graph``, ``conv_rules``); forward nodes keep the exported model's names. ONNX
  Runtime's optimizer renames, fuses and adds nodes (NCHWc convs, ``ReorderInput`` /
  ``ReorderOutput``): a node whose name is not the step graph's takes the phase of the step-graph
  tensor it produces, else of the nodes that read its outputs, else of those that produce its inputs.
- ``step_flops``: the FLOP floor of the step (multiply-adds of Conv / Gemm / MatMul): the forward,
  the input gradients of every layer whose input depends on a trainable weight (i.e. above the
  earliest candidate), and the selected channels' weight gradients (the classifier's in full).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ...core.selection import Selection
from ...engines.portable_format import PortableLayout

PHASES = (
    "forward",
    "forward corrections",
    "kept channels",
    "masks",
    "loss",
    "input gradients",
    "weight gradients",
)
_HINTS = {  # the builder's hint (the path segment before "<Op>#<n>") -> phase
    "keep": "kept channels",
    "mask": "masks",
    "grad_input": "input gradients",
    "unbroadcast": "input gradients",
    "grad_weight": "weight gradients",
    "correction": "forward corrections",
    "index": "forward corrections",
    "loss": "loss",
}
_EMITTED = re.compile(r"^[A-Za-z]+#\d+")
_CLAMPS = ("Relu", "Clip")  # their "<node>/grad" is the mask's unpacking and product
_MAC_OPS = ("Conv", "Gemm", "MatMul")


def node_phases(
    step: onnx.GraphProto, optimized: onnx.GraphProto, forward: onnx.GraphProto, profiled: dict[str, str] | None = None
) -> dict[str, str]:
    """Phase of every node of ``optimized`` (ONNX Runtime's optimized ``step``) by node name;
    ``forward`` is the artifact's inference graph (the exported forward). ``profiled`` (name -> op
    type of the nodes a profile names): its names that ``optimized`` does not have (ONNX Runtime
    names an unnamed node, e.g. of an inlined function body, ``<Op>_<index>``) get the phase of an
    unnamed node of that op type."""
    forward_ops = {node.name: node.op_type for node in forward.node}
    named = _step_phases(step, forward_ops)
    made_by = {o: named[node.name] for node in step.node for o in node.output}
    nodes = list(optimized.node)
    phases: list[str | None] = []
    for node in nodes:
        phase = named.get(node.name) or named.get(node.name.removesuffix("_nchwc")) if node.name else None
        phases.append(phase or next((made_by[o] for o in node.output if o in made_by), None))
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(index)
    producer = {o: index for index, node in enumerate(nodes) for o in node.output}
    unresolved = [i for i, phase in enumerate(phases) if phase is None]
    for direction in ("readers", "producers", "readers", "producers"):  # ORT's own nodes: readers first
        changed = True
        while changed:
            changed = False
            for index in [i for i in unresolved if phases[i] is None]:
                node = nodes[index]
                if direction == "readers":
                    near = [phases[r] for o in node.output for r in readers.get(o, [])]
                else:
                    near = [phases[producer[i]] for i in node.input if i in producer]
                phases[index] = next((p for p in near if p), None)
                changed = changed or phases[index] is not None
    phases = [phase or "forward" for phase in phases]  # isolated (constant) nodes
    result = {node.name: phase for node, phase in zip(nodes, phases, strict=True) if node.name}
    unnamed = {}
    for node, phase in zip(nodes, phases, strict=True):
        if not node.name:
            unnamed.setdefault(node.op_type, phase)
    for name, op_type in (profiled or {}).items():
        if name not in result:
            result[name] = unnamed.get(op_type, "forward")
    return result


def _step_phases(step: onnx.GraphProto, forward_ops: dict[str, str]) -> dict[str, str]:
    """Phase of every node of the step graph, from its name; a "<node>/grad" node read only by the
    renames of the gradient outputs (a classifier's weight Gemm, its bias sum) is a weight gradient."""
    phases = {node.name: _name_phase(node.name, forward_ops) for node in step.node}
    readers: dict[str, list[str]] = {}
    for node in step.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    for node in step.node:
        read_by = [r for o in node.output for r in readers.get(o, [])]
        if phases[node.name] == "input gradients" and read_by and all(r.startswith("grad::") for r in read_by):
            phases[node.name] = "weight gradients"
    return phases


def _name_phase(name: str, forward_ops: dict[str, str]) -> str:
    if name in forward_ops:
        return "forward"
    if name == "correct":
        return "loss"
    parts = name.split("/")
    if len(parts) >= 2 and _EMITTED.match(parts[-1]):
        kind = parts[-2]
        if kind == "grad":
            return "masks" if forward_ops.get("/".join(parts[:-2])) in _CLAMPS else "input gradients"
        if kind in _HINTS:
            return _HINTS[kind]
    return "weight gradients" if name.startswith("grad::") else "forward"


@dataclass(frozen=True)
class StepFlops:
    """Multiply-adds of a step's Conv / Gemm / MatMul work that no implementation can skip."""

    forward: int
    input_gradients: int  # layers whose input depends on a trainable weight
    weight_gradients: int  # the selected channels' (the classifier's in full)

    @property
    def floor(self) -> int:
        return self.forward + self.input_gradients + self.weight_gradients

    @property
    def floor_passes(self) -> float:
        """The floor in inference passes (forward multiply-adds)."""
        return self.floor / self.forward


def step_flops(forward: onnx.ModelProto, layout: PortableLayout, selection: Selection, batch: int) -> StepFlops:
    """The FLOP floor of one step of ``layout``'s artifact (``forward``: its inference graph) with
    ``selection`` at ``batch``; see the module docstring."""
    shapes, constants = _static_shapes(forward, batch)
    trainable = set(layout.weights)
    needs = set(trainable)
    for node in forward.graph.node:
        if needs.intersection(node.input):
            needs.update(node.output)
    fwd = backward = 0
    for node in forward.graph.node:
        if node.op_type not in _MAC_OPS:
            continue
        macs = _macs(node, shapes, constants)
        fwd += macs
        data = [i for i in node.input[:2] if i not in constants]
        if any(i in needs and i not in trainable for i in data):
            backward += macs
    layer_of = layout.layer_of
    weights = 0
    for layer in layout.layers:
        weights += batch * len(selection.channels.get(layer.name, ())) * layer.wgrad_macs_per_channel
    for name, shape in layout.weights.items():
        if name not in layer_of and len(shape) == 2:  # the classifier's weight
            weights += batch * int(np.prod(shape))
    return StepFlops(fwd, backward, weights)


def _static_shapes(model: onnx.ModelProto, batch: int) -> tuple[dict[str, list[int]], dict[str, np.ndarray]]:
    """Shapes of ``model``'s tensors at ``batch`` (measured by running it: ``portable.probe_tensors``),
    and its constants."""
    from .portable import probe_tensors

    shapes = {
        name: [d * batch if axis in info.batch_axes else d for axis, d in enumerate(info.shape)]
        for name, info in probe_tensors(model).items()
    }
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return shapes, constants


def _macs(node: onnx.NodeProto, shapes: dict[str, list[int]], constants: dict[str, np.ndarray]) -> int:
    """Multiply-adds of a Conv, Gemm or MatMul node."""
    out = shapes.get(node.output[0], [])
    if not out or min(out) < 0:
        raise ValueError(f"no static shape for the output of {node.op_type} node {node.name!r}")
    if node.op_type == "Conv":
        weight = shapes.get(node.input[1]) or list(constants[node.input[1]].shape)
        return int(np.prod(out)) * int(np.prod(weight[1:]))
    inner = shapes.get(node.input[0], [-1])[-1]
    if node.op_type == "Gemm":
        for attribute in node.attribute:
            if attribute.name == "transA" and attribute.i:
                inner = shapes[node.input[0]][0]
    if inner < 0:
        raise ValueError(f"no static shape for the input of {node.op_type} node {node.name!r}")
    return int(np.prod(out)) * inner


def kernel_times(events: list[dict], runs: int) -> tuple[dict[str, float], dict[str, str], float]:
    """From ONNX Runtime's profile of ``runs`` session runs (the last ``runs`` recorded): mean
    microseconds per run of every node's kernels, every node's op type, and the mean duration of
    a whole run."""
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    whole = [e["dur"] for e in events if e.get("name") == "model_run"][-runs:]
    per_run = len(kernels) // max(1, len([e for e in events if e.get("name") == "model_run"]))
    timed = kernels[-runs * per_run :] if per_run else []
    micros: Counter = Counter()
    ops = {}
    for event in timed:
        name = event["name"].removesuffix("_kernel_time")
        micros[name] += event["dur"] / runs
        ops[name] = event["args"].get("op_name", "?")
    return dict(micros), ops, float(np.mean(whole)) if whole else 0.0
