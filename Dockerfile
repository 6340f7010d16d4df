# edge-trady device image: the on-device runner (`edge-trady run / profile / evaluate / health`).
#
# Written for the classic builder and BuildKit alike (no RUN --mount, no heredocs, no
# --chmod); deploy/test-docker.sh exercises it with the classic builder.
#
#   Default: the portable runner (plain onnxruntime; no torch, no onnxruntime-training), one
#   Dockerfile for amd64 and arm64 (Raspberry Pi 3/4/5, Zero 2 W, x86_64 boxes):
#     docker build -t edge-trady:portable .
#   Jetson (GPU): the PyTorch engines on an NVIDIA L4T PyTorch base, whose CUDA torch is reused
#   (the venv gets --system-site-packages; torch is not reinstalled). It needs Python >= 3.10:
#   the JetPack 5 images (nvcr.io/nvidia/l4t-pytorch:r35.x-pth2.0-py3 style tags) ship Python
#   3.8 and are too old; use a JetPack 6 (L4T r36.x) PyTorch image (check the tag on NGC). Keep
#   the base's layers and environment (CUDA paths) with LAYOUT=layered:
#     docker build --build-arg ENGINE=torch --build-arg LAYOUT=layered \
#       --build-arg BASE_IMAGE=<jetson-pytorch-image> -t edge-trady:jetson .
#   x86_64 with the older ONNX Runtime *training* engine (onnxruntime-training-cpu 1.19.2):
#     docker build --build-arg ENGINE=ort -t edge-trady:ort .
#   Offline / local base image (what deploy/test-docker.sh does):
#     docker build --build-arg BASE_IMAGE=edge-trady-base:bookworm ...
#
# Dependencies are pinned by constraints-device.txt (onnxruntime, numpy, ...; ENGINE=ort also by
# the workstation's constraints.txt: onnxruntime-training, onnx), whatever the build host's pip
# configuration says. Package index configuration is never baked into this
# file or the image; nothing from the host's pip configuration is needed. If the build must use
# a private index or certificate, either
#   * --build-arg PIP_INDEX_URL=... / PIP_EXTRA_INDEX_URL=... / PIP_TRUSTED_HOST=...
#     (plain pip environment variables; they only reach the builder stage), or
#   * --build-arg PIP_CONF_URL=http://127.0.0.1:PORT/pipconf.tar with --network host: a tar
#     holding pip.conf (index URLs and certificate files only, paths under /tmp/pipconf)
#     served from a temporary directory during the build; it is fetched, used and deleted
#     inside one RUN, so it is in no layer. deploy/test-docker.sh generates it from
#     `pip config list`, keeping index URLs and certificates and dropping every local path.
#
# The base must provide python3 (>= 3.10) with the venv module; the builder and the runtime
# use the same base because the venv points at the base's interpreter. With LAYOUT=flat (the
# default) the runtime is one layer holding only what the runner needs (deploy/slim_rootfs.py).

ARG BASE_IMAGE=python:3.11-slim
# flat: one layer, only what the runner needs from the base (small; the base's ENV is replaced
#   by this file's).
# layered: the base's layers and ENV kept as they are (Jetson: CUDA paths), nothing pruned.
ARG LAYOUT=flat

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

# portable : .[device] -> plain onnxruntime (x86_64 and aarch64 wheels), the default
# torch     : .[torch]  -> PyTorch engines; reuses a torch already in the base (Jetson images)
# ort       : .[ort]    -> onnxruntime-training-cpu (x86_64 only)
# none      : the device-side package only (profile / data tools)
ARG ENGINE=portable
# More extras of edge-trady, comma separated: e.g. EXTRAS=fleet (Flower 1.42, for a fleet node:
# deploy/fleet/).
ARG EXTRAS=
# ENGINE=torch (unless the base already has torch): which torch to install. Pinned because the
# PyPI aarch64 wheels from torch 2.11 on depend on the CUDA 13 libraries (several GB, useless on
# a Pi); up to 2.10 they are CPU-only. On x86_64 every PyPI torch pulls CUDA: use the PyTorch CPU
# index instead, e.g. TORCH_INDEX_URL=<PyTorch CPU wheel index> TORCH_SPEC=torch==2.9.1+cpu.
ARG TORCH_SPEC="torch==2.9.1"
ARG TORCH_INDEX_URL=
ARG PIP_CONF_URL=
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_TRUSTED_HOST=
ARG PIP_DEFAULT_TIMEOUT=120

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/dev/null \
    PYTHONDONTWRITEBYTECODE=1

# Fetches the pip configuration (if any) into /tmp/pipconf; used by each RUN that calls pip.
# The file is deleted again at the end of the same RUN. Without it pip reads no configuration
# file at all (PIP_CONFIG_FILE=/dev/null: a base image's pip.conf cannot interfere either).
RUN printf '%s\n' \
      'set -eu' \
      'if [ -n "${PIP_CONF_URL:-}" ]; then' \
      '  mkdir -p /tmp/pipconf' \
      '  python3 -c "import io,sys,tarfile,urllib.request as u; tarfile.open(fileobj=io.BytesIO(u.urlopen(sys.argv[1]).read())).extractall(\"/tmp/pipconf\")" "$PIP_CONF_URL"' \
      '  export PIP_CONFIG_FILE=/tmp/pipconf/pip.conf' \
      'fi' \
      > /usr/local/bin/with-pipconf.sh

# 1) dependencies only (cached until pyproject.toml, the constraints, ENGINE or EXTRAS change)
WORKDIR /src
COPY pyproject.toml constraints-device.txt constraints.txt ./
RUN set -eu; . /usr/local/bin/with-pipconf.sh; \
    venv_opts=""; extra=""; torch_spec=""; pins="-c /src/constraints-device.txt"; \
    case "$ENGINE" in \
      portable) extra="[device]" ;; \
      ort) extra="[ort]"; pins="$pins -c /src/constraints.txt" ;; \
      torch) if python3 -c "import torch" 2>/dev/null; then \
               echo "torch found in the base image: reusing it"; venv_opts="--system-site-packages"; \
             else extra="[torch]"; torch_spec="$TORCH_SPEC"; fi ;; \
      none) ;; \
      *) echo "unknown ENGINE=$ENGINE (portable|torch|ort|none)" >&2; exit 2 ;; \
    esac; \
    if [ -n "$EXTRAS" ]; then inner="${extra#[}"; inner="${inner%]}"; extra="[${inner:+$inner,}$EXTRAS]"; fi; \
    python3 -m venv $venv_opts /opt/venv; \
    /opt/venv/bin/pip install --upgrade pip setuptools wheel; \
    torch_index=""; [ -z "$TORCH_INDEX_URL" ] || torch_index="--extra-index-url $TORCH_INDEX_URL"; \
    mkdir -p edge_trady && touch edge_trady/__init__.py README.md; \
    /opt/venv/bin/pip install $pins $torch_index "/src$extra" $torch_spec; \
    /opt/venv/bin/pip uninstall -y edge-trady; \
    rm -rf /tmp/pipconf /src/edge_trady /src/build /src/*.egg-info

# 2) the project itself (pure Python; no dependency resolution). Then slim the venv: a runtime
#    image needs no pip/setuptools/wheel, and the dependencies' test suites and *_PRUNE are
#    dead weight.
#    Bytecode is kept (compiled by pip at install time): the non-root runtime user cannot write
#    __pycache__ into the root-owned venv, so without it every start would recompile.
#
# ENGINE=portable: parts of the dependencies the runner never loads (paths relative to
# site-packages; "" keeps everything), ~55 MB: onnxruntime's C API library libonnxruntime.so (the
# Python binding onnxruntime_pybind11_state.so links ONNX Runtime statically and does not load
# it) and its offline model tools (transformers, quantization, tools); Pillow's AVIF codec, font
# rendering (FreeType, HarfBuzz) and colour management (LittleCMS) with their libraries (the
# data loaders only decode and resize images; JPEG, PNG, TIFF, WebP, BMP, GIF stay); numpy's
# build tools (f2py, distutils, C headers).
ARG PORTABLE_PRUNE="onnxruntime/capi/libonnxruntime.so.* onnxruntime/transformers onnxruntime/quantization \
 onnxruntime/tools PIL/_avif.* pillow.libs/libavif-* PIL/_imagingft.* pillow.libs/libfreetype-* \
 pillow.libs/libharfbuzz-* pillow.libs/libbrotli* pillow.libs/libpng16-* PIL/_imagingcms.* \
 pillow.libs/liblcms2-* PIL/_imagingtk.* numpy/f2py numpy/distutils numpy/_core/include ../../../bin/f2py ../../../bin/numpy-config"
# ENGINE=ort: dependencies of onnxruntime-training-cpu that the on-device training API
# (onnxruntime.training.api: CheckpointState / Module / Optimizer) never imports: sympy is only
# used by ORT's symbolic shape tools, ORTModule and the Triton code generator (torch-based), and
# no module of the 1.19.2 wheel imports h5py. Together ~65 MB. Set to "" to keep them.
ARG ORT_PRUNE="sympy mpmath h5py"
# ENGINE=torch: parts of the torch wheel a runtime never reads (C++ headers, ~60 MB: only needed
# by torch.compile's C++ code generation and cpp_extension builds, which edge-trady does not
# use). Paths relative to site-packages; "" keeps everything. Not applied to a reused base torch.
ARG TORCH_PRUNE="torch/include"
COPY . /src
RUN set -eu; . /usr/local/bin/with-pipconf.sh; \
    /opt/venv/bin/pip install --no-deps --no-build-isolation /src; \
    if [ "$ENGINE" = ort ] && [ -n "$ORT_PRUNE" ]; then /opt/venv/bin/pip uninstall -y $ORT_PRUNE; fi; \
    site=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
    if [ "$ENGINE" = portable ]; then for p in $PORTABLE_PRUNE; do rm -rf "$site"/$p; done; fi; \
    if [ "$ENGINE" = torch ] && [ -d "$site/torch" ]; then for p in $TORCH_PRUNE; do rm -rf "$site/$p"; done; fi; \
    /opt/venv/bin/pip uninstall -y pip setuptools wheel; \
    find /opt/venv -depth -type d \( -name tests -o -name test \) -path '*/site-packages/*' \
         ! -path '*/site-packages/edge_trady/*' -exec rm -rf {} +; \
    find "$site" -name '*.pyi' -delete; \
    rm -rf /tmp/pipconf /src/build; \
    /opt/venv/bin/python -c "import click, numpy, psutil, PIL"; \
    case "$ENGINE" in \
      portable) if [ "$(uname -m)" = x86_64 ] || grep -q '^CPU implementer' /proc/cpuinfo; then \
                  /opt/venv/bin/python -c "import onnxruntime as o, PIL.Image, PIL.JpegImagePlugin, PIL.PngImagePlugin; o.SessionOptions(); print('onnxruntime', o.__version__, o.get_available_providers())"; \
                else echo "emulated $(uname -m) build (the host's /proc/cpuinfo): onnxruntime's CPU detection crashes under qemu-user, its import is not checked here"; fi; \
                ! /opt/venv/bin/python -c "import torch" 2>/dev/null || { echo "torch must not be in the portable image" >&2; exit 1; }; \
                ! /opt/venv/bin/python -c "import onnxruntime.training" 2>/dev/null || { echo "onnxruntime-training must not be in the portable image" >&2; exit 1; } ;; \
      ort) [ "$(uname -m)" != x86_64 ] || /opt/venv/bin/python -c "import onnxruntime" ;; \
      torch) /opt/venv/bin/python -c "import torch; c = torch.nn.Conv2d(3, 4, 3); c(torch.randn(1, 3, 8, 8)).sum().backward(); print('torch', torch.__version__, 'conv backward ok')" ;; \
    esac; \
    /opt/venv/bin/edge-trady --version

# ---------------------------------------------------------------------------------------------
# The runtime's file system: the base, the non-root user, the venv and the exit-hook wrapper.
# LAYOUT=flat: deploy/slim_rootfs.py assembles in /rootfs only what the runner needs from it
# (the venv, the interpreter with its standard library as a bytecode zip, a shell and basic
# tools, the shared libraries they load; checked chrooted); the image is that folder alone.
FROM ${BASE_IMAGE} AS runtime-root
ARG LAYOUT=flat

# non-root runtime user; /work is the data/artifact/run volume
RUN set -eu; \
    if command -v useradd >/dev/null 2>&1; then \
      groupadd --system --gid 10001 trady; \
      useradd --system --uid 10001 --gid 10001 --home-dir /home/trady --create-home \
              --shell /usr/sbin/nologin trady; \
    else \
      echo 'trady:x:10001:' >> /etc/group; \
      echo 'trady:x:10001:10001:edge-trady:/home/trady:/usr/sbin/nologin' >> /etc/passwd; \
      mkdir -p /home/trady && chown 10001:10001 /home/trady; \
    fi; \
    mkdir -p /work && chown 10001:10001 /work

COPY --from=builder /opt/venv /opt/venv
COPY deploy/with-exit-hook.sh /usr/local/bin/edge-trady-with-exit-hook
COPY deploy/slim_rootfs.py /tmp/slim_rootfs.py
RUN set -eu; chmod 0755 /usr/local/bin/edge-trady-with-exit-hook; \
    if [ "$LAYOUT" = flat ]; then python3 /tmp/slim_rootfs.py /rootfs; else mkdir /rootfs; fi; \
    rm /tmp/slim_rootfs.py; \
    /opt/venv/bin/edge-trady --version

FROM scratch AS runtime-flat
COPY --from=runtime-root /rootfs /

FROM runtime-root AS runtime-layered

# ---------------------------------------------------------------------------------------------
FROM runtime-${LAYOUT}

ARG ENGINE=portable

ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8 \
    HOME=/home/trady \
    EDGE_TRADY_RUN=/work/run \
    EDGE_TRADY_HEALTH_MAX_AGE=10m

USER 10001:10001
WORKDIR /work
VOLUME ["/work"]

# Healthy while the run in $EDGE_TRADY_RUN makes progress: its heartbeat (rewritten every few
# training steps) is younger than $EDGE_TRADY_HEALTH_MAX_AGE, or training finished. Unhealthy
# when it stops, fails, hangs or is stopped (SIGSTOP). The start period covers loading the data
# and the first evaluation; raise EDGE_TRADY_HEALTH_MAX_AGE on a slow board.
HEALTHCHECK --interval=1m --timeout=30s --start-period=10m --retries=3 \
    CMD ["edge-trady", "health"]

ENTRYPOINT ["edge-trady"]
CMD ["--help"]

# last, so a new commit (VCS_REF) does not invalidate the layers above
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG SOURCE_URL=https://github.com/edge-trady/edge-trady
LABEL org.opencontainers.image.title="edge-trady" \
      org.opencontainers.image.description="Memory-budgeted on-device fine-tuning with TraDy (engine: ${ENGINE})" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.edge-trady.engine="${ENGINE}"
