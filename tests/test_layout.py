"""The device side (core/, device/, fleet/, the onnxruntime engines, device commands) imports without torch
and without the onnx package."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE_PACKAGES = ("edge_trady.core", "edge_trady.device", "edge_trady.device.data", "edge_trady.fleet")
DEVICE_MODULES = (
    "edge_trady.cli",
    "edge_trady.errors",
    "edge_trady.engines",
    "edge_trady.engines.base",
    "edge_trady.engines.ort_runtime",
    "edge_trady.engines.ort_training",
    "edge_trady.engines.portable",
    "edge_trady.engines.portable_format",
    "edge_trady.engines.layout_file",
    "edge_trady.commands.run",
    "edge_trady.commands.evaluate",
    "edge_trady.commands.profile",
    "edge_trady.commands.options",
    "edge_trady.commands.fleet",
)
SCRIPT = f"""
import importlib, pkgutil, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx"):
            raise ImportError(f"{{name}} is not installed on this (simulated) device")

sys.meta_path.insert(0, Blocked())
names = list({DEVICE_MODULES!r})
for package in {DEVICE_PACKAGES!r}:
    module = importlib.import_module(package)
    names += [f"{{package}}.{{info.name}}" for info in pkgutil.iter_modules(module.__path__)]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))
assert not loaded, loaded
print(len(names))
"""


def test_device_modules_import_without_torch_and_onnx() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= len(DEVICE_MODULES) + 15
