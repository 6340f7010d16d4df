"""A round's task (server -> node) and report (node -> server) as plain data (no Flower)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from ..errors import FleetError

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class RoundTask:
    """What the server asks of every node in a round."""

    round: int  # 1-based
    rounds: int
    local_epochs: int
    artifact_sha256: str
    protocol: int = PROTOCOL_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> RoundTask:
        protocol = values.get("protocol")
        if protocol != PROTOCOL_VERSION:
            raise FleetError(
                f"the server speaks fleet protocol {protocol!r}, this edge-trady speaks {PROTOCOL_VERSION}: "
                "install the same edge-trady version on the server and the devices"
            )
        return cls(**{f.name: values[f.name] for f in fields(cls)})


@dataclass
class ClientReport:
    """A client's numbers for one round."""

    examples: int  # training images: the aggregation weight
    train_loss: float
    train_acc: float
    val_examples: int  # local validation images; the two below are of the global model received
    val_loss: float
    val_acc: float
    channels: int  # input channels selected (candidate layers)
    seed: int  # the selection's seed (node and plan seed), drawn with the round
    seconds: float
    peak_rss_bytes: int  # VmHWM of the process that trained (the ClientApp)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> ClientReport:
        return cls(**{f.name: values[f.name] for f in fields(cls)})
