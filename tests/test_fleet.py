"""Fleet fine-tuning end to end with real Flower processes on 127.0.0.1: a SuperLink (``edge-trady
fleet server``) and SuperNodes (``edge-trady fleet node``) on disjoint Fashion-MNIST partitions.

ImageNet-pretrained EfficientNet-Lite0 at 32 px, 10 classes, trady at 2 %, lr 0.01 (a randomly
initialised MobileNet is chaotic at any useful learning rate: fp32 rounding differences between engines
grow 2x per step and accuracy barely moves). A round is ~10 s, most of it Flower's polling and the
ClientApp process start. The default suite runs a small fleet (2 good nodes of 100 images, 2 rounds);
``-m slow`` also the full one (3 good nodes of 200 images, 3 rounds) and the fault tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fleet_harness import Fleet

from edge_trady.cli import cli
from edge_trady.core.slices import ChannelSlice
from edge_trady.device.manifest import Manifest, hash_files
from edge_trady.fleet.aggregate import entry_mask, weight_layers
from edge_trady.fleet.partition import write_partitions
from edge_trady.fleet.state import RunFolder
from edge_trady.workstation.cost_trace import trace_layers
from edge_trady.workstation.models import build_model
from edge_trady.workstation.ranking import build_ranking

MODEL, SIZE = "efficientnet-lite0", 32


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _export(root: Path, name: str, engine: str = "portable") -> Path:
    """A trady plan at 2 % over the last 20 layers (a written ranking: no ranking epoch), exported in
    the format of ``engine`` (portable: onnx, the default; ort: ort-training). The plan is made with
    the planner itself: ``edge-trady plan`` also predicts every other engine's peak (16 s here)."""
    from edge_trady.device.profile import load_profile
    from edge_trady.device.progress import Progress
    from edge_trady.workstation.planner import PlanRequest, make_plan

    built = build_model(MODEL, 10, SIZE)
    names = [layer.name for layer in trace_layers(built.module, SIZE) if layer.name != built.classifier]
    scores = dict.fromkeys(names[-20:], 1.0)
    build_ranking(MODEL, SIZE, scores, scores, threshold=1.0).save(root / "ranking.json")
    request = PlanRequest(
        model=MODEL, profile=load_profile("this-workstation"), image_size=SIZE, batch_size=16, engine=engine,
        budget="2%", ranking=str(root / "ranking.json"), data="fashion-mnist", per_class=20, lr=0.01,
    )  # fmt: skip
    plan = root / f"{name}.json"
    make_plan(request, Progress(quiet=True)).save(plan)
    _invoke("export", str(plan), "-o", str(root / name), "--quiet")
    return root / name


def _other_artifact(root: Path, artifact: Path) -> Path:
    """A valid artifact with another hash (as a re-export would have): one file edited, manifest redone."""
    other = root / "other-artifact"
    shutil.copytree(artifact, other)
    layout = next(p for p in other.iterdir() if p.suffix == ".json" and p.name != "manifest.json")
    layout.write_text(layout.read_text() + "\n")
    manifest = Manifest.load(artifact)
    manifest.files = hash_files(other)
    manifest.save(other)
    return other


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fleet")


@pytest.fixture(scope="module")
def artifact(root: Path) -> Path:
    return _export(root, "artifact")


@pytest.fixture(scope="module")
def other_artifact(root: Path, artifact: Path) -> Path:
    return _other_artifact(root, artifact)


@pytest.fixture(scope="module")
def parts(root: Path) -> list[Path]:
    """Three nodes' partitions, 20 images per class each (the full fleet and the fault tests)."""
    return [p.path for p in write_partitions("fashion-mnist", 3, root / "parts", SIZE, per_class=60)]


@pytest.fixture(scope="module")
def small_parts(root: Path) -> list[Path]:
    """Two nodes' partitions, 10 images per class each (the default-suite fleet and round tests)."""
    return [p.path for p in write_partitions("fashion-mnist", 2, root / "small-parts", SIZE, per_class=20)]


REPO = Path(__file__).resolve().parents[1]
DEVICE_VENV = REPO / ".venv-device" / "bin" / "python"


def device_python() -> Path:
    """The device venv's Python (scripts/setup.sh: plain onnxruntime 1.32, Flower, no torch)."""
    if not (DEVICE_VENV.parent / "flower-supernode").exists():
        pytest.skip(f"no device venv with Flower at {DEVICE_VENV.parent.parent}: run scripts/setup.sh")
    return DEVICE_VENV


@dataclass(frozen=True)
class FleetRun:
    fleet: Fleet
    out: Path
    engines: dict[str, str]  # good node -> the engine it trains with
    device: str  # the node in the device venv
    rounds: int
    val_per_class: int


@pytest.fixture(scope="module", params=["small", pytest.param("full", marks=pytest.mark.slow)])
def fleet_run(request, artifact: Path, other_artifact: Path, parts: list[Path], small_parts: list[Path], root: Path):
    """Good nodes: dev0 on torch-sparse in this environment, the last one on the portable engine in the
    device venv (plain onnxruntime 1.32, no torch), and in the full fleet dev1 on the portable engine in
    this environment (``auto`` picks it for the portable artifact); plus a node whose artifact is another
    export (refused). small: 2 good nodes of 100 images, 2 rounds; full (slow): 3 of 200, 3 rounds."""
    small = request.param == "small"
    data, rounds, val_per_class = (small_parts, 2, 20) if small else (parts, 3, 50)
    python = device_python()
    labels = [f"dev{index}" for index in range(len(data))]
    engines = dict.fromkeys(labels, "portable") | {"dev0": "torch-sparse"}
    fleet = Fleet(root / f"run-{request.param}")
    out = fleet.root / "out"
    try:
        fleet.server(
            artifact, out, "--rounds", str(rounds), "--min-clients", str(len(labels)), "--val", "fashion-mnist",
            "--val-per-class", str(val_per_class), "--round-timeout", "180", "--wait-timeout", "180",
            "--wait-for", str(len(labels) + 1),
        )  # fmt: skip
        fleet.node("dev0", artifact, data[0], "--engine", "torch-sparse")
        for label, part in zip(labels[1:-1], data[1:-1], strict=True):
            fleet.node(label, artifact, part)
        fleet.node(labels[-1], artifact, data[-1], python=python)
        fleet.node("stale", other_artifact, data[-1])
        code = fleet.wait_exit("server", timeout=120 + 90 * rounds)
        assert code == 0, fleet.logs()
        yield FleetRun(fleet, out, engines, labels[-1], rounds, val_per_class)
    finally:
        fleet.close()


def test_fleet_improves_the_model_and_writes_what_evaluate_reads(fleet_run: FleetRun, artifact: Path) -> None:
    out = fleet_run.out
    records = RunFolder(out).records()
    assert [r["round"] for r in records] == list(range(fleet_run.rounds + 1))
    assert records[-1]["val_loss"] < records[0]["val_loss"], records
    assert records[-1]["val_acc"] > records[0]["val_acc"], records
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    info = json.loads((out / "model.json").read_text())
    assert info["artifact_sha256"] == Manifest.load(artifact).artifact_sha256
    done = subprocess.run(
        [sys.executable, "-m", "edge_trady", "evaluate", str(out / "model.onnx"), "--data", "fashion-mnist",
         "--per-class", str(fleet_run.val_per_class)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert f"accuracy {records[-1]['val_acc']:.4f}" in done.stdout  # the server's evaluation of the same model


def test_refused_node_sat_out_and_the_round_went_on(fleet_run: FleetRun) -> None:
    first, *later = RunFolder(fleet_run.out).records()[1:]
    assert sorted(c["node"] for c in first["clients"]) == sorted(fleet_run.engines)
    assert [r["node"] for r in first["refused"]] == ["stale"]
    assert "the server trains" in first["refused"][0]["reason"]
    assert all(r["refused"] == [] and r["nodes"] == len(fleet_run.engines) for r in later)  # left out after refusing
    assert "error: this node's artifact" in (fleet_run.fleet.root / "stale.log").read_text()
    assert {c["node"]: c["engine"] for c in first["clients"]} == fleet_run.engines


def test_the_device_venv_node_trained_on_plain_onnxruntime_without_torch(fleet_run: FleetRun) -> None:
    """The device venv's ClientApp (started by its SuperNode, found on the venv's PATH) trained every
    round with the portable engine on plain onnxruntime 1.32 and never imported torch; the nodes of
    this environment ran onnxruntime-training / torch."""
    device = fleet_run.device
    for record in RunFolder(fleet_run.out).records()[1:]:
        clients = {c["node"]: c for c in record["clients"]}
        assert (clients[device]["onnxruntime"], clients[device]["torch_loaded"]) == ("plain 1.32.0", False)
        assert clients["dev0"]["torch_loaded"] is True
        assert all(clients[n]["onnxruntime"] == "training 1.19.2" for n in clients if n not in ("dev0", device))
    logged = fleet_run.fleet.node_log(device)
    assert [r["round"] for r in logged] == list(range(1, fleet_run.rounds + 1))
    for entry in logged:
        assert Path(entry["runtime"]["python"]).parent.resolve() == DEVICE_VENV.parent.resolve()
        assert entry["engine"] == "portable" and entry["runtime"]["torch_loaded"] is False


def test_untouched_entries_stay_bit_identical_between_rounds(fleet_run: FleetRun, artifact: Path) -> None:
    manifest = Manifest.load(artifact)
    layers = weight_layers(manifest.plan.layer_costs)
    folder = RunFolder(fleet_run.out)
    changed = []
    for number in range(1, fleet_run.rounds + 1):
        before, after = (dict(np.load(folder.state_path(n))) for n in (number - 1, number))
        touched = {name: np.zeros(layer.weight_shape, bool) for name, layer in layers.items()}
        for label in fleet_run.engines:
            (entry,) = [r for r in fleet_run.fleet.node_log(label) if r["round"] == number]
            for layer_name, channels in entry["selection"]["channels"].items():
                name = f"{layer_name}.weight"
                touched[name] |= entry_mask(layers[name], np.asarray(channels))
        for name, mask in touched.items():
            assert np.array_equal(before[name][~mask].view(np.uint32), after[name][~mask].view(np.uint32)), name
            changed.append(before[name][mask] != after[name][mask])
        head = [name for name in before if name not in layers]
        assert head and all(not np.array_equal(before[n], after[n]) for n in head)  # classifier: FedAvg
    assert np.concatenate(changed).mean() > 0.25  # SGD moved many selected entries (the rest: zero gradient)


def test_uplink_carried_only_the_selected_slices(fleet_run: FleetRun, artifact: Path) -> None:
    manifest = Manifest.load(artifact)
    layers = weight_layers(manifest.plan.layer_costs)
    folder = RunFolder(fleet_run.out)
    initial = dict(np.load(folder.state_path(0)))
    trainable_bytes = sum(a.nbytes for a in initial.values())
    head_bytes = sum(a.nbytes for n, a in initial.items() if n not in layers)
    for record in folder.records()[1:]:
        for client in record["clients"]:
            (entry,) = [r for r in fleet_run.fleet.node_log(client["node"]) if r["round"] == record["round"]]
            chosen = {f"{k}.weight": np.asarray(v) for k, v in entry["selection"]["channels"].items() if v}
            assert client["updated_channels"] == {name: len(c) for name, c in chosen.items()}
            expected = {name: ChannelSlice(layers[name], c).size for name, c in chosen.items()}
            assert client["updated_values"] == expected
            assert client["dense"] == sorted(n for n in initial if n not in layers)  # the classifier only
            payload = 4 * sum(expected.values()) + 4 * sum(len(c) for c in chosen.values()) + head_bytes
            assert client["uplink_payload_bytes"] == payload
            framing = 200 * (2 * len(chosen) + len(client["dense"]))  # npy header + name per array
            assert payload < client["uplink_bytes"] < payload + framing
            assert client["uplink_bytes"] < 0.1 * trainable_bytes < record["downlink_bytes"]


def _round_updates(artifact: Path, data: Path, out: Path, engines: list[str]) -> tuple[dict, dict]:
    """Round 1 of 2 from the artifact's tensors on each engine: (start state, engine -> update)."""
    from edge_trady.fleet.client import NodeSettings, train_round
    from edge_trady.fleet.engines import open_engine
    from edge_trady.fleet.task import RoundTask

    manifest = Manifest.load(artifact)
    state = {n: a.copy() for n, a in open_engine("portable", artifact, manifest).trainable_state().items()}
    task = RoundTask(1, 2, 1, manifest.artifact_sha256)
    updates = {}
    for engine in engines:
        update, _, kind = train_round(NodeSettings("dev0", artifact, str(data), out / engine, engine), task, state)
        assert kind == engine
        updates[engine] = update
    return state, updates


def _sent(update) -> dict[str, np.ndarray]:
    return {n: p.values.ravel() for n, p in update.slices.items()} | {n: a.ravel() for n, a in update.dense.items()}


def _assert_same_training(state: dict, reference, other, layers: dict) -> None:
    """Same slices and classifier, values apart by fp32 rounding only, and the round trained."""
    assert reference.slices.keys() == other.slices.keys() and reference.dense.keys() == other.dense.keys()
    assert all(np.array_equal(p.channels, other.slices[n].channels) for n, p in reference.slices.items())
    start = {n: ChannelSlice(layers[n], p.channels).gather(state[n]).ravel() for n, p in reference.slices.items()}
    start |= {n: state[n].ravel() for n in reference.dense}
    ours, theirs = _sent(reference), _sent(other)
    moved = np.concatenate([ours[n] - start[n] for n in start])
    apart = np.concatenate([ours[n] - theirs[n] for n in start])
    assert np.linalg.norm(moved) > 0.05  # the round trained
    assert np.linalg.norm(apart) < 1e-4 * np.linalg.norm(moved)  # fp32 rounding only


DEVICE_ROUND = """
import importlib.util, json, sys
import numpy as np
from pathlib import Path
from edge_trady.device.manifest import Manifest
from edge_trady.fleet.client import NodeSettings, train_round
from edge_trady.fleet.task import RoundTask
artifact, data, out = map(Path, sys.argv[1:4])
state = dict(np.load(out / "state.npz"))
task = RoundTask(1, 2, 1, Manifest.load(artifact).artifact_sha256)
update, report, engine = train_round(NodeSettings("dev0", artifact, str(data), out / "node"), task, state)
np.savez(out / "update.npz", **{n + "@c": p.channels for n, p in update.slices.items()},
         **{n + "@v": p.values for n, p in update.slices.items()}, **update.dense)
print(json.dumps({"engine": engine, "torch": "torch" in sys.modules,
                  "torch_installed": importlib.util.find_spec("torch") is not None}))
"""


def _device_round(artifact: Path, data: Path, state: dict, out: Path):
    """The client's round in the device venv (plain onnxruntime 1.32, no torch installed): ``auto``
    picks the portable engine."""
    from edge_trady.fleet.aggregate import ClientUpdate, SliceUpdate

    np.savez(out / "state.npz", **state)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [str(device_python()), "-c", DEVICE_ROUND, str(artifact), str(data), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.splitlines()[-1])
    assert facts == {"engine": "portable", "torch": False, "torch_installed": False}
    with np.load(out / "update.npz") as saved:
        arrays = dict(saved)
    names = {k[:-2] for k in arrays if k.endswith("@c")}
    return ClientUpdate(1, {n: SliceUpdate(arrays.pop(n + "@c"), arrays.pop(n + "@v")) for n in names}, arrays)


def test_every_engine_sends_the_same_update(artifact: Path, small_parts: list[Path], tmp_path) -> None:
    """torch-sparse and portable (here and in the torch-free device venv) start from the artifact's
    tensors and train the same selection on the same batches: their updates agree to fp32 rounding."""
    state, updates = _round_updates(artifact, small_parts[0], tmp_path, ["torch-sparse", "portable"])
    built = build_model(MODEL, 10, SIZE)
    assert all(np.array_equal(built.module.state_dict()[n].numpy(), a) for n, a in state.items())
    layers = weight_layers(Manifest.load(artifact).plan.layer_costs)
    _assert_same_training(state, updates["portable"], updates["torch-sparse"], layers)
    device = _device_round(artifact, small_parts[0], state, tmp_path)
    _assert_same_training(state, device, updates["torch-sparse"], layers)


@pytest.mark.slow
def test_killed_node_rejoins_and_restarted_server_continues(root: Path, artifact: Path, parts: list[Path]) -> None:
    """4 rounds: dev2 loses power in round 2 and is started again at once; round 2 completes with the
    other two (once Flower declares the dead node unavailable) and dev2 is back for round 3. The server
    is stopped after round 3 and started again: it continues with round 4."""
    fleet = Fleet(root / "faults")
    out = root / "faults" / "out"
    args = ["--rounds", "4", "--min-clients", "2", "--val", "fashion-mnist", "--val-per-class", "50",
            "--round-timeout", "150", "--wait-timeout", "150", "--wait-for", "3"]  # fmt: skip
    folder = RunFolder(out)
    try:
        fleet.server(artifact, out, *args)
        for index in range(3):
            fleet.node(f"dev{index}", artifact, parts[index])
        fleet.wait_for(lambda: folder.last_round() >= 1 and fleet.clientapp_running("dev2"), 400, "round 2 on dev2")
        fleet.kill("dev2")
        fleet.node("dev2", artifact, parts[2])
        fleet.wait_for(lambda: folder.last_round() >= 3, 300, "round 3")
        fleet.stop("server")
        assert folder.status()["state"] == "running"
        fleet.server(artifact, out, *args, label="server-again")
        assert fleet.wait_exit("server-again", 600) == 0, fleet.logs()
    finally:
        fleet.close()
    records = folder.records()
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    second = records[2]
    assert sorted(c["node"] for c in second["clients"]) == ["dev0", "dev1"]
    assert [lost["node"] for lost in second["lost"]] == ["dev2"]
    assert sorted(c["node"] for c in records[3]["clients"]) == ["dev0", "dev1", "dev2"]  # a new node ID
    assert "continuing after round 3/4" in (fleet.root / "server-again.log").read_text()
    assert folder.status()["state"] == "finished"
    assert records[-1]["val_acc"] > records[0]["val_acc"] + 0.2, [r["val_acc"] for r in records]


@pytest.mark.slow
def test_tls_and_node_authentication(root: Path, artifact: Path, parts: list[Path]) -> None:
    """The documented secure setup on 127.0.0.1: TLS, node authentication with a registered key; a
    node whose key is not registered never joins."""
    from fleet_harness import write_credentials

    keys = write_credentials(root / "secure" / "credentials")
    stranger = write_credentials(root / "secure" / "stranger")
    fleet = Fleet(root / "secure")
    out = root / "secure" / "out"
    try:
        fleet.start(
            "server", "server", str(artifact), "--out", str(out), "--port", str(fleet.port), "--rounds", "1",
            "--min-clients", "1", "--wait-timeout", "150", "--ssl-ca-certfile", str(keys["ca.crt"]),
            "--ssl-certfile", str(keys["server.pem"]), "--ssl-keyfile", str(keys["server.key"]), "--node-auth",
            "--register-key", str(keys["node-key.pub"]),
        )  # fmt: skip
        secure = ["--root-certificates", str(keys["ca.crt"])]
        fleet.wait_for(lambda: "registered" in (fleet.root / "server.log").read_text(), 120, "the key registered")
        fleet.node("dev0", artifact, parts[0], *secure, "--auth-key", str(keys["node-key"]), insecure=False)
        fleet.node("stranger", artifact, parts[1], *secure, "--auth-key", str(stranger["node-key"]), insecure=False)
        assert fleet.wait_exit("server", 300) == 0, fleet.logs()
    finally:
        fleet.close()
    (record,) = RunFolder(out).records()[1:]
    assert [c["node"] for c in record["clients"]] == ["dev0"] and record["nodes"] == 1
    assert "--insecure" not in (out / "flower" / "logs" / "superlink.log").read_text()
    assert not (fleet.root / "nodes" / "stranger" / "rounds.jsonl").exists()
