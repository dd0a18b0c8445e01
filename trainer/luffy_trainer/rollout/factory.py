"""Build the rollout engine a training config asks for; the config names the servers and the weight-sync address."""

from __future__ import annotations

from luffy_trainer import contract
from luffy_trainer.config import RolloutConfig, TrainConfig
from luffy_trainer.rollout.base import RolloutEngine, RolloutError
from luffy_trainer.rollout.control import ControlTokenError, read_token


def rollout_server_urls(config: RolloutConfig) -> list[str]:
    """`rollout.server_urls`, checked: at least one, each http(s), none twice."""
    urls = list(config.server_urls)
    if not urls:
        raise RolloutError("backend vllm-server needs server URLs: set rollout.server_urls")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise RolloutError(f"rollout.server_urls: {url!r} is not an http(s) URL")
    if len(set(urls)) != len(urls):
        raise RolloutError("rollout.server_urls: a server URL is listed twice")
    return urls


def weight_sync_address(config: RolloutConfig, replicas: int) -> tuple[str, int]:
    """(host, first port) the trainer listens on for weight sync with `replicas` servers, checked to fit."""
    port = config.weight_sync_port
    last = contract.weight_sync_port(port, replicas - 1)
    if last > 65535:
        raise RolloutError(f"rollout.weight_sync_port {port}: ports {port}..{last} are not all valid")
    return config.weight_sync_host, port


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
            max_model_len=contract.max_model_len(
                rollout.max_model_len, config.data.max_prompt_length, config.data.max_response_length
            ),
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
        host, port = weight_sync_address(rollout, len(urls))
        token = None
        if rollout.control_token_file is not None:
            try:
                token = read_token(rollout.control_token_file)
            except ControlTokenError as exc:
                raise RolloutError(f"rollout.control_token_file: {exc}") from None
        return VLLMServerClient(
            urls,
            control_token=token,
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
