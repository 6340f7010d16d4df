"""What the server and the devices say to each other, as Flower records (Message API).

Downlink, one ``train`` message per node and round:

- ``global`` (ArrayRecord): every trainable tensor of the artifact, by parameter name;
- ``task`` (ConfigRecord): ``task.RoundTask`` (protocol version, round, rounds, local epochs, artifact hash).

Uplink, the reply:

- ``update`` (ArrayRecord): for each candidate layer the client trained, ``<param>@channels`` (int32
  input channels) and ``<param>@values`` (float32 entries of those channels, as a
  ``core.slices.ChannelSlice`` lays them out); the classifier's parameters whole, under their own
  names. Never a frozen entry.
- ``report`` (MetricRecord): ``num-examples`` and the client's numbers (``task.ClientReport``);
- ``info`` (ConfigRecord): ``status`` ("ok" or "refused"), ``reason``, node name, version; with an
  update also the engine, the onnxruntime the ClientApp loaded and whether it imported torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..errors import FleetError
from .aggregate import ClientUpdate, SliceUpdate
from .task import ClientReport, RoundTask

GLOBAL, TASK, UPDATE, REPORT, INFO = "global", "task", "update", "report", "info"
CHANNELS, VALUES = "@channels", "@values"
EXAMPLES = "num-examples"  # Flower's name for the aggregation weight


def task_record(task: RoundTask) -> ConfigRecord:
    return ConfigRecord(task.to_dict())


def read_task(record: Mapping) -> RoundTask:
    return RoundTask.from_dict(dict(record))


def report_record(report: ClientReport) -> MetricRecord:
    values = report.to_dict()
    values[EXAMPLES] = values.pop("examples")
    return MetricRecord(values)


def read_report(record: Mapping) -> ClientReport:
    values = dict(record)
    values["examples"] = values.pop(EXAMPLES)
    return ClientReport.from_dict(values)


def encode_state(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(array)) for name, array in state.items()})


def decode_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def encode_update(update: ClientUpdate) -> ArrayRecord:
    arrays = {}
    for name, part in update.slices.items():
        arrays[name + CHANNELS] = Array(part.channels.astype(np.int32))
        arrays[name + VALUES] = Array(np.ascontiguousarray(part.values, dtype=np.float32))
    arrays.update({name: Array(np.ascontiguousarray(array)) for name, array in update.dense.items()})
    return ArrayRecord(arrays)


def decode_update(record: ArrayRecord, examples: int) -> ClientUpdate:
    """The update in ``record``; raises FleetError if a slice lacks its channels or values."""
    arrays = decode_state(record)
    names = {key[: -len(CHANNELS)] for key in arrays if key.endswith(CHANNELS)}
    names |= {key[: -len(VALUES)] for key in arrays if key.endswith(VALUES)}
    slices = {}
    for name in sorted(names):
        channels, values = arrays.pop(name + CHANNELS, None), arrays.pop(name + VALUES, None)
        if channels is None or values is None:
            raise FleetError(f"update of {name!r} has {'values' if channels is None else 'channels'} only")
        slices[name] = SliceUpdate(channels, values)
    return ClientUpdate(int(examples), slices, arrays)


def train_content(state_record: ArrayRecord, task: RoundTask) -> RecordDict:
    return RecordDict({GLOBAL: state_record, TASK: task_record(task)})


def reply_content(update: ClientUpdate, report: ClientReport, info: dict) -> RecordDict:
    return RecordDict(
        {UPDATE: encode_update(update), REPORT: report_record(report), INFO: ConfigRecord({"status": "ok", **info})}
    )


def refusal_content(reason: str, info: dict) -> RecordDict:
    return RecordDict({INFO: ConfigRecord({"status": "refused", "reason": reason, **info})})
