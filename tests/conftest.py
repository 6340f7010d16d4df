import pytest
import torch

from edge_trady.workstation.cost_trace import trace_layers
from edge_trady.workstation.models import build_model


@pytest.fixture(scope="session", autouse=True)
def _one_thread_is_enough() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def tiny_model():
    """MobileNetV2-w0.35 at 32 px (depthwise, pointwise, dense conv and linear layers)."""
    built = build_model("mobilenetv2-w0.35", num_classes=4, image_size=32, seed=0)
    return built, trace_layers(built.module, 32)


@pytest.fixture(scope="session", params=["ort", "portable"])
def small_artifact(request, tmp_path_factory):
    """(plan.json, artifact) of a small plan for the ort engine (ort-training format) or the portable
    one (onnx format), shared by the safety tests (cli_helpers): each runs with both."""
    from cli_helpers import small_artifact

    return small_artifact(tmp_path_factory.mktemp(f"small-artifact-{request.param}"), request.param)
