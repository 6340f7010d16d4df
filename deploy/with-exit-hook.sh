#!/bin/sh
# edge-trady-with-exit-hook RUN_DIR COMMAND [ARG...]   (in the image: /usr/local/bin)
#
# Runs COMMAND (e.g. `edge-trady run ... --out RUN_DIR --resume`). When it ends, for any reason,
# runs the user hook named by $EDGE_TRADY_ON_EXIT (if set) as
#     "$EDGE_TRADY_ON_EXIT" RUN_DIR STATUS RESULT
# STATUS is COMMAND's exit status (see `edge-trady --help`: 0 done, 130 stopped by a signal after
# a checkpoint, ...; 128+N when killed by signal N, e.g. 137 for SIGKILL or the OOM killer);
# RESULT is success (0, or 130: a clean stop), exit-code or signal, as systemd's $SERVICE_RESULT
# with the unit's SuccessExitStatus=130 (the systemd unit calls the same hook from ExecStopPost=). Then exits with COMMAND's status, so restart policies and
# `docker compose ps` see it. SIGTERM and SIGINT are passed on to COMMAND (it checkpoints and
# stops). Without $EDGE_TRADY_ON_EXIT, COMMAND simply replaces this script.
set -u
[ $# -ge 2 ] || { echo "usage: edge-trady-with-exit-hook RUN_DIR COMMAND [ARG...]" >&2; exit 2; }
run_dir=$1
shift
hook=${EDGE_TRADY_ON_EXIT:-}
[ -n "$hook" ] || exec "$@"

"$@" <&0 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM
trap 'kill -INT "$pid" 2>/dev/null' INT
while :; do
    wait "$pid"
    status=$?
    kill -0 "$pid" 2>/dev/null || break # still running: the wait was cut short by a signal
done
case $status in
    0 | 130) result=success ;;
    129 | 13[1-9] | 14[0-9] | 15[0-9]) result=signal ;;
    *) result=exit-code ;;
esac
"$hook" "$run_dir" "$status" "$result" || echo "edge-trady-with-exit-hook: $hook exited with status $?" >&2
exit "$status"
