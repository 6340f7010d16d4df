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
                     writable /work volume, `profile` (if implemented), image size, no torch
                     (ENGINE=portable)
  6. run (guarded)   host: edge-trady plan (against the container's profile) + export ->
                     /work/artifact; container (--memory 1g): edge-trady run /work/artifact
                     --train fashion-mnist:/work/data --per-class 20 --epochs 2 --out /work/run;
                     then metrics.jsonl: last train loss < first, units_used <= budget_units.
                     Enabled with --with-run (or WITH_RUN=1).
  7. health + crash  (--with-resume) the compose.yaml command under --restart on-failure, with
                     the image's HEALTHCHECK at a 2 s interval: healthy while it trains; SIGSTOP
                     -> unhealthy (heartbeat too old), SIGCONT -> healthy; then SIGKILL mid-run
                     from the host, docker restarts it, it resumes and finishes with exit 0
  7b. systemd unit   (--with-resume) the ExecStart of deploy/edge-trady-run.service (with the
                     unit's Environment=, paths mapped to /work) run twice in the container: a
                     fresh start with --resume, then the finished run again: exit 0 and no file
                     of the run folder changed (content and mtime)
  8. compose         (--with-resume) deploy/compose.yaml for real (`docker compose`, else
                     Debian's docker-compose): checks read-only root, cap_drop ALL,
                     no-new-privileges, artifact + data read-only, CPU and memory limits; the
                     exit hook (EDGE_TRADY_ON_EXIT); `stop` mid-run -> exit 130 + hook; `up`
                     -> resumes, exit 0 + hook; `up` on the finished run -> exit 0, no file
                     changed

Options:
  --engine portable|ort|torch|none  image flavour (default: portable)
  --arch amd64|arm64       image architecture (default: amd64). arm64 builds and runs the
                           image through qemu (binfmt_misc, registered while the script runs):
                           the Raspberry Pi image. Slow (emulated pip, numpy and ORT)
  --tag NAME               image tag (default: edge-trady:<engine>-test)
  --base IMAGE             base image (default: edge-trady-base:bookworm, built if missing;
                           e.g. python:3.11-slim if a registry is reachable)
  --memory SIZE            hard memory limit for the test containers (default: 1g)
  --with-run               enable step 6 (plan + export on the host, run in the container)
  --with-resume            also steps 7, 7b and 8 (implies --with-run)
  --artifact DIR           use this existing artifact for step 6 instead of exporting one
  --no-cache               docker build --no-cache
  --base-only              only steps 1-2 (prepare the cache)
  -h, --help               this help

Environment: EDGE_TRADY_CACHE (default ~/.cache/edge-trady), WITH_RUN=1, PLAN_CMD and
EXPORT_CMD (host commands of step 6, see the script), RUN_ARGS (extra `edge-trady run` args),
BUILD_ARGS (extra `docker build` args), COMPOSE (compose command, default: `docker compose` if
it works, else docker-compose).
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
# $PLAN_ENGINE: the image's engine (ort for ENGINE=ort, else portable).
PLAN_CMD=${PLAN_CMD:-'edge-trady plan --model efficientnet-lite0 --image-size 32 --engine "$PLAN_ENGINE" --lr 0.02 --profile "$WORK/profile.json" --data "fashion-mnist:$WORK/data" --per-class 20 --epochs 2 -o "$PLAN"'}
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
PLAN_ENGINE=${PLAN_ENGINE:-$([ "$ENGINE" = ort ] && echo ort || echo portable)}
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
# emulated arm64: a Raspberry Pi 4's /proc/cpuinfo (see et_arm_cpuinfo: onnxruntime under qemu)
EMU=()
if [ "$ARCH" = arm64 ]; then
    et_arm_cpuinfo "$ET_CACHE/arm64/cpuinfo"
    EMU=(-v "$ET_CACHE/arm64/cpuinfo:/proc/cpuinfo:ro")
fi
DRUN=(docker run --rm --memory "$MEMORY" --memory-swap "$MEMORY" "${EMU[@]}" -v "$WORK:/work")

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
    if [ "$ENGINE" = portable ]; then
        out=$("${DRUN[@]}" --network none --entrypoint python "$TAG" -c "import torch" 2>&1) &&
            et_die "ENGINE=portable: torch is importable in the image"
        et_info "import torch in the image: fails, as it must ($(echo "$out" | tail -n 1))"
        out=$("${DRUN[@]}" --network none --entrypoint python "$TAG" -c \
            "import onnxruntime as o; print('onnxruntime', o.__version__, end=' '); import onnxruntime.training" 2>&1) &&
            et_die "ENGINE=portable: onnxruntime.training is importable in the image"
        et_info "${out%%$'\n'*}; import onnxruntime.training fails, as it must"
    fi
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
    export WORK ARTIFACT_DIR PLAN PLAN_ENGINE
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

# ----- 7, 7b, 8: (guarded) health, crash/resume, systemd unit, compose -------------------------
RESUME_RESULT="skipped (enable with --with-resume)"
UNIT_RESULT="skipped (enable with --with-resume)"
COMPOSE_RESULT="skipped (enable with --with-resume)"

# fingerprint DIR : one line per file (path, size, mtime, sha256), to prove a restart changed nothing
fingerprint() {
    "$ET_PYTHON" - "$1" <<'PY'
import hashlib, os, sys
root = sys.argv[1]
for folder, _, files in sorted(os.walk(root)):
    for name in sorted(files):
        path = os.path.join(folder, name)
        st = os.stat(path)
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        print(os.path.relpath(path, root), st.st_size, st.st_mtime_ns, digest)
PY
}

# same_files BEFORE AFTER WHAT : a failure (listed in the report, exit 1 at the end; the other
# steps still run) when a file of the finished run changed
FAILURES=()
same_files() {
    if ! diff -q "$1" "$2" >/dev/null; then
        { diff "$1" "$2" || true; } | sed 's/^/    /' >&2
        et_warn "FAIL: $3 changed files of the finished run (above: < before, > after)"
        FAILURES+=("$3 changed $({ diff "$1" "$2" || true; } | grep -c '^>') of the $(wc -l <"$1") files of the finished run")
        return
    fi
    et_info "$3: exit 0, none of the $(wc -l <"$1") files of the run folder changed"
}

# the runner command of compose.yaml as sh sees it ($$ -> $)
compose_command() {
    "$ET_PYTHON" -c 'import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))["services"]["runner"]["command"]
print((c[0] if isinstance(c, list) else c).replace("$$", "$"))' "$ET_REPO/deploy/compose.yaml" ||
        et_die "cannot read the runner command from deploy/compose.yaml (needs PyYAML)"
}

runner_pid() {   # host pid of `edge-trady run` in container $1
    docker top "$1" -eo pid,args | awk '/edge-trady run/ && !/sh -c/ && !/with-exit-hook/ {print $1}' | head -n 1
}

wait_for() {   # wait_for SECONDS WHAT CMD... : until CMD succeeds
    local limit=$1 what=$2 i
    shift 2
    for i in $(seq 1 "$((limit * 2))"); do
        "$@" && return 0
        sleep 0.5
    done
    et_die "timed out after ${limit}s waiting for $what"
}
health_is() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$1")" = "$2" ]; }
epochs_done() { [ "$(cat "$1/metrics.jsonl" 2>/dev/null | wc -l)" -ge "$2" ]; }
exited() { [ "$(docker inspect -f '{{.State.Status}}' "$1")" = exited ]; }

resume_test() {
    local name=edge-trady-resume-test cmd pid state restarts lines t0
    cmd=$(compose_command)
    rm -rf "$WORK/run"
    docker rm -f "$name" >/dev/null 2>&1 || true
    ET_CLEANUP+=("docker rm -f $name >/dev/null 2>&1")
    # the image's HEALTHCHECK command, checked every 2 s; a heartbeat older than 15 s is unhealthy
    docker run -d --name "$name" --init --memory "$MEMORY" --memory-swap "$MEMORY" \
        --restart on-failure:5 --network none "${EMU[@]}" -v "$WORK:/work" \
        --health-interval 2s --health-retries 1 --health-timeout 30s --health-start-period 0s \
        -e EDGE_TRADY_HEALTH_MAX_AGE=15s \
        -e EDGE_TRADY_TRAIN=fashion-mnist:/work/data \
        -e "EDGE_TRADY_ARGS=--per-class $PER_CLASS --epochs $RESUME_EPOCHS --checkpoint-every 3" \
        --entrypoint /bin/sh "$TAG" -c "$cmd" >/dev/null
    wait_for 240 "healthy" health_is "$name" healthy
    pid=$(runner_pid "$name")
    [ -n "$pid" ] || et_die "runner process not found in $name"
    et_info "health: healthy while training ($(docker exec "$name" edge-trady health))"
    kill -STOP "$pid"
    t0=$(date +%s)
    wait_for 90 "unhealthy after SIGSTOP" health_is "$name" unhealthy
    HEALTH_STOP_S=$(($(date +%s) - t0))
    et_info "health: SIGSTOP -> unhealthy after ${HEALTH_STOP_S}s ($(docker exec "$name" edge-trady health || true))"
    kill -CONT "$pid"
    wait_for 120 "healthy after SIGCONT" health_is "$name" healthy
    et_info "health: SIGCONT -> healthy again"
    wait_for 240 "2 finished epochs" epochs_done "$WORK/run" 2
    pid=$(runner_pid "$name")
    et_info "after $(wc -l <"$WORK/run/metrics.jsonl") epochs: SIGKILL to the runner (host pid $pid)"
    kill -9 "$pid"
    for _ in $(seq 1 300); do
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
# must exit 0 at once and change no file.
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
        [ "$i" = 1 ] || fingerprint "$WORK/run-systemd" >"$TMP/systemd-before"
        "${DRUN[@]}" --network none "${envs[@]}" --entrypoint "${args[0]}" "$TAG" "${args[@]:1}" \
            >"$TMP/systemd-$i.log" 2>&1 || { tail -n 20 "$TMP/systemd-$i.log" >&2; et_die "unit command, start $i failed"; }
        n=$(wc -l <"$WORK/run-systemd/metrics.jsonl")
        et_info "start $i: exit 0, $n epoch records$(grep -i -m1 'resum\|finished' "$TMP/systemd-$i.log" | sed 's/^/, runner: /')"
        [ "$n" = "$EPOCHS" ] || et_die "expected $EPOCHS epoch records after start $i, got $n"
    done
    fingerprint "$WORK/run-systemd" >"$TMP/systemd-after"
    same_files "$TMP/systemd-before" "$TMP/systemd-after" "start 2 (systemd unit, finished run)"
}

# 8: compose.yaml for real, on its own work folder (artifact and data copied from step 6)
compose_test() {
    local cwork="$ET_CACHE/compose-work" c cid hard mounts status
    if [ -n "${COMPOSE:-}" ]; then
        read -r -a c <<<"$COMPOSE"
    elif docker compose version >/dev/null 2>&1; then
        c=(docker compose)
    else
        et_need docker-compose
        c=(docker-compose)
    fi
    et_info "compose: ${c[*]} ($("${c[@]}" version 2>/dev/null | head -n 1))"
    c+=(-p edge-trady-test -f "$ET_REPO/deploy/compose.yaml")
    if [ "$ARCH" = arm64 ]; then   # the emulated device's /proc/cpuinfo, as for docker run
        printf 'services:\n  runner:\n    volumes:\n      - %s:/proc/cpuinfo:ro\n' "$ET_CACHE/arm64/cpuinfo" >"$TMP/compose.arm64.yaml"
        c+=(-f "$TMP/compose.arm64.yaml")
    fi
    rm -rf "$cwork"
    mkdir -p "$cwork/hooks"
    cp -r "$WORK/artifact" "$WORK/data" "$cwork/"
    printf '#!/bin/sh\necho "$@" >> /work/hook.log\n' >"$cwork/hooks/on-exit"
    chmod 0755 "$cwork/hooks/on-exit"
    chown -R 10001:10001 "$cwork" 2>/dev/null || chmod -R a+rwX "$cwork"
    export EDGE_TRADY_WORK="$cwork" EDGE_TRADY_IMAGE="$TAG" EDGE_TRADY_MEMORY="$MEMORY" EDGE_TRADY_CPUS=1.5
    export EDGE_TRADY_ON_EXIT=/work/hooks/on-exit
    export EDGE_TRADY_ARGS="--per-class $PER_CLASS --epochs $RESUME_EPOCHS --checkpoint-every 3"
    ET_CLEANUP+=("${c[*]} down >/dev/null 2>&1")
    "${c[@]}" up -d --no-build runner 2>&1 | sed 's/^/    compose: /' >&2
    cid=$("${c[@]}" ps -q runner)
    hard=$(docker inspect -f 'read-only root {{.HostConfig.ReadonlyRootfs}}, cap_drop {{.HostConfig.CapDrop}}, security_opt {{.HostConfig.SecurityOpt}}, cpus {{.HostConfig.NanoCpus}}, memory {{.HostConfig.Memory}}/{{.HostConfig.MemorySwap}}, network {{.HostConfig.NetworkMode}}, init {{.HostConfig.Init}}' "$cid")
    mounts=$(docker inspect -f '{{range .Mounts}}{{.Destination}}={{if .RW}}rw{{else}}ro{{end}} {{end}}' "$cid")
    et_info "container: $hard"
    et_info "mounts: $mounts"
    case "$hard" in "read-only root true, cap_drop [ALL], security_opt [no-new-privileges:true], cpus 1500000000,"*"network none, init true") ;;
        *) et_die "compose container is not hardened as compose.yaml says: $hard" ;; esac
    for m in /work=rw /work/artifact=ro /work/data=ro; do
        case " $mounts" in *" $m "*) ;; *) et_die "mount $m missing: $mounts" ;; esac
    done
    wait_for 240 "1 finished epoch (compose)" epochs_done "$cwork/run" 1
    "${c[@]}" stop runner 2>&1 | sed 's/^/    compose: /' >&2
    status=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
    et_info "stop mid-run: exit $status; hook: $(tail -n 1 "$cwork/hook.log")"
    [ "$status" = 130 ] || et_die "compose stop: expected exit 130 (checkpoint, stopped), got $status"
    [ "$(tail -n 1 "$cwork/hook.log")" = "/work/run 130 success" ] || et_die "hook not called with the stop"
    "${c[@]}" up -d --no-build runner 2>&1 | sed 's/^/    compose: /' >&2
    cid=$("${c[@]}" ps -q runner)
    wait_for 600 "the resumed run to end (compose)" exited "$cid"
    status=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
    et_info "up again: $(docker logs "$cid" 2>&1 | grep -i 'resuming at' | tail -n 1), exit $status, $(wc -l <"$cwork/run/metrics.jsonl") epoch records; hook: $(tail -n 1 "$cwork/hook.log")"
    [ "$status" = 0 ] || et_die "the resumed compose run exited $status"
    [ "$(tail -n 1 "$cwork/hook.log")" = "/work/run 0 success" ] || et_die "hook not called with the end of the run"
    [ "$(wc -l <"$cwork/run/metrics.jsonl")" = "$RESUME_EPOCHS" ] || et_die "expected $RESUME_EPOCHS epoch records"
    et_check_metrics "$cwork/run"
    fingerprint "$cwork/run" >"$TMP/compose-before"
    "${c[@]}" up -d --no-build runner 2>&1 | sed 's/^/    compose: /' >&2
    cid=$("${c[@]}" ps -q runner)
    wait_for 120 "the finished run to exit again (compose)" exited "$cid"
    status=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
    [ "$status" = 0 ] || et_die "compose up on the finished run exited $status"
    fingerprint "$cwork/run" >"$TMP/compose-after"
    same_files "$TMP/compose-before" "$TMP/compose-after" "compose up on the finished run"
    "${c[@]}" down 2>&1 | sed 's/^/    compose: /' >&2
}

if [ "$WITH_RESUME" = 1 ]; then
    et_step "7. health (HEALTHCHECK, SIGSTOP) + crash + restart + resume (compose.yaml command, --restart on-failure)"
    et_timed "health + crash/resume (container)" resume_test
    et_check_metrics "$WORK/run"
    RESUME_RESULT="ok (healthy -> SIGSTOP -> unhealthy in ${HEALTH_STOP_S}s -> SIGCONT -> healthy; SIGKILL mid-run -> docker restart -> --resume -> exit 0)"
    et_step "7b. systemd unit command (deploy/edge-trady-run.service ExecStart) in the container"
    et_timed "systemd unit command x2 (container)" systemd_unit_test
    et_check_metrics "$WORK/run-systemd"
    UNIT_RESULT="ok (ExecStart: fresh start with --resume; start 2 on the finished run: exit 0$([ ${#FAILURES[@]} = 0 ] && echo ', no file changed' || echo ', FILES CHANGED'))"
    et_step "8. compose.yaml for real (hardening, exit hook, stop/up, finished run)"
    et_timed "compose (stop, up, up)" compose_test
    COMPOSE_RESULT="ok (hardened; stop -> 130 + hook; up -> resumed, 0 + hook; up on the finished run: 0$(printf '%s\n' "${FAILURES[@]}" | grep -q compose && echo ', FILES CHANGED' || echo ', no file changed'))"
fi

# ----- report --------------------------------------------------------------------------------
et_step "report"
cat <<EOF
  image          $TAG  ($SIZE_MB MB; base $BASE_MB MB; target < 150 MB for portable)
  engine         $ENGINE
  user           non-root (uid $("${DRUN[@]}" --network none --entrypoint id "$TAG" -u))
  memory limit   --memory $MEMORY --memory-swap $MEMORY
  profile        $PROFILE_RESULT
  run            $RUN_RESULT
  crash/resume   $RESUME_RESULT
  systemd unit   $UNIT_RESULT
  compose        $COMPOSE_RESULT
  work volume    $WORK
  build log      $BUILD_LOG
EOF
if [ ${#FAILURES[@]} -gt 0 ]; then
    printf '  FAILED         %s\n' "${FAILURES[@]}"
    exit 1
fi
