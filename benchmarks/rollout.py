"""Rollout throughput (server client vs in-process vLLM) and weight-sync time vs model size, on tiny Qwen2 models.

Throughput: the same seeded requests (P prompts of L random tokens, n samples each, up to T new tokens, temperature 1)
go through `VLLMEngine` (engine core in this process) and through `VLLMServerClient` to one `luffy serve-rollout`
replica on 127.0.0.1; after one warm-up batch, the median of R timed batches is reported as generated tokens per
second (EOS can end a sample early; only generated tokens count). The two never run at the same time.

Weight sync: for a few `TinyModelShape`s, the seconds `update_weights` takes with the model's own float32 weights
(Hugging Face names, as the trainer sends them), in-process (buckets handed to the worker) and to one server replica
(gloo broadcast over loopback, `/collective_rpc`, `reload_weights`, prefix-cache reset). The first server update also
forms the weight-sync group and is reported separately; the other columns are medians of R updates.

    .venv/bin/python -P benchmarks/rollout.py
    .venv/bin/python -P benchmarks/rollout.py --skip-sync --prompts 64

(`-P`: benchmarks/ is not put on sys.path, where a module named like a standard one would shadow it in the
subprocesses torch starts; a script's own directory is put first otherwise.)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MAX_MODEL_LEN = 512
SYNC_SHAPES = {  # name -> TinyModelShape fields (vocab 384 and the tokenizer are fixed)
    "tiny (default)": {},
    "h256 x4": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024,
                    num_hidden_layers=4),
    "h512 x8": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, intermediate_size=2048,
                    num_hidden_layers=8),
    "h1024 x8": dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, intermediate_size=4096,
                     num_hidden_layers=8),
}  # fmt: skip


def machine() -> str:
    import torch
    import vllm

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gb:.0f} GB RAM, no GPU; Python {platform.python_version()}, "
        f"torch {torch.__version__}, vllm {vllm.__version__}"
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_generate(engine, prompts, n, params, repeats: int) -> float:
    """Median generated tokens per second over `repeats` batches, after one warm-up batch."""
    engine.generate(prompts, n, params, seed=0)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = engine.generate(prompts, n, params, seed=0)
        elapsed = time.perf_counter() - start
        rates.append(sum(len(c.token_ids) for cs in out for c in cs) / elapsed)
    return statistics.median(rates)


def throughput(model_dir: str, workdir: Path, args) -> list[str]:
    import random

    from luffy_trainer.rollout import SamplingParams
    from luffy_trainer.rollout.serve import LocalRolloutServer
    from luffy_trainer.rollout.server_client import VLLMServerClient
    from luffy_trainer.rollout.vllm_engine import VLLMEngine

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0)

    engine = VLLMEngine(model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN)
    in_process = time_generate(engine, prompts, args.n, params, args.repeats)
    engine.close()

    server = LocalRolloutServer(model_dir, free_port(), log_path=workdir / "throughput-server.log",
                                max_model_len=MAX_MODEL_LEN).start()  # fmt: skip
    try:
        server.wait_healthy()
        client = VLLMServerClient([server.url], sync_port=free_port())
        served = time_generate(client, prompts, args.n, params, args.repeats)
        client.close()
    finally:
        server.stop()
    batch = f"{args.prompts} prompts x {args.prompt_len} tokens, n={args.n}, max_tokens={args.max_tokens}"
    return [
        "| engine | batch | generated tokens/s (median) | relative |",
        "|---|---|---:|---:|",
        f"| in-process `VLLMEngine` | {batch} | {in_process:,.0f} | 1.00 |",
        f"| `VLLMServerClient` -> 1 replica | {batch} | {served:,.0f} | {served / in_process:.2f} |",
    ]


def timed_update(engine, weights, version: int) -> float:
    start = time.perf_counter()
    engine.update_weights(weights, version)
    return time.perf_counter() - start


def sync_times(workdir: Path, args) -> list[str]:
    import torch
    from luffy_trainer.demo.tiny import TinyModelShape, make_tiny_model
    from luffy_trainer.rollout.serve import LocalRolloutServer
    from luffy_trainer.rollout.server_client import VLLMServerClient
    from luffy_trainer.rollout.vllm_engine import VLLMEngine
    from transformers import AutoModelForCausalLM

    rows = [
        "| model | parameters | float32 MB | in-process (s) | server, first with join (s) | server (s) | server MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, fields in SYNC_SHAPES.items():
        model_dir = str(make_tiny_model(workdir / name.split()[0], seed=0, shape=TinyModelShape(**fields)))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        weights = [(n, p.detach()) for n, p in model.named_parameters()]
        params = sum(t.numel() for _, t in weights)
        megabytes = sum(t.numel() * t.element_size() for _, t in weights) / 2**20

        engine = VLLMEngine(model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN)
        in_process = statistics.median(timed_update(engine, weights, v) for v in range(1, args.repeats + 1))
        engine.close()

        server = LocalRolloutServer(model_dir, free_port(), log_path=workdir / f"sync-{name.split()[0]}.log",
                                    max_model_len=MAX_MODEL_LEN).start()  # fmt: skip
        try:
            server.wait_healthy()
            client = VLLMServerClient([server.url], sync_port=free_port())
            first = timed_update(client, weights, 1)
            served = statistics.median(timed_update(client, weights, v) for v in range(2, args.repeats + 2))
            client.close()
        finally:
            server.stop()
        rows.append(
            f"| {name} | {params / 1e6:.1f} M | {megabytes:.1f} | {in_process:.3f} | {first:.3f} | {served:.3f} "
            f"| {megabytes / served:,.0f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-sync", action="store_true")
    args = parser.parse_args()

    from luffy_trainer.demo.tiny import make_tiny_model

    print(f"machine: {machine()}", flush=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.orig_argv[1:]])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="luffy-rollout-bench-") as tmp:
        workdir = Path(tmp)
        if not args.skip_throughput:
            model_dir = str(make_tiny_model(workdir / "throughput", seed=0))
            print("\n".join(throughput(model_dir, workdir, args)), flush=True)
        if not args.skip_sync:
            print("\n".join(sync_times(workdir, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
