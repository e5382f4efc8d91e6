# syntax=docker/dockerfile:1.7
# vaeserve: CPU by default; `--build-arg DEVICE=cuda` builds on a CUDA base image with GPU wheels.
ARG DEVICE=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
# The interpreter follows the CUDA image's Ubuntu release; pinning its exact build would break on
# every base-image refresh.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# ---- build: a virtual environment with the project and its pinned dependencies ----
# base-${DEVICE} is a stage above, not an image to tag.
# hadolint ignore=DL3006
FROM base-${DEVICE} AS build
ARG DEVICE
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml constraints.txt README.md ./
COPY training ./training
COPY service ./service
# torch first and pinned: the CPU wheel from PyTorch's CPU index, or the CUDA wheel from PyPI.
RUN if [ "$DEVICE" = "cuda" ]; then \
        /opt/venv/bin/pip install -c constraints.txt torch==2.13.0; \
    else \
        /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; \
    fi \
    && /opt/venv/bin/pip install -c constraints.txt . \
    && if [ "$DEVICE" = "cuda" ]; then \
        /opt/venv/bin/pip uninstall -y onnxruntime \
        && /opt/venv/bin/pip install "onnxruntime-gpu==1.31.1"; \
    fi

# ---- runtime: no compilers, no sources beyond the installed package, a non-root user ----
# hadolint ignore=DL3006
FROM base-${DEVICE} AS runtime
RUN groupadd --system --gid 10001 vae \
    && useradd --system --uid 10001 --gid vae --no-create-home --shell /usr/sbin/nologin vae
COPY --from=build /opt/venv /opt/venv
COPY --chown=root:root models /srv/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    VAE_GRPC_PORT=8001 \
    VAE_MODEL_DIR=/srv/models
WORKDIR /srv
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-m", "service.healthcheck"]
# uvicorn finishes in-flight requests on SIGTERM (up to 30 s) before it exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vae-serve"]
