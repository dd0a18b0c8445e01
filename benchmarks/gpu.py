"""The trainer on a GPU: luffy's policy update, log-prob head and HF rollouts at Qwen2.5 shapes, with random weights.

Nothing is downloaded: the models are built in memory at the public shapes of Qwen2.5-0.5B and Qwen2.5-1.5B
(`SHAPES`) with random weights. Each section writes its results into `OUT/gpu.json` as soon as it ends, so a run cut
short by its timeout keeps what it measured.

- `update`: `PolicyUpdater.optimize` (luffy's own path: `prepare_policy` with FSDP2 on one rank, bf16 compute over
  float32 master weights on CUDA, AdamW) on LUFFY batches of 7 rollouts + 1 trace per prompt, activation
  checkpointing on and off: tokens/s, MFU (FLOPs counted by `train_flops`, verl's formula) and peak memory.
- `logprobs`: the naive `[T, V]` log-softmax against `chunked_head_logprobs` (benchmarks/logprob_memory.py's
  `measure`), forward and backward at V = 151,936, T = 8,192: peak memory and time.
- `generation`: the HF rollout backend (`HFEngine`) on a model saved to a temporary directory: generated tokens/s.
- `correctness`: the loss and gradients of one micro-batch (`PolicyUpdater.backward`) on the device, bf16 under FSDP2,
  against the same batch in float32 on CPU without FSDP.

`--cpu --tiny` runs every section in seconds on CPU (float32, FSDP2 over a one-rank gloo group, tiny shapes): the
test suite's check of this script (tests/test_gpu_benchmark.py). On the GPU machine: benchmarks/gpu_device.sh.

    python benchmarks/gpu.py --out DIR                 # CUDA, Qwen2.5 shapes
    python benchmarks/gpu.py --cpu --tiny --out DIR    # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def logprob_memory():
    """benchmarks/logprob_memory.py, loaded from its file rather than by putting benchmarks/ on sys.path: there, its
    neighbours (operator.py, rollout.py) would shadow modules of the same names in whatever process imports this one
    (the test suite's, where inductor then compiled vLLM's sampler kernel without its vector ISA flags)."""
    import importlib.util

    module = sys.modules.get("logprob_memory")
    if module is None:
        spec = importlib.util.spec_from_file_location(
            "logprob_memory", Path(__file__).resolve().parent / "logprob_memory.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["logprob_memory"] = module
        spec.loader.exec_module(module)
    return module


# The H200's dense bf16 peak as the issue states it; the peak used is recorded with every MFU (`--peak-tflops`).
H200_BF16_TFLOPS = 790.0


@dataclass(frozen=True)
class Shape:
    """A Qwen2 architecture (the fields of its Hugging Face config that matter for compute and memory)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 151_936
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# From the public config.json of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B (0.49B and 1.54B parameters, tied embeddings).
SHAPES = {
    "qwen2.5-0.5b": Shape(896, 24, 14, 2, 4864),
    "qwen2.5-1.5b": Shape(1536, 28, 12, 2, 8960),
    "tiny": Shape(64, 2, 4, 2, 128, vocab_size=4096),
}


def eos_id(shape: Shape) -> int:
    """Qwen2.5's <|endoftext|> (also its padding), or the last id of a smaller vocabulary."""
    return min(151_643, shape.vocab_size - 1)


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    shapes: tuple[str, ...]
    prompts: int  # per update step, 8 samples each
    prompt_len: int
    response_len: int
    micro_batch_tokens: int
    warmup_steps: int
    steps: int
    logprob_tokens: int
    logprob_vocab: int
    chunk_tokens: int
    gen_prompts: int
    gen_n: int
    gen_prompt_len: int
    gen_tokens: int
    check_shape: str
    check_prompt_len: int
    check_response_len: int


FULL = Plan(
    shapes=("qwen2.5-0.5b", "qwen2.5-1.5b"),
    prompts=2,
    prompt_len=1024,
    response_len=4096,
    micro_batch_tokens=10_240,
    warmup_steps=1,
    steps=2,
    logprob_tokens=8192,
    logprob_vocab=151_936,
    chunk_tokens=512,
    gen_prompts=8,
    gen_n=8,
    gen_prompt_len=512,
    gen_tokens=256,
    check_shape="qwen2.5-0.5b",
    check_prompt_len=64,
    check_response_len=192,
)
TINY = Plan(
    shapes=("tiny",),
    prompts=1,
    prompt_len=16,
    response_len=48,
    micro_batch_tokens=256,
    warmup_steps=1,
    steps=1,
    logprob_tokens=1024,
    logprob_vocab=4096,
    chunk_tokens=128,
    gen_prompts=2,
    gen_n=2,
    gen_prompt_len=8,
    gen_tokens=8,
    check_shape="tiny",
    check_prompt_len=8,
    check_response_len=24,
)


def train_flops(shape: Shape, seq_lens: list[int]) -> float:
    """Model FLOPs of one forward + backward over sequences of these lengths, as verl's MFU counts them for Qwen2
    (`_estimate_qwen2_flops` in verl's flops_counter): 6 x dense parameters x tokens, with the embedding and the
    lm_head counted as two V x H matrices even when tied, plus 12 x sum(s^2) x head_dim x heads x layers for
    attention (the full square, not the causal half). Recomputation by activation checkpointing is not counted.
    """
    h, d = shape.hidden_size, shape.head_dim
    q = o = shape.num_attention_heads * d
    k = v = shape.num_key_value_heads * d
    per_layer = 3 * h * shape.intermediate_size + h * (q + k + v + o)
    dense = per_layer * shape.num_hidden_layers + 2 * shape.vocab_size * h
    attention = 12 * sum(s * s for s in seq_lens) * d * shape.num_attention_heads * shape.num_hidden_layers
    return 6.0 * dense * sum(seq_lens) + attention


def qwen2_model(shape: Shape, device, seed: int):
    """A Qwen2ForCausalLM with random float32 weights at `shape`, built directly on `device`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos = eos_id(shape)
    config = Qwen2Config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=32_768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).float()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
    return model


def train_config(plan: Plan, device, *, checkpointing: bool, prompts: int, prompt_len: int, response_len: int):
    """The `TrainConfig` of a LUFFY run (defaults of the released run) sized for this benchmark: one mini-batch."""
    from luffy_trainer.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "model": {
                "path": "random-weights",
                "dtype": "bfloat16" if device.type == "cuda" else "float32",
                "gradient_checkpointing": checkpointing,
            },
            "data": {"max_prompt_length": prompt_len, "max_response_length": response_len},
            "optimization": {
                "prompts_per_step": prompts,
                "optimizer_steps_per_batch": 1,
                "micro_batch_tokens": plan.micro_batch_tokens,
            },
        }
    )


def luffy_samples(config, vocab: int, prompts: int, prompt_len: int, response_lens: list[int], seed: int):
    """A LUFFY batch through `build_samples`: per prompt, rollouts and one trace of random tokens; random 0/1 rewards
    for the rollouts and 1 for the trace, so the advantages are not all zero. `response_lens` cycles over samples."""
    from luffy_trainer.groups import GroupInput, build_samples

    rng = random.Random(seed)
    algo = config.algorithm
    lens = iter(response_lens * (prompts * (algo.n_on_policy + 1)))
    groups = [
        GroupInput(
            prompt_ids=[rng.randrange(vocab) for _ in range(prompt_len)],
            rollouts=[[rng.randrange(vocab) for _ in range(next(lens))] for _ in range(algo.n_on_policy)],
            rollout_rewards=[float(rng.random() < 0.5) for _ in range(algo.n_on_policy)],
            rollout_truncated=[True] * algo.n_on_policy,
            trace_ids=[rng.randrange(vocab) for _ in range(next(lens))],
            trace_reward=1.0,
        )
        for _ in range(prompts)
    ]
    return build_samples(groups, algo)


def _seq_lens(samples) -> list[int]:
    return [len(s.prompt_ids) + len(s.response_ids) for s in samples]


def _peak_memory(device) -> dict:
    """Peak memory of this process so far: the CUDA allocator's, or the resident high-water mark on CPU."""
    import torch

    _status_kb = logprob_memory()._status_kb

    if device.type == "cuda":
        return {
            "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"peak_rss_gb": _status_kb("VmHWM") / 2**20}


def _reset_peak(device) -> None:
    import gc

    import torch

    _reset_peak_rss = logprob_memory()._reset_peak_rss

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()


def update_row(plan: Plan, device, peak_tflops: float, name: str, checkpointing: bool) -> dict:
    """Tokens/s, MFU and peak memory of `PolicyUpdater.optimize` on one shape, its median over the timed steps."""
    PeakMemory = logprob_memory().PeakMemory
    from luffy_trainer.distributed import World
    from luffy_trainer.policy import PolicyUpdater, build_optimizer, prepare_policy

    shape = SHAPES[name]
    config = train_config(
        plan,
        device,
        checkpointing=checkpointing,
        prompts=plan.prompts,
        prompt_len=plan.prompt_len,
        response_len=plan.response_len,
    )
    samples = luffy_samples(config, shape.vocab_size, plan.prompts, plan.prompt_len, [plan.response_len], 1)
    _reset_peak(device)
    policy = prepare_policy(qwen2_model(shape, device, 0), config.model, World(), device, sharded=True)
    optimizer, scheduler = build_optimizer(policy, config)
    updater = PolicyUpdater(policy, optimizer, scheduler, config, eos_id(shape), World(), device)
    timer = PeakMemory(device)
    seconds, stats = [], {}
    for step in range(plan.warmup_steps + plan.steps):
        timer.sync()
        start = time.perf_counter()
        stats = updater.optimize(samples)
        timer.sync()
        if step >= plan.warmup_steps:
            seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds)
    flops = train_flops(shape, _seq_lens(samples))
    tokens = sum(_seq_lens(samples))
    return {
        "shape": name,
        "gradient_checkpointing": checkpointing,
        "dtype": config.model.dtype,
        "samples_per_step": len(samples),
        "tokens_per_step": tokens,
        "micro_batch_tokens": plan.micro_batch_tokens,
        "step_seconds": seconds,
        "tokens_per_s": tokens / step_s,
        "flops_per_step": flops,
        "tflops_per_s": flops / step_s / 1e12,
        "mfu": flops / step_s / (peak_tflops * 1e12),
        "loss": stats["loss"],
        "grad_norm": stats["grad_norm"],
        **_peak_memory(device),
    }


def bench_update(plan: Plan, device, peak_tflops: float) -> list[dict]:
    """`update_row` for every shape, checkpointing on and off; running out of GPU memory is a result, not the end."""
    import torch

    results = []
    for name in plan.shapes:
        for checkpointing in (True, False):
            try:
                row = update_row(plan, device, peak_tflops, name, checkpointing)
            except torch.OutOfMemoryError as exc:
                row = {"shape": name, "gradient_checkpointing": checkpointing, "error": " ".join(str(exc).split())}
                row |= _peak_memory(device)
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def bench_logprobs(plan: Plan, device) -> list[dict]:
    """Naive against chunked log-probs + entropy, forward and backward, at every shape's hidden size."""
    measure, run_isolated = logprob_memory().measure, logprob_memory().run_isolated

    results = []
    for hidden in sorted({SHAPES[n].hidden_size for n in plan.shapes}):
        for variant, chunk in (("naive", 0), ("chunked", plan.chunk_tokens)):
            sizes = (variant, plan.logprob_tokens, plan.logprob_vocab, hidden, chunk)
            if device.type == "cuda":  # the allocator's statistics are exact in-process; a first call warms up
                measure(*sizes, device=str(device), dtype="bfloat16")
                row = measure(*sizes, device=str(device), dtype="bfloat16") | {"dtype": "bfloat16"}
            else:
                row = run_isolated(*sizes) | {"dtype": "float32"}
            results.append({"tokens": plan.logprob_tokens, "vocab": plan.logprob_vocab, "hidden": hidden, **row})
            print(json.dumps(results[-1]), flush=True)
    return results


def bench_generation(plan: Plan, device) -> list[dict]:
    """Generated tokens/s of `HFEngine` (sampling at temperature 1) on each shape, saved to a temporary directory."""
    import torch
    from luffy_trainer.rollout.base import SamplingParams
    from luffy_trainer.rollout.hf_engine import HFEngine

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    rng = random.Random(2)
    results = []
    for name in plan.shapes:
        shape = SHAPES[name]
        prompts = [
            [rng.randrange(shape.vocab_size) for _ in range(plan.gen_prompt_len)] for _ in range(plan.gen_prompts)
        ]
        with tempfile.TemporaryDirectory(prefix="luffy-gpu-bench-") as tmp:
            qwen2_model(shape, device, 0).to(getattr(torch, dtype)).save_pretrained(tmp)
            engine = HFEngine(tmp, dtype=dtype, device=str(device), max_batch_prompts=plan.gen_prompts)
        engine.generate(prompts[:1], 1, SamplingParams(max_tokens=4), seed=0)  # warm-up
        timer_sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        _reset_peak(device)
        start = time.perf_counter()
        out = engine.generate(prompts, plan.gen_n, SamplingParams(max_tokens=plan.gen_tokens), seed=0)
        timer_sync()
        seconds = time.perf_counter() - start
        engine.close()
        generated = sum(len(c.token_ids) for group in out for c in group)
        results.append(
            {
                "shape": name,
                "dtype": dtype,
                "prompts": plan.gen_prompts,
                "n": plan.gen_n,
                "prompt_len": plan.gen_prompt_len,
                "max_tokens": plan.gen_tokens,
                "generated_tokens": generated,
                "seconds": seconds,
                "tokens_per_s": generated / seconds,
                **_peak_memory(device),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def _gradients(policy) -> dict:
    """Every parameter's gradient as a full float32 CPU tensor (FSDP2's sharded DTensors gathered)."""
    from torch.distributed.tensor import DTensor

    grads = {}
    for name, param in policy.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        grads[name] = grad.detach().float().cpu()
    return grads


def check_correctness(plan: Plan, device) -> dict:
    """One micro-batch's loss and gradients: on `device` through FSDP2 (bf16 compute on CUDA, float32 on CPU) with
    activation checkpointing, against float32 on CPU without FSDP or checkpointing, from the same weights.

    Tolerance: on CUDA bf16 keeps 8 significant bits (rounding 2^-9) in every matmul input of 24+ layers, so the
    gradient's relative L2 error is expected at the percent level: pass if it is at most 5e-2 and the loss is within
    2e-2 of the float32 one (relative, or absolute below 1). On CPU both sides compute in float32: 1e-4 for both.
    """
    import torch
    from luffy_trainer.distributed import World
    from luffy_trainer.groups import collate
    from luffy_trainer.loss import MiniBatchTotals
    from luffy_trainer.policy import PolicyUpdater, build_optimizer, prepare_policy

    shape = SHAPES[plan.check_shape]
    lens = [plan.check_response_len // 2 + i * plan.check_response_len // 16 for i in range(8)]  # ragged responses
    sides = {}
    reference = qwen2_model(shape, "cpu", 3)
    for side, dev, lm, sharded in (
        ("reference", torch.device("cpu"), reference, False),
        ("device", device, copy.deepcopy(reference), True),
    ):
        config = train_config(
            plan,
            dev,
            checkpointing=sharded,
            prompts=1,
            prompt_len=plan.check_prompt_len,
            response_len=max(lens),
        )
        samples = luffy_samples(config, shape.vocab_size, 1, plan.check_prompt_len, lens, 4)
        batch = collate(samples, eos_id(shape))
        policy = prepare_policy(lm, config.model, World(), dev, sharded=sharded)
        optimizer, scheduler = build_optimizer(policy, config)
        updater = PolicyUpdater(policy, optimizer, scheduler, config, eos_id(shape), World(), dev)
        metrics = updater.backward(batch, None, MiniBatchTotals.of([batch]))
        sides[side] = {"dtype": config.model.dtype, "loss": float(metrics["loss"]), "grads": _gradients(policy)}
        del policy, optimizer, scheduler, updater
    ref, got = sides["reference"], sides["device"]
    names = sorted(ref["grads"])
    if names != sorted(got["grads"]):
        raise RuntimeError(f"parameter names differ: {sorted(set(names) ^ set(got['grads']))[:5]}")
    diff = math.sqrt(sum(float((got["grads"][n] - ref["grads"][n]).pow(2).sum()) for n in names))
    norm = math.sqrt(sum(float(ref["grads"][n].pow(2).sum()) for n in names))
    dot = sum(float((got["grads"][n] * ref["grads"][n]).sum()) for n in names)
    norm_got = math.sqrt(sum(float(got["grads"][n].pow(2).sum()) for n in names))
    per_param = {
        n: float((got["grads"][n] - ref["grads"][n]).norm() / ref["grads"][n].norm().clamp_min(1e-30)) for n in names
    }
    worst = max(per_param, key=per_param.get)
    loss_err = abs(got["loss"] - ref["loss"]) / max(1.0, abs(ref["loss"]))
    grad_tol, loss_tol = (5e-2, 2e-2) if device.type == "cuda" else (1e-4, 1e-4)
    result = {
        "shape": plan.check_shape,
        "tokens": sum(len(s.prompt_ids) + len(s.response_ids) for s in samples),
        "reference_dtype": ref["dtype"],
        "device_dtype": got["dtype"],
        "loss_reference": ref["loss"],
        "loss_device": got["loss"],
        "loss_error": loss_err,
        "grad_norm_reference": norm,
        "grad_rel_l2_error": diff / norm,
        "grad_cosine": dot / (norm * norm_got),
        "worst_parameter": worst,
        "worst_parameter_rel_error": per_param[worst],
        "grad_tolerance": grad_tol,
        "loss_tolerance": loss_tol,
        "within_tolerance": diff / norm <= grad_tol and loss_err <= loss_tol,
    }
    print(json.dumps(result), flush=True)
    return result


def environment(device, peak_tflops: float) -> dict:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpus": os.cpu_count(),
        "peak_tflops": peak_tflops,
    }
    if device.type == "cuda":
        env["device_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return env


SECTIONS = ("update", "logprobs", "correctness", "generation")  # the acceptance measure first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory of gpu.json (default: $OUT)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and lengths (seconds on CPU)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="the device's dense bf16 peak")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out DIR (or $OUT) is required")

    if args.cpu:  # before torch initialises CUDA: FSDP2's device mesh follows torch.cuda.is_available()
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if not args.cpu and not torch.cuda.is_available():
        parser.error("CUDA is not available; pass --cpu (with --tiny for a quick check)")
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    plan = TINY if args.tiny else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "mode": ("cpu" if args.cpu else "cuda") + ("-tiny" if args.tiny else ""),
        "environment": environment(device, args.peak_tflops),
        "plan": asdict(plan),
        "shapes": {n: asdict(SHAPES[n]) for n in plan.shapes},
        "flops_formula": "verl _estimate_qwen2_flops (benchmarks/gpu.py train_flops)",
    }
    runners = {
        "correctness": lambda: check_correctness(plan, device),
        "logprobs": lambda: bench_logprobs(plan, device),
        "update": lambda: bench_update(plan, device, args.peak_tflops),
        "generation": lambda: bench_generation(plan, device),
    }
    for section in args.sections:
        start = time.perf_counter()
        report[section] = runners[section]()
        report.setdefault("section_seconds", {})[section] = time.perf_counter() - start
        (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"{section}: done in {report['section_seconds'][section]:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
