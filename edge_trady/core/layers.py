"""Per-layer cost model (METHOD.md), independent of torch.

The unit of selection is an input channel of a Conv2d or Linear layer. For one sample, updating
input channel ``c`` costs ``Cw`` weight-gradient entries plus ``Ca`` stored activations:

- dense conv ``[C', C, D, D]``:   ``Cw = C' * D * D``
- grouped conv (g groups):       ``Cw = (C'/g) * D * D``  (only the C'/g outputs of c's group)
- depthwise conv (g = C):        ``Cw = (C'/C) * D * D``  (``D * D`` for multiplier 1)
- linear ``[C', C]``:             ``Cw = C'``, ``Ca = T``
- ``Ca = H * W`` of the layer's (unpadded) input feature map.

A Linear's input channel is the feature ``c`` on its input's last axis, whatever its rank: on
``[B, C]`` it sees one value per sample (``T = 1``), on tokens ``[B, T1, .., C]`` (attention, MLP of a
transformer) ``T = T1 * ..`` values per sample. A Linear records ``in_hw = out_hw = (T, 1)``, so that
``Ca = T`` and its weight gradient costs ``C' * T`` multiply-adds per channel and sample.

A "unit" is one fp32 value (4 bytes). Activations scale with the batch size, weights do not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

BYTES_PER_UNIT = 4


@dataclass(frozen=True)
class LayerCost:
    """Shape facts and per-input-channel costs of one Conv2d or Linear layer."""

    name: str
    kind: str  # "conv", "dwconv", "gconv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    groups: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_channels, self.in_channels)
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)

    @property
    def tokens(self) -> int:
        """Positions one sample's input channel has: ``H * W`` of a conv, ``T`` of a Linear."""
        return self.in_hw[0] * self.in_hw[1]

    @property
    def weight_units_per_channel(self) -> int:
        """``Cw``: weight-gradient entries that belong to one input channel."""
        return (self.out_channels // self.groups) * self.kernel[0] * self.kernel[1]

    @property
    def act_units_per_channel(self) -> int:
        """``Ca``: stored activation values of one input channel, for one sample."""
        return self.tokens

    @property
    def unit_cost(self) -> int:
        """``Cw + Ca``: the paper's per-channel memory cost (one sample)."""
        return self.weight_units_per_channel + self.act_units_per_channel

    def bytes_per_channel(self, batch_size: int) -> int:
        """Real bytes to update one input channel at ``batch_size`` (fp32)."""
        units = self.weight_units_per_channel + batch_size * self.act_units_per_channel
        return BYTES_PER_UNIT * units

    @property
    def wgrad_macs_per_channel(self) -> int:
        """Multiply-adds of one input channel's weight gradient, one sample (FLOPs = 2x)."""
        return self.weight_units_per_channel * self.out_hw[0] * self.out_hw[1]

    def patch_bytes_per_channel(self, batch_size: int) -> int:
        """Bytes the portable step's weight gradient of this layer works on per selected input
        channel: the ``kh*kw`` shifted copies of the channel (its *patches*) and their product with
        the output gradient (a grouped conv's ``out/groups`` outputs; a dense conv's Einsum copies
        them once). 0 where there are no patches: a Linear, or a 1x1 conv keeping the input's size."""
        if self.kind == "linear" or (self.kernel == (1, 1) and self.in_hw == self.out_hw):
            return 0
        patches = self.kernel[0] * self.kernel[1] * self.out_hw[0] * self.out_hw[1] * batch_size * BYTES_PER_UNIT
        products = self.out_channels // self.groups if self.groups > 1 else 1
        return patches * (1 + products)

    @property
    def total_units(self) -> int:
        """Units to update every input channel of this layer."""
        return self.unit_cost * self.in_channels

    @property
    def weight_count(self) -> int:
        return self.weight_units_per_channel * self.in_channels

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists, so a dict read back from JSON compares equal)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> LayerCost:
        return cls(
            name=data["name"],
            kind=data["kind"],
            in_channels=int(data["in_channels"]),
            out_channels=int(data["out_channels"]),
            kernel=tuple(data["kernel"]),
            groups=int(data["groups"]),
            in_hw=tuple(data["in_hw"]),
            out_hw=tuple(data["out_hw"]),
        )


def channel_costs(layer: LayerCost, unit: str, batch_size: int = 1) -> float:
    """Cost of one input channel of ``layer`` in ``unit`` ("units" or "bytes")."""
    if unit == "units":
        return float(layer.unit_cost)
    if unit == "bytes":
        return float(layer.bytes_per_channel(batch_size))
    raise ValueError(f"unknown cost unit {unit!r} (expected 'units' or 'bytes')")


def full_units(layers: list[LayerCost]) -> int:
    """Units of full fine-tuning: every input channel of every layer."""
    return sum(layer.total_units for layer in layers)
