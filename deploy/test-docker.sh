#!/usr/bin/env bash
# Build the edge-trady device image and smoke-test it under a hard 1 GiB memory limit.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/test-docker.sh [options]

Builds the device image from the top-level Dockerfile on a locally built Debian base image
(no registry needed), then runs it the way a Pi/Jetson would: non-root, --memory 1g, /work volume.

Steps (each is timed; cached steps are fast on the second run):
  1. dockerd         start one (--iptables=false --bridge=none) if no engine answers
  2. base image      debootstrap bookworm -> docker import edge-trady-base:bookworm (once)
  3. pip config      generated from `pip config list` into a temp dir, served on 127.0.0.1
                     for the build only (never written into the repository or the image)
  4. build           docker build --network host (ENGINE=ort: .[ort], no torch)
  5. checks          --version, non-root user (id -u != 0), memory limit seen by the container,
                     writable /work volume, `profile` (if implemented), image size
  6. run (guarded)   host: edge-trady plan (against the container's profile) + export ->
                     /work/artifact; container (--memory 1g): edge-trady run /work/artifact
                     --train fashion-mnist:/work/data --per-class 20 --epochs 2 --out /work/run;
                     then metrics.jsonl: last train loss < first, units_used <= budget_units.
                     Enabled with --with-run (or WITH_RUN=1).

Options:
  --engine ort|torch|none  image flavour (default: ort; torch with --arch arm64)
  --arch amd64|arm64       image architecture (default: amd64). arm64 builds and runs the
                           image through qemu (binfmt_misc, registered while the script runs):
                           the Raspberry Pi image, ENGINE=torch with the aarch64 torch wheel.
                           Slow (emulated pip and torch import)
  --tag NAME               image tag (default: edge-trady:<engine>-test)
  --base IMAGE             base image (default: edge-trady-base:bookworm, built if missing;
                           e.g. python:3.11-slim if a registry is reachable)
  --memory SIZE            hard memory limit for the test containers (default: 1g)
  --with-run               enable step 6 (plan + export on the host, run in the container)
  --with-resume            also step 7 (implies --with-run): the compose.yaml command under
                           --restart on-failure; the runner is SIGKILLed mid-run from the host,
                           docker restarts it, it must resume (--resume) and finish with exit 0;
                           then 7b: the ExecStart of deploy/edge-trady-run.service (with the
                           unit's Environment=, paths mapped to /work) run twice in the
                           container: a fresh start with --resume, then a no-op resume
  --artifact DIR           use this existing artifact for step 6 instead of exporting one
  --no-cache               docker build --no-cache
  --base-only              only steps 1-2 (prepare the cache)
  -h, --help               this help

Environment: EDGE_TRADY_CACHE (default ~/.cache/edge-trady), WITH_RUN=1, PLAN_CMD and
EXPORT_CMD (host commands of step 6, see the script), RUN_ARGS (extra `edge-trady run` args),
BUILD_ARGS (extra `docker build` args).
EOF
}

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ----- parameters (easy to adjust) -----------------------------------------------------------
ENGINE=
ARCH=amd64
TAG=
BASE=
MEMORY=1g
WITH_RUN=${WITH_RUN:-0}
WITH_RESUME=${WITH_RESUME:-0}
RESUME_EPOCHS=12              # step 7: long enough to be killed mid-run
ARTIFACT=
NO_CACHE=
BASE_ONLY=0
DATA_SRC=${EDGE_TRADY_FMNIST:-/usr/share/datasets/fashion-mnist}
PER_CLASS=20
EPOCHS=2
# Host side of step 6: plan against the profile measured in the container (step 5b, same
# --memory), then export the artifact. $WORK, $PLAN and $ARTIFACT_DIR are set when they run.
# Adjust here (or via the environment) as the workstation CLI evolves.
# The model is the ImageNet-pretrained efficientnet-lite0 (the artifact carries its weights; the
# image needs no model package): it learns clearly in 2 epochs, so "last train loss < first" is
# a real check (natively, seeds 0-2: ~2.2 -> ~1.74, val_acc ~0.55). The ort engine trains every
# candidate channel, hence the lower --lr (0.05 overshoots: the loss rises in epoch 2). The
# random-init mobilenetv2-w0.35 hardly learns in 2 epochs (or diverges at the default lr).
# shellcheck disable=SC2016  # expanded later, by bash -c
PLAN_CMD=${PLAN_CMD:-'edge-trady plan --model efficientnet-lite0 --image-size 32 --engine ort --lr 0.02 --profile "$WORK/profile.json" --data "fashion-mnist:$WORK/data" --per-class 20 --epochs 2 -o "$PLAN"'}
# shellcheck disable=SC2016
EXPORT_CMD=${EXPORT_CMD:-'edge-trady export "$PLAN" -o "$ARTIFACT_DIR"'}
RUN_ARGS=${RUN_ARGS:-}
BUILD_ARGS=${BUILD_ARGS:-}     # extra `docker build` args, e.g. "--build-arg TORCH_SPEC=torch==2.9.1"

while [ $# -gt 0 ]; do
    case "$1" in
        --engine) ENGINE=$2; shift 2 ;;
        --arch) ARCH=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --base) BASE=$2; shift 2 ;;
        --memory) MEMORY=$2; shift 2 ;;
        --with-run) WITH_RUN=1; shift ;;
        --with-resume) WITH_RUN=1; WITH_RESUME=1; shift ;;
        --artifact) ARTIFACT=$(cd "$2" && pwd); WITH_RUN=1; shift 2 ;;
        --no-cache) NO_CACHE=--no-cache; shift ;;
        --base-only) BASE_ONLY=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; et_die "unknown option: $1" ;;
    esac
done
case "$ARCH" in amd64 | arm64) ENGINE=${ENGINE:-portable} ;;
    *) et_die "--arch: amd64 or arm64" ;; esac
LOCAL_BASE="$ET_BASE_IMAGE"
[ "$ARCH" = amd64 ] || LOCAL_BASE="$ET_BASE_IMAGE-$ARCH"
BASE=${BASE:-$LOCAL_BASE}
if [ -z "$TAG" ]; then
    TAG=edge-trady:$ENGINE-test
    [ "$ARCH" = amd64 ] || TAG=edge-trady:$ENGINE-$ARCH-test
fi
WORK="$ET_CACHE/docker-work"   # mounted at /work in the container
BUILD_LOG="$ET_CACHE/logs/docker-build-$ENGINE-$ARCH.log"
trap et_on_exit EXIT

# ----- 1-2: engine and base image ------------------------------------------------------------
et_step "1. docker engine"
et_timed "dockerd" et_dockerd

if [ "$ARCH" != amd64 ]; then
    et_step "1b. binfmt_misc (emulated $ARCH)"
    et_binfmt_aarch64
fi
if [ "$BASE" = "$LOCAL_BASE" ]; then
    et_step "2. base image $BASE"
    et_timed "base image $ARCH (debootstrap + import)" et_base_image "$ARCH"
else
    et_step "2. base image $BASE (not built here)"
    docker image inspect "$BASE" >/dev/null 2>&1 || et_info "not present locally: docker build will pull it"
fi
[ "$BASE_ONLY" = 1 ] && { et_info "--base-only: done"; exit 0; }

# ----- 3: pip configuration for the build ----------------------------------------------------
et_step "3. pip configuration (temporary, from \`pip config list\`)"
TMP=$(mktemp -d)
ET_CLEANUP+=("rm -rf '$TMP'")
et_pip_conf "$TMP/pipconf"
et_pipconf_server "$TMP/pipconf"
ET_CLEANUP+=("kill $ET_PIPCONF_PID 2>/dev/null")
et_info "served at $ET_PIPCONF_URL for the duration of the build"

# ----- 4: build ------------------------------------------------------------------------------
build() {
    local version rev
    version=$(et_project_version)
    rev=$(git -C "$ET_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    # pipefail: the pipeline fails if docker build fails (the filter never does)
    # shellcheck disable=SC2086
    if ! docker build $NO_CACHE --network host -t "$TAG" \
        --build-arg BASE_IMAGE="$BASE" \
        --build-arg ENGINE="$ENGINE" \
        --build-arg PIP_CONF_URL="$ET_PIPCONF_URL" \
        --build-arg VERSION="$version" \
        --build-arg VCS_REF="$rev" \
        $BUILD_ARGS \
        -f "$ET_REPO/Dockerfile" "$ET_REPO" 2>&1 | tee "$BUILD_LOG" |
        { grep --line-buffered -E '^(Step [0-9]+/[0-9]+ :|#[0-9]+ \[)|Successfully|ERROR|error:|edge-trady, version|^torch ' || true; }
    then
        tail -n 30 "$BUILD_LOG" >&2
        et_die "docker build failed (log: $BUILD_LOG)"
    fi
}
et_step "4. docker build $TAG (engine $ENGINE, base $BASE)"
et_timed "docker build ($ENGINE, $ARCH)" build
kill "$ET_PIPCONF_PID" 2>/dev/null || true

SIZE_BYTES=$(docker image inspect -f '{{.Size}}' "$TAG")
SIZE_MB=$(et_mb "$SIZE_BYTES")
BASE_MB=$(et_mb "$(docker image inspect -f '{{.Size}}' "$BASE" 2>/dev/null || echo 0)")
et_info "image $TAG: $SIZE_MB MB (base $BASE_MB MB)"

# ----- 5: container checks -------------------------------------------------------------------
mkdir -p "$WORK"
chown 10001:10001 "$WORK" 2>/dev/null || chmod 0777 "$WORK"
DRUN=(docker run --rm --memory "$MEMORY" --memory-swap "$MEMORY" -v "$WORK:/work")

checks() {
    local out uid limit user
    out=$("${DRUN[@]}" --network none "$TAG" --version)
    et_info "edge-trady --version: $out"
    user=$(docker image inspect -f '{{.Config.User}}' "$TAG")
    uid=$("${DRUN[@]}" --network none --entrypoint id "$TAG" -u)
    [ "$uid" != 0 ] || et_die "the container runs as root"
    et_info "container user: image USER=$user, id -u=$uid (non-root: ok)"
    limit=$("${DRUN[@]}" --network none --entrypoint sh "$TAG" -c \
        'cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes')
    et_info "memory limit seen inside: $limit bytes (--memory $MEMORY)"
    "${DRUN[@]}" --network none --entrypoint sh "$TAG" -c 'touch /work/.write-test && rm /work/.write-test'
    et_info "/work volume writable by uid $uid: ok"
    et_info "healthcheck: $(docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$TAG")"
}
et_step "5. container checks (--memory $MEMORY, non-root, /work)"
et_timed "container checks" checks

PROFILE_RESULT="skipped (edge-trady profile not implemented yet)"
if et_has_command profile; then
    et_step "5b. edge-trady profile inside the container"
    et_timed "profile (container)" "${DRUN[@]}" --network none "$TAG" profile -o /work/profile.json
    PROFILE_RESULT="ok ($WORK/profile.json)"
else
    et_info "edge-trady profile: not implemented yet, skipped"
fi

# ----- 6: (guarded) plan + export on the host, run in the container -------------------------
RUN_RESULT="skipped (enable with --with-run)"
if [ "$WITH_RUN" = 1 ]; then
    et_step "6. plan + export on the host, edge-trady run in the container (--memory $MEMORY)"
    for c in run $([ -n "$ARTIFACT" ] || echo plan export); do
        et_has_command "$c" || et_die "edge-trady $c is not implemented in this checkout"
    done
    [ -n "$ARTIFACT" ] || [ -f "$WORK/profile.json" ] || et_die "no $WORK/profile.json (step 5b)"
    rm -rf "$WORK/run" "$WORK/artifact"
    mkdir -p "$WORK/data"
    cp -u "$DATA_SRC"/*-ubyte.gz "$WORK/data/"
    ARTIFACT_DIR="$WORK/artifact"
    PLAN="$WORK/plan.json"
    export WORK ARTIFACT_DIR PLAN
    if [ -n "$ARTIFACT" ]; then
        cp -r "$ARTIFACT" "$ARTIFACT_DIR"
    else
        et_info "host: $PLAN_CMD"
        et_timed "plan (host)" bash -c "$PLAN_CMD"
        et_info "host: $EXPORT_CMD"
        et_timed "export (host)" bash -c "$EXPORT_CMD"
    fi
    chown -R 10001:10001 "$WORK" 2>/dev/null || chmod -R a+rwX "$WORK"
    # shellcheck disable=SC2086
    et_timed "run (container, --memory $MEMORY)" "${DRUN[@]}" --network none "$TAG" run /work/artifact \
        --train fashion-mnist:/work/data --per-class "$PER_CLASS" --epochs "$EPOCHS" --out /work/run $RUN_ARGS
    et_step "6b. check $WORK/run/metrics.jsonl"
    et_check_metrics "$WORK/run"
    RUN_RESULT="ok (metrics: $WORK/run/metrics.jsonl)"
fi

# ----- 7: (guarded) crash + restart + resume with the compose.yaml command ------------------
RESUME_RESULT="skipped (enable with --with-resume)"
UNIT_RESULT="skipped (enable with --with-resume)"
resume_test() {
    local name=edge-trady-resume-test cmd pid i state restarts lines
    cmd=$("$ET_PYTHON" -c 'import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))["services"]["runner"]["command"]
print((c[0] if isinstance(c, list) else c).replace("$$", "$"))' "$ET_REPO/deploy/compose.yaml") ||
        et_die "cannot read the runner command from deploy/compose.yaml (needs PyYAML)"
    rm -rf "$WORK/run"
    docker rm -f "$name" >/dev/null 2>&1 || true
    ET_CLEANUP+=("docker rm -f $name >/dev/null 2>&1")
    docker run -d --name "$name" --init --memory "$MEMORY" --memory-swap "$MEMORY" \
        --restart on-failure:5 --network none -v "$WORK:/work" \
        -e EDGE_TRADY_TRAIN=fashion-mnist:/work/data \
        -e "EDGE_TRADY_ARGS=--per-class $PER_CLASS --epochs $RESUME_EPOCHS --checkpoint-every 3" \
        --entrypoint /bin/sh "$TAG" -c "$cmd" >/dev/null
    for i in $(seq 1 240); do   # wait for 2 finished epochs
        [ "$(cat "$WORK/run/metrics.jsonl" 2>/dev/null | wc -l)" -ge 2 ] && break
        sleep 0.5
    done
    pid=$(docker top "$name" -eo pid,args | awk '/edge-trady run/ && !/sh -c/ {print $1}' | head -n 1)
    [ -n "$pid" ] || et_die "runner process not found in $name"
    et_info "after $(wc -l <"$WORK/run/metrics.jsonl") epochs: SIGKILL to the runner (host pid $pid)"
    kill -9 "$pid"
    for i in $(seq 1 300); do
        state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}' "$name")
        restarts=${state##* }
        [ "$restarts" -ge 1 ] && [ "${state%% *}" = exited ] && break
        sleep 1
    done
    lines=$(wc -l <"$WORK/run/metrics.jsonl")
    et_info "container: restarts $restarts, final state '${state% *}', $lines epoch records"
    docker logs "$name" 2>&1 | grep -i 'resum' | sed 's/^/    runner: /' >&2 || true
    [ "$restarts" -ge 1 ] || et_die "docker did not restart the container"
    [ "$state" = "exited 0 $restarts" ] || et_die "the resumed run did not finish with exit 0 ($state)"
    [ "$lines" = "$RESUME_EPOCHS" ] || et_die "expected $RESUME_EPOCHS epoch records, got $lines"
    docker rm -f "$name" >/dev/null
}

# 7b: the systemd unit's command line, as systemd would run it: continuation lines joined, $$ -> $,
# split into argv (/bin/sh -c '...'), with the unit's Environment= values and the paths mapped
# into /work. First start: no checkpoint, --resume starts fresh; second start: the finished run
# is resumed (nothing left to do) and exits 0 without adding epochs.
systemd_unit_test() {
    local out=/work/run-systemd argv_file i n
    argv_file="$TMP/systemd-argv"
    # the unit's Environment= defaults, with the device paths mapped into the container
    "$ET_PYTHON" - "$ET_REPO/deploy/edge-trady-run.service" EDGE_TRADY_BIN=/opt/venv/bin/edge-trady \
        ARTIFACT=/work/artifact TRAIN=fashion-mnist:/work/data OUT=$out >"$argv_file" <<'PY' ||
import re, shlex, sys
text = re.sub(r"\\\n\s*", " ", open(sys.argv[1]).read())  # continuation lines
lines = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
exec_start = [l.split("=", 1)[1] for l in lines if l.startswith("ExecStart=")]
env = [l.split("=", 1)[1] for l in lines if l.startswith("Environment=")]
assert len(exec_start) == 1, exec_start
values = dict(w.split("=", 1) for w in shlex.split(" ".join(env)))  # Environment="K=V" K=V ...
values.update(w.split("=", 1) for w in sys.argv[2:])
for key, value in values.items():
    print(f"ENV\0{key}={value}", end="\0")
for word in shlex.split(exec_start[0].replace("$$", "$")):
    print("ARG\0" + word, end="\0")
PY
        et_die "cannot parse deploy/edge-trady-run.service"
    local envs=() args=() kind word
    while IFS= read -r -d '' kind && IFS= read -r -d '' word; do
        if [ "$kind" = ENV ]; then envs+=(-e "$word"); else args+=("$word"); fi
    done <"$argv_file"
    et_info "ExecStart: ${args[*]}"
    et_info "environment: ${envs[*]}"
    rm -rf "$WORK/run-systemd"
    for i in 1 2; do
        "${DRUN[@]}" --network none "${envs[@]}" --entrypoint "${args[0]}" "$TAG" "${args[@]:1}" \
            >"$TMP/systemd-$i.log" 2>&1 || { tail -n 20 "$TMP/systemd-$i.log" >&2; et_die "unit command, start $i failed"; }
        n=$(wc -l <"$WORK/run-systemd/metrics.jsonl")
        et_info "start $i: exit 0, $n epoch records$(grep -i -m1 'resum' "$TMP/systemd-$i.log" | sed 's/^/, runner: /')"
        [ "$n" = "$EPOCHS" ] || et_die "expected $EPOCHS epoch records after start $i, got $n"
    done
}

if [ "$WITH_RESUME" = 1 ]; then
    et_step "7. crash + restart + resume (compose.yaml command, --restart on-failure)"
    et_timed "crash/resume (container)" resume_test
    et_check_metrics "$WORK/run"
    RESUME_RESULT="ok (SIGKILL mid-run -> docker restart -> --resume -> exit 0)"
    et_step "7b. systemd unit command (deploy/edge-trady-run.service ExecStart) in the container"
    et_timed "systemd unit command x2 (container)" systemd_unit_test
    et_check_metrics "$WORK/run-systemd"
    UNIT_RESULT="ok (ExecStart: fresh start with --resume, then resume of the finished run)"
fi

# ----- report --------------------------------------------------------------------------------
et_step "report"
cat <<EOF
  image          $TAG  ($SIZE_MB MB; base $BASE_MB MB; target < 300 MB for ort)
  engine         $ENGINE
  user           non-root (uid $("${DRUN[@]}" --network none --entrypoint id "$TAG" -u))
  memory limit   --memory $MEMORY --memory-swap $MEMORY
  profile        $PROFILE_RESULT
  run            $RUN_RESULT
  crash/resume   $RESUME_RESULT
  systemd unit   $UNIT_RESULT
  work volume    $WORK
  build log      $BUILD_LOG
EOF
