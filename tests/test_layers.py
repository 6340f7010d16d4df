import pytest
import torch
from torch import nn

from edge_trady.core.budget import Budget, format_bytes, parse_budget
from edge_trady.core.layers import LayerCost, full_units
from edge_trady.core.memory import selection_patch_bytes
from edge_trady.errors import EdgeTradyError
from edge_trady.workstation.cost_trace import trace_layers
from edge_trady.workstation.models import build_model


class FourLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 16x16 -> 8x8
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # 8x8
        self.grouped = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)  # 8x8 -> 4x4
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.depthwise(self.dense(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_costs_match_hand_computed_values() -> None:
    dense, depthwise, grouped, fc = trace_layers(FourLayers(), 16)
    # dense: Cw = C' * D * D = 8 * 9, Ca = 16 * 16, MACs = Cw * H'W' = 72 * 64
    assert (dense.kind, dense.weight_units_per_channel, dense.act_units_per_channel) == ("conv", 72, 256)
    assert dense.unit_cost == 328 and dense.total_units == 3 * 328
    assert dense.wgrad_macs_per_channel == 72 * 64
    # depthwise: Cw = (C'/g) * D * D = 9, Ca = 8 * 8
    assert (depthwise.kind, depthwise.weight_units_per_channel, depthwise.act_units_per_channel) == (
        "dwconv",
        9,
        64,
    )
    assert depthwise.total_units == 8 * (9 + 64)
    assert depthwise.wgrad_macs_per_channel == 9 * 64
    # grouped (g=4): Cw = (12/4) * 9 = 27, Ca = 64, output 4x4
    assert (grouped.kind, grouped.weight_units_per_channel, grouped.act_units_per_channel) == (
        "gconv",
        27,
        64,
    )
    assert grouped.wgrad_macs_per_channel == 27 * 16
    assert grouped.weight_shape == (12, 2, 3, 3)
    # linear: Cw = C', Ca = 1
    assert (fc.kind, fc.weight_units_per_channel, fc.act_units_per_channel, fc.unit_cost) == (
        "linear",
        5,
        1,
        6,
    )
    # bytes at batch 32: 4 * (Cw + 32 * Ca)
    assert dense.bytes_per_channel(32) == 4 * (72 + 32 * 256)
    assert full_units([dense, depthwise, grouped, fc]) == 3 * 328 + 8 * 73 + 8 * 91 + 12 * 6


def test_weight_count_equals_parameters() -> None:
    model = FourLayers()
    layers = trace_layers(model, 16)
    for layer in layers:
        assert layer.weight_count == model.get_submodule(layer.name).weight.numel()


def test_mobilenetv2_full_units_close_to_paper() -> None:
    # METHOD.md: 27,946 units are 2.2 % of full fine-tuning for MobileNetV2-w0.35 (128 px) -> ~1.27 M.
    built = build_model("mobilenetv2-w0.35", 10, 128)
    total = full_units(trace_layers(built.module, 128))
    assert 1.15e6 < total < 1.45e6


def test_layer_cost_round_trips_through_dict() -> None:
    layer = LayerCost("a", "gconv", 8, 12, (3, 3), 4, (8, 8), (4, 4))
    assert LayerCost.from_dict(layer.to_dict()) == layer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("27946", Budget(27946, "units")),
        ("110KiB", Budget(110 * 1024, "bytes")),
        ("64MiB", Budget(64 * 2**20, "bytes")),
        ("2%", Budget(0.02, "share")),
        ("1.5GB", Budget(1.5e9, "bytes")),
    ],
)
def test_parse_budget(text: str, expected: Budget) -> None:
    assert parse_budget(text) == expected


def test_share_resolves_against_full_units() -> None:
    assert parse_budget("2%").resolve(1_000_000) == Budget(20_000, "units")


@pytest.mark.parametrize("text", ["", "abc", "5 parsecs", "0%", "150%"])
def test_bad_budget_is_a_clear_error(text: str) -> None:
    with pytest.raises(EdgeTradyError, match="budget"):
        parse_budget(text)


def test_format_bytes() -> None:
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"


def test_model_factory_from_a_file_gets_a_new_head(tmp_path) -> None:
    factory = tmp_path / "net.py"
    factory.write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                         nn.Conv2d(8, 8, 3, groups=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(8, 1000))\n"
    )
    built = build_model(f"{factory}:make", num_classes=5, image_size=16, trust_code=True)
    assert built.classifier == "6"
    assert built.module(torch.zeros(2, 3, 16, 16)).shape == (2, 5)
    kinds = [layer.kind for layer in trace_layers(built.module, 16)]
    assert kinds == ["conv", "dwconv", "linear"]


def test_patch_bytes_count_the_shifted_copies_the_portable_weight_gradient_works_on() -> None:
    """kh*kw shifted copies of a selected channel at the output's size, plus their product with
    the output gradient (one per output of the channel's group); nothing without patches."""
    depthwise = LayerCost("dw", "dwconv", 8, 16, (5, 5), 8, (16, 16), (8, 8))  # multiplier 2, stride 2
    assert depthwise.patch_bytes_per_channel(4) == 25 * 8 * 8 * 4 * 4 * (1 + 2)
    dense = LayerCost("c", "conv", 8, 8, (3, 3), 1, (8, 8), (8, 8))
    assert dense.patch_bytes_per_channel(2) == 9 * 8 * 8 * 2 * 4 * 2
    assert LayerCost("pw", "conv", 8, 8, (1, 1), 1, (8, 8), (8, 8)).patch_bytes_per_channel(4) == 0
    assert LayerCost("pw2", "conv", 8, 8, (1, 1), 1, (8, 8), (4, 4)).patch_bytes_per_channel(1) == 16 * 4 * 2
    assert LayerCost("fc", "linear", 8, 2, (1, 1), 1, (1, 1), (1, 1)).patch_bytes_per_channel(4) == 0
    # a selection drawn over every candidate: its share of all their patches
    patches = 8 * (depthwise.patch_bytes_per_channel(4) + dense.patch_bytes_per_channel(4))
    assert selection_patch_bytes([dense, depthwise], 4, 0.25) == patches // 4
    assert selection_patch_bytes([dense, depthwise], 4, 1.0) == patches
    assert selection_patch_bytes([dense, depthwise], 4, 0.0) == 0
