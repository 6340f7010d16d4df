"""``edge-trady fleet``: fine-tune one model on many devices over Flower (server, node, partition)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import click

from ..device.loop import Stopped
from ..errors import FleetError
from ..fleet.aggregate import AGGREGATIONS, UPDATERS


@click.group("fleet")
def command() -> None:
    """Fleet fine-tuning: many devices train one model together over Flower 1.42.

    Each device trains the same artifact on its own data and sends back only the channel slices it
    updated; the server averages every weight entry over the devices that updated it (or, with
    'fleet server --aggregation all', its change over all devices of the round). On the
    workstation: 'edge-trady fleet server'; on each device: 'edge-trady fleet node'. See
    docs/fleet.md.
    """


def _tls_options(fn):
    for option in reversed(
        [
            click.option("--insecure", is_flag=True, help="No TLS: only for 127.0.0.1 / localhost."),
            click.option(
                "--ssl-ca-certfile", type=click.Path(exists=True, dir_okay=False), help="CA certificate (PEM)."
            ),
            click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), help="Server certificate."),
            click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), help="Server private key."),
        ]
    ):
        fn = option(fn)
    return fn


@command.command("server")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Run folder (see docs).")
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True)
@click.option("--local-epochs", type=click.IntRange(1), default=1, show_default=True, help="Epochs per round.")
@click.option(
    "--min-clients", type=click.IntRange(1), default=2, show_default=True, help="Updates a round needs to count."
)
@click.option("--round-timeout", type=click.FloatRange(1), default=600, show_default=True, help="Seconds.")
@click.option(
    "--wait-timeout", type=click.FloatRange(1), default=600, show_default=True, help="Seconds to wait for nodes."
)
@click.option(
    "--wait-for", type=click.IntRange(1), default=None, help="Nodes to wait for before round 1. Default: --min-clients."
)
@click.option("--attempts", type=click.IntRange(1), default=3, show_default=True, help="Tries of a short round.")
@click.option(
    "--aggregation",
    type=click.Choice(AGGREGATIONS),
    default=UPDATERS,
    show_default=True,
    help="An entry's new value: the mean over the clients that updated it, or its change averaged over all "
    "clients of the round (no update counts as no change: full-model FedAvg's mean). See docs/fleet.md.",
)
@click.option("--val", default=None, help="Data to evaluate the global model on after each round (server side).")
@click.option("--val-per-class", type=click.IntRange(1), default=None)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the SuperLink listens on.")
@click.option("--port", type=click.IntRange(1, 65535), default=9092, show_default=True)
@_tls_options
@click.option("--node-auth", is_flag=True, help="Accept only registered SuperNodes (needs TLS; see --register-key).")
@click.option(
    "--register-key",
    "register_keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A node's public key (ssh-keygen -t ecdsa -b 384) to register once the SuperLink is up; repeatable.",
)
@click.option(
    "--superlink",
    default=None,
    help="HOST:PORT of a SuperLink already running (e.g. a service): submit the run there, start none.",
)
@click.option("--quiet", is_flag=True)
def server(
    artifact: str,
    out_dir: str,
    rounds: int,
    local_epochs: int,
    min_clients: int,
    round_timeout: float,
    wait_timeout: float,
    wait_for: int | None,
    attempts: int,
    aggregation: str,
    val: str | None,
    val_per_class: int | None,
    host: str,
    port: int,
    insecure: bool,
    ssl_ca_certfile: str | None,
    ssl_certfile: str | None,
    ssl_keyfile: str | None,
    node_auth: bool,
    register_keys: tuple[str, ...],
    superlink: str | None,
    quiet: bool,
) -> None:
    """Start the SuperLink, run ROUNDS rounds of ARTIFACT on the connected devices, stop.

    The global model starts from the artifact's trainable tensors; after each round it is saved
    in OUT/global/ and the round in OUT/rounds.jsonl; at the end OUT/model.onnx (read by 'edge-trady
    evaluate'). Run the same command again to continue an interrupted run. Example (one machine):

      edge-trady fleet server artifact/ --out fleet/ --rounds 5 --insecure --val fashion-mnist
    """
    from ..device.manifest import Manifest
    from ..fleet import launch
    from ..fleet.server import FleetConfig
    from ..fleet.state import FLOWER_DIR, FleetRun, RunFolder

    launch.require_flower()
    tls = _tls(ssl_ca_certfile, ssl_certfile, ssl_keyfile)
    address = superlink or f"{host}:{port}"
    link_host, link_port = launch.split_address(address)
    launch.check_security(link_host, insecure, tls)
    if node_auth and tls is None:
        raise FleetError("--node-auth needs TLS (Flower authenticates nodes only over TLS connections)")
    manifest = Manifest.load(Path(artifact))
    out = Path(out_dir).resolve()
    config = FleetConfig(
        artifact=str(Path(artifact).resolve()),
        out=str(out),
        rounds=rounds,
        local_epochs=local_epochs,
        min_clients=min_clients,
        round_timeout=round_timeout,
        wait_timeout=wait_timeout,
        wait_for=wait_for or 0,
        attempts=attempts,
        aggregation=aggregation,
        val=val or "",
        val_per_class=val_per_class or 0,
    )
    folder = RunFolder(out)
    done = folder.check(FleetRun(manifest.artifact_sha256, manifest.plan.model, rounds, local_epochs, aggregation))
    flower = out / FLOWER_DIR
    app = launch.write_app(flower, config.to_run_config())
    home = flower / "home"
    launch.write_connection(home, address, insecure, Path(tls.ca_certfile) if tls else None)
    env = launch.flower_env(home)
    say = (lambda line: None) if quiet else click.echo
    say(
        f"fleet: {manifest.plan.model}, artifact {manifest.artifact_sha256[:12]}, {rounds} rounds of "
        f"{local_epochs} epoch(s), >= {min_clients} clients"
        + ("" if aggregation == UPDATERS else f", entries averaged over {aggregation} clients")
        + (f"; continuing after round {done}" if done else "")
        + f"; Flower logs in {flower / 'logs'}"
    )
    link = None
    stopped = False
    previous = signal.signal(signal.SIGTERM, _interrupt)  # systemd / kill: clean up as for Ctrl-C
    try:
        if superlink is None:
            log = flower / "logs" / "superlink.log"
            command_line = launch.superlink_command(host, port, flower / "superlink.db", insecure, tls, node_auth)
            link = launch.start(command_line, log, env)
            launch.wait_for_port(host, port, link, log)
            say(f"fleet: SuperLink listening on {host}:{port} (PID {link.pid}); start the devices' nodes")
        for key in register_keys:
            say(f"fleet: {launch.register_node(Path(key), env)}")
        _follow_run(app, flower / "logs" / "run.log", env, say)
    except KeyboardInterrupt:
        stopped = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if link is not None:
            launch.stop(link)
    status = folder.status()
    if stopped:
        raise Stopped(
            f"stopped after round {status.get('round', 0)} of {rounds}; run the same command to continue"
            + ("" if link else " (the run goes on on the SuperLink: 'flwr stop' ends it)")
        )
    if status.get("state") == "failed":
        raise FleetError(status.get("error", "the run failed"))
    if status.get("state") != "finished":
        raise FleetError(
            f"the run stopped after round {status.get('round', 0)} of {rounds} "
            f"({launch.tail(flower / 'logs' / 'run.log', 3)}); run the same command to continue"
        )
    say(f"fleet: done; global model in {out / 'model.onnx'}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _follow_run(app: Path, log: Path, env: dict, say) -> None:
    """``flwr run APP --stream``: the whole output to ``log``, the server's ``fleet:`` lines to ``say``."""
    from ..fleet import launch

    command = [launch.flower_tool("flwr"), "run", str(app), launch.CONNECTION, "--stream"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                out.write(line)
                out.flush()
                if line.startswith("fleet: "):
                    say(line.rstrip())
        finally:
            if process.poll() is None:
                process.terminate()
            process.wait()


@command.command("node")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--data", required=True, help="This device's training data (as 'edge-trady run --train').")
@click.option("--superlink", required=True, help="HOST:PORT of the server's SuperLink.")
@click.option("--name", default=None, help="This node's name (seeds its selections). Default: the host name.")
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), default="fleet-node", show_default=True, help="Node log."
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "portable", "ort", "torch-sparse"]),
    default="auto",
    show_default=True,
    help="auto: the artifact format's engine (portable: plain onnxruntime) where installed, else torch-sparse.",
)
@click.option("--val", default=None, help="Local validation data. Default: the validation split of --data.")
@click.option("--per-class", type=click.IntRange(1), default=None, help="At most this many images per class.")
@click.option("--val-per-class", type=click.IntRange(1), default=None)
@click.option("--insecure", is_flag=True, help="No TLS: only for a SuperLink on 127.0.0.1.")
@click.option(
    "--root-certificates", type=click.Path(exists=True, dir_okay=False), help="CA certificate of the SuperLink."
)
@click.option(
    "--auth-key", type=click.Path(exists=True, dir_okay=False), help="This node's private key (node authentication)."
)
@click.option(
    "--runtime-port",
    type=click.IntRange(1, 65535),
    default=9094,
    show_default=True,
    help="Local port of the SuperNode's Runtime API (one per SuperNode on a machine).",
)
def node(
    artifact: str,
    data: str,
    superlink: str,
    name: str | None,
    out_dir: str,
    engine: str,
    val: str | None,
    per_class: int | None,
    val_per_class: int | None,
    insecure: bool,
    root_certificates: str | None,
    auth_key: str | None,
    runtime_port: int,
) -> None:
    """Run this device as a fleet node: a Flower SuperNode whose ClientApp trains ARTIFACT on --data.

    Checks the artifact and the data first, then becomes the SuperNode (same PID: fit for a systemd
    unit) and trains whenever the server starts a round. Each round is logged in OUT/rounds.jsonl.
    Example:

      edge-trady fleet node artifact/ --data /data/train --superlink server:9092 --root-certificates ca.crt
    """
    from ..device.manifest import Manifest
    from ..device.runner import RunRequest, load_data
    from ..fleet import launch
    from ..fleet.client import NodeSettings
    from ..fleet.engines import resolve_engine

    launch.require_flower()
    host, _ = launch.split_address(superlink)
    tls = launch.Tls(Path(root_certificates)) if root_certificates else None
    launch.check_security(host, insecure, tls)
    artifact_dir = Path(artifact).resolve()
    manifest = Manifest.load(artifact_dir)
    out = Path(out_dir).resolve()
    settings = NodeSettings(
        name=name or socket.gethostname(),
        artifact=artifact_dir,
        data=data,
        out=out,
        engine=engine,
        val=val,
        per_class=per_class,
        val_per_class=val_per_class,
    )
    train, val_data = load_data(manifest, RunRequest(artifact_dir, data, out, val, per_class, val_per_class))
    chosen = resolve_engine(engine, manifest)
    (out / "flower").mkdir(parents=True, exist_ok=True)  # FLWR_HOME of the SuperNode: the apps it installs
    node_config = out / "node.toml"
    node_config.write_text(launch.toml_table(settings.to_config()))
    command_line = launch.supernode_command(
        superlink, node_config, runtime_port, insecure, Path(root_certificates) if root_certificates else None,
        Path(auth_key) if auth_key else None,
    )  # fmt: skip
    click.echo(
        f"fleet node {settings.name}: artifact {manifest.artifact_sha256[:12]}, {len(train)} train / "
        f"{len(val_data)} val images, engine {chosen}; SuperNode for {superlink} (PID {os.getpid()})",
        err=True,
    )
    os.execve(command_line[0], command_line, launch.flower_env(out / "flower"))


@command.command("partition")
@click.argument("data")
@click.option("--nodes", type=click.IntRange(1), required=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--image-size", type=click.IntRange(8), default=64, show_default=True)
@click.option("--per-class", type=click.IntRange(1), default=None, help="Images per class before splitting.")
@click.option("--skew", type=click.Choice(["iid", "labels"]), default="iid", show_default=True)
@click.option("--alpha", type=click.FloatRange(0, min_open=True), default=0.5, show_default=True, help="labels skew.")
@click.option("--seed", type=int, default=0, show_default=True)
def partition(
    data: str, nodes: int, out_dir: str, image_size: int, per_class: int | None, skew: str, alpha: float, seed: int
) -> None:
    """Split DATA's training images into disjoint OUT/node-<i>.npz files (one per device).

    For trying a fleet on one machine or benchmarking it. Example:

      edge-trady fleet partition fashion-mnist --nodes 3 --per-class 60 --image-size 32 --out parts/
    """
    from ..fleet.partition import write_partitions

    for part in write_partitions(data, nodes, Path(out_dir), image_size, skew, per_class, alpha, seed):
        click.echo(f"{part.path}: {part.images} images, per class {part.per_class}")


def _tls(ca: str | None, cert: str | None, key: str | None):
    from ..fleet.launch import Tls

    if not (ca or cert or key):
        return None
    if not (ca and cert and key):
        raise FleetError("TLS needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile together")
    return Tls(Path(ca), Path(cert), Path(key))
