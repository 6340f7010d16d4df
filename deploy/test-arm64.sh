#!/usr/bin/env bash
# Run the device side of edge-trady on an emulated arm64 (Raspberry Pi / Jetson class) Debian.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/test-arm64.sh [options]

Emulates an arm64 device (Raspberry Pi class) with qemu-user (no VM): a Debian bookworm arm64
root with python3.11, plus a site directory with the device side's aarch64 wheels, pinned by
constraints-device.txt: plain onnxruntime, numpy, ... and no torch. Both are built once into the
cache and reused. qemu's aarch64 binfmt_misc handler is registered while the script runs
(commands such as `profile` start child Python processes) and removed again at exit.

Steps (each is timed):
  1. arm64 root     debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11,
                    then every downloaded .deb is unpacked with dpkg-deb -x (no second stage)
  2. wheel site     pip download/install --platform manylinux_2_xx_aarch64 --no-deps of
                    constraints-device.txt (onnxruntime 1.32.0 cp311 aarch64, numpy, ...)
  3. smoke test     under qemu: numpy and onnxruntime import and compute; `import torch` fails
  4. project        pip install --no-deps --target of this checkout (pure Python) into the root
  5. commands       edge-trady --help / --version / profile -o (prints its summary)
  6. run + resume   host (x86_64): plan + export a portable artifact (EfficientNet-Lite0, real
                    Fashion-MNIST subset, 2 epochs); arm64: edge-trady run, SIGKILLed in epoch 2
                    after its first mid-epoch checkpoint, then --resume to the end; checks: loss
                    decreases, units_used <= budget every epoch, final weights equal an x86_64
                    run of the same artifact and seed (plain onnxruntime in a host venv) within
                    ARM_TOLERANCE. Skipped if the checkout has no portable engine (an error
                    with --strict). About 25 min on 2 busy x86_64 cores (qemu: ~1 min a step).

Options:
  --prepare-only     steps 1-3 only (build/verify the cache)
  --no-run           skip step 6
  --strict           a command or engine that is not implemented yet is an error, not a skip
  --rebuild          delete the cached arm64 root and wheel site first
  -h, --help         this help

Environment: EDGE_TRADY_CACHE (default ~/.cache/edge-trady), EDGE_TRADY_FMNIST
(/usr/share/datasets/fashion-mnist), RUN_* (step 6 parameters, at the top of the script).
EOF
}

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ----- parameters (easy to adjust) -----------------------------------------------------------
PY=3.11
# The device side's wheels, installed into the site with --no-deps (markers would be evaluated
# for the host): every pin of constraints-device.txt (onnxruntime's own dependencies included).
CONSTRAINTS="$ET_REPO/constraints-device.txt"
# Bookworm has glibc 2.36. pip does not expand --platform to older manylinux tags, so list them.
PLATFORMS=(manylinux_2_28_aarch64 manylinux_2_27_aarch64 manylinux_2_26_aarch64
    manylinux_2_24_aarch64 manylinux2014_aarch64 manylinux_2_17_aarch64 linux_aarch64)
DATA_SRC=${EDGE_TRADY_FMNIST:-/usr/share/datasets/fashion-mnist}

# Step 6: plan + export on the host (workstation, x86_64), `run` on the emulated arm64 device.
# The pretrained EfficientNet-Lite0 learns clearly in a few epochs, so "loss decreases" is a real
# check; its weights come with the artifact (the device needs no model package).
RUN_MODEL=${RUN_MODEL:-efficientnet-lite0}
RUN_IMAGE_SIZE=${RUN_IMAGE_SIZE:-32}
RUN_PER_CLASS=${RUN_PER_CLASS:-20}
RUN_EPOCHS=${RUN_EPOCHS:-2}
RUN_LR=${RUN_LR:-0.02}
RUN_BUDGET=${RUN_BUDGET:-2%}
RUN_CHECKPOINT_EVERY=${RUN_CHECKPOINT_EVERY:-2}   # steps: the kill lands between checkpoints
RUN_KILL_AFTER=${RUN_KILL_AFTER:-5}               # seconds after epoch 2's first checkpoint
# Final weights, arm64 vs x86_64: the same graph, data, order and channel draws, but ONNX
# Runtime's kernels differ by architecture (NEON vs AVX, summation order), so they agree to
# float32 rounding accumulated over the run's SGD steps, not bit for bit.
ARM_TOLERANCE=${ARM_TOLERANCE:-1e-4}
RUN_INITIAL_MODEL=${RUN_INITIAL_MODEL:-inference.onnx}   # the artifact's inference model (weights before)
RUN_NEEDS=${RUN_NEEDS:-edge_trady/engines/portable.py}
# shellcheck disable=SC2016  # expanded later, by bash -c
PLAN_CMD=${PLAN_CMD:-'edge-trady plan --model "$RUN_MODEL" --image-size "$RUN_IMAGE_SIZE" --engine portable --lr "$RUN_LR" --budget "$RUN_BUDGET" --profile "$PROFILE" --data "fashion-mnist:$DATA" --per-class "$RUN_PER_CLASS" --epochs "$RUN_EPOCHS" -o "$PLAN"'}
# shellcheck disable=SC2016
EXPORT_CMD=${EXPORT_CMD:-'edge-trady export "$PLAN" -o "$ARTIFACT_DIR"'}

PREPARE_ONLY=0
RUN=1
STRICT=0
REBUILD=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare-only) PREPARE_ONLY=1; shift ;;
        --no-run) RUN=0; shift ;;
        --strict) STRICT=1; shift ;;
        --rebuild) REBUILD=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; et_die "unknown option: $1" ;;
    esac
done

ARM="$ET_CACHE/arm64"
ROOT="$ARM/root"                     # the emulated device's filesystem
SITE="$ROOT/opt/edge-trady/site"     # aarch64 wheels (onnxruntime, numpy, ...)
APP="$ROOT/opt/edge-trady/app"       # this checkout, installed with --no-deps
WORK="$ROOT/work"                    # data and runs, inside the root
QEMU=qemu-aarch64-static
trap et_on_exit EXIT
et_need "$QEMU" debootstrap dpkg-deb

# Run the root's python3.11 under qemu. Host paths under $ROOT are used on purpose: with -L,
# qemu maps guest paths into $ROOT only when they exist there, so a new output file given as a
# guest path would be created on the host instead.
# QEMU_LD_PREFIX: the same root for child processes (started through binfmt_misc, see below).
# ARM_EXEC=exec (in a subshell): exec qemu in place of the shell, so that $! of a background
# `(ARM_EXEC=exec; edge_trady ...) &` is qemu itself and a kill reaches the runner.
arm_python() {
    ${ARM_EXEC:-} env -i PATH=/usr/bin:/bin HOME="$WORK" LANG=C.UTF-8 PYTHONNOUSERSITE=1 QEMU_LD_PREFIX="$ROOT" \
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
# the emulated device's /proc/cpuinfo (qemu maps guest paths that exist under -L): a Pi 4's,
# instead of the host's x86 one that ONNX Runtime's CPU detection crashes on (et_arm_cpuinfo)
et_arm_cpuinfo "$ROOT/proc/cpuinfo"
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
    et_info "downloading the aarch64 wheels of $(basename "$CONSTRAINTS") into $ARM/wheels, installing into $SITE"
    rm -rf "$SITE.tmp"
    site_install "$SITE.tmp" -r "$CONSTRAINTS"
    rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
    cp "$CONSTRAINTS" "$SITE/.edge-trady-constraints"
}

et_step "2. aarch64 wheel site ($SITE)"
if cmp -s "$CONSTRAINTS" "$SITE/.edge-trady-constraints"; then
    et_info "cached ($(du -sh "$SITE" | cut -f1))"
else
    et_timed "aarch64 wheels (download + install)" build_site
fi
et_info "$(cd "$SITE" && ls -d ./*.dist-info | sed 's|^\./||; s|\.dist-info$||' | tr '\n' ' ')"

# ----- 3: smoke test -------------------------------------------------------------------------
smoke() {
    arm_python - <<'PY'
import platform, time
t = time.time()
import numpy, onnxruntime
print(f"    import onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__} on {platform.machine()}: "
      f"{time.time() - t:.1f}s; providers {onnxruntime.get_available_providers()}")
a = numpy.random.default_rng(0).standard_normal((64, 64), dtype=numpy.float32)
print(f"    numpy matmul ok: trace {float(numpy.trace(a @ a.T)):.1f}")
try:
    import torch  # noqa: F401
except ImportError as exc:
    print(f"    import torch: fails, as it must on the device ({type(exc).__name__}: {exc})")
else:
    raise SystemExit("    FAIL: torch is importable on the device")
PY
}
et_step "3. smoke test under qemu (onnxruntime, numpy; no torch)"
et_timed "smoke test (onnxruntime + numpy, no torch)" smoke
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

# ----- 6: a portable artifact from x86_64, run on arm64 with a kill and a resume --------------
# x86_64 reference: the same artifact and seed, trained by the same runner with plain
# onnxruntime (constraints-device.txt) in a host venv without torch.
x86_venv() {
    local venv="$ET_CACHE/x86_64-device-venv"
    if ! cmp -s "$CONSTRAINTS" "$venv/.edge-trady-constraints"; then
        rm -rf "$venv"
        "$ET_PYTHON" -m venv "$venv"
        PIP_CONSTRAINT= PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= "$venv/bin/pip" install --quiet \
            -r "$CONSTRAINTS" 2>&1 | { grep -v 'is ignored: it is neither' || true; }
        cp "$CONSTRAINTS" "$venv/.edge-trady-constraints"
    fi
    X86_PYTHON="$venv/bin/python"
}

# weights_diff MODEL_A MODEL_B BEFORE : max |a - b| over all initializers, and the largest change
# training made (|a - before|), on the host (onnx package of the workstation).
weights_diff() {
    "$ET_PYTHON" - "$@" <<'PY'
import sys
import numpy as np
import onnx
from onnx import numpy_helper

def weights(path):
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(path).graph.initializer}

a, b = weights(sys.argv[1]), weights(sys.argv[2])
before = weights(sys.argv[3]) if len(sys.argv) > 3 else {}
assert a.keys() == b.keys(), "the two models have different weights"
diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
moved = max((float(np.abs(a[k] - before[k]).max()) for k in a if k in before), default=float("nan"))
print(f"{diff:.3g} {moved:.3g} {len(a)}")
PY
}

# arm64 run killed mid-run: SIGKILL in epoch 2, once a mid-epoch checkpoint exists (LATEST names
# a step > 0 of the second epoch) plus RUN_KILL_AFTER seconds, then --resume to the end
arm_run_with_kill() {
    local out=$1 pid i
    shift
    rm -rf "$out"
    (ARM_EXEC=exec; edge_trady run "$@" --out "$out" --checkpoint-every "$RUN_CHECKPOINT_EVERY") >"$out.log" 2>&1 &
    pid=$!
    for i in $(seq 1 7200); do
        [ "$(cat "$out/metrics.jsonl" 2>/dev/null | wc -l)" -ge 1 ] &&
            grep -q '^epoch0001-step0*[1-9]' "$out/checkpoints/LATEST" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$out.log" >&2; et_die "arm64 run ended before the kill"; }
        sleep 1
    done
    sleep "$RUN_KILL_AFTER"  # between two checkpoints of epoch 2
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "" ] || et_die "the arm64 runner (pid $pid) survived SIGKILL"
    ARM_KILLED_AT="$(wc -l <"$out/metrics.jsonl") epoch(s), checkpoint $(cat "$out/checkpoints/LATEST" 2>/dev/null)"
    et_info "SIGKILL after $ARM_KILLED_AT"
    edge_trady run "$@" --out "$out" --checkpoint-every "$RUN_CHECKPOINT_EVERY" --resume >"$out.resume.log" 2>&1 ||
        { tail -n 20 "$out.resume.log" >&2; et_die "the resumed arm64 run failed"; }
    grep -i -m1 'resum' "$out.resume.log" | sed 's/^/    runner: /' >&2 || true
    [ -f "$out/summary.json" ] || { tail -n 20 "$out.log" >&2; et_die "the resumed arm64 run did not finish"; }
}

portable_run() {
    local job="$ARM/job" data="$WORK/data/fashion-mnist" x86_run arm_run out tol
    mkdir -p "$job" "$data"
    cp -u "$DATA_SRC"/*-ubyte.gz "$data/"
    rm -rf "$job/artifact" "$job/plan.json"
    PLAN="$job/plan.json" ARTIFACT_DIR="$job/artifact" PROFILE="$WORK/runs/profile.json" DATA="$data"
    export PLAN ARTIFACT_DIR PROFILE DATA RUN_MODEL RUN_IMAGE_SIZE RUN_PER_CLASS RUN_EPOCHS RUN_LR RUN_BUDGET
    et_info "host: $PLAN_CMD"
    et_timed "plan (host, x86_64)" bash -c "$PLAN_CMD"
    et_info "host: $EXPORT_CMD"
    et_timed "export (host, x86_64)" bash -c "$EXPORT_CMD"
    local args=("$job/artifact" --train "fashion-mnist:$data" --per-class "$RUN_PER_CLASS")
    x86_venv
    x86_run="$job/run-x86_64"
    rm -rf "$x86_run"
    et_timed "run (x86_64 reference, plain onnxruntime)" env PYTHONPATH="$ET_REPO" "$X86_PYTHON" -m edge_trady run \
        "${args[@]}" --out "$x86_run" --quiet
    arm_run="$WORK/runs/run-arm64"
    et_timed "run (arm64 under qemu, killed + resumed)" arm_run_with_kill "$arm_run" "${args[@]}"
    et_step "6b. check the arm64 run ($arm_run/metrics.jsonl)"
    et_check_metrics "$arm_run"
    out=$(weights_diff "$arm_run/model.onnx" "$x86_run/model.onnx" "$job/artifact/$RUN_INITIAL_MODEL")
    read -r ARM_DIFF ARM_MOVED ARM_TENSORS <<<"$out"
    tol=$ARM_TOLERANCE
    et_info "final weights, arm64 (killed + resumed) vs x86_64: max |diff| $ARM_DIFF over $ARM_TENSORS tensors (training moved weights by up to $ARM_MOVED); tolerance $tol"
    awk -v d="$ARM_DIFF" -v t="$tol" 'BEGIN { exit !(d <= t) }' ||
        et_die "arm64 and x86_64 weights differ by $ARM_DIFF > $tol"
}

if [ "$RUN" = 1 ]; then
    missing=""
    for f in $RUN_NEEDS; do [ -e "$ET_REPO/$f" ] || missing="$missing $f"; done
    if [ -n "$missing" ]; then
        not_implemented "run on a portable artifact (missing:$missing)"
    else
        et_step "6. portable artifact (x86_64 export) -> edge-trady run on arm64, SIGKILL, --resume ($RUN_MODEL, $RUN_IMAGE_SIZE px, $RUN_PER_CLASS/class, $RUN_EPOCHS epochs)"
        t_run=$(date +%s)
        portable_run
        RESULTS+=("run (portable, arm64): ok, killed after $ARM_KILLED_AT and resumed; weights vs x86_64: max |diff| $ARM_DIFF <= $ARM_TOLERANCE ($ARM_TENSORS tensors, moved up to $ARM_MOVED); step 6: $(($(date +%s) - t_run))s")
    fi
fi

et_step "report"
printf '  %s\n' "arm64 root: $ROOT" "wheel site: $SITE ($(du -sh "$SITE" | cut -f1))" \
    "project:    $APP" "${RESULTS[@]}"
