"""HFEngine (transformers generate) against an independent reference: a token-by-token argmax over full forward
passes, without generate, caches or padding."""

from __future__ import annotations

import pytest
import torch
from luffy_trainer.rollout import RolloutEngine, RolloutError, SamplingParams
from luffy_trainer.rollout.hf_engine import HFEngine
from rollout_reference import (
    MAX_TOKENS,
    assert_logprobs_match,
    hf_logprobs,
    hf_weights,
    load_hf,
    make_prompts,
    max_gap,
    trainer_logprobs,
)

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


@torch.no_grad()
def argmax_decode(model_dir: str, prompt: list[int], max_tokens: int) -> list[int]:
    model = load_hf(model_dir)
    eos = model.generation_config.eos_token_id
    ids = list(prompt)
    for _ in range(max_tokens):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token == eos:
            break
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = HFEngine(tiny_model_dir, dtype="float32", device="cpu", max_batch_prompts=3)
    yield engine
    engine.close()


def test_greedy_batched_with_left_padding_equals_argmax_decoding(engine, tiny_model_dir):
    assert isinstance(engine, RolloutEngine)
    prompts = make_prompts()
    out = engine.generate(prompts, n=2, params=GREEDY)
    assert len(out) == len(prompts)
    for prompt, completions in zip(prompts, out, strict=True):
        assert len(completions) == 2 and completions[0] == completions[1]
        c = completions[0]
        assert c.token_ids == argmax_decode(tiny_model_dir, prompt, MAX_TOKENS)
        assert c.finish_reason == ("stop" if len(c.token_ids) < MAX_TOKENS else "length")
        assert c.weight_version == 0
        assert_logprobs_match(tiny_model_dir, prompt, c.token_ids, c.logprobs)


def test_sampling_is_seeded_and_returns_the_sampled_distributions_logprobs(engine, tiny_model_dir):
    prompts = make_prompts((9, 30))
    params = SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, top_k=50)
    first = engine.generate(prompts, n=3, params=params, seed=11)
    assert first == engine.generate(prompts, n=3, params=params, seed=11)
    assert first != engine.generate(prompts, n=3, params=params, seed=12)
    for prompt, completions in zip(prompts, first, strict=True):
        assert len(completions) == 3
        for c in completions:
            # softmax(logits / 0.7) over the 50 most likely tokens and then the 0.9 nucleus, renormalised
            assert_logprobs_match(tiny_model_dir, prompt, c.token_ids, c.logprobs, temperature=0.7, top_k=50, top_p=0.9)


def test_logprobs_at_temperature_are_what_the_trainer_recomputes(engine, tiny_model_dir):
    """As with vLLM: at temperature 0.7 the returned log-probs equal the trainer's token_logprobs(logits / 0.7)."""
    prompts = make_prompts((9, 30))
    out = engine.generate(prompts, n=2, params=SamplingParams(max_tokens=12, temperature=0.7), seed=3)
    for prompt, completions in zip(prompts, out, strict=True):
        for c in completions:
            assert max_gap(c.logprobs, trainer_logprobs(tiny_model_dir, prompt, c.token_ids, 0.7)) < 1e-4
            assert max_gap(c.logprobs, hf_logprobs(tiny_model_dir, prompt, c.token_ids)) > 1e-2


def test_update_weights_switches_model_and_version(engine, tiny_model_dir, tiny_model_b_dir):
    prompts = make_prompts((6, 140))
    engine.update_weights(hf_weights(tiny_model_b_dir), version=3)
    out = engine.generate(prompts, n=1, params=GREEDY)
    assert engine.weight_version == 3
    for prompt, (c,) in zip(prompts, out, strict=True):
        assert c.token_ids == argmax_decode(tiny_model_b_dir, prompt, MAX_TOKENS)
        assert c.weight_version == 3
    engine.update_weights(iter(hf_weights(tiny_model_dir)), version=4)  # any iterable, e.g. a generator
    assert engine.generate(prompts[:1], 1, GREEDY)[0][0].token_ids == argmax_decode(tiny_model_dir, prompts[0], 16)


def test_bad_updates_and_requests_are_refused_with_the_cause(engine):
    version = engine.weight_version
    with pytest.raises(RolloutError, match=r"no weight named 'lm\.head'"):
        engine.update_weights([("lm.head", torch.zeros(1))], version=1)
    with pytest.raises(RolloutError, match=r"has shape \(2,\)"):
        engine.update_weights([("lm_head.weight", torch.zeros(2))], version=1)
    with pytest.raises(RolloutError, match="non-negative int"):
        engine.update_weights([], version=-1)
    with pytest.raises(RolloutError, match="prompt 1 is empty"):
        engine.generate([[5], []], 1, GREEDY)
    with pytest.raises(RolloutError, match="top_p"):
        engine.generate([[5]], 1, SamplingParams(max_tokens=4, top_p=0.0))
    assert engine.weight_version == version  # nothing was applied
