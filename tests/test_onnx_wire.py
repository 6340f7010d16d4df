"""core.onnx_wire reads and patches ONNX files as the onnx package would."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_trady.core.onnx_wire import OnnxFile
from edge_trady.errors import ArtifactError

WEIGHT = np.arange(12, dtype=np.float32).reshape(3, 4)


def _model() -> onnx.ModelProto:
    bias = helper.make_tensor("b", TensorProto.FLOAT, [3], [0.5, -1.0, 2.0])  # float_data, not raw
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("w", 1, [3, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(WEIGHT, "w"), bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="a" * 300)


def test_reads_what_the_onnx_package_reads() -> None:
    model = OnnxFile(_model().SerializeToString())
    assert model.inputs == ["x"] and model.outputs == ["y"]  # "w" is an initializer, overridable
    assert model.opsets == {"": 17}
    assert model.initializers["w"].dims == (3, 4) and model.initializers["w"].data_type == TensorProto.FLOAT
    assert np.array_equal(model.array("w"), WEIGHT)


def test_patched_model_equals_the_onnx_package_edit() -> None:
    original = _model()
    new = -2 * WEIGHT
    patched = OnnxFile(original.SerializeToString()).patched({"w": new})
    expected = _model()
    expected.graph.initializer[0].CopyFrom(numpy_helper.from_array(new, "w"))
    assert patched == expected.SerializeToString()
    assert np.array_equal(numpy_helper.to_array(onnx.load_from_string(patched).graph.initializer[0]), new)


def test_refuses_what_it_cannot_patch_and_broken_files() -> None:
    data = _model().SerializeToString()
    model = OnnxFile(data, "m.onnx")
    with pytest.raises(ArtifactError, match="'w' has shape \\(3, 4\\), got \\(4, 3\\)"):
        model.patched({"w": WEIGHT.T})
    with pytest.raises(ArtifactError, match="initializer 'b' is not float32 raw data"):
        model.array("b")
    with pytest.raises(ArtifactError, match="no initializer 'v'"):
        model.array("v")
    with pytest.raises(ArtifactError, match="m.onnx: not a readable ONNX model"):
        OnnxFile(data[: len(data) // 2], "m.onnx")
