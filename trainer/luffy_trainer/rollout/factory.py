"""Build the rollout engine a training config asks for, with the cluster's addresses taken from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping

from luffy_trainer.config import RolloutConfig, TrainConfig
from luffy_trainer.rollout.base import RolloutEngine, RolloutError

ENV_ROLLOUT_URLS = "LUFFY_ROLLOUT_URLS"  # comma-separated base URLs of the rollout servers; wins over the config
ENV_SYNC_HOST = "LUFFY_WEIGHT_SYNC_HOST"  # address the rollout servers reach the trainer at
ENV_SYNC_PORT = "LUFFY_WEIGHT_SYNC_PORT"  # first of the trainer's weight-sync ports, one per replica
DEFAULT_SYNC_HOST = "127.0.0.1"
DEFAULT_SYNC_PORT = 29600


def rollout_server_urls(config: RolloutConfig, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Server URLs from LUFFY_ROLLOUT_URLS if set, else from rollout.server_urls; each must be http(s)."""
    if environ.get(ENV_ROLLOUT_URLS, "").strip():
        source, urls = ENV_ROLLOUT_URLS, [u.strip() for u in environ[ENV_ROLLOUT_URLS].split(",") if u.strip()]
    else:
        source, urls = "rollout.server_urls", list(config.server_urls)
    if not urls:
        raise RolloutError(f"backend vllm-server needs server URLs: set {ENV_ROLLOUT_URLS} or rollout.server_urls")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise RolloutError(f"{source}: {url!r} is not an http(s) URL")
    if len(set(urls)) != len(urls):
        raise RolloutError(f"{source}: a server URL is listed twice")
    return urls


def weight_sync_address(replicas: int, environ: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """(host, first port) the trainer listens on for weight sync; it uses ports [port, port + replicas)."""
    host = environ.get(ENV_SYNC_HOST, "").strip() or DEFAULT_SYNC_HOST
    raw = environ.get(ENV_SYNC_PORT, "").strip() or str(DEFAULT_SYNC_PORT)
    try:
        port = int(raw)
    except ValueError:
        raise RolloutError(f"{ENV_SYNC_PORT}={raw!r} is not a port number") from None
    if port < 1 or port + replicas > 65536:
        raise RolloutError(f"{ENV_SYNC_PORT}={port}: ports {port}..{port + replicas - 1} are not all valid")
    return host, port


def resolve_sync_backend(name: str) -> str:
    """`auto` means NCCL where this process has a GPU, else gloo."""
    if name != "auto":
        return name
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def build_rollout_engine(config: TrainConfig, model_path: str) -> RolloutEngine:
    """The engine for `config.rollout.backend`; in-process backends load `model_path`, servers load their own."""
    rollout = config.rollout
    if rollout.backend == "vllm":
        from luffy_trainer.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_path,
            dtype=config.model.dtype,
            max_model_len=rollout.max_model_len or config.data.max_prompt_length + config.data.max_response_length,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            tensor_parallel_size=rollout.tensor_parallel_size,
            enforce_eager=rollout.enforce_eager,
            trust_remote_code=config.model.trust_remote_code,
            seed=config.optimization.seed,
            bucket_mb=rollout.weight_sync_bucket_mb,
        )
    if rollout.backend == "vllm-server":
        from luffy_trainer.rollout.server_client import VLLMServerClient

        urls = rollout_server_urls(rollout)
        host, port = weight_sync_address(len(urls))
        return VLLMServerClient(
            urls,
            sync_host=host,
            sync_port=port,
            sync_backend=resolve_sync_backend(rollout.weight_sync_backend),
            sync_timeout_s=rollout.weight_sync_timeout_s,
            bucket_mb=rollout.weight_sync_bucket_mb,
            request_timeout_s=rollout.request_timeout_s,
            unhealthy_timeout_s=rollout.unhealthy_timeout_s,
            max_inflight_requests=rollout.max_inflight_requests,
            request_attempts=rollout.request_attempts,
            float_dtype=config.model.dtype,
        )
    if rollout.backend == "hf":
        from luffy_trainer.rollout.hf_engine import HFEngine

        return HFEngine(model_path, dtype=config.model.dtype, trust_remote_code=config.model.trust_remote_code)
    raise RolloutError(f"rollout.backend {rollout.backend!r} is not one of vllm, vllm-server, hf")
