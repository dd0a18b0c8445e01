"""The per-mode training loss of one micro-batch, scaled so that micro-batches add up to the mini-batch objective.

Gradient accumulation sums micro-batch losses and FSDP averages gradients over ranks (the caller multiplies each
rank's loss by the world size to undo the average). What each micro-batch contributes depends on
`algorithm.lossScale`:

- `invariant` (default): every term is normalised by mini-batch totals (token or sequence counts over the whole
  mini-batch, across ranks), so the objective, and so the update, does not depend on how a mini-batch is cut into
  micro-batches or ranks. The entropy bonus is the token mean over all response tokens of the mini-batch.
- `released`: the scaling of the released LUFFY code. Each rank's loss is the sum over its micro-batches of the
  policy-gradient token sum / normLength and of each micro-batch's own token means of the entropy and of the NLL;
  the objective is the mean of the ranks' losses. Against `invariant` at W ranks, the policy-gradient term is 1/W as
  large, and the entropy and NLL terms are (1/W) x the sum over micro-batches of their micro-batch means instead of
  one mean over the mini-batch (equal when W = 1 and the mini-batch is one micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from luffy_trainer.algorithm import ImportanceLevel, masked_mean, policy_loss
from luffy_trainer.config import AlgorithmConfig
from luffy_trainer.groups import TensorBatch


@dataclass(frozen=True)
class MiniBatchTotals:
    """Counts over a whole mini-batch (all micro-batches, all ranks) that normalise each micro-batch's terms."""

    pg_tokens: int
    pg_sequences: int
    nll_tokens: int
    response_tokens: int

    @staticmethod
    def of(batches: list[TensorBatch]) -> MiniBatchTotals:
        return MiniBatchTotals(
            pg_tokens=sum(int(b.response_mask.sum()) for b in batches),
            pg_sequences=sum(int(b.response_mask.any(dim=-1).sum()) for b in batches),
            nll_tokens=sum(int(b.nll_mask.sum()) for b in batches),
            response_tokens=sum(int(b.token_mask.sum()) for b in batches),
        )


def micro_batch_loss(
    batch: TensorBatch,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    algorithm: AlgorithmConfig,
    norm_length: int,
    totals: MiniBatchTotals,
    world_size: int = 1,
    *,
    importance_level: ImportanceLevel = "none",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's share of one micro-batch in the mini-batch objective (summed over micro-batches and ranks) and its
    metrics: the policy-gradient parts and `loss` add up to the objective; `entropy` and `nll_loss` are parts of the
    mini-batch's token means, whatever the scaling. `importance_level` (TrainConfig.importance_level, `auto` resolved)
    weights the on-policy tokens that carry behaviour log-probs, truncated at `algorithm.importance_cap`."""
    released = algorithm.loss_scale == "released"
    rank_share = 1.0 / world_size if released else 1.0
    loss = logprobs.sum() * 0.0
    metrics: dict[str, torch.Tensor] = {}
    if totals.pg_tokens:
        aggregation = algorithm.aggregation
        divisor: int | None = norm_length
        if aggregation == "token-mean":  # a mean over the whole mini-batch's tokens, not over this micro-batch's
            aggregation, divisor = "token-sum", totals.pg_tokens
        pg, parts = policy_loss(
            logprobs,
            old_logprobs,
            batch.advantages.to(logprobs.device),
            batch.response_mask,
            batch.off_policy_mask,
            gamma=algorithm.gamma,
            clip_eps=algorithm.clip_eps,
            aggregation=aggregation,
            norm_length=divisor,
            off_policy_max_clip=algorithm.off_policy_max_clip,
            off_policy_min_clip=algorithm.off_policy_min_clip,
            behaviour_logprobs=None
            if batch.behaviour_logprobs is None
            else batch.behaviour_logprobs.to(logprobs.device),
            behaviour_mask=None if batch.behaviour_mask is None else batch.behaviour_mask.to(logprobs.device),
            importance_level=importance_level,
            importance_cap=algorithm.importance_cap,
        )
        share = rank_share
        if aggregation == "seq-mean-token-mean":
            share = int(batch.response_mask.any(dim=-1).sum()) / totals.pg_sequences
        loss = loss + pg * share
        metrics.update({k: v * share if k.endswith("_loss") else v for k, v in parts.items()})
    if not float(metrics.get("off_policy_tokens", 0.0)) and bool(batch.off_policy_mask.any()):
        # Traces outside the policy-gradient term (sft, rl_sft_loss): their token probability is still the curve the
        # paper compares (how fast the policy absorbs the traces).
        trace = batch.off_policy_mask & batch.token_mask
        metrics["off_policy_prob_mean"] = masked_mean(logprobs.detach().exp(), trace.to(logprobs.device))
        metrics["off_policy_tokens"] = trace.sum().to(logprobs.dtype)
    if totals.nll_tokens:
        nll_sum = -(logprobs * batch.nll_mask).sum()
        metrics["nll_loss"] = nll_sum.detach() / totals.nll_tokens
        divisor = int(batch.nll_mask.sum()) / rank_share if released else totals.nll_tokens
        if divisor:
            loss = loss + algorithm.nll_coef * nll_sum / divisor
    if entropy is not None and totals.response_tokens:
        entropy_sum = (entropy * batch.token_mask).sum()
        metrics["entropy"] = entropy_sum.detach() / totals.response_tokens
        divisor = int(batch.token_mask.sum()) / rank_share if released else totals.response_tokens
        if divisor and algorithm.entropy_coeff and algorithm.uses_entropy_bonus:
            loss = loss - algorithm.entropy_coeff * entropy_sum / divisor
    metrics["loss"] = loss.detach()
    return loss, metrics
