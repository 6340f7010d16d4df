"""Device profiles: memory, CPU and runtime facts the planner needs, as JSON
(schema: edge_trady/profiles/README.md).

Runs on the device: no torch here. Engine baselines are measured in fresh subprocesses.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from .. import __version__
from ..core.atomic import write_json
from ..errors import ProfileError

SCHEMA_VERSION = 1
ENGINE_MODULES = {"python": "numpy", "ort": "onnxruntime", "torch": "torch"}  # engine -> module
ENGINES = tuple(ENGINE_MODULES)
PROFILES_ENV = "EDGE_TRADY_PROFILES"
DEFAULT_PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"  # package data
PROBE_TIMEOUT_S = 600
PROBE_MODEL = Path(__file__).with_name("probe.onnx")  # package data: Y = Conv(X[1,3,16,16]) (tests/test_probe_model.py)


@dataclass
class DeviceProfile:
    """What a device offers for fine-tuning; all memory sizes in bytes."""

    schema_version: int
    name: str
    arch: str
    cpu_model: str
    cpu_cores: int
    total_memory_bytes: int
    available_memory_bytes: int
    swap_bytes: int
    os_reserved_bytes: int
    os: str
    python: str | None
    runtime_versions: dict[str, str]
    runtime_baseline_bytes: dict[str, int]
    compute_gflops: float | None
    source: str
    notes: str = ""
    shared_gpu_memory: bool = False

    def __post_init__(self) -> None:
        _validate(self.to_dict(), f"profile {self.name!r}")

    @property
    def usable_memory_bytes(self) -> int:
        """Memory a fine-tuning process may use: available, capped by total minus the OS share."""
        return min(self.available_memory_bytes, self.total_memory_bytes - self.os_reserved_bytes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_json(path, self.to_dict(), indent=2)
        return path


# --- validation ---------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(DeviceProfile)}
_REQUIRED = [name for name, f in _FIELDS.items() if f.default is dataclasses.MISSING]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_INT = (_is_int, "an integer")
_STR = (lambda v: isinstance(v, str), "a string")
_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(["schema_version", "cpu_cores", "swap_bytes", "os_reserved_bytes"], _INT),
    **dict.fromkeys(["total_memory_bytes", "available_memory_bytes"], _INT),
    **dict.fromkeys(["name", "arch", "cpu_model", "os", "source", "notes"], _STR),
    "python": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "compute_gflops": (lambda v: v is None or _is_number(v), "a number or null"),
    "shared_gpu_memory": (lambda v: isinstance(v, bool), "true or false"),
    "runtime_versions": (
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        'an object of version strings, e.g. {"numpy": "2.0.1"}',
    ),
    "runtime_baseline_bytes": (
        lambda v: isinstance(v, dict) and all(_is_int(x) and x > 0 for x in v.values()),
        'an object of positive byte counts, e.g. {"ort": 70000000}',
    ),
}


def _validate(data: Any, where: str) -> None:
    """Raise ProfileError naming ``where`` and the field for anything the schema does not allow."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if "schema_version" in data and data["schema_version"] != SCHEMA_VERSION:
        raise ProfileError(
            f"{where}: field 'schema_version' is {data['schema_version']!r}; this edge-trady "
            f"reads version {SCHEMA_VERSION} (see edge_trady/profiles/README.md)"
        )
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_FIELDS)}")
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise ProfileError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    for name, value in data.items():
        check, expected = _TYPES[name]
        if not check(value):
            raise ProfileError(f"{where}: field {name!r} must be {expected}, got {value!r}")
    total, gflops = data["total_memory_bytes"], data["compute_gflops"]
    rules = [
        ("total_memory_bytes", total > 0, "must be > 0 bytes"),
        ("available_memory_bytes", data["available_memory_bytes"] > 0, "must be > 0 bytes"),
        ("available_memory_bytes", data["available_memory_bytes"] <= total, "exceeds total"),
        ("swap_bytes", data["swap_bytes"] >= 0, "must be >= 0 bytes"),
        ("os_reserved_bytes", 0 <= data["os_reserved_bytes"] < total, "must be in [0, total)"),
        ("cpu_cores", data["cpu_cores"] >= 1, "must be >= 1"),
        ("compute_gflops", gflops is None or gflops > 0, "must be > 0 or null"),
        *((name, bool(data[name].strip()), "must not be empty") for name in ("name", "arch")),
        (
            "source",
            data["source"] == "measured" or data["source"].startswith("datasheet:"),
            'must be "measured" or "datasheet: <origin>"',
        ),
    ]
    for name, ok, problem in rules:
        if not ok:
            raise ProfileError(f"{where}: field {name!r} {problem}, got {data[name]!r}")


# --- loading ------------------------------------------------------------------------------------


def profiles_dir() -> Path:
    """Where bare profile names are looked up: ``$EDGE_TRADY_PROFILES``, else the profiles shipped
    in the package (``edge_trady/profiles/``)."""
    return Path(os.environ.get(PROFILES_ENV) or DEFAULT_PROFILES_DIR)


def available_profiles() -> list[str]:
    directory = profiles_dir()
    return sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []


def _resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" or os.sep in name_or_path or "/" in name_or_path or path.is_file():
        if not path.is_file():
            raise ProfileError(f"no such profile file: {path}")
        return path
    candidate = profiles_dir() / f"{name_or_path}.json"
    if candidate.is_file():
        return candidate
    names = ", ".join(available_profiles()) or "none"
    raise ProfileError(
        f"unknown device profile {name_or_path!r} (looked in {profiles_dir()}); "
        f"available: {names}. Pass a path to a .json file or set {PROFILES_ENV}"
    )


def load_profile(name_or_path: str) -> DeviceProfile:
    """Load and validate a profile: a JSON path or a bare name such as ``raspberry-pi-4-2gb``."""
    path = _resolve(str(name_or_path))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from None
    _validate(data, str(path))
    return DeviceProfile(**data)


# --- measuring ----------------------------------------------------------------------------------


def _probe_script(engine: str) -> str:
    """Python source for a fresh process that loads ``engine`` and prints its peak RSS."""
    work = {
        "python": "import numpy\nnumpy.ones(1)\n",
        "ort": (
            "import numpy, onnxruntime\n"
            "from onnxruntime.capi import _pybind_state\n"
            f"s = onnxruntime.InferenceSession({str(PROBE_MODEL)!r}, "
            "providers=['CPUExecutionProvider'])\n"
            "s.run(None, {'X': numpy.ones((1, 3, 16, 16), numpy.float32)})\n"
        ),
        "torch": ("import torch\nconv = torch.nn.Conv2d(3, 8, 3)\nconv(torch.randn(1, 3, 16, 16)).sum().backward()\n"),
    }[engine]
    # Block torch outside its own probe: onnxruntime-training's `import onnxruntime` imports torch
    # (for ORTModule) whenever it can, which a torch-free device runner does not pay for.
    guard = "" if engine == "torch" else "import sys\nsys.modules['torch'] = None\n"
    return guard + work + "from edge_trady.device.memwatch import peak_rss_bytes\nprint(peak_rss_bytes())\n"


def measure_engine_baseline(engine: str) -> int | None:
    """Peak RSS (bytes) of a fresh Python process that loaded ``engine`` and ran a tiny model.

    ``"python"`` is the bare interpreter plus numpy. None when the engine is not installed.
    """
    if engine not in ENGINES:
        raise ProfileError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if importlib.util.find_spec(ENGINE_MODULES[engine]) is None:
        return None
    try:
        result = subprocess.run(
            [sys.executable, "-c", _probe_script(engine)],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise ProfileError(f"measuring the {engine} baseline took over {PROBE_TIMEOUT_S} s") from None
    lines = result.stdout.split()
    if result.returncode != 0 or not lines or not lines[-1].isdigit():
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProfileError(f"measuring the {engine} baseline failed (exit {result.returncode}): {detail}")
    return int(lines[-1])


def measure_compute_gflops(seconds: float = 0.5, n: int = 512) -> float:
    """fp32 GFLOP/s of numpy ``n x n`` matmuls repeated for about ``seconds``.

    Reports the fastest repetition, so other load on the machine disturbs the figure less.
    """
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    with np.errstate(all="ignore"):  # only the time matters (some emulated BLAS builds warn)
        a @ b  # warm-up: BLAS threads, caches
    best, end = math.inf, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        with np.errstate(all="ignore"):
            a @ b
        now = time.perf_counter()
        best = min(best, now - start)
        if now >= end:
            return 2 * n**3 / best / 1e9


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_dirs(v1_controller: str) -> list[tuple[Path, bool]]:
    """Candidate cgroup directories of this process as ``(dir, is_v2)``, own cgroup first."""
    dirs: list[tuple[Path, bool]] = []
    for line in (_read(Path("/proc/self/cgroup")) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hierarchy == "0" and not controllers:
            base, is_v2 = Path("/sys/fs/cgroup"), True
        elif v1_controller in controllers.split(","):
            base, is_v2 = Path("/sys/fs/cgroup") / v1_controller, False
        else:
            continue
        dirs += [(base / rel.lstrip("/"), is_v2), (base, is_v2)]
    return dirs


def available_memory_bytes() -> int:
    """Memory this process may still take: available RAM, or less inside a memory-limited cgroup
    or under an address-space limit (``ulimit -v``, ``prlimit --as``)."""
    return available_memory()[0]


def available_memory(address_space_reserve: int = 0) -> tuple[int, str]:
    """``available_memory_bytes`` and what limits it (for messages); ``address_space_reserve``:
    address space still to be mapped but not used (counts only under an address-space limit)."""
    limits = [(int(psutil.virtual_memory().available), "available RAM")]
    cgroup = _cgroup_memory()
    if cgroup:
        limits.append((max(cgroup[0] - cgroup[1], 0), "the cgroup (container) memory limit"))
    headroom = address_space_headroom()
    if headroom is not None:
        limits.append((max(headroom - address_space_reserve, 0), "the address-space limit (RLIMIT_AS, prlimit --as)"))
    return min(limits)


def address_space_headroom() -> int | None:
    """Bytes of address space this process may still map under RLIMIT_AS (None: unlimited).

    The limit counts virtual memory (``VmSize``), which runtimes reserve well beyond what they
    touch, so this is what is left of the limit now, not of physical memory."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    status = _read(Path("/proc/self/status")) or ""
    size = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:")), 0)
    return max(soft - size, 0)


def _cgroup_memory() -> tuple[int, int] | None:
    """``(limit, usage without inactive page cache)`` of a limited memory cgroup, else None."""
    best: tuple[int, int] | None = None
    for directory, is_v2 in _cgroup_dirs("memory"):
        names = ("memory.max", "memory.current", "inactive_file")
        if not is_v2:
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        limit, usage = _read(directory / names[0]), _read(directory / names[1])
        if not (limit and limit.isdigit() and usage and usage.isdigit()):
            continue
        stat = dict(line.split(maxsplit=1) for line in (_read(directory / "memory.stat") or "").splitlines())
        inactive = int(stat.get(names[2], 0))
        if best is None or int(limit) < best[0]:
            best = (int(limit), max(int(usage) - inactive, 0))
    return best


def usable_cores() -> tuple[int, bool]:
    """Cores this process may run on (its CPU affinity, or fewer under a cgroup CPU quota), and
    whether the quota is what limits them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpus()
    if quota and quota < cores:
        return quota, True
    return max(cores, 1), False


def default_threads() -> int:
    """Intra-op threads of a training run: the usable cores, at most the physical ones (a second
    hardware thread of a core adds no arithmetic units to the convolutions)."""
    physical = psutil.cpu_count(logical=False) or usable_cores()[0]
    return max(1, min(usable_cores()[0], physical))


def _cgroup_cpus() -> int | None:
    """Cores allowed by a cgroup CPU quota (rounded up), else None."""
    for directory, is_v2 in _cgroup_dirs("cpu"):
        if is_v2:
            quota, _, period = (_read(directory / "cpu.max") or "max").partition(" ")
        else:
            quota = _read(directory / "cpu.cfs_quota_us") or "-1"
            period = _read(directory / "cpu.cfs_period_us") or ""
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            return max(1, math.ceil(int(quota) / int(period)))
    return None


_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
}


def _cpu_model() -> str:
    """CPU name from /proc/cpuinfo (ARM part numbers decoded), plus the board from device-tree."""
    info: dict[str, str] = {}
    for line in (_read(Path("/proc/cpuinfo")) or "").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip().lower(), value.strip())
    model = (
        _ARM_PARTS.get(info.get("cpu part", "").lower()) or info.get("model name") or platform.processor() or "unknown"
    )
    board = (_read(Path("/proc/device-tree/model")) or "").rstrip("\x00")
    return f"{model} ({board})" if board else model


def _os_name() -> str:
    release = _read(Path("/etc/os-release")) or ""
    pretty = next((ln[12:].strip('"') for ln in release.splitlines() if ln.startswith("PRETTY_NAME=")), None)
    kernel = f"{platform.system()} {platform.release()}"
    return f"{pretty}, {kernel}" if pretty else platform.platform()


def _runtime_versions() -> dict[str, str]:
    """Versions of edge-trady and its runtimes, from package metadata (nothing is imported)."""
    versions = {"edge-trady": __version__}
    distributions = importlib.metadata.packages_distributions()
    for module in ("numpy", "psutil", "onnxruntime", "torch"):
        for dist in distributions.get(module, []):
            try:
                versions[module] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def measure_profile(
    name: str | None = None,
    engines: tuple[str, ...] = ("ort", "torch"),
    os_reserved_bytes: int | None = None,
    benchmark_seconds: float = 0.5,
    progress: Callable[[str], None] | None = None,
) -> DeviceProfile:
    """Measure this device's memory, CPU, runtime baselines and compute rate.

    The ``python`` baseline is always measured. ``benchmark_seconds=0`` skips the compute
    benchmark (``compute_gflops`` is then None). ``progress`` receives one line per step.
    """
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ProfileError(f"unknown engine(s) {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    say = progress or (lambda _: None)
    notes: list[str] = []

    memory = psutil.virtual_memory()
    total, available = int(memory.total), int(memory.available)
    cgroup = _cgroup_memory()
    if cgroup and cgroup[0] < total:
        total, available = cgroup[0], min(available, max(cgroup[0] - cgroup[1], 1))
        notes.append("memory limited by a cgroup (container)")
    headroom = address_space_headroom()
    if headroom is not None and headroom < available:
        available = max(headroom, 1)
        notes.append("memory limited by an address-space limit (RLIMIT_AS)")
    cores, limited = usable_cores()
    if limited:
        notes.append("CPU limited by a cgroup quota")

    baselines: dict[str, int] = {}
    for engine in dict.fromkeys(("python", *engines)):
        say(f"measuring the {engine} baseline (fresh process)")
        baseline = measure_engine_baseline(engine)
        if baseline is None:
            notes.append(f"{engine} not installed")
        else:
            baselines[engine] = baseline
    gflops = None
    if benchmark_seconds > 0:
        say(f"measuring compute ({benchmark_seconds:g} s fp32 matmul)")
        gflops = round(measure_compute_gflops(benchmark_seconds), 2)

    arch = platform.machine()
    return DeviceProfile(
        schema_version=SCHEMA_VERSION,
        name=name or socket.gethostname() or "this-device",
        arch={"amd64": "x86_64", "arm64": "aarch64"}.get(arch.lower(), arch),
        cpu_model=_cpu_model(),
        cpu_cores=cores or 1,
        total_memory_bytes=total,
        available_memory_bytes=available,
        swap_bytes=int(psutil.swap_memory().total),
        os_reserved_bytes=0 if os_reserved_bytes is None else os_reserved_bytes,
        os=_os_name(),
        python=platform.python_version(),
        runtime_versions=_runtime_versions(),
        runtime_baseline_bytes=baselines,
        compute_gflops=gflops,
        source="measured",
        notes="; ".join(notes),
    )
