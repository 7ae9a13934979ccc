# syntax=docker/dockerfile:1
#
# tokenrec image: the `tokenrec` CLI, Ray and MLflow, for a laptop, a Ray cluster (head and
# workers run the same image) and model serving. CPU by default; one build argument selects CUDA.
#
# Build (from the repository root):
#   docker build -t tokenrec:cpu .                                  # torch 2.13.0+cpu, fbgemm-gpu-cpu 1.8.0
#   docker build -t tokenrec:cuda --build-arg VARIANT=cuda .        # torch 2.13.0+cu130, fbgemm-gpu 1.8.0, NCCL
#   docker build -t tokenrec:cuda --build-arg VARIANT=cuda --build-arg CUDA=cu12X .  # another CUDA wheel index
#   docker build -t tokenrec:cpu --build-arg EXTRA_PIP="boto3" .    # + extra packages (e.g. for the Ray AWS launcher)
#
# Run (the entrypoint is `tokenrec`; user tokenrec, uid 1000, in /home/tokenrec/work; bind-mounted
# host folders it writes to must be writable by uid 1000):
#   docker run --rm tokenrec:cpu                                    # --help
#   docker run --rm --shm-size=2g tokenrec:cpu demo                 # the README's demo, inside the container
#   docker run --rm --shm-size=2g -v "$PWD/data:/data:ro" -v "$PWD/.tokenrec:/home/tokenrec/work/.tokenrec" \
#       tokenrec:cpu train --config /opt/tokenrec/configs/demo.toml --data /data --days 2026-01-01..2026-01-03
#   docker run --rm --gpus all --shm-size=8g ... tokenrec:cuda train ... --set train.use_gpu=true
# Serve a registered model (MLflow's scoring server on port 5000):
#   docker run --rm -p 5000:5000 -e MLFLOW_TRACKING_URI --entrypoint mlflow tokenrec:cpu \
#       models serve -m models:/tokenrec-ranker@champion --env-manager local --host 0.0.0.0 --port 5000
# Multi-node (Ray cluster launcher, KubeRay): docs/cluster.md; GPU notes: docs/gpu.md.
#
# What goes in, in the order `make install` uses: torch first (from the PyTorch wheel index of the
# variant, so the CPU image does not pull PyPI's CUDA torch and its ~3 GB of CUDA libraries), then
# requirements/cpu.lock without the lines the variant replaces (torch; for CUDA also
# fbgemm_gpu-cpu) and without the test/lint tools (pytest, ruff and what only they need), then
# torchrec==1.8.0 with --no-deps (its metadata would pull the CUDA fbgemm-gpu into the CPU image),
# then this project in editable mode from /opt/tokenrec (the CLI finds configs/ and
# requirements/cpu.lock next to its code, so the source tree stays in the image).
#
# No compiler: every pinned package installs from a wheel and nothing compiles at run time (no
# torch.compile / Triton kernels in this code base). Add gcc to the runtime stage if that changes.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtual environment with the pinned dependencies (cached until requirements/ change)
FROM ${PYTHON_IMAGE} AS build

# cpu | cuda
ARG VARIANT=cpu
# PyTorch CUDA wheel index tag for VARIANT=cuda; torch and fbgemm-gpu both come from it, so they
# match. cu130: the CUDA that torch 2.13.0 on PyPI is built against (cuda-toolkit 13.0). Another
# tag must be one that both torch 2.13.0 and fbgemm-gpu 1.8.0 are published for (FBGEMM's release
# compatibility table) and that the nodes' NVIDIA driver supports.
ARG CUDA=cu130
# Overrides the index torch (and, for cuda, fbgemm-gpu) come from, e.g. a mirror.
ARG TORCH_INDEX_URL=""
# Space-separated extra pip requirements, e.g. "boto3" for the Ray AWS autoscaler on the head node.
ARG EXTRA_PIP=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/tokenrec
COPY requirements/ requirements/
# EXTRA_PIP is the builder's own list: its pins are up to them.
# hadolint ignore=DL3013
RUN set -eu; \
    torch_pin="$(grep -i '^torch==' requirements/cpu.lock)"; \
    dev='pytest|ruff|iniconfig|pluggy|pygments'; \
    case "$VARIANT" in \
      cpu) \
        pip install --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" "$torch_pin"; \
        grep -v -i -E "^(torch|$dev)==" requirements/cpu.lock > /tmp/rest.txt ;; \
      cuda) \
        pip install --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$CUDA}" \
            "$torch_pin" -r requirements/gpu.txt; \
        grep -v -i -E "^(torch|fbgemm[-_]gpu[-_]cpu|$dev)==" requirements/cpu.lock > /tmp/rest.txt ;; \
      *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    pip install -r /tmp/rest.txt; \
    pip install --no-deps -r requirements/torchrec.txt; \
    if [ -n "$EXTRA_PIP" ]; then pip install $EXTRA_PIP; fi; \
    python -c "import torch, torchrec, fbgemm_gpu, ray, mlflow; \
print('torch', torch.__version__, '(CUDA', torch.version.cuda, ') | torchrec', torchrec.__version__, \
'| ray', ray.__version__, '| mlflow', mlflow.__version__)"

# ---- runtime: slim Python + the venv + the source; no compiler, no pip cache
FROM ${PYTHON_IMAGE} AS runtime

ARG VARIANT=cpu
LABEL org.opencontainers.image.title="tokenrec" \
      org.opencontainers.image.description="tokenrec training (TorchRec + Ray + MLflow), ${VARIANT} build"

# openssh-client + rsync: the Ray cluster launcher's autoscaler runs inside the head container and
# reaches worker hosts over SSH, syncing files with rsync (also `rsync -e 'docker exec'` into the
# container). wget: KubeRay's default liveness/readiness probes. All small; versions come with the
# base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates openssh-client rsync wget \
 && rm -rf /var/lib/apt/lists/*

# Non-root user (uid/gid 1000). HOME is set explicitly: the Ray launcher reads it from the image.
RUN groupadd --gid 1000 tokenrec \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/tokenrec --shell /bin/bash tokenrec \
 && mkdir -p /home/tokenrec/work /mnt/shared \
 && chown -R 1000:1000 /home/tokenrec /mnt/shared
ENV HOME=/home/tokenrec \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Login shells (`bash -l`: KubeRay's `ray start`, the Ray launcher's commands) reset PATH from
# /etc/profile; this puts the venv back in front (single quotes: expanded at login, not here).
# hadolint ignore=SC2016
RUN echo 'export PATH="/opt/venv/bin:$PATH"' > /etc/profile.d/tokenrec-venv.sh

COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/tokenrec
COPY . .
# Editable, as `make install` does: /opt/tokenrec stays the code's home (configs/, requirements/).
# setuptools comes with torch, so no build isolation (and no network) is needed here.
RUN pip install --no-deps --no-build-isolation -e . \
 && tokenrec --help > /dev/null

# = tokenrec; numeric so that Kubernetes' `runAsNonRoot` can check it is not root.
USER 1000:1000
WORKDIR /home/tokenrec/work
# MLflow's model server (`mlflow models serve --port 5000`); documentation only.
EXPOSE 5000
ENTRYPOINT ["tokenrec"]
CMD ["--help"]
