"""Peak memory of response log-probs + entropy, forward and backward: naive full logits vs luffy's chunked head.

What is measured: the output projection of a causal LM (a float32 `[V, H]` lm_head, V = 151,936 as in Qwen2.5,
H = 896 as in Qwen2.5-0.5B) over T random final hidden states (batch 1), then per-token log-prob of a target token and
the entropy of the distribution, and the backward pass of sum(w1 * logp + w2 * entropy) into the hidden states and
the lm_head weight. This is the part of the policy forward/backward whose memory grows with T * V; the transformer
body is the same in both variants and is left out.

How: each variant runs in a fresh Python process on CPU. After the inputs and weights exist, the process resets its
peak-RSS counter (Linux /proc/self/clear_refs, value 5) and reports VmHWM - VmRSS at that point, i.e. the extra
resident memory at the high-water mark of forward + backward. That includes the float32 lm_head weight gradient
(V * H * 4 bytes, 545 MB here), which both variants must produce; the table also shows the peak without it.

    .venv/bin/python benchmarks/logprob_memory.py            # T = 4096, chunk sizes 256, 512, 1024
    .venv/bin/python benchmarks/logprob_memory.py --tokens 1024 --chunks 128 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MB = 1024 * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; this benchmark needs Linux")


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        raise RuntimeError(f"cannot reset the peak RSS counter via /proc/self/clear_refs: {exc}") from None


class PeakMemory:
    """Extra memory at the high-water mark since `start()`: the CUDA allocator's statistics on a GPU, resident memory
    (Linux VmHWM - VmRSS) on CPU, where only a fresh process gives a faithful number (freed heap is reused)."""

    def __init__(self, device) -> None:
        self.device = device
        self.base = 0

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        import gc

        import torch

        gc.collect()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _status_kb("VmRSS") * 1024
            _reset_peak_rss()

    def extra_mb(self) -> float:
        import torch

        self.sync()
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / MB
        return (_status_kb("VmHWM") * 1024 - self.base) / MB


def measure(
    variant: str,
    tokens: int,
    vocab: int,
    hidden_size: int,
    chunk_tokens: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """Run one variant in this process and return its peak extra memory and wall time.

    Inputs and lm_head are in `dtype`; the naive path upcasts its logits to float32 as the chunked one does per chunk.
    """
    import torch
    from luffy_trainer.logprobs import chunked_head_logprobs

    dev, dt = torch.device(device), getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(dev, dt).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.02).to(dev, dt).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(dev)
    w_logp, w_entropy = torch.randn(tokens, generator=gen).to(dev), torch.randn(tokens, generator=gen).to(dev)
    peak = PeakMemory(dev)
    peak.start()
    start = time.perf_counter()
    if variant == "naive":
        log_probs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
        logp = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    else:
        logp, entropy = chunked_head_logprobs(hidden, weight, None, targets, chunk_tokens=chunk_tokens)
    (w_logp * logp + w_entropy * entropy).sum().backward()
    peak.sync()
    seconds = time.perf_counter() - start
    peak_mb = peak.extra_mb()
    assert weight.grad is not None and hidden.grad is not None
    return {
        "variant": variant,
        "chunk_tokens": chunk_tokens if variant == "chunked" else None,
        "peak_mb": peak_mb,
        "weight_grad_mb": weight.grad.numel() * weight.grad.element_size() / MB,
        "seconds": seconds,
    }


def run_isolated(variant: str, tokens: int, vocab: int, hidden: int, chunk_tokens: int = 0) -> dict:
    """`measure` on CPU in a fresh process, so that its peak resident memory is its own."""
    sizes = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "chunk": chunk_tokens}
    cmd = [sys.executable, __file__, "--child", variant, *(f"--{k}={v}" for k, v in sizes.items())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.vocab, args.hidden, args.chunk)))
        return 0

    import torch

    sizes = (args.tokens, args.vocab, args.hidden)
    results = [run_isolated("naive", *sizes)] + [run_isolated("chunked", *sizes, c) for c in args.chunks]
    naive = results[0]
    grad_mb = naive["weight_grad_mb"]
    threads = torch.get_num_threads()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads)"
    print(f"T = {args.tokens}, V = {args.vocab}, H = {args.hidden}, float32, batch 1; {machine}")
    print()
    print(
        "| variant | chunk tokens | peak extra memory (MB) | % of naive | without lm_head grad (MB) | % of naive "
        "| time (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        share = 100 * r["peak_mb"] / naive["peak_mb"]
        share_no_grad = 100 * (r["peak_mb"] - grad_mb) / (naive["peak_mb"] - grad_mb)
        chunk = r["chunk_tokens"] or "-"
        print(
            f"| {r['variant']} | {chunk} | {r['peak_mb']:.0f} | {share:.1f}% | {r['peak_mb'] - grad_mb:.0f} "
            f"| {share_no_grad:.1f}% | {r['seconds']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
