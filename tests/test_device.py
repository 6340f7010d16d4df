"""Device profiles: shipped files, validation messages, measurement and the ``profile`` command."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_trady.commands.profile import command
from edge_trady.device.profile import (
    DEFAULT_PROFILES_DIR,
    PROFILES_ENV,
    SCHEMA_VERSION,
    DeviceProfile,
    load_profile,
)
from edge_trady.errors import ProfileError

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def _valid() -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": "test-board",
        "arch": "aarch64",
        "cpu_model": "Cortex-A72",
        "cpu_cores": 4,
        "total_memory_bytes": 2048 * MiB,
        "available_memory_bytes": 1700 * MiB,
        "swap_bytes": 100 * MiB,
        "os_reserved_bytes": 320 * MiB,
        "os": "Raspberry Pi OS Lite",
        "python": "3.11.2",
        "runtime_versions": {"numpy": "2.4.6"},
        "runtime_baseline_bytes": {"python": 27 * MiB, "torch": 227 * MiB},
        "compute_gflops": 9.0,
        "source": "datasheet: test",
    }


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "board.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("path", sorted(DEFAULT_PROFILES_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_profiles_load(path: Path) -> None:
    profile = load_profile(path.stem)
    assert profile.name == path.stem
    assert 0 < profile.usable_memory_bytes <= profile.total_memory_bytes
    assert profile.source == "measured" or "estimate" in profile.notes


def test_expected_profiles_are_shipped() -> None:
    names = {p.stem for p in DEFAULT_PROFILES_DIR.glob("*.json")}
    assert {
        "raspberry-pi-3b",
        "raspberry-pi-zero-2w",
        "raspberry-pi-4-2gb",
        "raspberry-pi-4-4gb",
        "raspberry-pi-5-8gb",
        "jetson-nano-4gb",
        "jetson-orin-nano-8gb",
        "generic-x86-4gb",
        "this-workstation",
    } <= names
    assert load_profile("jetson-nano-4gb").shared_gpu_memory


def test_round_trip(tmp_path: Path) -> None:
    profile = DeviceProfile(**_valid(), notes="n", shared_gpu_memory=True)
    loaded = load_profile(str(profile.save(tmp_path / "p.json")))
    assert loaded == profile
    assert loaded.to_dict() == json.loads((tmp_path / "p.json").read_text())


def test_usable_memory() -> None:
    data = _valid()
    assert DeviceProfile(**data).usable_memory_bytes == 1700 * MiB  # available is the limit
    data["os_reserved_bytes"] = 512 * MiB
    assert DeviceProfile(**data).usable_memory_bytes == 1536 * MiB  # total - reserved


def _without(field: str):
    return lambda d: d.pop(field)


def _set(field: str, value):
    return lambda d: d.__setitem__(field, value)


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (_without("cpu_cores"), "cpu_cores", "missing"),
        (_set("total_memory_bytes", "2GB"), "total_memory_bytes", "integer"),
        (_set("cpu_cores", True), "cpu_cores", "integer"),
        (_set("runtime_baseline_bytes", {"ort": -5}), "runtime_baseline_bytes", "positive"),
        (_set("available_memory_bytes", -1), "available_memory_bytes", "> 0"),
        (_set("total_memory_bytes", 0), "total_memory_bytes", "> 0"),
        (_set("swap_bytes", -1), "swap_bytes", ">= 0"),
        (_set("available_memory_bytes", 4096 * MiB), "available_memory_bytes", "exceeds"),
        (_set("os_reserved_bytes", 2048 * MiB), "os_reserved_bytes", "total"),
        (_set("schema_version", 2), "schema_version", "version 1"),
        (_set("total_memroy_bytes", 1), "total_memroy_bytes", "unknown"),
        (_set("source", "guess"), "source", "datasheet"),
        (_set("compute_gflops", 0), "compute_gflops", "> 0"),
    ],
)
def test_validation_errors_name_file_and_field(tmp_path, mutate, field, words) -> None:
    data = _valid()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message and field in message and words in message


def test_invalid_json_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "x",\n  "arch": ,\n}\n')
    with pytest.raises(ProfileError, match=r"broken\.json: invalid JSON at line 3"):
        load_profile(str(path))


def test_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(ProfileError, match="list.json: expected a JSON object"):
        load_profile(str(path))


def test_unknown_name_lists_available(tmp_path, monkeypatch) -> None:
    for name in ("board-a", "board-b"):
        DeviceProfile(**{**_valid(), "name": name}).save(tmp_path / f"{name}.json")
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    assert load_profile("board-b").name == "board-b"
    with pytest.raises(ProfileError, match="'board-c'.*available: board-a, board-b"):
        load_profile("board-c")
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(str(tmp_path / "missing.json"))


def test_constructor_validates() -> None:
    with pytest.raises(ProfileError, match="profile 'test-board': field 'cpu_cores'"):
        DeviceProfile(**{**_valid(), "cpu_cores": 0})


def test_profile_command_writes_loadable_profile(tmp_path: Path) -> None:
    out = tmp_path / "dev.json"
    args = ["-o", str(out), "--name", "dev", "--engines", "ort", "--reserve", "64MiB"]
    result = CliRunner().invoke(command, [*args, "--bench-seconds", "0.05"])
    assert result.exit_code == 0, result.output
    assert "usable for training" in result.output and "wrote" in result.output
    profile = load_profile(str(out))
    assert profile.source == "measured" and profile.name == "dev"
    assert profile.os_reserved_bytes == 64 * MiB
    assert profile.compute_gflops is not None and profile.compute_gflops > 0
    assert profile.runtime_baseline_bytes["python"] > 1 * MiB
    assert "torch" not in profile.runtime_baseline_bytes
    if "onnxruntime" in profile.runtime_versions:
        assert profile.runtime_baseline_bytes["ort"] > profile.runtime_baseline_bytes["python"]


def test_profile_command_quiet_and_bad_options(tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    runner = CliRunner()
    quiet = runner.invoke(command, ["-q", "-o", str(out), "--engines", "none", "--bench-seconds", "0"])
    assert quiet.exit_code == 0 and quiet.output == ""
    profile = load_profile(str(out))
    assert profile.compute_gflops is None and list(profile.runtime_baseline_bytes) == ["python"]
    assert runner.invoke(command, ["--engines", "tensorflow"]).exit_code == 2
    assert runner.invoke(command, ["--reserve", "lots"]).exit_code == 2


def test_profile_runs_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from edge_trady.commands.profile import command\n"
        "from edge_trady.device.profile import measure_profile\n"
        "p = measure_profile(engines=('ort', 'torch'), benchmark_seconds=0)\n"
        "assert 'torch' not in p.runtime_baseline_bytes\n"
        "assert sys.modules['torch'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_dataclass_fields_match_readme() -> None:
    readme = (DEFAULT_PROFILES_DIR / "README.md").read_text()
    for field in dataclasses.fields(DeviceProfile):
        assert f"| `{field.name}` |" in readme


@pytest.mark.parametrize(
    ("files", "memory", "cpus"),
    [
        (  # cgroup v2 (docker --memory 1g --cpus 1.5), namespaced: own cgroup is "/"
            {
                "/proc/self/cgroup": "0::/",
                "/sys/fs/cgroup/memory.max": "1073741824",
                "/sys/fs/cgroup/memory.current": "300000000",
                "/sys/fs/cgroup/memory.stat": "anon 100000000\ninactive_file 100000000",
                "/sys/fs/cgroup/cpu.max": "150000 100000",
            },
            (1073741824, 200000000),
            2,
        ),
        (  # cgroup v1, limit on the process's own cgroup, no CPU quota
            {
                "/proc/self/cgroup": "4:memory:/job\n2:cpu,cpuacct:/job",
                "/sys/fs/cgroup/memory/job/memory.limit_in_bytes": "536870912",
                "/sys/fs/cgroup/memory/job/memory.usage_in_bytes": "1000",
                "/sys/fs/cgroup/cpu/job/cpu.cfs_quota_us": "-1",
                "/sys/fs/cgroup/cpu/job/cpu.cfs_period_us": "100000",
            },
            (536870912, 1000),
            None,
        ),
        ({"/proc/self/cgroup": "0::/", "/sys/fs/cgroup/memory.max": "max"}, None, None),
    ],
)
def test_cgroup_limits(monkeypatch, files, memory, cpus) -> None:
    from edge_trady.device import profile as device

    monkeypatch.setattr(device, "_read", lambda path: files.get(str(path)))
    assert device._cgroup_memory() == memory
    assert device._cgroup_cpus() == cpus


@pytest.mark.parametrize(
    ("affinity", "quota", "physical", "threads"),
    [(8, None, 4, 4), (8, 2, 8, 2), (2, None, None, 2), (4, 6, 4, 4), (1, None, 8, 1)],
)
def test_default_threads_are_the_usable_physical_cores(monkeypatch, affinity, quota, physical, threads) -> None:
    """CPU affinity, a cgroup quota and the physical cores each cap the default thread count."""
    from edge_trady.device import profile as device

    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(device, "_cgroup_cpus", lambda: quota)
    monkeypatch.setattr(device.psutil, "cpu_count", lambda logical=True: physical)
    assert device.default_threads() == threads
    assert device.usable_cores() == (min(affinity, quota or affinity), bool(quota and quota < affinity))
