# edge-trady device image: the on-device runner (`edge-trady run / profile / evaluate`).
#
# Written for the classic builder and BuildKit alike (no RUN --mount, no heredocs, no
# --chmod); deploy/test-docker.sh exercises it with the classic builder.
#
#   x86_64, ONNX Runtime training engine (default, no torch):
#     docker build -t edge-trady:ort .
#   arm64 (Raspberry Pi 4/5) or Jetson, PyTorch engines (masked / torch-sparse):
#     docker build --build-arg ENGINE=torch -t edge-trady:torch .
#   Jetson: use an NVIDIA L4T PyTorch image matching the JetPack release as the base, so its
#   CUDA build of torch is reused (the venv gets --system-site-packages; torch is not
#   reinstalled). It must have Python >= 3.10: the JetPack 5 images
#   (nvcr.io/nvidia/l4t-pytorch:r35.x-pth2.0-py3 style tags) ship Python 3.8 and are too old
#   for edge-trady; use a JetPack 6 (L4T r36.x) PyTorch image (check the tag on NGC):
#     docker build --build-arg ENGINE=torch --build-arg BASE_IMAGE=<jetson-pytorch-image> \
#       -t edge-trady:jetson .
#   Offline / local base image (what deploy/test-docker.sh does):
#     docker build --build-arg BASE_IMAGE=edge-trady-base:bookworm ...
#
# Package index configuration is never baked into this file or the image. Either
#   * --build-arg PIP_INDEX_URL=... / PIP_EXTRA_INDEX_URL=... / PIP_TRUSTED_HOST=...
#     (plain pip environment variables; they only reach the builder stage), or
#   * --build-arg PIP_CONF_URL=http://127.0.0.1:PORT/pipconf.tar with --network host: a tar
#     holding pip.conf (+ certificate files it references, paths under /tmp/pipconf) served
#     from a temporary directory during the build; it is fetched, used and deleted inside one
#     RUN, so it is in no layer. deploy/test-docker.sh generates it from `pip config list`.
#
# The base must provide python3 (>= 3.10) with the venv module; the builder and the final
# stage use the same base because the venv points at the base's interpreter.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

# ort   : .[ort]   -> onnxruntime-training-cpu (x86_64 only; the marker skips it elsewhere)
# torch : .[torch] -> PyTorch engines; reuses a torch already in the base (Jetson images)
# none  : the device-side package only (profile / data tools)
ARG ENGINE=ort
# More extras of edge-trady to install, comma separated: e.g. EXTRAS=fleet (Flower, for a fleet
# node: deploy/fleet/).
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
    PYTHONDONTWRITEBYTECODE=1

# Fetches the pip configuration (if any) into /tmp/pipconf; used by each RUN that calls pip.
# The file is deleted again at the end of the same RUN.
RUN printf '%s\n' \
      'set -eu' \
      'if [ -n "${PIP_CONF_URL:-}" ]; then' \
      '  mkdir -p /tmp/pipconf' \
      '  python3 -c "import io,sys,tarfile,urllib.request as u; tarfile.open(fileobj=io.BytesIO(u.urlopen(sys.argv[1]).read())).extractall(\"/tmp/pipconf\")" "$PIP_CONF_URL"' \
      '  export PIP_CONFIG_FILE=/tmp/pipconf/pip.conf' \
      'fi' \
      > /usr/local/bin/with-pipconf.sh

# 1) dependencies only (cached until pyproject.toml, ENGINE or EXTRAS change)
WORKDIR /src
COPY pyproject.toml ./
RUN set -eu; . /usr/local/bin/with-pipconf.sh; \
    venv_opts=""; extras=""; torch_spec=""; \
    case "$ENGINE" in \
      ort) extras="ort" ;; \
      torch) if python3 -c "import torch" 2>/dev/null; then \
               echo "torch found in the base image: reusing it"; venv_opts="--system-site-packages"; \
             else extras="torch"; torch_spec="$TORCH_SPEC"; fi ;; \
      none) ;; \
      *) echo "unknown ENGINE=$ENGINE (ort|torch|none)" >&2; exit 2 ;; \
    esac; \
    extras="$extras${extras:+${EXTRAS:+,}}$EXTRAS"; extra="${extras:+[$extras]}"; \
    python3 -m venv $venv_opts /opt/venv; \
    /opt/venv/bin/pip install --upgrade pip setuptools wheel; \
    torch_index=""; [ -z "$TORCH_INDEX_URL" ] || torch_index="--extra-index-url $TORCH_INDEX_URL"; \
    mkdir -p edge_trady && touch edge_trady/__init__.py README.md; \
    /opt/venv/bin/pip install $torch_index "/src$extra" $torch_spec; \
    /opt/venv/bin/pip uninstall -y edge-trady; \
    rm -rf /tmp/pipconf /src/edge_trady /src/build /src/*.egg-info

# 2) the project itself (pure Python; no dependency resolution). Then slim the venv: a runtime
#    image needs no pip/setuptools/wheel, and the dependencies' test suites and ORT_PRUNE are
#    dead weight.
#    Bytecode is kept (compiled by pip at install time): the non-root runtime user cannot write
#    __pycache__ into the root-owned venv, so without it every start would recompile.
#
# ENGINE=ort only: dependencies of onnxruntime-training-cpu that the on-device training API
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
    if [ "$ENGINE" = torch ] && [ -d "$site/torch" ]; then for p in $TORCH_PRUNE; do rm -rf "$site/$p"; done; fi; \
    /opt/venv/bin/pip uninstall -y pip setuptools wheel; \
    find /opt/venv -depth -type d \( -name tests -o -name test \) -path '*/site-packages/*' \
         ! -path '*/site-packages/edge_trady/*' -exec rm -rf {} +; \
    rm -rf /tmp/pipconf /src/build; \
    /opt/venv/bin/python -c "import click, numpy, psutil, PIL"; \
    if [ "$ENGINE" = ort ] && [ "$(uname -m)" = x86_64 ]; then /opt/venv/bin/python -c "import onnxruntime"; fi; \
    if [ "$ENGINE" = torch ]; then /opt/venv/bin/python -c "import torch; c = torch.nn.Conv2d(3, 4, 3); c(torch.randn(1, 3, 8, 8)).sum().backward(); print('torch', torch.__version__, 'conv backward ok')"; fi; \
    /opt/venv/bin/edge-trady --version

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG ENGINE=ort

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

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8 \
    HOME=/home/trady

USER 10001:10001
WORKDIR /work
VOLUME ["/work"]

HEALTHCHECK --interval=5m --timeout=30s --start-period=10s --retries=3 \
    CMD ["edge-trady", "--version"]

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
