# syntax=docker/dockerfile:1.7
# Two images from one build:
#   docker build --target worker   -t baton-worker .    # workers + router: CUDA torch, Triton
#   docker build --target operator -t baton-operator .  # Kopf operator: no torch
# Both run as the unprivileged user 1000 (the operator's pod specs require non-root).

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# CUDA 13.0 wheels: Hopper (sm_90) and Blackwell (sm_100) kernels in one build.
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

# ---- the baton wheel (pure Python; protobuf stubs are committed) ----------------------------
FROM python:${PYTHON_VERSION}-slim AS wheel
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY operator ./operator
COPY workers ./workers
COPY kernels ./kernels
COPY proto ./proto
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- operator: Kopf, the Kubernetes client, the autoscaler's Prometheus client ---------------
FROM python:${PYTHON_VERSION}-slim AS operator
RUN useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin baton
COPY --from=wheel /wheels /wheels
# --no-deps: the package's own dependencies are the workers' (torch); the operator needs these.
RUN pip install --no-cache-dir --no-deps /wheels/baton-*.whl \
 && pip install --no-cache-dir "kopf>=1.37" "kubernetes>=29" "pyyaml>=6" \
        "prometheus-client>=0.20" "aiohttp>=3.9" numpy \
 && rm -rf /wheels \
 && python -c "import baton.operator.handlers, baton.operator.autoscaler.daemon"
USER 1000:1000
ENV PYTHONUNBUFFERED=1 HOME=/tmp
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "baton.operator"]

# ---- worker: prefill/decode workers and the router ------------------------------------------
FROM ${CUDA_IMAGE} AS worker
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/baton PATH=/opt/baton/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/baton \
 && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin baton
# torch first from the CUDA index (it brings a matching Triton); then baton and its deps.
RUN pip install --index-url ${TORCH_INDEX} "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /wheels
RUN pip install "$(ls /wheels/baton-*.whl)[kernels]" && rm -rf /wheels
USER 1000:1000
# Triton compiles kernels at first use; /tmp is a writable volume in the pod specs.
ENV HOME=/tmp TRITON_CACHE_DIR=/tmp/triton HF_HUB_OFFLINE=1
EXPOSE 50051 9400 8000
ENTRYPOINT ["baton"]
