"""The server's rounds over a Flower ``Grid``: send the global state to every online node, collect
the sparse updates, aggregate, evaluate, save; continue a run folder where it stopped.

A round needs ``min_clients`` good updates. It ends when every node has answered (an update, a
refusal or Flower's "node unavailable" once a dead node misses its heartbeats) or after
``round_timeout``; with too few updates it is sent again (same seeds, same selections) up to
``attempts`` times. A node that refuses (another artifact, missing data) is left out for the rest of
the run; a node that comes back under a new node ID takes part from the next round. A node's name
(``edge-trady fleet node --name``) seeds its selections and must be unique in the fleet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from ..core.atomic import replacing, write_json
from ..device.data import Normalization, evaluation_split, load_dataset
from ..device.loop import evaluate
from ..device.manifest import Manifest, ModelInfo
from ..device.runner import check_data
from ..errors import EdgeTradyError, FleetError
from .aggregate import UPDATERS, ClientUpdate, aggregate, check_aggregation, check_update, weight_layers
from .engines import FORMAT_ENGINES, open_engine
from .protocol import INFO, REPORT, UPDATE, decode_update, encode_state, read_report, train_content
from .state import MODEL_FILE, SUMMARY_FILE, FleetRun, RunFolder
from .task import RoundTask

POLL_SECONDS = 0.5
TTL_MARGIN_SECONDS = 60.0  # a message outlives the round by this much, so a late reply is not lost


@dataclass(frozen=True)
class FleetConfig:
    """The run config of the Flower app (``[tool.flwr.app.config]``; "" and 0 mean unset)."""

    artifact: str
    out: str
    rounds: int = 5
    local_epochs: int = 1
    min_clients: int = 2
    round_timeout: float = 600.0  # seconds a round waits for its updates
    wait_timeout: float = 600.0  # seconds to wait for enough nodes to be online
    wait_for: int = 0  # nodes to wait for before the first round (0: min_clients)
    attempts: int = 3  # tries of a round that got fewer than min_clients updates
    val: str = ""  # data the server evaluates the global model on after each round
    val_per_class: int = 0
    aggregation: str = UPDATERS  # an entry's mean over the clients that updated it, or over all (aggregate.py)

    def __post_init__(self) -> None:
        if min(self.rounds, self.local_epochs, self.min_clients, self.attempts) < 1:
            raise FleetError("rounds, local epochs, minimum clients and attempts must be >= 1")
        check_aggregation(self.aggregation)
        if not (Path(self.artifact).is_absolute() and Path(self.out).is_absolute()):
            raise FleetError("the run config's artifact and out must be absolute paths")

    def to_run_config(self) -> dict:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, config: Mapping) -> FleetConfig:
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in config:
                value = config[key]
                values[f.name] = {"int": int, "float": float}.get(f.type, str)(value)
        try:
            return cls(**values)
        except TypeError as exc:
            raise FleetError(f"run config: {exc}") from exc


class FleetServer:
    def __init__(self, config: FleetConfig, log=print) -> None:
        self.config = config
        self.log = log
        self.artifact = Path(config.artifact)
        self.manifest = Manifest.load(self.artifact)
        self.plan = self.manifest.plan
        self.engine = open_engine(FORMAT_ENGINES[self.manifest.format], self.artifact, self.manifest)
        self.layers = weight_layers(self.plan.layer_costs)
        self.folder = RunFolder(Path(config.out))
        self.refused: dict[int, str] = {}  # node ID -> why it refused (left out for the run)
        self.names: dict[int, str] = {}  # node ID -> the name it reported
        self.val = self._val_data()

    @property
    def run_spec(self) -> FleetRun:
        config = self.config
        return FleetRun(
            self.manifest.artifact_sha256, self.plan.model, config.rounds, config.local_epochs, config.aggregation
        )

    def run(self, grid: Grid) -> dict:
        """Every remaining round; returns the summary."""
        initial = self.engine.trainable_state()
        done = self.folder.begin(self.run_spec, initial)
        state = self.folder.load_state(done, initial)
        self.folder.set_status("running", round=done, rounds=self.config.rounds)
        if done == 0 and not self.folder.records():
            self.folder.log_round({"round": 0, **self.evaluate_state(state)})
        elif done:
            self.log(f"fleet: continuing after round {done}/{self.config.rounds} from {self.folder.out}")
        self.wait_for_nodes(grid, max(self.config.wait_for, self.config.min_clients))
        for number in range(done + 1, self.config.rounds + 1):
            state, record = self.round(grid, number, state)
            record.update(self.evaluate_state(state))
            self.folder.save_state(number, state)
            self.folder.log_round(record)
            self.folder.set_status("running", round=number, rounds=self.config.rounds)
            self.log(_round_line(record, self.config.rounds))
        return self.finish(state)

    def round(self, grid: Grid, number: int, state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
        task = RoundTask(number, self.config.rounds, self.config.local_epochs, self.manifest.artifact_sha256)
        for attempt in range(1, self.config.attempts + 1):
            started = time.monotonic()
            nodes = self.wait_for_nodes(grid, self.config.min_clients)
            downlink = encode_state(state)
            messages = [
                Message(
                    train_content(downlink, task),
                    node,
                    MessageType.TRAIN,
                    ttl=self.config.round_timeout + TTL_MARGIN_SECONDS,
                    group_id=str(number),
                )
                for node in nodes
            ]
            replies = self.collect(grid, messages)
            updates, record = self.read_replies(replies, state)
            record.update(round=number, attempt=attempt, nodes=len(nodes), downlink_bytes=downlink.count_bytes())
            if len(updates) >= self.config.min_clients:
                result = aggregate(state, updates, self.layers, self.config.aggregation)
                record.update(
                    touched=result.touched,
                    touched_entries=sum(result.touched.values()),
                    trainable_entries=sum(a.size for a in state.values()),
                    examples=result.examples,
                    federated_val_acc=_weighted([c["val_acc"] for c in record["clients"]], record["clients"]),
                    seconds=time.monotonic() - started,
                )
                return result.state, record
            self.log(
                f"fleet: round {number} attempt {attempt}: {len(updates)} update(s), "
                f"{self.config.min_clients} needed; {_problems(record)}"
            )
        raise FleetError(
            f"round {number}: fewer than {self.config.min_clients} updates after {self.config.attempts} attempts "
            f"({_problems(record)})"
        )

    def wait_for_nodes(self, grid: Grid, count: int) -> list[int]:
        """The online nodes that have not refused, once there are at least ``count``."""
        deadline = time.monotonic() + self.config.wait_timeout
        while True:
            nodes = sorted(n for n in grid.get_node_ids() if n not in self.refused)
            if len(nodes) >= count:
                return nodes
            if time.monotonic() > deadline:
                refused = "; ".join(f"{self.names.get(n, n)}: {why}" for n, why in self.refused.items())
                problem = f"{len(nodes)} node(s) online after {self.config.wait_timeout:.0f}s, {count} needed"
                raise FleetError(problem + (f"; refused: {refused}" if refused else ""))
            time.sleep(POLL_SECONDS)

    def collect(self, grid: Grid, messages: list[Message]) -> dict[int, Message | str]:
        """Each node's reply, or why there is none ("not delivered", "timed out")."""
        ids = list(grid.push_messages(messages))
        pending = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages, strict=True) if mid}
        replies: dict[int, Message | str] = {
            msg.metadata.dst_node_id: "not delivered" for mid, msg in zip(ids, messages, strict=True) if not mid
        }
        deadline = time.monotonic() + self.config.round_timeout
        while pending and time.monotonic() < deadline:
            for reply in self._pull(grid, list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    replies[node] = reply
            if pending:
                time.sleep(POLL_SECONDS)
        replies.update({node: f"timed out after {self.config.round_timeout:.0f}s" for node in pending.values()})
        return replies

    def _pull(self, grid: Grid, ids: list[str]) -> list[Message]:
        """The replies to ``ids`` that have arrived; none when the SuperLink fails to answer (under load
        its SQLite database can be locked: HTTP 500), so the round polls again until its timeout."""
        try:
            return list(grid.pull_messages(ids))
        except Exception as exc:  # noqa: BLE001 (Flower's transports raise httpx / grpc errors alike)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.log(f"fleet: the SuperLink failed to hand over replies ({reason[:160]}); polling again")
            return []

    def read_replies(
        self, replies: dict[int, Message | str], state: dict[str, np.ndarray]
    ) -> tuple[list[ClientUpdate], dict]:
        """The good updates, and the round's record of every node."""
        updates: list[ClientUpdate] = []
        clients, refused, lost = [], [], []
        for node, reply in sorted(replies.items()):
            if isinstance(reply, str):
                lost.append({"node_id": node, "node": self.names.get(node), "error": reply})
                continue
            if reply.has_error():
                lost.append({"node_id": node, "node": self.names.get(node), "error": reply.error.reason})
                continue
            info = dict(reply.content[INFO])
            self.names[node] = str(info.get("node"))
            if info.get("status") != "ok":
                self.refused[node] = str(info.get("reason", "no reason given"))
                refused.append({"node_id": node, "node": info.get("node"), "reason": self.refused[node]})
                self.log(f"fleet: node {info.get('node')} ({node}) refused: {self.refused[node]}")
                continue
            try:
                report = read_report(reply.content[REPORT])
                record = reply.content[UPDATE]
                update = decode_update(record, report.examples)
                check_update(update, state, self.layers)
            except (EdgeTradyError, KeyError, TypeError, ValueError) as exc:
                lost.append({"node_id": node, "node": info.get("node"), "error": f"bad update: {exc}"})
                continue
            updates.append(update)
            clients.append(
                {
                    "node_id": node,
                    "node": info.get("node"),
                    "engine": info.get("engine"),
                    "onnxruntime": info.get("onnxruntime"),
                    "torch_loaded": info.get("torch_loaded"),
                    **{k: _finite(v) for k, v in asdict(report).items()},
                    "uplink_bytes": record.count_bytes(),
                    "uplink_payload_bytes": update.payload_bytes,
                    "updated_channels": {name: len(part.channels) for name, part in update.slices.items()},
                    "updated_values": {name: part.values.size for name, part in update.slices.items()},
                    "dense": sorted(update.dense),
                }
            )
        names = [c["node"] for c in clients]
        twins = sorted({name for name in names if names.count(name) > 1})
        if twins:  # same name, same seed: the same selection twice (and a restart looks like a twin)
            self.log(f"fleet: several nodes named {', '.join(twins)}: give each device its own --name")
        return updates, {"clients": clients, "refused": refused, "lost": lost, "same_name": twins}

    def finish(self, state: dict[str, np.ndarray]) -> dict:
        """Write the final model (``model.onnx`` + ``model.json``) and ``summary.json``."""
        self.engine.load_trainable_state(state)
        model = self.folder.out / MODEL_FILE
        with replacing(model) as tmp:
            self.engine.export_inference(tmp)
        ModelInfo.of(self.manifest).save(model)
        records = self.folder.records()
        summary = {
            **asdict(self.run_spec),
            "initial_val_acc": records[0].get("val_acc") if records else None,
            "final_val_acc": records[-1].get("val_acc") if records else None,
            "rounds_log": [{k: r.get(k) for k in ("round", "val_acc", "federated_val_acc")} for r in records],
        }
        write_json(self.folder.out / SUMMARY_FILE, summary, indent=2)
        self.folder.set_status("finished", round=self.config.rounds, rounds=self.config.rounds)
        self.log(f"fleet: finished; model written to {model}")
        return summary

    def _val_data(self):
        if not self.config.val:
            return None
        plan = self.plan
        norm = Normalization.from_dict(self.manifest.normalization)
        split = evaluation_split(self.config.val)  # as 'edge-trady evaluate' scores it
        per_class = self.config.val_per_class or None
        data = load_dataset(self.config.val, split, plan.image_size, norm, per_class, plan.seed)
        check_data(data, plan.num_classes, self.manifest.class_names, plan.image_size)
        return data

    def evaluate_state(self, state: dict[str, np.ndarray]) -> dict:
        """The global model's loss and accuracy on the server's --val data ({} without)."""
        if self.val is None:
            return {}
        self.engine.load_trainable_state(state)
        loss, accuracy = evaluate(self.engine, self.val, self.plan.batch_size)
        return {"val_loss": loss, "val_acc": accuracy, "val_images": len(self.val)}


def _finite(value):
    """JSON has no NaN: a metric the client could not compute (no local validation images) is None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _weighted(values: list[float], clients: list[dict]) -> float | None:
    pairs = [(v, c["val_examples"]) for v, c in zip(values, clients, strict=True) if c["val_examples"]]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def _problems(record: dict) -> str:
    parts = [f"{c['node'] or c['node_id']} refused: {c['reason']}" for c in record["refused"]]
    parts += [f"{c['node'] or c['node_id']}: {c['error']}" for c in record["lost"]]
    return "; ".join(parts) or "no node answered"


def _round_line(record: dict, rounds: int) -> str:
    clients = record["clients"]
    uplink = np.mean([c["uplink_bytes"] for c in clients])
    val = f" val_acc {record['val_acc']:.4f}" if "val_acc" in record else ""
    return (
        f"fleet: round {record['round']}/{rounds}: {len(clients)} client(s), {record['examples']} images, "
        f"{record['touched_entries']:,}/{record['trainable_entries']:,} entries updated, "
        f"uplink {uplink / 1024:.1f} KiB/client (downlink {record['downlink_bytes'] / 1024:.1f} KiB){val}"
        + (f", lost {len(record['lost'])}" if record["lost"] else "")
        + f" ({record['seconds']:.0f}s)"
    )
