"""Export a model as an ONNX Runtime training artifact with per-layer gradient masks (workstation).

Starts from ``forward.forward_graph`` (eval mode, no BatchNorm, pads merged) and lets
``onnxruntime.training.artifacts.generate_artifacts`` build the training graph; every trainable
weight gets a ``mask::<param>`` input that zeroes the unselected entries of its gradient.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import onnx
from onnx import helper
from torch import nn

from ...core.layers import LayerCost
from ...core.masks import mask_shape
from ...engines.ort_runtime import MASK_PREFIX, ArtifactLayout
from ...errors import ArtifactError
from .forward import INPUT, LABELS, LOGITS, check_layers, first_line, forward_graph


def export_training_artifact(
    model: nn.Module,
    layers: list[LayerCost],
    trainable: list[str],
    classifier: str,
    image_size: int,
    out_dir: Path,
) -> ArtifactLayout:
    """Write the artifact of ``model`` to ``out_dir``: ``trainable`` layers' weights masked, the
    classifier's weight and bias unmasked, everything else frozen."""
    costs = {layer.name: layer for layer in layers}
    masked = [name for name in dict.fromkeys(trainable) if name != classifier]
    check_layers(model, costs, masked, classifier)
    head: nn.Linear = model.get_submodule(classifier)
    params = {name: [f"{name}.weight"] for name in masked}
    params[classifier] = [f"{classifier}.weight"] + ([f"{classifier}.bias"] if head.bias is not None else [])
    masks = {MASK_PREFIX + f"{name}.weight": name for name in masked}
    graph = forward_graph(model, {*masked, classifier}, image_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    loss_name = _generate(graph, params, masks, costs, out_dir)
    layout = ArtifactLayout(
        image_size=image_size,
        classifier=classifier,
        input_name=INPUT,
        labels_name=LABELS,
        loss_name=loss_name,
        logits_name=LOGITS,
        masks=masks,
        params=params,
        layers=[costs[name] for name in masked],
    )
    layout.save(out_dir)
    return layout


def _generate(
    graph: onnx.ModelProto,
    params: dict[str, list[str]],
    masks: dict[str, str],
    costs: dict[str, LayerCost],
    out_dir: Path,
) -> str:
    """Run ``generate_artifacts`` and add the masks; return the name of the loss output."""
    from onnxruntime.training import artifacts

    requires_grad = [name for names in params.values() for name in names]
    names = {init.name for init in graph.graph.initializer}
    missing = [name for name in requires_grad if name not in names]
    if missing:
        raise ArtifactError(
            f"parameter {missing[0]!r} is not an initializer of the exported graph "
            "(shared or transformed weights are not supported)"
        )
    try:
        with _quiet_gradient_builder():
            artifacts.generate_artifacts(
                graph,
                requires_grad=requires_grad,
                frozen_params=sorted(names - set(requires_grad)),
                loss=artifacts.LossType.CrossEntropyLoss,
                optimizer=artifacts.OptimType.SGD,
                artifact_directory=out_dir,
                additional_output_names=[LOGITS],
            )
    except Exception as exc:
        raise ArtifactError(f"ONNX Runtime cannot build the training graph: {_ort_reason(exc)}") from exc
    _logits_only(out_dir / ArtifactLayout.eval_model)
    return _add_masks(out_dir / ArtifactLayout.training_model, masks, costs)


@contextlib.contextmanager
def _quiet_gradient_builder() -> Iterator[None]:
    """The gradient builder logs every graph pass at INFO unless its SessionOptions say not to."""
    from onnxruntime import SessionOptions
    from onnxruntime.training.onnxblock import _training_graph_utils

    def quiet() -> SessionOptions:
        options = SessionOptions()
        options.log_severity_level = 3
        return options

    with mock.patch.object(_training_graph_utils, "SessionOptions", quiet):
        yield


def _add_masks(path: Path, masks: dict[str, str], costs: dict[str, LayerCost]) -> str:
    """Insert ``Mul(<param>_grad, mask::<param>)`` before each masked gradient's accumulator;
    return the name of the loss output."""
    model = onnx.load(path)
    graph = model.graph
    accumulators = {node.input[1]: node for node in graph.node if node.op_type == "InPlaceAccumulatorV2"}
    mask_inputs = []
    for mask, layer in masks.items():
        grad = f"{layer}.weight_grad"
        masked = f"{grad}.masked"
        accumulators[grad].input[1] = masked
        graph.node.append(helper.make_node("Mul", [grad, mask], [masked], name=f"Mask_{layer}"))
        shape = mask_shape(costs[layer])
        mask_inputs.append(helper.make_tensor_value_info(mask, onnx.TensorProto.FLOAT, shape))
    user = [i for i in graph.input if i.name in (INPUT, LABELS)]
    rest = [i for i in graph.input if i.name not in (INPUT, LABELS)]
    del graph.input[:]
    graph.input.extend([*user, *mask_inputs, *rest])
    onnx.save(model, path)
    return graph.output[0].name


def _logits_only(path: Path) -> None:
    """Drop the loss and the labels input from the eval model: ``predict`` needs images only."""
    model = onnx.load(path)
    graph = model.graph
    keep_outputs = [o for o in graph.output if o.name == LOGITS]
    del graph.output[:]
    graph.output.extend(keep_outputs)
    needed = {LOGITS}
    nodes = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            nodes.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(nodes))
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)
    onnx.save(model, path)


def _ort_reason(exc: Exception) -> str:
    """The useful part of an ORT error, with the layer a gradient is missing for."""
    text = str(exc)
    missing = re.search(r"has not been registered: (\S+) for node (\S+)", text)
    if missing:
        op, node = missing.groups()
        layer = node.rsplit("/", 2)[-2] if node.count("/") >= 2 else node
        return f"no gradient for op {op} in layer {layer!r} (node {node})"
    return first_line(text.rpartition(" was false. ")[2])
