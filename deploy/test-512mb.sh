#!/usr/bin/env bash
# A 512 MB board: plan for the Raspberry Pi Zero 2 W profile, run it under a hard 512 MB limit.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/test-512mb.sh [options]

The Raspberry Pi Zero 2 W (512 MB) case, measured: the workstation plans EfficientNet-Lite0 for
the raspberry-pi-zero-2w profile with the portable engine (the plan also prints the other
engines' predicted peaks and why they do not fit), exports the portable artifact, and the
portable image runs it in a container with a hard 512 MB limit and no swap
(docker run --memory 512m --memory-swap 512m). The run must complete (exit 0, every epoch
logged, loss decreases, budget held) and its measured peak (VmHWM, summary.json
peak_rss_bytes) must be within +-TOLERANCE of the plan's predicted peak. Prints prediction vs
measured per part of the run and writes them as JSON.

Steps (each is timed):
  1. image      the portable image of this checkout, built by deploy/test-docker.sh (cached
                layers: fast after the first build); --image TAG runs an existing image
  2. plan       host: edge-trady plan --profile raspberry-pi-zero-2w (IMAGE_SIZE, BATCH, ...)
  3. export     host: edge-trady export (portable artifact)
  4. run        container, --memory 512m --memory-swap 512m --network none:
                edge-trady run; then the container's cgroup memory.peak
  5. check      exit 0, metrics (loss, budget), |measured / predicted - 1| <= TOLERANCE

Options:
  --image TAG      run this existing image instead of building edge-trady:portable-test
  --out FILE       JSON result (default: bench/results/pi-zero-512mb.json)
  -h, --help       this help

Environment: IMAGE_SIZE (128), BATCH (16), BUDGET (2%; empty: the planner's default budget),
PER_CLASS (50), EPOCHS (2), LR (0.02), MEMORY (512m),
TOLERANCE (0.10), EDGE_TRADY_CACHE (~/.cache/edge-trady), EDGE_TRADY_FMNIST.
EOF
}

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ----- parameters ----------------------------------------------------------------------------
# 128 px, batch 16, TraDy budget 2 %: a useful setting (val_acc 0.11 -> 0.78 in 2 epochs on 500
# images) that fits the Zero 2 W with the portable engine; batch 32 at 128 px leaves a budget of
# 1 MiB. The torch engines need more than the usable memory even for the classifier alone (the
# torch runtime is 227 MiB of the 352 MiB usable), and no onnxruntime-training wheel exists for
# aarch64. BUDGET= (empty) takes the planner's default budget instead.
PROFILE_NAME=raspberry-pi-zero-2w
IMAGE_SIZE=${IMAGE_SIZE:-128}
BATCH=${BATCH:-16}
BUDGET=${BUDGET-2%}
PER_CLASS=${PER_CLASS:-50}
EPOCHS=${EPOCHS:-2}
LR=${LR:-0.02}
MEMORY=${MEMORY:-512m}
TOLERANCE=${TOLERANCE:-0.10}
TAG=edge-trady:portable-test
BUILD=1
OUT="$ET_REPO/bench/results/pi-zero-512mb.json"
DATA_SRC=${EDGE_TRADY_FMNIST:-/usr/share/datasets/fashion-mnist}

while [ $# -gt 0 ]; do
    case "$1" in
        --image) TAG=$2; BUILD=0; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; et_die "unknown option: $1" ;;
    esac
done

WORK="$ET_CACHE/512mb-work"   # mounted at /work in the container
trap et_on_exit EXIT

et_step "1. docker engine and image $TAG"
et_timed "dockerd" et_dockerd
if [ "$BUILD" = 1 ]; then
    et_info "building $TAG from this checkout (deploy/test-docker.sh)"
    et_timed "build + checks (deploy/test-docker.sh)" "$ET_REPO/deploy/test-docker.sh" --tag "$TAG" >/dev/null
fi
docker image inspect "$TAG" >/dev/null 2>&1 || et_die "image $TAG not found"
et_info "image $TAG: $(et_mb "$(docker image inspect -f '{{.Size}}' "$TAG")") MB"

rm -rf "$WORK/run" "$WORK/artifact" "$WORK/plan.json" "$WORK/cgroup-peak"
mkdir -p "$WORK/data"
cp -u "$DATA_SRC"/*-ubyte.gz "$WORK/data/"
PLAN_ARGS=(--model efficientnet-lite0 --image-size "$IMAGE_SIZE" --batch-size "$BATCH" --engine portable
    --lr "$LR" --profile "$PROFILE_NAME" --data "fashion-mnist:$WORK/data" --per-class "$PER_CLASS"
    --epochs "$EPOCHS")
RANKING="$ET_REPO/bench/results/ranking-efficientnet-lite0-${IMAGE_SIZE}px.json"
[ -f "$RANKING" ] && PLAN_ARGS+=(--ranking "$RANKING")
[ -z "$BUDGET" ] || PLAN_ARGS+=(--budget "$BUDGET")

et_step "2. plan (host): ${PLAN_ARGS[*]}"
et_timed "plan (host)" edge-trady plan "${PLAN_ARGS[@]}" -o "$WORK/plan.json"

et_step "3. export (host)"
et_timed "export (host)" edge-trady export "$WORK/plan.json" -o "$WORK/artifact"
chown -R 10001:10001 "$WORK" 2>/dev/null || chmod -R a+rwX "$WORK"

et_step "4. run in the container (--memory $MEMORY --memory-swap $MEMORY, no network)"
run() {
    # the container cgroup's peak charge (v2 memory.peak, v1 max_usage_in_bytes): the limit applies to
    # it; file pages already cached by an earlier container are not charged again
    docker run --rm --memory "$MEMORY" --memory-swap "$MEMORY" --network none -v "$WORK:/work" \
        --entrypoint sh "$TAG" -c 'edge-trady run /work/artifact --train fashion-mnist:/work/data \
            --per-class "$0" --out /work/run --quiet; rc=$?
            cat /sys/fs/cgroup/memory.peak /sys/fs/cgroup/memory/memory.max_usage_in_bytes \
                >/work/cgroup-peak 2>/dev/null; exit "$rc"' "$PER_CLASS"
}
RC=0
et_timed "run (container, --memory $MEMORY)" run || RC=$?
[ "$RC" = 0 ] || et_die "the run under --memory $MEMORY did not complete (exit $RC; 137: OOM-killed)"

et_step "5. checks"
et_check_metrics "$WORK/run"
mkdir -p "$(dirname "$OUT")"
"$ET_PYTHON" - "$WORK" "$OUT" "$MEMORY" "$TOLERANCE" "$TAG" "${PLAN_ARGS[*]}" <<'PY'
import json, sys
from pathlib import Path

from edge_trady.core.atomic import write_json

work, out, memory, tol, tag, plan_args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5], sys.argv[6]
plan = json.loads((work / "plan.json").read_text())
summary = json.loads((work / "run" / "summary.json").read_text())
metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line]
cgroup = (work / "cgroup-peak").read_text().split()[0] if (work / "cgroup-peak").read_text().strip() else ""
predicted, measured = plan["memory"]["peak_bytes"], summary["peak_rss_bytes"]
error = measured / predicted - 1
mib = 2**20
print(f"    {'part':<36} {'phase':<6} {'MiB':>7}")
for part in plan["memory"]["parts"]:
    print(f"    {part['name']:<36} {part['phase']:<6} {part['bytes'] / mib:7.1f}")
print(f"    predicted peak (plan, {plan['profile']['name']}): {predicted / mib:.1f} MiB of usable "
      f"{plan['usable_memory_bytes'] / mib:.1f} MiB")
print(f"    measured peak (VmHWM, summary.json):   {measured / mib:.1f} MiB  ({error:+.1%}, tolerance +-{tol:.0%})")
if cgroup:
    print(f"    container cgroup peak charge:          {int(cgroup) / mib:.1f} MiB (limit {memory})")
for row in plan.get("engines", []):
    peaks = [row[k] and f"{row[k] / mib:.1f}" for k in ("at_budget_bytes", "smallest_bytes")]
    print(f"    other engine {row['engine']:<13} at budget {peaks[0]} MiB, classifier only {peaks[1]} MiB: "
          f"fits {row['fits']}")
result = {
    "what": "EfficientNet-Lite0 planned for raspberry-pi-zero-2w (portable), run under a hard memory limit",
    "command": "deploy/test-512mb.sh",
    "plan_args": plan_args,
    "image": tag,
    "memory_limit": memory,
    "image_size": plan["image_size"],
    "batch_size": plan["batch_size"],
    "budget_bytes": plan["budget"],
    "epochs": len(metrics),
    "train_images": summary["train_images"],
    "usable_memory_bytes": plan["usable_memory_bytes"],
    "predicted_peak_bytes": predicted,
    "measured_peak_rss_bytes": measured,
    "cgroup_memory_peak_bytes": int(cgroup) if cgroup else None,
    "relative_error": error,
    "tolerance": tol,
    "within_tolerance": abs(error) <= tol,
    "parts": plan["memory"]["parts"],
    "other_engines": plan.get("engines", []),
    "train_loss": [m["train_loss"] for m in metrics],
    "val_acc": [m["val_acc"] for m in metrics],
    "initial_val_acc": summary.get("initial_val_acc"),
    "run_seconds": summary["seconds"],
}
write_json(out, result)
print(f"    wrote {out}")
sys.exit(0 if abs(error) <= tol else f"    FAIL: measured peak is {error:+.1%} off the prediction (tolerance +-{tol:.0%})")
PY
