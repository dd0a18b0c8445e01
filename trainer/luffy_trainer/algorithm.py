"""The LUFFY objective as pure tensor functions (arXiv 2504.14945 and its released code).

Nothing here knows about models, engines or I/O. Shapes: `[B, T]` per-token tensors over the response positions of B
sequences padded to width T; `advantages` is `[B]` (one scalar per sequence, broadcast to its tokens).

The LUFFY policy loss per response token t of sequence i, with mask m and off-policy indicator o:
  on-policy  (o = 0):  l = -A_i * r,        r = exp(logp - logp_old)      (PPO-clipped when clip_eps is set)
  off-policy (o = 1):  l = -A_i * f(p),     p = exp(logp), f(p) = p / (p + gamma)   (never clipped)
The behaviour policy of an off-policy trace is taken as 1, so its ratio is p itself; the shaping f re-weights the
gradient of each trace token by gamma*p/(p+gamma)^2, which favours low-probability tokens over plain importance
sampling (weight p) without the uniform weight 1 of SFT.
"""

from __future__ import annotations

from typing import Literal

import torch

# `algorithm.aggregation: token-mean` is not among them: loss.py computes it as a token sum over the mini-batch's token
# count, so that it does not depend on how a mini-batch is cut into micro-batches and ranks.
Aggregation = Literal["token-sum", "seq-mean-token-mean"]


def group_advantages(rewards: torch.Tensor, *, normalize_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages of `[groups, group_size]` rewards: reward minus its group mean, optionally / (std + eps).

    In LUFFY mode the off-policy samples are part of each group, so they move the mean like any other sample. The std
    is the unbiased one over the group (0 for a group of one sample).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, group_size], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centred
    if rewards.shape[1] < 2:
        std = torch.zeros_like(rewards[:, :1])
    else:
        std = rewards.std(dim=1, keepdim=True, unbiased=True)
    return centred / (std + eps)


def shape_off_policy_probs(probs: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Policy shaping f(p) = p / (p + gamma); gamma None means no shaping, f(p) = p."""
    if gamma is None:
        return probs
    return probs / (probs + gamma)


def aggregate_tokens(
    values: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation = "token-sum",
    norm_length: int | None = None,
) -> torch.Tensor:
    """Reduce `[B, T]` token values over `mask` to a scalar.

    - `token-sum`: sum of masked values / norm_length (None: T, the padded response width). This is the released
      LUFFY default (norm_length = max response length = 8192): a constant divisor, so longer responses weigh more.
    - `seq-mean-token-mean`: mean over sequences (those with at least one masked token) of the per-sequence mean.
    """
    mask = mask.to(values.dtype)
    masked = values * mask
    if aggregation == "token-sum":
        divisor = norm_length if norm_length is not None else values.shape[-1]
        return masked.sum() / divisor
    if aggregation == "seq-mean-token-mean":
        counts = mask.sum(dim=-1)
        per_seq = masked.sum(dim=-1) / counts.clamp(min=1.0)
        present = (counts > 0).to(values.dtype)
        return (per_seq * present).sum() / present.sum().clamp(min=1.0)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected token-sum or seq-mean-token-mean")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is set (0 when none are)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    off_policy_mask: torch.Tensor,
    *,
    gamma: float | None = 0.1,
    clip_eps: float | None = None,
    aggregation: Aggregation = "token-sum",
    norm_length: int | None = None,
    off_policy_max_clip: float | None = None,
    off_policy_min_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mixed-policy loss (module docstring), aggregated over the response tokens.

    `off_policy_mask` marks trace tokens; `old_logprobs` is only read on on-policy tokens. The optional clamps bound
    the shaped off-policy weight f(p) (disabled in the released main run). Returns the loss and detached metrics:
    `pg_loss`, `on_policy_loss` and `off_policy_loss` (the same aggregation over each part, so they add up to the
    loss), `off_policy_prob_mean` (mean p over trace tokens), `off_policy_shaped_mean` (mean f(p)),
    `on_policy_ratio_mean`, `clip_fraction` (share of on-policy tokens whose clipped branch is taken) and the token
    counts.
    """
    if advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"advantages must be [B] with B = {logprobs.shape[0]}, got {tuple(advantages.shape)}")
    response_mask = response_mask.bool()
    off = off_policy_mask.bool() & response_mask
    on = ~off_policy_mask.bool() & response_mask
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)

    # On-policy: ratio to the policy that sampled (or, with one optimizer step per batch, exactly 1 in value).
    log_ratio = torch.where(on, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    on_loss_tok = -adv * ratio
    if clip_eps is not None:
        clipped_loss_tok = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        clip_taken = clipped_loss_tok > on_loss_tok
        on_loss_tok = torch.maximum(on_loss_tok, clipped_loss_tok)
    else:
        clip_taken = torch.zeros_like(on)

    # Off-policy: behaviour probability 1, ratio = p, shaped by f and never clipped.
    probs = torch.exp(torch.where(off, logprobs, torch.zeros_like(logprobs)))
    shaped = shape_off_policy_probs(probs, gamma)
    if off_policy_max_clip is not None or off_policy_min_clip is not None:
        shaped = torch.clamp(shaped, min=off_policy_min_clip, max=off_policy_max_clip)
    off_loss_tok = -adv * shaped

    token_loss = torch.where(off, off_loss_tok, on_loss_tok)
    loss = aggregate_tokens(token_loss, response_mask, aggregation, norm_length)

    with torch.no_grad():
        on_part = aggregate_tokens(torch.where(on, token_loss, 0.0), response_mask, aggregation, norm_length)
        off_part = aggregate_tokens(torch.where(off, token_loss, 0.0), response_mask, aggregation, norm_length)
        metrics = {
            "pg_loss": loss.detach(),
            "on_policy_loss": on_part,
            "off_policy_loss": off_part,
            "off_policy_prob_mean": masked_mean(probs.detach(), off),
            "off_policy_shaped_mean": masked_mean(shaped.detach(), off),
            "on_policy_ratio_mean": masked_mean(ratio.detach(), on),
            "clip_fraction": masked_mean(clip_taken.to(logprobs.dtype), on),
            "on_policy_tokens": on.sum().to(logprobs.dtype),
            "off_policy_tokens": off.sum().to(logprobs.dtype),
        }
    return loss, metrics
