"""Flower's processes and files, as ``edge-trady fleet`` starts them.

- the Flower app: a folder with only a ``pyproject.toml`` whose components are this package's
  ``server_app:app`` and ``client_app:app`` and whose run config is the ``FleetConfig``. The code
  itself is the edge-trady installed on each machine (the FAB carries no code);
- ``FLWR_HOME/config.toml``: the SuperLink connection ``flwr run`` uses;
- ``flower-superlink`` / ``flower-supernode`` command lines: TLS or ``--insecure`` (loopback only),
  node authentication, never Flower's runtime dependency installation (no network at run time);
- the environment: Flower's telemetry and update check off.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import FleetError

APP_NAME = "edge-trady-fleet"
CONNECTION = "edge-trady"
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
FLOWER_VERSION = "1.42"
DEFAULT_PORT = 9092  # the SuperLink's one HTTP port (Fleet, Control and Runtime APIs)
DEFAULT_RUNTIME_PORT = 9094  # a SuperNode's local Runtime API, for its ClientApp processes


@dataclass(frozen=True)
class Tls:
    """Certificates: the server's (``certfile``, ``keyfile``) and the CA that signed it."""

    ca_certfile: Path
    certfile: Path | None = None
    keyfile: Path | None = None


def require_flower() -> None:
    """Raise FleetError unless Flower can run here (flwr installed, Python >= 3.11)."""
    if sys.version_info < (3, 11):
        raise FleetError(
            f"fleet fine-tuning needs Flower {FLOWER_VERSION}, which needs Python >= 3.11; this is "
            f"{sys.version.split()[0]} (JetPack 6 ships 3.10: see docs/fleet.md, 'Jetson')"
        )
    try:
        import flwr
    except ImportError:
        raise FleetError(f"Flower is not installed: pip install 'edge-trady[fleet]' (flwr {FLOWER_VERSION})") from None
    if not flwr.__version__.startswith(FLOWER_VERSION):
        raise FleetError(f"flwr {flwr.__version__} is installed, edge-trady's fleet speaks flwr {FLOWER_VERSION}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise FleetError(f"{address!r}: expected HOST:PORT")
    return host, int(port)


def check_security(host: str, insecure: bool, tls: Tls | None) -> None:
    """``--insecure`` only on loopback; otherwise TLS is required."""
    if insecure and tls is not None:
        raise FleetError("--insecure and TLS certificates exclude each other")
    if insecure and not is_loopback(host):
        raise FleetError(
            f"--insecure is for localhost only ({host} is not a loopback address): give the TLS "
            "certificates (docs/fleet.md, 'TLS and node authentication')"
        )
    if not insecure and tls is None:
        raise FleetError("give TLS certificates, or --insecure for a test on 127.0.0.1")


def flower_env(home: Path | None = None) -> dict[str, str]:
    """The environment of Flower's processes. This Python's scripts come first on PATH: a SuperNode
    starts ``flower-superexec`` and ``flwr-clientapp`` (a SuperLink ``flwr-serverapp``) by name, and
    they must be this environment's (a device venv's, not another Python's found on PATH)."""
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, **FLOWER_ENV, "PATH": os.pathsep.join(filter(None, [scripts, os.environ.get("PATH")]))}
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def flower_tool(name: str) -> str:
    """The path of a Flower command installed with this Python (systemd units have a bare PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FleetError(f"{name} not found: pip install 'edge-trady[fleet]'")
    return found


def superlink_command(
    host: str, port: int, database: Path, insecure: bool, tls: Tls | None, node_auth: bool
) -> list[str]:
    """``database``: the SuperLink's state on disk, so a restarted SuperLink still knows the nodes
    (an in-memory one answers their heartbeats with 401 and they retry for ever)."""
    command = [flower_tool("flower-superlink"), "--host", host, "--port", str(port), "--database", str(database)]
    command.append("--disable-runtime-dependency-installation")
    if insecure:
        command.append("--insecure")
    elif tls is not None:
        if tls.certfile is None or tls.keyfile is None:
            raise FleetError("the SuperLink needs --ssl-certfile and --ssl-keyfile (and --ssl-ca-certfile)")
        command += ["--ssl-ca-certfile", str(tls.ca_certfile)]
        command += ["--ssl-certfile", str(tls.certfile), "--ssl-keyfile", str(tls.keyfile)]
    if node_auth:
        command.append("--enable-supernode-auth")
    return command


def supernode_command(
    superlink: str,
    node_config: Path,
    runtime_port: int,
    insecure: bool,
    root_certificates: Path | None,
    auth_key: Path | None,
) -> list[str]:
    command = [flower_tool("flower-supernode"), "--superlink", superlink, "--node-config", str(node_config)]
    command += ["--port", str(runtime_port)]
    if insecure:
        command.append("--insecure")
    elif root_certificates is not None:
        command += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    return command


def toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string is a TOML basic string


def toml_table(values: dict) -> str:
    """``key = value`` lines (flat: what Flower's node and run configs hold)."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())


def write_app(directory: Path, run_config: dict) -> Path:
    """The Flower app folder ``directory/edge-trady-fleet`` (its name is the app's)."""
    from .. import __version__

    app = directory / APP_NAME
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(
        f"""# Written by edge-trady fleet server: the ServerApp and ClientApp are edge-trady's own.
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{APP_NAME}"
version = "{__version__}"
description = "edge-trady fleet fine-tuning: TraDy channel slices over Flower"
license = "Apache-2.0"
dependencies = ["flwr>={FLOWER_VERSION}.0"]

[tool.flwr.app]
publisher = "edge-trady"

[tool.flwr.app.components]
serverapp = "edge_trady.fleet.server_app:app"
clientapp = "edge_trady.fleet.client_app:app"

[tool.flwr.app.config]
{toml_table(run_config)}"""
    )
    return app


def write_connection(home: Path, address: str, insecure: bool, root_certificates: Path | None) -> None:
    """``FLWR_HOME/config.toml`` with the connection ``edge-trady`` (the SuperLink's Control API)."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines.append(f"address = {toml_value(address)}")
    if insecure:
        lines.append("insecure = true")
    elif root_certificates is not None:
        lines.append(f"root-certificates = {toml_value(str(root_certificates))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def register_node(public_key: Path, env: dict[str, str]) -> str:
    """``flwr supernode register`` on the connection of ``env``'s FLWR_HOME; a key registered
    before (the SuperLink's database keeps them) is fine. Returns what happened."""
    command = [flower_tool("flwr"), "supernode", "register", str(public_key), CONNECTION, "--format", "json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = {"success": False, "error-message": (done.stdout + done.stderr).strip()[-300:]}
    if answer.get("success"):
        return f"registered {public_key} (node ID {answer.get('node-id')})"
    problem = str(answer.get("error-message", "unknown error"))
    if "already in use" in problem:
        return f"{public_key} is registered already"
    raise FleetError(f"cannot register {public_key}: {problem.splitlines()[-1]}")


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``command`` (in its own session: a Ctrl-C goes to edge-trady, which stops it), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for_port(host: str, port: int, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FleetError(f"{Path(process.args[0]).name} exited ({process.returncode}): {tail(log)}")
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise FleetError(f"{Path(process.args[0]).name} did not listen on {host}:{port} within {timeout:.0f}s")


def stop(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM ``process`` and every descendant (Flower's SuperExec starts its own session, so a
    process group does not hold them all), each by its PID; SIGKILL what is left after ``timeout``."""
    import psutil

    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait()


def tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) + f" (log: {log})"
