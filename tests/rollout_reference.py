"""Independent references for the rollout tests: Hugging Face `generate` and a plain forward pass on the tiny models."""

from __future__ import annotations

import random
import socket
from functools import cache

import torch

# Prompt lengths in tokens: short ones, and two longer than one prefix-cache block (128 tokens on CPU), where stale
# cached keys/values would show after a weight update if the cache were not reset.
PROMPT_LENGTHS = (5, 17, 46, 140, 212)
MAX_TOKENS = 16
MAX_MODEL_LEN = 512


def make_prompts(lengths=PROMPT_LENGTHS, seed: int = 7) -> list[list[int]]:
    """Deterministic token-id prompts (ids the tokenizer knows, no special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(n)] for n in lengths]


@cache
def load_hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model_dir: str, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    """Greedy continuation by transformers' own `generate` (stops after EOS, which it includes)."""
    model = load_hf(model_dir)
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id,
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def hf_logprobs(
    model_dir: str,
    prompt: list[int],
    completion: list[int],
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
) -> list[float]:
    """log mu(completion[t] | prompt + completion[:t]) from one forward pass over the whole sequence, mu being the
    sampling distribution: softmax(logits / temperature) restricted to the top_k most likely tokens and to the most
    likely tokens whose preceding mass is below top_p (the nucleus), renormalised."""
    model = load_hf(model_dir)
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].double() / temperature
    order = logits.argsort(dim=-1, descending=True)
    keep_sorted = torch.ones_like(logits, dtype=torch.bool)
    if top_k > 0:
        keep_sorted[:, top_k:] = False
    probs_sorted = logits.gather(-1, order).masked_fill(~keep_sorted, -torch.inf).softmax(-1)
    mass_before = probs_sorted.cumsum(-1) - probs_sorted
    keep_sorted &= mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    logp = logits.masked_fill(~keep, -torch.inf).log_softmax(-1)
    return logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1).tolist()


def trainer_logprobs(model_dir: str, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    """The trainer's recomputation of the same log-probs (`luffy_trainer.logprobs.token_logprobs`, the loss's input)."""
    from luffy_trainer.logprobs import token_logprobs

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp, _ = token_logprobs(
            load_hf(model_dir), ids, torch.ones_like(ids), len(completion), temperature=temperature, with_entropy=False
        )
    return logp[0].tolist()


def hf_weights(model_dir: str) -> list[tuple[str, torch.Tensor]]:
    """The model's weights as the trainer passes them: Hugging Face names, `named_parameters()` order."""
    return [(name, p.detach()) for name, p in load_hf(model_dir).named_parameters()]


def free_port_block(count: int) -> int:
    """A first port P such that P .. P+count-1 are free on 127.0.0.1 now."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            sockets = []
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()


def max_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def assert_logprobs_match(
    model_dir: str, prompt: list[int], tokens: list[int], logprobs: list[float], **sampling: float
) -> None:
    """Returned per-token log-probs agree with a Hugging Face forward pass within 1e-4 (float32); `sampling`
    (temperature, top_k, top_p) as in `hf_logprobs`."""
    assert max_gap(logprobs, hf_logprobs(model_dir, prompt, tokens, **sampling)) < 1e-4


def assert_greedy_matches_hf(out, prompts, model_dir: str, version: int, max_tokens: int = MAX_TOKENS) -> None:
    """Every completion equals HF generate's greedy tokens, carries `version`, and has HF's log-probs."""
    assert len(out) == len(prompts)
    for prompt, completions in zip(prompts, out, strict=True):
        for c in completions:
            assert c.token_ids == hf_greedy(model_dir, prompt, max_tokens), f"prompt of {len(prompt)} tokens"
            assert c.weight_version == version
            assert_logprobs_match(model_dir, prompt, c.token_ids, c.logprobs)


def token_ids(out) -> list[list[tuple[int, ...]]]:
    return [[tuple(c.token_ids) for c in completions] for completions in out]
