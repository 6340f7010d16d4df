#!/usr/bin/env bash
# Copy a training artifact (and optionally data) to a device and start `edge-trady run` there.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/push-and-run.sh [options] ARTIFACT_DIR|PLAN.json USER@HOST

Copies the job to the device, starts it in the background over ssh and prints how to follow it.
The device needs edge-trady installed (venv, systemd unit or Docker).
  ARTIFACT_DIR  (from `edge-trady export`)  -> `edge-trady run` (portable runner, plain ONNX
                Runtime: x86_64 and arm64, e.g. Raspberry Pi)
  PLAN.json     (from `edge-trady plan --engine torch-sparse`)
                -> `edge-trady finetune --plan --engine torch-sparse` (PyTorch: Jetson GPUs)

Modes (--mode):
  nohup    (default) `nohup edge-trady run|finetune ... &` in REMOTE_DIR; log in REMOTE_DIR/run.log
  systemd  copies to /var/lib/edge-trady (sudo), restarts the edge-trady-run unit
           (deploy/edge-trady-run.service must be installed, for a plan with the finetune
           drop-in from deploy/README.md; the unit always passes --resume)
  docker   `docker compose up -d runner` (artifact) or `--profile torch up -d finetune` (plan)
           with deploy/compose.yaml copied to REMOTE_DIR

Options:
  --data DIR          also copy a data folder (e.g. the Fashion-MNIST *-ubyte.gz files)
  --remote-dir DIR    working folder on the device (default: ~/edge-trady; systemd: /var/lib/edge-trady)
  --train SPEC        --train value for nohup mode, relative to REMOTE_DIR
                      (default: fashion-mnist:data)
  --run-args "ARGS"   extra `edge-trady run` args (default: "--per-class 20 --epochs 2")
  --bin PATH          edge-trady on the device (default: edge-trady; e.g. ~/venv/bin/edge-trady)
  --resume            continue the run in REMOTE_DIR/run from its last checkpoint (nohup mode)
  --engine ENGINE     finetune engine for a plan (default: torch-sparse)
  --mode MODE         nohup | systemd | docker
  --ssh-opts "OPTS"   extra ssh options, e.g. "-p 2222 -i ~/.ssh/pi"
  --dry-run           print the commands instead of running them
  -h, --help          this help

Example:
  deploy/push-and-run.sh --data ~/datasets/fashion-mnist runs/export pi@raspberrypi.local
EOF
}

MODE="nohup"
DATA=
REMOTE_DIR=
TRAIN=
RUN_ARGS="--per-class 20 --epochs 2"
BIN=edge-trady
RESUME=
ENGINE=torch-sparse
SSH_OPTS=
DRY=0
POS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --data) DATA=$2; shift 2 ;;
        --remote-dir) REMOTE_DIR=$2; shift 2 ;;
        --train) TRAIN=$2; shift 2 ;;
        --run-args) RUN_ARGS=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --resume) RESUME=--resume; shift ;;
        --engine) ENGINE=$2; shift 2 ;;
        --mode) MODE=$2; shift 2 ;;
        --ssh-opts) SSH_OPTS=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; echo "unknown option: $1" >&2; exit 2 ;;
        *) POS+=("$1"); shift ;;
    esac
done
[ "${#POS[@]}" = 2 ] || { usage >&2; exit 2; }
JOB=${POS[0]%/}
TARGET=${POS[1]}
if [ -d "$JOB" ]; then KIND=artifact; elif [ -f "$JOB" ]; then KIND=plan;
else echo "neither an artifact folder nor a plan file: $JOB" >&2; exit 2; fi
[ -z "$DATA" ] || [ -d "$DATA" ] || { echo "not a folder: $DATA" >&2; exit 2; }
case "$MODE" in nohup | docker) REMOTE_DIR=${REMOTE_DIR:-edge-trady} ;; systemd) REMOTE_DIR=${REMOTE_DIR:-/var/lib/edge-trady} ;;
    *) echo "unknown --mode $MODE" >&2; exit 2 ;; esac
DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

say() { printf '==> %s\n' "$*" >&2; }
run() {
    if [ "$DRY" = 1 ]; then printf '    %q' "$@" >&2; echo >&2; else "$@"; fi
}
# shellcheck disable=SC2086
rsh() { run ssh $SSH_OPTS "$TARGET" "$@"; }
copy() { # copy SRC_DIR REMOTE_DEST (rsync if both sides have it, else scp -r)
    if command -v rsync >/dev/null && { [ "$DRY" = 1 ] || rsh 'command -v rsync >/dev/null'; }; then
        run rsync -az --delete --info=progress2 -e "ssh $SSH_OPTS" "$1/" "$TARGET:$2/"
    else
        rsh "rm -rf '$2' && mkdir -p '$(dirname "$2")'"
        # shellcheck disable=SC2086
        run scp -rq $SSH_OPTS "$1" "$TARGET:$2"
    fi
}

# systemd mode writes to a root-owned folder: stage in the home folder, then sudo move.
STAGE=$REMOTE_DIR
[ "$MODE" = systemd ] && STAGE=edge-trady-upload
say "preparing $TARGET:$STAGE"
rsh "mkdir -p '$STAGE'"
if [ "$KIND" = artifact ]; then
    say "copying artifact $JOB -> $TARGET:$STAGE/artifact"
    copy "$JOB" "$STAGE/artifact"
else
    say "copying plan $JOB -> $TARGET:$STAGE/plan.json"
    # shellcheck disable=SC2086
    run scp -q $SSH_OPTS "$JOB" "$TARGET:$STAGE/plan.json"
fi
if [ -n "$DATA" ]; then
    say "copying data $DATA -> $TARGET:$STAGE/data"
    copy "$DATA" "$STAGE/data"
fi
# nohup runs in REMOTE_DIR, so a relative data path works; systemd/docker use their own settings
# (TRAIN in /etc/edge-trady/run.env, EDGE_TRADY_TRAIN for compose).
TRAIN=${TRAIN:-fashion-mnist:data}

case "$MODE" in
nohup)
    if [ "$KIND" = artifact ]; then
        JOBCMD="$BIN run artifact --train '$TRAIN' $RUN_ARGS --out run $RESUME"
    else
        JOBCMD="$BIN finetune --plan plan.json --data '$TRAIN' --engine $ENGINE $RUN_ARGS --out run $RESUME"
    fi
    say "starting (nohup) in $TARGET:$REMOTE_DIR: $JOBCMD"
    rsh "cd '$REMOTE_DIR' || exit 1; nohup $JOBCMD \
        > run.log 2>&1 < /dev/null & echo \$! > run.pid && echo \"    pid \$(cat run.pid)\""
    cat <<EOF

Follow the run:   ssh $SSH_OPTS $TARGET 'tail -f $REMOTE_DIR/run.log'
Per-epoch lines:  ssh $SSH_OPTS $TARGET 'cat $REMOTE_DIR/run/metrics.jsonl'
Stop (checkpoints first): ssh $SSH_OPTS $TARGET 'kill \$(cat $REMOTE_DIR/run.pid)'
Continue later:   the same push-and-run.sh command with --resume
Collect results:  rsync -az $TARGET:$REMOTE_DIR/run/ ./run-from-device/
EOF
    ;;
systemd)
    say "installing into $REMOTE_DIR and (re)starting edge-trady-run.service"
    rsh "sudo mkdir -p '$REMOTE_DIR' && sudo rm -rf '$REMOTE_DIR/artifact' '$REMOTE_DIR/plan.json' \
        && sudo cp -r '$STAGE'/$([ "$KIND" = artifact ] && echo artifact || echo plan.json) '$REMOTE_DIR/' \
        && { [ ! -d '$STAGE/data' ] || { sudo rm -rf '$REMOTE_DIR/data' && sudo cp -r '$STAGE/data' '$REMOTE_DIR/'; }; } \
        && sudo chown -R trady:trady '$REMOTE_DIR' && rm -rf '$STAGE' \
        && sudo systemctl restart edge-trady-run && systemctl --no-pager status edge-trady-run | head -n 5"
    cat <<EOF

Follow the run:   ssh $SSH_OPTS $TARGET 'journalctl -u edge-trady-run -f'
Per-epoch lines:  ssh $SSH_OPTS $TARGET 'cat $REMOTE_DIR/run/metrics.jsonl'
Stop (checkpoints first): ssh $SSH_OPTS $TARGET 'sudo systemctl stop edge-trady-run'
Collect results:  rsync -az --rsync-path='sudo rsync' $TARGET:$REMOTE_DIR/run/ ./run-from-device/
EOF
    ;;
docker)
    say "copying compose.yaml and starting docker compose in $TARGET:$REMOTE_DIR"
    # shellcheck disable=SC2086
    run scp -q $SSH_OPTS "$DEPLOY/compose.yaml" "$TARGET:$REMOTE_DIR/compose.yaml"
    SERVICE="up -d --no-build runner"
    [ "$KIND" = plan ] && SERVICE="--profile torch up -d --no-build finetune"
    rsh "cd '$REMOTE_DIR' && mkdir -p run && sudo chown -R 10001:10001 run \$(ls -d artifact plan.json data 2>/dev/null) \
        && EDGE_TRADY_WORK=. EDGE_TRADY_TRAIN='fashion-mnist:/work/data' EDGE_TRADY_ARGS='$RUN_ARGS' \
           docker compose $SERVICE"
    cat <<EOF

(The image must exist on the device: build it there, or docker save | ssh $TARGET docker load.)
Follow the run:   ssh $SSH_OPTS $TARGET 'cd $REMOTE_DIR && docker compose logs -f'  (service ${SERVICE##* })
Stop (checkpoints first): ssh $SSH_OPTS $TARGET 'cd $REMOTE_DIR && docker compose stop'
Collect results:  rsync -az $TARGET:$REMOTE_DIR/run/ ./run-from-device/
EOF
    ;;
esac
