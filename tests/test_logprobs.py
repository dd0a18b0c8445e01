"""Chunked response log-probs and entropies against the naive full-logits computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
from luffy_trainer.logprobs import chunked_head_logprobs, token_logprobs

PROMPT_LENGTHS = [5, 3, 6]
RESPONSE_LENGTHS = [4, 7, 1]
PAD_ID = 0


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def padded_batch(vocab_size: int, seed: int = 0):
    """Prompts left-padded to the longest prompt, responses right-padded to the longest response."""
    gen = torch.Generator().manual_seed(seed)
    width_p, width_r = max(PROMPT_LENGTHS), max(RESPONSE_LENGTHS)
    input_ids = torch.full((len(PROMPT_LENGTHS), width_p + width_r), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    rows = []
    for i, (p, r) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS, strict=True)):
        prompt = torch.randint(1, vocab_size, (p,), generator=gen)
        response = torch.randint(1, vocab_size, (r,), generator=gen)
        input_ids[i, width_p - p : width_p] = prompt
        input_ids[i, width_p : width_p + r] = response
        mask[i, width_p - p : width_p + r] = 1
        rows.append((prompt, response))
    return input_ids, mask, width_r, rows


def naive_logprobs(model, input_ids, mask, width_r, temperature):
    """Full [B, T, V] logits from the HF forward, log-softmax, gather, entropy -(p log p) summed over V."""
    # Positions written out row by row: 0, 1, 2, ... over the real tokens, 0 on left padding.
    positions = torch.zeros_like(input_ids)
    for i in range(input_ids.shape[0]):
        real = mask[i].nonzero().squeeze(-1)
        positions[i, real] = torch.arange(len(real))
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits.float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    width_p = input_ids.shape[1] - width_r
    predicting = log_probs[:, width_p - 1 : -1]
    logp = predicting.gather(-1, input_ids[:, width_p:, None]).squeeze(-1)
    entropy = -(predicting.exp() * predicting).sum(-1)
    return logp, entropy


def weighted_loss(logp, entropy, valid, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(logp.shape, generator=gen)
    w2 = torch.randn(logp.shape, generator=gen)
    return ((w1 * logp + w2 * entropy) * valid).sum()


def param_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("chunk_tokens", "temperature"), [(1, 1.0), (4, 1.0), (5, 0.7), (12, 1.0), (1024, 1.3)])
def test_values_and_gradients_match_naive(model, chunk_tokens, temperature):
    input_ids, mask, width_r, _ = padded_batch(model.config.vocab_size)
    valid = mask[:, -width_r:].bool()
    assert valid.sum() == sum(RESPONSE_LENGTHS) == 12  # chunk sizes 5 and 12 don't / do divide the token count

    ref_logp, ref_entropy = naive_logprobs(model, input_ids, mask, width_r, temperature)
    ref_grads = param_grads(model, weighted_loss(ref_logp, ref_entropy, valid))

    logp, entropy = token_logprobs(
        model, input_ids, mask, width_r, temperature=temperature, chunk_tokens=chunk_tokens, with_entropy=True
    )
    assert logp.dtype == entropy.dtype == torch.float32
    assert logp.shape == entropy.shape == (3, width_r)
    torch.testing.assert_close(logp[valid], ref_logp[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[valid], ref_entropy[valid], atol=1e-5, rtol=1e-5)
    assert torch.all(logp[~valid] == 0) and torch.all(entropy[~valid] == 0)
    assert torch.all(logp[valid] < 0) and torch.all(entropy[valid] > 0)

    grads = param_grads(model, weighted_loss(logp, entropy, valid))
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert ref_grads["lm_head.weight"].abs().sum() > 0 and ref_grads["model.embed_tokens.weight"].abs().sum() > 0


def test_logprobs_only_gradient_matches_naive(model):
    input_ids, mask, width_r, _ = padded_batch(model.config.vocab_size, seed=3)
    valid = mask[:, -width_r:].bool()
    ref_logp, _ = naive_logprobs(model, input_ids, mask, width_r, 1.0)
    ref_grads = param_grads(model, (ref_logp * valid).sum())
    logp, entropy = token_logprobs(model, input_ids, mask, width_r, chunk_tokens=5, with_entropy=False)
    assert entropy is None
    grads = param_grads(model, (logp * valid).sum())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_each_row_matches_an_unpadded_hf_forward(model):
    """Left padding changes nothing: row i equals the HF forward of its real tokens alone, with default positions."""
    input_ids, mask, width_r, rows = padded_batch(model.config.vocab_size, seed=5)
    with torch.no_grad():
        logp, _ = token_logprobs(model, input_ids, mask, width_r, chunk_tokens=3)
        for i, (prompt, response) in enumerate(rows):
            ids = torch.cat([prompt, response])[None]
            log_probs = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
            expected = log_probs[len(prompt) - 1 : -1].gather(-1, response[:, None]).squeeze(-1)
            torch.testing.assert_close(logp[i, : len(response)], expected, atol=1e-5, rtol=1e-5)


def test_head_with_bias_and_bfloat16_weights():
    """The output projection alone: a bias gets its gradient; with bf16 weights the chunked path is no less accurate
    than the naive bf16 path (both measured against float32 arithmetic on the same bf16-rounded inputs)."""
    gen = torch.Generator().manual_seed(7)
    n, h, v = 11, 16, 50
    targets = torch.randint(0, v, (n,), generator=gen)
    w_logp, w_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    base = [torch.randn(*shape, generator=gen).bfloat16() for shape in [(n, h), (v, h), (v,)]]

    def naive(hidden, weight, bias):
        log_probs = torch.log_softmax((hidden @ weight.T + bias).float() / 0.9, dim=-1)
        return log_probs.gather(-1, targets[:, None]).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)

    def chunked(hidden, weight, bias):
        return chunked_head_logprobs(hidden, weight, bias, targets, temperature=0.9, chunk_tokens=4)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in base]
        logp, entropy = fn(*leaves)
        grads = torch.autograd.grad((w_logp * logp + w_ent * entropy).sum(), leaves)
        return [logp, entropy, *grads]

    exact = run(naive, torch.float32)
    for got, ref in zip(run(chunked, torch.float32), exact, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert exact[-1].abs().sum() > 0  # the bias gradient is exercised

    naive_bf16, chunked_bf16 = run(naive, torch.bfloat16), run(chunked, torch.bfloat16)
    for got, naive_got, ref in zip(chunked_bf16, naive_bf16, exact, strict=True):
        assert got.dtype == naive_got.dtype
        error, naive_error = (got.float() - ref).abs().max(), (naive_got.float() - ref).abs().max()
        assert error <= 1.5 * naive_error, (error, naive_error)
        assert error <= 0.02 * ref.abs().max()


def test_rejects_a_layout_that_is_not_left_padded(model):
    input_ids, mask, width_r, _ = padded_batch(model.config.vocab_size)
    bad = mask.clone()
    bad[0, -width_r - 1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        token_logprobs(model, input_ids, bad, width_r)
    with pytest.raises(ValueError, match="response_width"):
        token_logprobs(model, input_ids, mask, input_ids.shape[1])
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logprobs(model, input_ids, mask, width_r, chunk_tokens=0)
