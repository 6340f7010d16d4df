# shellcheck shell=bash
# Shared helpers for the deploy/ scripts. Source it, do not run it.
#
# Everything heavy (debootstrap roots, wheel sites, the docker base image) lives in a cache
# outside the repository:  ${EDGE_TRADY_CACHE:-$HOME/.cache/edge-trady}
#
#   amd64/rootfs/          debootstrap'd Debian bookworm (python3, venv) -> docker image
#   amd64/base.id          id of the imported image (edge-trady-base:bookworm)
#   arm64/root/            Debian bookworm arm64 root with python3.11 (run with qemu-aarch64-static)
#   arm64/wheels/          downloaded aarch64 wheels (torch, numpy, ...)
#   arm64/root/opt/edge-trady/site/   the wheels, installed (PYTHONPATH)
#   logs/                  logs of the long steps
#
# Nothing here writes pip configuration (index URLs, mirrors, certificates) into the repository:
# it is read from `pip config list` at run time and written to a temporary directory.

ET_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ET_CACHE="${EDGE_TRADY_CACHE:-$HOME/.cache/edge-trady}"
ET_SUITE="${EDGE_TRADY_SUITE:-bookworm}"
# Optional Debian mirror for debootstrap (default: debootstrap's own default).
ET_DEBIAN_MIRROR="${EDGE_TRADY_DEBIAN_MIRROR:-}"
ET_BASE_IMAGE="${EDGE_TRADY_BASE_IMAGE:-edge-trady-base:${ET_SUITE}}"
ET_PYTHON="${PYTHON:-python3}"

# ---------------------------------------------------------------------------------------------
# logging and timing
# ---------------------------------------------------------------------------------------------
ET_T0=$(date +%s)
ET_TIMINGS=()

et_step() { printf '\n\033[1m==> [%s] %s\033[0m\n' "$(date +%H:%M:%S)" "$*" >&2; }
et_info() { printf '    %s\n' "$*" >&2; }
et_warn() { printf '\033[33mWARN: %s\033[0m\n' "$*" >&2; }
et_die() { printf '\033[31mERROR: %s\033[0m\n' "$*" >&2; exit 1; }

# et_timed LABEL CMD...   run CMD, remember how long it took (printed by et_timings).
# No `|| rc=$?` here on purpose: that would switch off `set -e` inside CMD. A failing step
# ends the script; the EXIT trap (et_on_exit) reports it with its elapsed time.
et_timed() {
    ET_CUR_STEP=$1
    ET_CUR_T=$(date +%s)
    shift
    "$@"
    ET_TIMINGS+=("$(printf '%-46s %5ss' "$ET_CUR_STEP" "$(($(date +%s) - ET_CUR_T))")")
    ET_CUR_STEP=
}

et_timings() {
    local line
    printf '\nTimings (total %ss):\n' "$(($(date +%s) - ET_T0))" >&2
    for line in "${ET_TIMINGS[@]}"; do printf '  %s\n' "$line" >&2; done
}

# Install with: trap et_on_exit EXIT
et_on_exit() {
    local rc=$?
    if [ "$rc" != 0 ] && [ -n "${ET_CUR_STEP:-}" ]; then
        ET_TIMINGS+=("$(printf '%-46s %5ss  FAILED (rc=%s)' "$ET_CUR_STEP" \
            "$(($(date +%s) - ET_CUR_T))" "$rc")")
    fi
    [ "${#ET_TIMINGS[@]}" -gt 0 ] && et_timings
    local f
    for f in "${ET_CLEANUP[@]}"; do eval "$f" || true; done
    return "$rc"
}
ET_CLEANUP=()
ET_CUR_STEP=

et_need() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || et_die "'$c' not found (apt-get install ${ET_PKG_HINT[$c]:-$c})"
    done
}
declare -A ET_PKG_HINT=([debootstrap]=debootstrap [qemu-aarch64-static]=qemu-user-static
    [docker]=docker.io [dockerd]=docker.io [dpkg-deb]=dpkg)

et_require_root() { [ "$(id -u)" = 0 ] || et_die "$1 needs root (debootstrap, dockerd)"; }

# ---------------------------------------------------------------------------------------------
# pip configuration, generated at run time (never committed)
# ---------------------------------------------------------------------------------------------
# et_pip_conf DIR [CONTAINER_DIR]
#   Writes DIR/pip.conf from the host's `pip config list`, keeping only what a build in a
#   container can use and needs: remote index locations (index-url, extra-index-url and
#   find-links with http(s) URLs), trusted-host, proxy, timeout, retries and certificates (cert,
#   client-cert: the files are copied into DIR and their paths rewritten to CONTAINER_DIR,
#   default /tmp/pipconf). Everything else is dropped: local paths and file:// indexes (they do
#   not exist inside the build), and options such as constraint, requirement, no-index or
#   only-binary that would change what the image installs (its pins are constraints-device.txt).
et_pip_conf() {
    local dir=$1 cdir=${2:-/tmp/pipconf}
    mkdir -p "$dir"
    "$ET_PYTHON" - "$dir" "$cdir" <<'PY'
import ast, os, shutil, subprocess, sys

out, cdir = sys.argv[1], sys.argv[2]
LOCATIONS = ("index-url", "extra-index-url", "find-links")
PLAIN = ("trusted-host", "proxy", "timeout", "default-timeout", "retries")
CERTS = ("cert", "client-cert")
lines = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                       capture_output=True, text=True).stdout.splitlines()
sections: dict[str, dict[str, str]] = {}
dropped: list[str] = []
for line in lines:
    if "=" not in line or "." not in line.split("=", 1)[0]:
        continue
    name, raw = line.split("=", 1)
    scope, key = name.rsplit(".", 1)
    try:
        value = str(ast.literal_eval(raw))
    except (ValueError, SyntaxError):
        value = raw
    section = "global" if scope in (":env:", "global") else scope.lstrip(":")
    if key in LOCATIONS:
        urls = [t for t in value.split() if t.startswith(("http://", "https://"))]
        if len(urls) < len(value.split()):
            dropped.append(f"{key} (local)")
        if not urls:
            continue
        value = "\n    ".join(urls)
    elif key in CERTS:
        if not os.path.isfile(value):
            dropped.append(f"{key} (missing file)")
            continue
        shutil.copyfile(value, os.path.join(out, f"{key}.pem"))
        value = f"{cdir}/{key}.pem"
    elif key not in PLAIN:
        dropped.append(key)
        continue
    sections.setdefault(section, {})[key] = value

with open(os.path.join(out, "pip.conf"), "w") as f:
    for name, sec in sections.items():
        f.write(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in sec.items()))
keys = ", ".join(f"{n}.{k}" for n, s in sections.items() for k in s)
print(f"    pip config for the build: {keys or '(none: public PyPI)'}", file=sys.stderr)
if dropped:
    print(f"    pip config: not passed to the build: {', '.join(sorted(set(dropped)))}", file=sys.stderr)
PY
}

# ---------------------------------------------------------------------------------------------
# docker
# ---------------------------------------------------------------------------------------------
et_dockerd() {
    et_need docker
    if docker info >/dev/null 2>&1; then
        et_info "docker engine is running ($(docker info -f '{{.ServerVersion}}' 2>/dev/null))"
        return
    fi
    et_require_root "starting dockerd"
    et_need dockerd
    mkdir -p "$ET_CACHE/logs"
    et_info "starting dockerd (log: $ET_CACHE/logs/dockerd.log)"
    # --iptables=false --bridge=none: no NAT here; builds/runs use --network host or none.
    # shellcheck disable=SC2086  # word splitting of the argument list is intended
    nohup dockerd ${EDGE_TRADY_DOCKERD_ARGS:---iptables=false --bridge=none} \
        >"$ET_CACHE/logs/dockerd.log" 2>&1 </dev/null &
    echo $! >"$ET_CACHE/dockerd.pid"
    local i
    for i in $(seq 1 60); do
        docker info >/dev/null 2>&1 && { et_info "dockerd is up (pid $(cat "$ET_CACHE/dockerd.pid"), ${i}s)"; return; }
        sleep 1
    done
    tail -n 20 "$ET_CACHE/logs/dockerd.log" >&2
    et_die "dockerd did not come up within 60 s"
}

# et_base_image [ARCH]   (ARCH: amd64 (default) or arm64)
# Debootstrap a bookworm root (minbase + python3, python3-venv, ca-certificates) and import it
# as $ET_BASE_IMAGE (amd64) or $ET_BASE_IMAGE-arm64, once. arm64 runs debootstrap's second stage
# in a chroot through qemu (binfmt_misc) and takes a few minutes more.
et_base_image() {
    local arch=${1:-amd64} image=$ET_BASE_IMAGE root
    [ "$arch" = amd64 ] || image="$ET_BASE_IMAGE-$arch"
    if docker image inspect "$image" >/dev/null 2>&1; then
        et_info "base image $image exists (cached)"
        return
    fi
    et_require_root "debootstrap"
    et_need debootstrap
    root="$ET_CACHE/$arch/rootfs"
    [ "$arch" = amd64 ] || root="$ET_CACHE/$arch/docker-rootfs"
    local log="$ET_CACHE/logs/debootstrap-$arch-base.log"
    if [ ! -f "$root/.edge-trady-complete" ]; then
        et_info "debootstrap $ET_SUITE ($arch, minbase + python3, python3-venv, ca-certificates)"
        et_info "log: $log (takes a few minutes)"
        rm -rf "$root.tmp"
        mkdir -p "$(dirname "$root")" "$ET_CACHE/logs"
        local foreign=()
        [ "$arch" = amd64 ] || foreign=(--foreign "--arch=$arch")
        # shellcheck disable=SC2086
        debootstrap "${foreign[@]}" --variant=minbase \
            --include=python3,python3-venv,ca-certificates \
            "$ET_SUITE" "$root.tmp" $ET_DEBIAN_MIRROR >"$log" 2>&1 \
            || { tail -n 20 "$log" >&2; et_die "debootstrap failed"; }
        if [ "$arch" != amd64 ]; then
            [ "$arch" = arm64 ] || et_die "unsupported arch $arch"
            et_binfmt_aarch64
            et_info "debootstrap --second-stage under qemu"
            chroot "$root.tmp" /debootstrap/debootstrap --second-stage >>"$log" 2>&1 \
                || { tail -n 20 "$log" >&2; et_die "debootstrap --second-stage failed"; }
        fi
        et_slim_root "$root.tmp"
        rm -rf "$root" && mv "$root.tmp" "$root"
        touch "$root/.edge-trady-complete"
    else
        et_info "debootstrap root cached: $root"
    fi
    et_info "importing $root as $image"
    tar --numeric-owner -C "$root" --exclude=./.edge-trady-complete --exclude='./dev/*' \
        --exclude='./proc/*' --exclude='./sys/*' -c . |
        docker import --platform "linux/$arch" \
            -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            -c 'CMD ["/bin/bash"]' - "$image" >"$ET_CACHE/$arch/base.id"
    et_info "base image: $image ($(et_mb "$(docker image inspect -f '{{.Size}}' "$image")") MB)"
}

# Drop apt caches, docs, man pages and non-English locales from a debootstrap root.
et_slim_root() {
    local r=$1
    rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/cache/apt/*.bin "$r"/var/lib/apt/lists/* \
        "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/var/log/*.log \
        "$r"/var/cache/debconf/*-old
    find "$r/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'en*' ! -name locale.alias \
        -exec rm -rf {} + 2>/dev/null || true
}

et_mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1000000 }'; }

# ---------------------------------------------------------------------------------------------
# a loopback HTTP server that hands the generated pip config to `docker build --network host`
# ---------------------------------------------------------------------------------------------
# et_pipconf_server DIR -> sets ET_PIPCONF_URL and ET_PIPCONF_PID. DIR must contain pip.conf.
# shellcheck disable=SC2034  # ET_PIPCONF_* are for the caller
# The build downloads DIR as a tar into /tmp/pipconf, uses it, and deletes it in the same layer.
et_pipconf_server() {
    local dir=$1 portfile
    tar -C "$dir" -cf "$dir/../pipconf.tar" .
    portfile=$(mktemp)
    "$ET_PYTHON" - "$dir/../pipconf.tar" "$portfile" <<'PY' &
import http.server, os, sys
tar, portfile = sys.argv[1], sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/pipconf.tar":
            self.send_error(404); return
        data = open(tar, "rb").read()
        self.send_response(200); self.send_header("Content-Length", str(len(data)))
        self.end_headers(); self.wfile.write(data)
    def log_message(self, *a): pass
# A fixed port keeps PIP_CONF_URL (a build arg, part of the layer cache key) stable between
# builds, so the dependency layer stays cached; fall back to any free port.
try:
    srv = http.server.HTTPServer(("127.0.0.1", int(os.environ.get("EDGE_TRADY_PIPCONF_PORT", "38917"))), H)
except OSError:
    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
with open(portfile, "w") as f: f.write(str(srv.server_port))
srv.serve_forever()
PY
    ET_PIPCONF_PID=$!
    local i
    for i in $(seq 1 50); do [ -s "$portfile" ] && break; sleep 0.1; done
    [ -s "$portfile" ] || et_die "pip config server did not start"
    ET_PIPCONF_URL="http://127.0.0.1:$(cat "$portfile")/pipconf.tar"
    rm -f "$portfile"
}

# ---------------------------------------------------------------------------------------------
# checks shared by the test scripts
# ---------------------------------------------------------------------------------------------
# et_check_metrics RUN_DIR : metrics.jsonl (one record per epoch, see edge_trady/runlog.py) must
# show a lower train loss in the last epoch than in the first, and units_used <= budget_units in
# every epoch. val_acc is printed per epoch (information, not checked).
et_check_metrics() {
    "$ET_PYTHON" - "$1/metrics.jsonl" <<'PY'
import json, sys
path = sys.argv[1]
try:
    recs = [json.loads(l) for l in open(path) if l.strip()]
except FileNotFoundError:
    sys.exit(f"    FAIL: {path} does not exist")
ok = True
if len(recs) < 2:
    sys.exit(f"    FAIL: {path}: {len(recs)} epoch record(s), need >= 2")
def num(v, spec=".4f"):
    return "None" if v is None else format(v, spec)

for r in recs:
    used, budget = r.get("units_used"), r.get("budget_units")
    fine = budget is not None and used is not None and used <= budget
    ok &= fine
    print(f"    epoch {r.get('epoch')}: train_loss {num(r.get('train_loss'))} "
          f"train_acc {num(r.get('train_acc'), '.3f')} val_acc {num(r.get('val_acc'), '.3f')} "
          f"units_used {num(used, ',.0f')} "
          f"<= budget_units {num(budget, ',.0f')} {r.get('budget_unit', '')}: "
          f"{'ok' if fine else 'FAIL'}  ({num(r.get('time_s'), '.1f')}s, peak rss "
          f"{num((r.get('peak_rss_bytes') or 0) / 2**20, '.0f')} MiB)")
first, last = recs[0].get("train_loss"), recs[-1].get("train_loss")
down = first is not None and last is not None and last < first
ok &= down
print(f"    train loss first {num(first)} -> last {num(last)}: {'decreases, ok' if down else 'FAIL'}")
try:  # summary.json (written at the end of a run) has the accuracy before training, if measured
    before = json.load(open(path.rsplit("/", 1)[0] + "/summary.json")).get("initial_val_acc")
except (OSError, ValueError):
    before = None
print("    val_acc per epoch: " + ("" if before is None else f"before {before:.3f}, ")
      + ", ".join(f"{r.get('epoch')}: {num(r.get('val_acc'), '.3f')}" for r in recs))
sys.exit(0 if ok else "    FAIL: metrics check failed")
PY
}

# et_has_command NAME : is `edge-trady NAME` implemented in this checkout?
et_has_command() { [ -f "$ET_REPO/edge_trady/commands/$1.py" ] || [ -d "$ET_REPO/edge_trady/commands/$1" ]; }

et_project_version() {
    "$ET_PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
        "$ET_REPO/pyproject.toml"
}

# et_arm_cpuinfo FILE : a Raspberry Pi 4's /proc/cpuinfo (4 x Cortex-A72). Under qemu-user the
# guest reads the host's x86 /proc/cpuinfo, and ONNX Runtime's CPU detection (cpuinfo) crashes
# or hangs on it (SIGSEGV in `import onnxruntime`, qemu 7.2). The arm64 tests give the emulated
# device this file instead: in the qemu -L root (test-arm64.sh; qemu maps guest paths that exist
# under -L), or bind-mounted over /proc/cpuinfo (test-docker.sh --arch arm64).
et_arm_cpuinfo() {
    local i
    mkdir -p "$(dirname "$1")"
    {
        for i in 0 1 2 3; do
            printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
            printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
        done
        printf 'Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n'
    } >"$1"
}

# ---------------------------------------------------------------------------------------------
# binfmt_misc: run aarch64 binaries through qemu-user-static
# ---------------------------------------------------------------------------------------------
# Registers the aarch64 handler qemu-user-static ships (as docker/buildx multi-arch setups do) if
# it is missing, and removes it again at exit if it was added here (needs `trap et_on_exit EXIT`).
# The handler has the F flag, so it also works inside chroots and containers.
ET_BINFMT=/proc/sys/fs/binfmt_misc
et_binfmt_aarch64() {
    if [ -e "$ET_BINFMT/qemu-aarch64" ]; then
        et_info "binfmt_misc: qemu-aarch64 registered"
        return
    fi
    et_require_root "registering binfmt_misc"
    [ -e "$ET_BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$ET_BINFMT"
    local conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -f "$conf" ] || et_die "$conf not found (apt-get install qemu-user-static)"
    grep -v '^#' "$conf" | head -n 1 >"$ET_BINFMT/register"
    ET_CLEANUP+=("echo -1 > '$ET_BINFMT/qemu-aarch64'")
    et_info "binfmt_misc: registered qemu-aarch64 from $conf (removed again at exit)"
}
