"""Export a model as a portable training artifact: plain-onnxruntime graphs (workstation).

The forward graph comes from ``forward.forward_graph`` (eval mode, no BatchNorm, pads merged) at
``step_graph.OPSET``; ``step_graph.StepBuilder`` appends the backward. Shapes of every forward
tensor are read by running the forward once at batch 1 and once at batch 2 (the axes that change
are batch axes), which is exact where ONNX shape inference is not (``view(batch, -1)``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from ...core.layers import LayerCost
from ...engines.portable_format import PortableLayout
from ...errors import ArtifactError
from .forward import INPUT, LOGITS, check_layers, forward_graph
from .step_graph import OPSET, StepBuilder, StepGraph, TensorInfo

MIN_ONNXRUNTIME = "1.17"  # opset 17 and the ops used; the oldest version the tests ran is 1.19


def build_step(
    model: nn.Module, layers: list[LayerCost], trainable: list[str], classifier: str, image_size: int
) -> tuple[StepGraph, onnx.ModelProto]:
    """The step graph of ``model`` with ``trainable`` candidate layers, and the forward graph."""
    costs = {layer.name: layer for layer in layers}
    candidates = [name for name in dict.fromkeys(trainable) if name != classifier]
    check_layers(model, costs, candidates, classifier)
    head: nn.Linear = model.get_submodule(classifier)
    head_params = [f"{classifier}.weight"] + ([f"{classifier}.bias"] if head.bias is not None else [])
    forward = forward_graph(model, {*candidates, classifier}, image_size, opset=OPSET)
    infos = probe_tensors(forward)
    step = StepBuilder(forward, infos, [costs[n] for n in candidates], classifier, head_params).build()
    foreign = {node.domain for node in step.model.graph.node if node.domain not in ("", "ai.onnx")}
    if foreign:
        raise ArtifactError(f"the step graph uses operators of domain {sorted(foreign)[0]!r}")
    return step, forward


def export_portable_artifact(
    model: nn.Module,
    layers: list[LayerCost],
    trainable: list[str],
    classifier: str,
    image_size: int,
    out_dir: Path,
) -> PortableLayout:
    """Write the portable artifact of ``model`` to ``out_dir``: ``trainable`` layers' selected
    channels and the whole classifier (weight and bias) train, everything else is frozen."""
    step, forward = build_step(model, layers, trainable, classifier, image_size)
    costs = {layer.name: layer for layer in layers}
    layout = PortableLayout(
        image_size=image_size,
        classifier=classifier,
        opset=OPSET,
        min_onnxruntime=MIN_ONNXRUNTIME,
        layers=[costs[name] for name in step.channel_inputs],
        channel_inputs=step.channel_inputs,
        weights=step.weights,
        inputs=step.inputs,
        refreshed=step.refreshed,
        grads=step.grads,
        kept={tensor: kept.why for tensor, kept in step.kept.items()},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(as_raw_data(step.model, step.refreshed), out_dir / layout.step_model)
    onnx.save(as_raw_data(forward, list(step.weights)), out_dir / layout.inference_model)
    layout.save(out_dir)
    return layout


def as_raw_data(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` with initializers ``names`` stored as float32 raw data, which the runner reads and
    rewrites in place (``core.onnx_wire``)."""
    model = copy.deepcopy(model)
    inits = {init.name: init for init in model.graph.initializer}
    for name in names:
        value = numpy_helper.to_array(inits[name])
        if value.dtype != np.float32:
            raise ArtifactError(f"parameter {name!r} is {value.dtype}, the portable format trains float32 only")
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return model


def probe_tensors(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Shape (at batch 1), batch axes and element type of every tensor of ``model``."""
    import onnxruntime

    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.output]}
    probe = copy.deepcopy(model)
    names = [o for node in probe.graph.node for o in node.output if o and o != LOGITS]
    missing = [n for n in names if not types.get(n)]
    if missing:
        raise ArtifactError(f"ONNX shape inference gives no type for tensor {missing[0]!r}")
    probe.graph.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in names)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    outputs = [o.name for o in session.get_outputs()]
    runs = [session.run(None, {INPUT: np.zeros((batch, *shape), np.float32)}) for batch in (1, 2)]
    infos = {INPUT: TensorInfo((1, *shape), (0,), onnx.TensorProto.FLOAT)}
    for name, one, two in zip(outputs, *runs, strict=True):
        one, two = np.asarray(one), np.asarray(two)
        axes = tuple(i for i, (a, b) in enumerate(zip(one.shape, two.shape, strict=True)) if a != b)
        dtype = onnx.TensorProto.FLOAT if name == LOGITS else types[name]
        infos[name] = TensorInfo(tuple(one.shape), axes, dtype)
    for init in model.graph.initializer:
        infos[init.name] = TensorInfo(tuple(init.dims), (), init.data_type)
    return infos
