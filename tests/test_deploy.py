"""The deploy files, without Docker or systemd: the unit's syntax and its hook line as systemd
runs it, the exit-hook wrapper of the image and compose, the compose hardening, the image's
build context, the opt-in scripts' --help. (The real builds and runs: deploy/test-docker.sh,
deploy/test-arm64.sh and deploy/test-512mb.sh.)"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edge_trady.device.loop import Stopped

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "edge-trady-run.service"
WRAPPER = ROOT / "deploy" / "with-exit-hook.sh"
COMPOSE = ROOT / "deploy" / "compose.yaml"


def _unit_settings() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", UNIT.read_text())  # continuation lines
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split("=", 1)) for line in lines if "=" in line and not line.startswith("#")]


def _setting(key: str) -> list[str]:
    return [value for k, value in _unit_settings() if k == key]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_file_has_no_unknown_or_invalid_settings(tmp_path: Path) -> None:
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_unit_exit_statuses_follow_the_convention() -> None:
    assert _setting("SuccessExitStatus") == [str(Stopped.exit_code)]  # systemctl stop: clean
    assert _setting("Restart") == ["on-failure"]
    assert set(_setting("RestartPreventExitStatus")[0].split()) == {"2", "4"}  # bad input, diverged
    assert _setting("NotifyAccess") == ["main"] and _setting("WatchdogSec")  # heartbeat pings
    (start,) = _setting("ExecStart")
    assert " run " in start and "--resume" in start


def _systemd_command(value: str, env: dict[str, str]) -> list[str]:
    """The argv systemd runs for an Exec*= value: no unescaped single $ (systemd would expand it
    itself), '-' prefix dropped, $$ -> $."""
    assert not re.search(r"(?<!\$)\$(?!\$)", value.replace("$$", "")), value
    return shlex.split(value.lstrip("-").replace("$$", "$"))


@pytest.mark.parametrize(
    ("status", "result"), [("0", "success"), ("130", "success"), ("3", "exit-code"), ("KILL", "oom-kill")]
)
def test_unit_stop_post_runs_the_hook_with_run_folder_and_status(tmp_path: Path, status: str, result: str) -> None:
    (stop_post,) = _setting("ExecStopPost")
    hook = tmp_path / "hook"
    hook.write_text(f'#!/bin/sh\nprintf "%s|" "$@" > {tmp_path}/called\n')
    hook.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "OUT": "/var/lib/edge-trady/run", "EXIT_STATUS": status}
    env |= {"SERVICE_RESULT": result, "ON_EXIT": str(hook)}
    subprocess.run(_systemd_command(stop_post, env), env=env, check=True)
    assert (tmp_path / "called").read_text() == f"/var/lib/edge-trady/run|{status}|{result}|"
    env["ON_EXIT"] = ""  # no hook configured: nothing runs, no error
    (tmp_path / "called").unlink()
    subprocess.run(_systemd_command(stop_post, env), env=env, check=True)
    assert not (tmp_path / "called").exists()


def _wrapper(tmp_path: Path, script: str, hook: bool = True) -> subprocess.Popen:
    hook_file = tmp_path / "hook"
    hook_file.write_text(f'#!/bin/sh\nprintf "%s|" "$@" > {tmp_path}/called\n')
    hook_file.chmod(0o755)
    env = dict(os.environ, EDGE_TRADY_ON_EXIT=str(hook_file) if hook else "")
    cmd = ["sh", str(WRAPPER), "/work/run", sys.executable, "-c", script]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    ("script", "status", "result"),
    [
        ("pass", 0, "success"),
        ("raise SystemExit(3)", 3, "exit-code"),
        ("import os; os.kill(os.getpid(), 9)", 137, "signal"),  # what the OOM killer leaves
    ],
)
def test_wrapper_reports_every_end_and_keeps_the_status(tmp_path: Path, script: str, status: int, result: str) -> None:
    proc = _wrapper(tmp_path, script)
    assert proc.wait(timeout=30) == status
    assert (tmp_path / "called").read_text() == f"/work/run|{status}|{result}|"


def test_wrapper_passes_sigterm_on_and_reports_the_stop(tmp_path: Path) -> None:
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))\n"  # like the runner: checkpoint, 130
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = _wrapper(tmp_path, script)
    assert proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 130 and time.monotonic() - started < 10
    assert (tmp_path / "called").read_text() == "/work/run|130|success|"


def test_wrapper_without_hook_is_the_command_itself(tmp_path: Path) -> None:
    proc = _wrapper(tmp_path, "import os; print(os.getpid())", hook=False)
    assert int(proc.stdout.readline()) == proc.pid  # exec: no shell left in between
    assert proc.wait(timeout=30) == 0 and not (tmp_path / "called").exists()


def test_compose_services_are_hardened_and_always_resume() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, service in services.items():
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"] and service["network_mode"] == "none"
        assert service["mem_limit"] == service["memswap_limit"] and service["cpus"], name
        mounts = dict(
            re.fullmatch(r"\$\{EDGE_TRADY_WORK:-\./work\}\S*:(/work\S*?)(:ro)?", v).groups() for v in service["volumes"]
        )
        assert mounts["/work"] is None and mounts["/work/data"] == ":ro", name
        command = service["command"][0]
        assert command.startswith("exec edge-trady-with-exit-hook /work/run edge-trady ") and "--resume" in command
        assert (
            "--out /work/run" in command and service["environment"]["EDGE_TRADY_ON_EXIT"] == "${EDGE_TRADY_ON_EXIT:-}"
        )
    runner = services["runner"]
    assert "/work/artifact" in runner["command"][0] and runner["build"]["args"]["ENGINE"] == "portable"
    assert "${EDGE_TRADY_WORK:-./work}/artifact:/work/artifact:ro" in runner["volumes"]


def test_image_build_context_has_what_the_dockerfile_copies() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    patterns = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M):
        for source in line.split()[:-1]:
            if source != ".":
                assert (ROOT / source).exists() and any(source.startswith(p.rstrip("/")) for p in patterns), source
    assert 'CMD ["edge-trady", "health"]' in dockerfile and "EDGE_TRADY_RUN=/work/run" in dockerfile
    assert "ARG ENGINE=portable" in dockerfile and 'pins="-c /src/constraints-device.txt"' in dockerfile


@pytest.mark.parametrize("script", ["test-docker.sh", "test-arm64.sh", "test-512mb.sh"])
def test_opt_in_deploy_tests_parse_and_explain_themselves(script: str) -> None:
    """The opt-in scripts need root, Docker or qemu to run; here: valid bash and a --help that needs none."""
    path = ROOT / "deploy" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    result = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: deploy/{script}") and "Steps" in result.stdout
    bad = subprocess.run(["bash", str(path), "--no-such-option"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "unknown option: --no-such-option" in bad.stderr
