"""Per-token log-probabilities and entropies of response tokens, without materialising `[B, T, V]` logits.

With Qwen2.5's vocabulary (V = 151,936) the float32 logits of one 8k-token response alone take 5 GB, and the naive
log-softmax + entropy graph keeps several tensors of that size alive for backward. Here the transformer body runs as
usual, but the output projection, log-softmax, target gather and entropy run over chunks of `chunk_tokens` tokens in
a custom autograd function that saves only the hidden states: backward recomputes each chunk's logits and applies the
analytic gradient, so at most a few `[chunk_tokens, V]` float32 buffers are alive at any time.

Batch layout (verl style): each row is [prompt, left-padded to width P | response, right-padded to width R].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift the prompt (pads get position 0)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """Float32 logits of one chunk, divided by the sampling temperature (a fresh tensor, safe to modify in place)."""
    logits = F.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def _chunk_forward(hidden, weight, bias, targets, temperature: float, with_entropy: bool):
    """Target log-probs, log-partition and (optionally) entropy of one chunk; two `[n, V]` buffers at most."""
    z = _chunk_logits(hidden, weight, bias, temperature)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, lse, None
    log_probs = z.sub_(lse[:, None])
    return logp, lse, -(log_probs.exp().mul_(log_probs)).sum(dim=-1)


def _chunk_logits_grad(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, temperature: float):
    """Gradient of sum(grad_logp * logp + grad_entropy * H) w.r.t. one chunk's raw logits (float32 `[n, V]`).

    With p = softmax(z) and z = logits / temperature:
      d logp_y / dz = onehot(y) - p,   d H / dz = -p * (log p + H),
    so the sum is -p * (grad_entropy * (log p + H) + grad_logp), plus grad_logp at the target.
    """
    log_probs = _chunk_logits(hidden, weight, bias, temperature).sub_(lse[:, None])
    probs = log_probs.exp()
    if grad_entropy is not None:
        coeff = log_probs.add_(entropy[:, None]).mul_(grad_entropy[:, None])
        if grad_logp is not None:
            coeff.add_(grad_logp[:, None])
    else:
        coeff = grad_logp[:, None]
    grad = probs.mul_(coeff).neg_()
    if grad_logp is not None:
        grad.scatter_add_(-1, targets[:, None], grad_logp[:, None])
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


class _ChunkedHeadLogProbs(torch.autograd.Function):
    """lm_head + log-softmax + target gather (+ entropy) over token chunks; backward recomputes each chunk's logits.

    Only the inputs and three `[N]` vectors are saved, so forward and backward each hold about two float32
    `[chunk_tokens, V]` buffers at a time (the per-chunk helpers return before the next chunk starts).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_tokens, with_entropy):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            chunk_logp, chunk_lse, chunk_entropy = _chunk_forward(
                hidden[start:end], weight, bias, targets[start:end], temperature, with_entropy
            )
            logp[start:end], lse[start:end] = chunk_logp, chunk_lse
            if with_entropy:
                entropy[start:end] = chunk_entropy
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_tokens = chunk_tokens
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulate the weight gradient in float32 across chunks, whatever the parameter dtype.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, hidden.shape[0])
            h = hidden[start:end]
            grad_z = _chunk_logits_grad(
                h,
                weight,
                bias,
                targets[start:end],
                lse[start:end],
                entropy[start:end] if grad_entropy is not None else None,
                grad_logp[start:end] if grad_logp is not None else None,
                grad_entropy[start:end] if grad_entropy is not None else None,
                ctx.temperature,
            )
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_z.to(weight.dtype) @ weight
            if grad_weight is not None:
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_z.T, h.float())
                else:
                    grad_weight.add_(grad_z.to(weight.dtype).T @ h)
            if grad_bias is not None:
                grad_bias.add_(grad_z.sum(dim=0))
            del grad_z  # free this chunk's buffer before the next one is allocated
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def chunked_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 512,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of `targets [N]` and entropy under softmax((hidden [N, H] @ weight.T + bias) / temperature).

    Both are float32 `[N]` and differentiable w.r.t. hidden, weight and bias; logits are upcast to float32 one chunk
    of `chunk_tokens` rows at a time and never stored.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] and targets [N]; got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logp, entropy = _ChunkedHeadLogProbs.apply(
        hidden, weight, bias, targets.long(), float(temperature), int(chunk_tokens), bool(with_entropy)
    )
    return logp, entropy if with_entropy else None


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_width: int,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 512,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob `[B, R]` (float32) of each response token given everything before it, and its entropy `[B, R]`.

    `input_ids`/`attention_mask` are `[B, P + R]`: prompts left-padded to P, responses right-padded to
    R = `response_width`; position ids come from the mask. The log-prob of response token j is read from the
    distribution at the previous column, softmax(logits / temperature). Positions whose mask is 0 (response padding)
    are not computed and hold 0 in both outputs; callers mask them anyway. Gradients flow to every model parameter.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, T]; got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    batch, width = input_ids.shape
    if not 0 < response_width < width:
        raise ValueError(f"response_width must be in [1, {width - 1}] for sequences of width {width}")
    prompt_width = width - response_width
    if not bool(attention_mask[:, prompt_width - 1].all()):
        raise ValueError(
            f"every prompt must end with a real token at column {prompt_width - 1} (prompts left-padded to width "
            f"{prompt_width})"
        )
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"token_logprobs needs a linear output projection, got {type(head).__name__}")
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        raise NotImplementedError("token_logprobs does not implement final_logit_softcapping")

    body = model.get_decoder()
    hidden = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    predicting = hidden[:, prompt_width - 1 : width - 1]
    targets = input_ids[:, prompt_width:]
    valid = attention_mask[:, prompt_width:].bool()
    logp_flat, entropy_flat = chunked_head_logprobs(
        predicting[valid],
        head.weight,
        head.bias,
        targets[valid],
        temperature=temperature,
        chunk_tokens=chunk_tokens,
        with_entropy=with_entropy,
    )
    zeros = torch.zeros(batch, response_width, dtype=torch.float32, device=input_ids.device)
    logp = zeros.masked_scatter(valid, logp_flat)
    entropy = zeros.masked_scatter(valid, entropy_flat) if entropy_flat is not None else None
    return logp, entropy
