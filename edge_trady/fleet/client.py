"""One round on a device (no Flower here): check the task against the local artifact, load the
global state, evaluate it on the local validation split, draw this node's channel selection,
train E local epochs with plain SGD, and return only the updated slices.

The learning rate follows the plan's cosine schedule over ``rounds * local_epochs`` epochs, so a
fleet run and a centralized run of as many epochs see the same schedule. The selection is drawn
once per round (the round is the fleet's epoch) from a seed of the plan's seed and the node's name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.atomic import append_line
from ..core.layers import LayerCost
from ..core.schedule import make_schedule
from ..core.selection import Selection
from ..core.slices import ChannelSlice
from ..device.data import Dataset, epoch_order
from ..device.loop import evaluate
from ..device.manifest import Manifest
from ..device.memwatch import peak_rss_bytes
from ..device.runner import RunRequest, load_data, plan_sampler
from ..engines.base import Engine
from ..errors import ArtifactError, FleetError
from .aggregate import ClientUpdate, SliceUpdate, weight_layers
from .engines import onnxruntime_kind, open_engine, resolve_engine
from .task import ClientReport, RoundTask

NODE_LOG = "rounds.jsonl"


@dataclass(frozen=True)
class NodeSettings:
    """A device's side of the fleet (Flower's node config, set by ``edge-trady fleet node``)."""

    name: str
    artifact: Path
    data: str
    out: Path  # the node's folder: rounds.jsonl
    engine: str = "auto"
    val: str | None = None  # default: the validation split of ``data``
    per_class: int | None = None
    val_per_class: int | None = None

    def to_config(self) -> dict[str, str | int]:
        """Flat key/value pairs for ``flower-supernode --node-config`` (None left out)."""
        values = {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: str(v) if isinstance(v, Path) else v for k, v in values.items() if v is not None}

    @classmethod
    def from_config(cls, config: dict) -> NodeSettings:
        values = {f.name: config.get(f.name.replace("_", "-")) for f in dataclasses.fields(cls)}
        missing = [k for k in ("name", "artifact", "data", "out") if not values[k]]
        if missing:
            raise FleetError(f"node config lacks {missing}: start the node with 'edge-trady fleet node'")
        values = {k: v for k, v in values.items() if v is not None}
        return cls(**{**values, "artifact": Path(values["artifact"]), "out": Path(values["out"])})


def node_seed(plan_seed: int, name: str) -> int:
    """The seed of a node's selections: stable across restarts (its node ID is not)."""
    return int.from_bytes(hashlib.sha256(f"{plan_seed}:{name}".encode()).digest()[:4], "little")


def check_task(task: RoundTask, manifest: Manifest, artifact: Path) -> None:
    """Refuse a task for another artifact (a clear message for the operator of both ends)."""
    ours = manifest.artifact_sha256
    if task.artifact_sha256 != ours:
        raise ArtifactError(
            f"this node's artifact {artifact} is {ours[:12]}, the server trains {task.artifact_sha256[:12]}: "
            "copy the server's artifact to the device"
        )


def train_round(
    settings: NodeSettings, task: RoundTask, global_state: dict[str, np.ndarray]
) -> tuple[ClientUpdate, ClientReport, str]:
    """Train round ``task.round`` from ``global_state``; log it in ``settings.out``. Returns the
    update, the report and the engine that trained (``engines.resolve_engine``)."""
    started = time.monotonic()
    manifest = Manifest.load(settings.artifact)
    check_task(task, manifest, settings.artifact)
    plan = manifest.plan
    seed = node_seed(plan.seed, settings.name)
    sampler = plan_sampler(dataclasses.replace(plan, seed=seed))
    request = RunRequest(
        settings.artifact, settings.data, settings.out, settings.val, settings.per_class, settings.val_per_class
    )
    train_data, val_data = load_data(manifest, request)
    kind = resolve_engine(settings.engine, manifest)
    engine = open_engine(kind, settings.artifact, manifest)
    engine.load_trainable_state(global_state)
    val_loss, val_acc = evaluate(engine, val_data, plan.batch_size) if len(val_data) else (math.nan, math.nan)
    selection = sampler.select(task.round)
    engine.set_selection(selection)
    loss, correct, seen = _local_epochs(engine, train_data, task, plan.lr, plan.warmup_epochs, plan.batch_size, seed)
    layers = weight_layers(plan.layer_costs)
    update = sparse_update(engine.trainable_state(), selection, layers, len(train_data))
    report = ClientReport(
        examples=len(train_data),
        train_loss=loss / seen,
        train_acc=correct / seen,
        val_examples=len(val_data),
        val_loss=val_loss,
        val_acc=val_acc,
        channels=selection.channel_count,
        seed=seed,
        seconds=time.monotonic() - started,
        peak_rss_bytes=peak_rss_bytes(),
    )
    settings.out.mkdir(parents=True, exist_ok=True)
    record = {
        "round": task.round,
        "engine": kind,
        "version": __version__,
        **dataclasses.asdict(report),
        "uplink_payload_bytes": update.payload_bytes,
        "runtime": runtime_facts(),
        "selection": selection.to_json(),
    }
    append_line(settings.out / NODE_LOG, json.dumps(record))
    return update, report, kind


def runtime_facts() -> dict[str, str | bool]:
    """What this process trained on: its Python, the onnxruntime it loaded ("plain 1.32.0",
    "training 1.19.2" or "" if none) and whether torch was ever imported in it."""
    loaded = sys.modules.get("onnxruntime")
    version = getattr(loaded, "__version__", None)
    return {
        "python": sys.executable,
        "onnxruntime": f"{onnxruntime_kind()} {version}" if version else "",
        "torch_loaded": "torch" in sys.modules,
    }


def _local_epochs(
    engine: Engine,
    data: Dataset,
    task: RoundTask,
    lr: float,
    warmup_epochs: int | None,
    batch_size: int,
    seed: int,
) -> tuple[float, int, int]:
    """The round's local epochs at their place in the run's schedule; (loss sum, correct, seen)."""
    steps = math.ceil(len(data) / batch_size)
    schedule = make_schedule(lr, task.rounds * task.local_epochs, steps, warmup_epochs)
    loss_sum, correct, seen = 0.0, 0, 0
    for local in range(task.local_epochs):
        epoch = (task.round - 1) * task.local_epochs + local
        for step, (x, y) in enumerate(data.batches(batch_size, epoch_order(len(data), seed, epoch))):
            loss, hits = engine.train_step(x, y, schedule.lr(epoch * steps + step))
            loss_sum += loss * len(y)
            correct += hits
            seen += len(y)
    return loss_sum, correct, seen


def sparse_update(
    state: dict[str, np.ndarray], selection: Selection, layers: dict[str, LayerCost], examples: int
) -> ClientUpdate:
    """The selected entries of the candidate layers (``layers``: weight name -> layer) and every
    other trainable tensor (the classifier) whole, from ``state``."""
    chosen = {f"{name}.weight": channels for name, channels in selection.channels.items() if len(channels)}
    slices = {
        name: SliceUpdate(np.asarray(channels, np.int32), ChannelSlice(layers[name], channels).gather(state[name]))
        for name, channels in chosen.items()
    }
    dense = {name: array for name, array in state.items() if name not in layers}
    return ClientUpdate(examples, slices, dense)
