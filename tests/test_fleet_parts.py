"""Fleet pieces without processes: wire format, node settings through Flower's own config parser,
the app folder through Flower's own validator, the server's run folder, security rules, partitions."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.cli.config_utils import load_and_validate
from flwr.common.config import parse_config_args

from edge_trady.errors import FleetError
from edge_trady.fleet import launch
from edge_trady.fleet.aggregate import ClientUpdate, SliceUpdate
from edge_trady.fleet.client import NodeSettings, node_seed
from edge_trady.fleet.partition import split_indices
from edge_trady.fleet.protocol import (
    decode_state,
    decode_update,
    encode_state,
    encode_update,
    read_report,
    read_task,
    report_record,
    task_record,
)
from edge_trady.fleet.server import FleetConfig
from edge_trady.fleet.state import FleetRun, RunFolder
from edge_trady.fleet.task import PROTOCOL_VERSION, ClientReport, RoundTask


def test_update_round_trips_bit_for_bit_and_carries_nothing_else() -> None:
    rng = np.random.default_rng(0)
    update = ClientUpdate(
        12,
        {"a.weight": SliceUpdate(np.array([1, 4], np.int32), rng.standard_normal((3, 2)).astype(np.float32))},
        {"head.weight": rng.standard_normal((3, 2)).astype(np.float32), "head.bias": np.zeros(3, np.float32)},
    )
    record = encode_update(update)
    assert sorted(record) == ["a.weight@channels", "a.weight@values", "head.bias", "head.weight"]
    back = decode_update(record, 12)
    assert back.examples == 12 and back.payload_bytes == update.payload_bytes == 2 * 4 + 6 * 4 + 9 * 4
    assert np.array_equal(back.slices["a.weight"].channels, update.slices["a.weight"].channels)
    assert back.slices["a.weight"].values.tobytes() == update.slices["a.weight"].values.tobytes()
    assert all(back.dense[k].tobytes() == v.tobytes() for k, v in update.dense.items())
    del record["a.weight@values"]
    with pytest.raises(FleetError, match="channels only"):
        decode_update(record, 12)


def test_state_task_and_report_round_trip() -> None:
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert np.array_equal(decode_state(encode_state(state))["w"], state["w"])
    task = RoundTask(2, 5, 1, "ab" * 32)
    assert read_task(task_record(task)) == task
    report = ClientReport(10, 0.5, 0.25, 4, 1.0, 0.5, 7, 99, 1.5, 123)
    assert read_report(report_record(report)) == report
    assert report_record(report)["num-examples"] == 10
    newer = {**task_record(task), "protocol": PROTOCOL_VERSION + 1}
    with pytest.raises(FleetError, match="same edge-trady version"):
        read_task(newer)


def test_node_settings_survive_flowers_node_config_parser(tmp_path: Path) -> None:
    settings = NodeSettings(
        name='pi "kitchen" 3', artifact=tmp_path / "my artifact", data="/data/a b", out=tmp_path / "out", per_class=5
    )
    path = tmp_path / "node.toml"
    path.write_text(launch.toml_table(settings.to_config()))
    assert NodeSettings.from_config(parse_config_args([str(path)])) == settings
    with pytest.raises(FleetError, match="lacks"):
        NodeSettings.from_config({"name": "x"})


def test_node_seed_is_stable_and_differs_between_nodes() -> None:
    assert node_seed(0, "pi-1") == node_seed(0, "pi-1") != node_seed(0, "pi-2")
    assert node_seed(0, "pi-1") != node_seed(1, "pi-1")


def test_app_folder_passes_flowers_validation_and_carries_the_run_config(tmp_path: Path) -> None:
    config = FleetConfig(str(tmp_path / "art"), str(tmp_path / "out"), rounds=3, val="fashion-mnist", aggregation="all")
    app = launch.write_app(tmp_path, config.to_run_config())
    assert app.name == launch.APP_NAME
    parsed, warnings = load_and_validate(app / "pyproject.toml", check_module=True)
    assert warnings == []
    components = parsed["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "edge_trady.fleet.server_app:app",
        "clientapp": "edge_trady.fleet.client_app:app",
    }
    assert FleetConfig.from_run_config(parsed["tool"]["flwr"]["app"]["config"]) == config


def test_flower_connection_file(tmp_path: Path) -> None:
    launch.write_connection(tmp_path, "127.0.0.1:9092", True, None)
    text = (tmp_path / "config.toml").read_text()
    assert 'default = "edge-trady"' in text and 'address = "127.0.0.1:9092"' in text and "insecure = true" in text
    launch.write_connection(tmp_path, "server.lan:9092", False, Path("/etc/ca.crt"))
    assert 'root-certificates = "/etc/ca.crt"' in (tmp_path / "config.toml").read_text()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.5"])
def test_insecure_is_allowed_on_loopback(host: str) -> None:
    launch.check_security(host, insecure=True, tls=None)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "server.lan"])
def test_insecure_is_refused_off_loopback(host: str) -> None:
    with pytest.raises(FleetError, match="localhost only"):
        launch.check_security(host, insecure=True, tls=None)
    with pytest.raises(FleetError, match="TLS"):
        launch.check_security(host, insecure=False, tls=None)
    launch.check_security(host, insecure=False, tls=launch.Tls(Path("ca.crt"), Path("s.crt"), Path("s.key")))


def test_flower_command_lines_never_install_at_run_time() -> None:
    tls = launch.Tls(Path("ca.crt"), Path("s.crt"), Path("s.key"))
    link = launch.superlink_command("0.0.0.0", 9092, Path("state.db"), False, tls, node_auth=True)
    assert link[link.index("--database") + 1] == "state.db"
    assert "--disable-runtime-dependency-installation" in link and "--insecure" not in link
    assert link[link.index("--ssl-certfile") + 1] == "s.crt" and "--enable-supernode-auth" in link
    node = launch.supernode_command("server:9092", Path("n.toml"), 9094, False, Path("ca.crt"), Path("k.pem"))
    assert "--allow-runtime-dependency-installation" not in node and "--insecure" not in node
    assert node[node.index("--root-certificates") + 1] == "ca.crt"
    assert node[node.index("--auth-supernode-private-key") + 1] == "k.pem"
    assert launch.flower_env()["FLWR_TELEMETRY_ENABLED"] == "0"


def test_flower_processes_started_by_name_are_this_pythons(monkeypatch) -> None:
    """A SuperNode starts flower-superexec and flwr-clientapp by name: this environment's scripts
    come first on PATH, before another Python's (one with torch, say)."""
    monkeypatch.setenv("PATH", "/opt/other-python/bin:/usr/bin")
    monkeypatch.setattr(sys, "executable", "/srv/device-venv/bin/python")
    path = launch.flower_env()["PATH"].split(os.pathsep)
    assert path == ["/srv/device-venv/bin", "/opt/other-python/bin", "/usr/bin"]


def _run(rounds: int = 3, aggregation: str = "updaters") -> FleetRun:
    return FleetRun("ab" * 32, "mobilenetv2-w0.35", rounds, 1, aggregation)


def test_a_run_keeps_its_aggregation(tmp_path: Path) -> None:
    """A restart with the other aggregation is another run; a fleet.json written before the option
    existed is the default's; an unknown aggregation is refused at once."""
    folder = RunFolder(tmp_path / "out")
    folder.begin(_run(), {"w": np.ones(3, np.float32)})
    with pytest.raises(FleetError, match="aggregation 'updaters' \\(now 'all'\\)"):
        folder.check(_run(aggregation="all"))
    saved = json.loads((tmp_path / "out" / "fleet.json").read_text())
    assert saved.pop("aggregation") == "updaters"
    (tmp_path / "out" / "fleet.json").write_text(json.dumps(saved))
    assert folder.check(_run()) == 0
    with pytest.raises(FleetError, match="unknown aggregation 'mean'"):
        FleetConfig("/a", "/o", aggregation="mean")


def test_run_folder_resumes_refuses_another_run_and_a_finished_one(tmp_path: Path) -> None:
    state = {"w": np.ones(3, np.float32)}
    folder = RunFolder(tmp_path / "out")
    assert folder.begin(_run(), state) == 0
    assert json.loads((tmp_path / "out" / "fleet.json").read_text())["rounds"] == 3
    for number in (1, 2):
        folder.save_state(number, {"w": state["w"] * number})
        folder.log_round({"round": number})
    assert folder.begin(_run(), state) == 2
    assert np.array_equal(folder.load_state(2, state)["w"], 2 * state["w"])
    with pytest.raises(FleetError, match="rounds 3 \\(now 4\\)"):
        folder.check(_run(rounds=4))
    folder.save_state(3, state)
    folder.log_round({"round": 3})
    with pytest.raises(FleetError, match="final"):
        folder.check(_run())
    with pytest.raises(FleetError, match="not the artifact's"):
        folder.load_state(1, {"w": np.ones(4, np.float32)})


def test_a_round_counts_once_its_state_and_log_line_exist(tmp_path: Path) -> None:
    state = {"w": np.ones(3, np.float32)}
    folder = RunFolder(tmp_path / "out")
    folder.begin(_run(), state)
    folder.log_round({"round": 1})  # killed after the line but before... cannot happen, but: no npz
    assert folder.last_round() == 0
    folder.save_state(1, state)
    assert folder.last_round() == 1
    with open(tmp_path / "out" / "rounds.jsonl", "a") as log:
        log.write('{"round": 2, "cl')  # a kill cut the line
    assert folder.begin(_run(), state) == 1
    assert (tmp_path / "out" / "rounds.jsonl").read_text() == '{"round": 1}\n'


def test_run_folder_refuses_a_folder_of_something_else(tmp_path: Path) -> None:
    (tmp_path / "flower").mkdir()
    assert RunFolder(tmp_path).check(_run()) is None  # the CLI's Flower files only: a new run
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FleetError, match="not a fleet run folder"):
        RunFolder(tmp_path).check(_run())


@pytest.mark.parametrize("skew", ["iid", "labels"])
def test_partitions_are_disjoint_and_cover_every_image(skew: str) -> None:
    labels = np.repeat(np.arange(10), 40)
    parts = split_indices(labels, 4, skew, alpha=0.3, seed=0)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    counts = np.array([np.bincount(labels[p], minlength=10) for p in parts])
    if skew == "iid":
        assert (counts == 10).all()
    else:
        assert (counts.max(axis=0) >= 20).mean() > 0.5  # most classes sit mostly on one node
    assert split_indices(labels, 4, skew, 0.3, 0)[2].tolist() == parts[2].tolist()  # seeded


@pytest.mark.parametrize(
    "args, message",
    [
        (["node", "{art}", "--data", "synthetic", "--superlink", "10.0.0.7:9092", "--insecure"], "localhost only"),
        (["node", "{art}", "--data", "synthetic", "--superlink", "server.lan:9092"], "give TLS certificates"),
        (["node", "{tmp}/none", "--data", "synthetic", "--superlink", "127.0.0.1:9092", "--insecure"], "no such"),
        (["server", "{tmp}/none", "--out", "{tmp}/out", "--insecure"], "no such artifact"),
        (["server", "{tmp}/none", "--out", "{tmp}/out", "--host", "0.0.0.0", "--insecure"], "localhost only"),
        (["server", "{tmp}/none", "--out", "{tmp}/out", "--ssl-certfile", "{tmp}/x"], "does not exist"),
    ],
)
def test_fleet_cli_fails_on_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    import subprocess
    import sys

    (tmp_path / "art").mkdir()
    argv = [a.format(art=tmp_path / "art", tmp=tmp_path) for a in args]
    done = subprocess.run([sys.executable, "-m", "edge_trady", "fleet", *argv], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_fleet_plan_adds_flowers_processes_as_parts_of_their_own() -> None:
    from edge_trady.core.memory import FLEET_DAEMONS_BYTES, FLEET_STATE_COPIES
    from edge_trady.device.profile import load_profile
    from edge_trady.device.progress import Progress
    from edge_trady.workstation.planner import PlanRequest, make_plan

    request = PlanRequest(
        model="mobilenetv2-w0.35", profile=load_profile("this-workstation"), image_size=32, batch_size=8,
        method="d-full-random", budget="5%", num_classes=4,
    )  # fmt: skip
    alone, fleet = (make_plan(PlanRequest(**{**request.__dict__, "fleet": f}), Progress(True)) for f in (False, True))
    added = {p.name for p in fleet.estimate.parts} - {p.name for p in alone.estimate.parts}
    assert added == {"fleet: SuperNode + SuperExec", "fleet: Flower in the ClientApp", "fleet: global tensors received"}
    parts = {p.name: p for p in fleet.estimate.parts}
    trainable = 4 * sum(layer.weight_count for layer in fleet.layer_costs)
    trainable += 4 * (fleet.classifier_cost.weight_count + fleet.classifier_cost.out_channels)
    assert parts["fleet: global tensors received"].bytes == FLEET_STATE_COPIES * trainable
    assert parts["fleet: SuperNode + SuperExec"].bytes == FLEET_DAEMONS_BYTES
    assert fleet.estimate.peak_bytes - alone.estimate.peak_bytes >= FLEET_DAEMONS_BYTES


def test_a_superlink_failure_while_pulling_replies_is_polled_again(monkeypatch) -> None:
    """Under load the SuperLink's SQLite database can be locked and pull-messages answers HTTP 500:
    the round keeps polling (and says so) instead of crashing the ServerApp; a node that never
    answers is reported as timed out."""
    from types import SimpleNamespace

    from edge_trady.fleet import server as server_module

    monkeypatch.setattr(server_module, "POLL_SECONDS", 0.01)

    class Grid:
        pulls = 0

        def push_messages(self, messages):
            return [f"m{m.metadata.dst_node_id}" for m in messages]

        def pull_messages(self, ids):
            self.pulls += 1
            if self.pulls == 1:
                raise RuntimeError("Server error '500 Internal Server Error' for url '.../pull-messages'\nmore")
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m1"))] if "m1" in ids else []

    lines: list[str] = []
    fleet = server_module.FleetServer.__new__(server_module.FleetServer)
    fleet.config = FleetConfig(artifact="/a", out="/o", round_timeout=1.0)
    fleet.log = lines.append
    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node)) for node in (1, 2)]
    replies = fleet.collect(Grid(), messages)
    assert replies[1].metadata.reply_to_message_id == "m1"
    assert replies[2] == "timed out after 1s"
    assert lines == ["fleet: the SuperLink failed to hand over replies (Server error '500 Internal Server Error' "
                     "for url '.../pull-messages'); polling again"]  # fmt: skip
