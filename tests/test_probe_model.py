"""The profiler's probe model (``edge_trady/device/probe.onnx``, package data) is what
``onnx.helper`` builds below, byte for byte. Regenerate it with ``python tests/test_probe_model.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_trady.device.profile import PROBE_MODEL, measure_engine_baseline


def probe_model() -> onnx.ModelProto:
    """``Y = Conv(X[1,3,16,16], W[8,3,3,3] = 0.01)``, IR 8 / opset 17 so old runtimes load it."""
    weight = numpy_helper.from_array(np.full((8, 3, 3, 3), 0.01, np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W"], ["Y"])],
        "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8, 14, 14])],
        [weight],
    )
    model = helper.make_model(
        graph, producer_name="edge-trady", ir_version=8, opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.checker.check_model(model)
    return model


def test_shipped_probe_model_is_regenerated_byte_for_byte() -> None:
    # A proto2 message without maps serializes its fields in number order: the bytes are stable.
    assert PROBE_MODEL.read_bytes() == probe_model().SerializeToString()


def test_probe_model_runs_in_onnxruntime() -> None:
    baseline = measure_engine_baseline("ort")
    assert baseline is not None and baseline > measure_engine_baseline("python")


if __name__ == "__main__":
    Path(sys.argv[1] if len(sys.argv) > 1 else PROBE_MODEL).write_bytes(probe_model().SerializeToString())
