# syntax=docker/dockerfile:1.7
# luffy's container images, built with BuildKit from the repository root. Three targets:
#   operator  the LuffyRun operator: python slim + luffy[operator] (kopf, kubernetes, pydantic; no torch), small
#   mlflow    an MLflow tracking server with the Postgres and S3 drivers the official image lacks (for the chart)
#   trainer   trainer and vLLM rollout pods: CUDA, torch, vLLM, transformers, MLflow and luffy (the default target)
#
#   docker build --target operator -t $REGISTRY/luffy-operator:0.1.0 .
#   docker build --target trainer  -t $REGISTRY/luffy:0.1.0 .
#   docker build --target mlflow   -t $REGISTRY/luffy-mlflow:0.1.0 .
#
# The source is bind-mounted into the install steps, never copied into a layer. Nothing secret goes in: registry and
# Hugging Face credentials belong to the cluster (imagePullSecrets, Secrets referenced by the LuffyRun).

ARG PYTHON_VERSION=3.12
# vLLM 0.32's wheels are built against torch 2.13 for CUDA 13; the devel image brings nvcc for FlashInfer's JIT.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG VLLM_VERSION=0.32.0
ARG MLFLOW_VERSION=3.17.2
ARG LUFFY_VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown

# --- operator ------------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS operator
ARG PYTHON_VERSION
ARG LUFFY_VERSION
ARG VCS_REF
ARG BUILD_DATE
LABEL org.opencontainers.image.title="luffy-operator" \
      org.opencontainers.image.description="The LuffyRun operator (kopf): runs LUFFY training on Kubernetes" \
      org.opencontainers.image.version="${LUFFY_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:${PYTHON_VERSION}-slim-bookworm"
ENV HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install "/src[operator]"
# The chart runs it as this user too (operator.runAsUser), with a read-only root filesystem.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["luffy-operator", "run"]
CMD ["--standalone", "--liveness", "http://0.0.0.0:8080/healthz"]

# --- mlflow --------------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS mlflow
ARG PYTHON_VERSION
ARG MLFLOW_VERSION
ARG LUFFY_VERSION
ARG VCS_REF
ARG BUILD_DATE
LABEL org.opencontainers.image.title="luffy-mlflow" \
      org.opencontainers.image.description="MLflow tracking server with Postgres (psycopg2) and S3 (boto3) support" \
      org.opencontainers.image.version="${LUFFY_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:${PYTHON_VERSION}-slim-bookworm"
ENV HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2"
# The chart's mlflow.runAsUser.
USER 1000:1000
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]

# --- trainer (and rollout) -----------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS trainer
ARG CUDA_IMAGE
ARG PYTHON_VERSION
ARG TORCH_VERSION
ARG VLLM_VERSION
ARG LUFFY_VERSION
ARG VCS_REF
ARG BUILD_DATE
LABEL org.opencontainers.image.title="luffy" \
      org.opencontainers.image.description="LUFFY trainer (torchrun) and vLLM rollout server for LuffyRun pods" \
      org.opencontainers.image.version="${LUFFY_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${CUDA_IMAGE}"
ENV DEBIAN_FRONTEND=noninteractive
# Python headers: Triton and FlashInfer compile kernels at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" "python${PYTHON_VERSION}-dev" ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/luffy \
    PATH=/opt/luffy/bin:${PATH} \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN "python${PYTHON_VERSION}" -m venv /opt/luffy
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install "torch==${TORCH_VERSION}" "vllm==${VLLM_VERSION}" "/src[trainer,gpu]"
# Pods run as uid 1000 with a read-only root filesystem and volumes on /tmp, /checkpoints, /models and /dev/shm
# (see operator/luffy_operator/manifests.py); the mount points belong to that user.
RUN mkdir -p /checkpoints /models && chown 1000:1000 /checkpoints /models
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["luffy"]
CMD ["--help"]
