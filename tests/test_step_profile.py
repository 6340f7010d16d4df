"""The step profiler's accounts (bench/step_profile.py): every node ONNX Runtime runs gets a phase,
and the FLOP floor is the forward + the input gradients above the earliest candidate + the
selected channels' weight gradients."""

import numpy as np
import onnx
import onnxruntime
import torch
from test_portable import KINDS, export, randomize

from edge_trady.core.selection import Selection
from edge_trady.workstation.export.step_profile import PHASES, node_phases, step_flops


def _artifact(tmp_path):
    torch.manual_seed(0)
    model = randomize(KINDS["depthwise 3x3"]())  # stem 3x3 conv -> depthwise 3x3 + BN + ReLU6 -> pool -> linear
    engine, costs = export(model, 8, tmp_path, trainable=["body.0"])
    return engine, costs


def test_every_node_of_the_optimized_step_has_a_phase(tmp_path) -> None:
    engine, _ = _artifact(tmp_path)
    layout = engine.layout
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(engine.graph_bytes("step"), options, providers=["CPUExecutionProvider"])
    step = onnx.load(tmp_path / layout.step_model).graph
    optimized = onnx.load(tmp_path / "optimized.onnx").graph
    forward = onnx.load(tmp_path / layout.inference_model).graph
    phases = node_phases(step, optimized, forward)
    assert set(phases) == {node.name for node in optimized.node if node.name}
    assert set(phases.values()) <= set(PHASES)
    by_name = node_phases(step, step, forward)
    kinds = {
        "/body/body.0/Conv": "forward",
        "/stem/Conv": "forward",
        "correct": "loss",
    }
    for name, phase in kinds.items():
        assert by_name[name] == phase, name
    hints = {"/mask/": "masks", "/keep/": "kept channels", "/grad_weight/": "weight gradients"}
    for hint, phase in hints.items():
        named = [n for n in by_name if hint in n]
        assert named and {by_name[n] for n in named} == {phase}, hint
    assert {by_name[n] for n in by_name if n.startswith("grad::")} == {"weight gradients"}
    assert "input gradients" in by_name.values() and "forward corrections" in by_name.values()


def test_flop_floor_counts_forward_input_gradients_above_the_earliest_candidate_and_selected_channels(
    tmp_path,
) -> None:
    engine, costs = _artifact(tmp_path)
    forward = onnx.load(tmp_path / engine.layout.inference_model)
    selection = Selection(0, {"body.0": np.array([1, 4, 6])}, 0.0)
    batch = 4
    flops = step_flops(forward, engine.layout, selection, batch)
    stem, body, head = costs["stem"], costs["body.0"], costs["head"]
    macs = {
        name: batch * c.out_channels * np.prod(c.out_hw) * (c.in_channels // c.groups) * np.prod(c.kernel)
        for name, c in (("stem", stem), ("body", body))
    }
    head_macs = batch * head.in_channels * head.out_channels
    assert flops.forward == macs["stem"] + macs["body"] + head_macs
    assert flops.input_gradients == head_macs  # the body's input is the frozen stem's output
    assert flops.weight_gradients == batch * 3 * body.wgrad_macs_per_channel + head_macs
    assert flops.floor_passes == flops.floor / flops.forward
