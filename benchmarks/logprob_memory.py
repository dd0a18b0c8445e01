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


def measure(variant: str, tokens: int, vocab: int, hidden_size: int, chunk_tokens: int) -> dict:
    """Run one variant in this process and return its peak extra memory and wall time."""
    import gc

    import torch
    from luffy_trainer.logprobs import chunked_head_logprobs

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    w_logp, w_entropy = torch.randn(tokens, generator=gen), torch.randn(tokens, generator=gen)
    gc.collect()
    baseline_kb = _status_kb("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    if variant == "naive":
        log_probs = torch.log_softmax(hidden @ weight.T, dim=-1)
        logp = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    else:
        logp, entropy = chunked_head_logprobs(hidden, weight, None, targets, chunk_tokens=chunk_tokens)
    (w_logp * logp + w_entropy * entropy).sum().backward()
    seconds = time.perf_counter() - start
    peak_mb = (_status_kb("VmHWM") - baseline_kb) * 1024 / MB
    assert weight.grad is not None and hidden.grad is not None
    return {
        "variant": variant,
        "chunk_tokens": chunk_tokens if variant == "chunked" else None,
        "peak_mb": peak_mb,
        "weight_grad_mb": weight.grad.numel() * weight.grad.element_size() / MB,
        "seconds": seconds,
    }


def run_isolated(variant: str, args: argparse.Namespace, chunk_tokens: int = 0) -> dict:
    sizes = {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "chunk": chunk_tokens}
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

    results = [run_isolated("naive", args)] + [run_isolated("chunked", args, c) for c in args.chunks]
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
