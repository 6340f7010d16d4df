"""Real Flower processes for the fleet tests: ``edge-trady fleet server`` (SuperLink + ServerApp)
and ``edge-trady fleet node`` (SuperNode + ClientApp) on 127.0.0.1, on free ports, each stopped
by its PID (with its descendants), logs kept and shown when something fails."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from edge_trady.fleet.launch import stop

# Ports below the kernel's ephemeral range (32768-60999): a port the kernel picks for ``bind(0)`` or for
# an outgoing connection (a node's to its SuperLink) can be handed out again before the process it
# was meant for binds it, which once failed a node's runtime API with "address already in use".
PORTS = range(20000, 32768)
_given: set[int] = set()


def free_port() -> int:
    """A loopback port no earlier call returned and nothing listens on now."""
    for port in random.sample(PORTS, len(PORTS)):
        if port in _given:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class Fleet:
    """Processes of one fleet test; ``close`` stops every one still running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        # One thread per process: several trainers share 2 cores (spinning OpenMP threads slow all).
        # SuperExecs look for new ClientApp/ServerApp tasks every 0.2 s instead of 1 s.
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        }
        root.mkdir(parents=True, exist_ok=True)

    def start(self, label: str, *args: str, python: Path | None = None) -> subprocess.Popen:
        """``edge-trady fleet ARGS`` with ``python`` (default: this one; e.g. the device venv's)."""
        log = open(self.root / f"{label}.log", "ab")  # noqa: SIM115 (kept open by the child)
        command = [str(python or sys.executable), "-m", "edge_trady", "fleet", *args]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.processes[label] = process
        return process

    def server(self, artifact: Path, out: Path, *args: str, label: str = "server") -> subprocess.Popen:
        return self.start(
            label, "server", str(artifact), "--out", str(out), "--insecure", "--port", str(self.port), *args
        )

    def node(self, label: str, artifact: Path, data: Path, *args: str, python: Path | None = None, insecure=True):
        return self.start(
            label,
            "node",
            str(artifact),
            "--data",
            str(data),
            "--name",
            label,
            "--out",
            str(self.root / "nodes" / label),
            "--superlink",
            f"127.0.0.1:{self.port}",
            *(["--insecure"] if insecure else []),
            "--runtime-port",
            str(free_port()),
            *args,
            python=python,
        )

    def node_log(self, label: str) -> list[dict]:
        return read_jsonl(self.root / "nodes" / label / "rounds.jsonl")

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.5)

    def wait_exit(self, label: str, timeout: float) -> int:
        try:
            return self.processes[label].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{label} still running after {timeout:.0f}s\n{self.logs()}") from None

    def family(self, label: str) -> list[psutil.Process]:
        """The process and its descendants (SuperNode, SuperExec, ClientApp)."""
        try:
            parent = psutil.Process(self.processes[label].pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def clientapp_running(self, label: str) -> bool:
        """True while the node's SuperNode has a ClientApp process training a round."""
        for member in self.family(label)[1:]:
            with contextlib.suppress(psutil.Error):
                if member.status() != psutil.STATUS_ZOMBIE and "flwr-clientapp" in " ".join(member.cmdline()):
                    return True
        return False

    def kill(self, label: str) -> None:
        """SIGKILL the process and its descendants, each by PID (a device losing power)."""
        for member in self.family(label):
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        self.processes[label].wait(10)

    def stop(self, label: str) -> None:
        stop(self.processes[label], timeout=10)

    def close(self) -> None:
        """SIGTERM every process and descendant at once, SIGKILL what is left after 10 s."""
        family = [member for label in self.processes for member in self.family(label)]
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.terminate()
        _, alive = psutil.wait_procs(family, timeout=10)
        for member in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        for process in self.processes.values():
            process.wait(10)

    def logs(self, lines: int = 25) -> str:
        parts = []
        for label in self.processes:
            text = (self.root / f"{label}.log").read_text(errors="replace").splitlines()
            parts.append(f"--- {label} (last {lines} lines)\n" + "\n".join(text[-lines:]))
        for flower in sorted(self.root.glob("**/flower/logs/*.log")):
            text = flower.read_text(errors="replace").splitlines()
            parts.append(f"--- {flower} (last {lines} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)


def write_credentials(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 / localhost, and a P-384 node key pair (OpenSSH),
    as docs/fleet.md makes them with openssl and ssh-keygen."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: x509.Name, signer, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key, node_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
    ca = certificate(
        "edge-trady test CA",
        ca_key,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-trady test CA")]),
        ca_key,
        True,
    )  # noqa: E501
    server = certificate("localhost", server_key, ca.subject, ca_key, False)
    pem = serialization.Encoding.PEM
    paths = {name: directory / name for name in ("ca.crt", "server.pem", "server.key", "node-key", "node-key.pub")}
    paths["ca.crt"].write_bytes(ca.public_bytes(pem))
    paths["server.pem"].write_bytes(server.public_bytes(pem))
    plain = serialization.NoEncryption()
    paths["server.key"].write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, plain)
    )
    paths["node-key"].write_bytes(node_key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain))
    paths["node-key.pub"].write_bytes(
        node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return paths
