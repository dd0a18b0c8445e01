"""The per-mode training loss of one micro-batch, scaled so that micro-batches add up to the mini-batch objective.

Gradient accumulation sums micro-batch losses, so each term is normalised by mini-batch totals (token or sequence
counts over the whole mini-batch, across ranks) rather than by the micro-batch's own counts: the objective, and so
the update, does not depend on how a mini-batch is cut into micro-batches or ranks.

The entropy bonus is the token mean over all response tokens of the mini-batch. (The released code takes the token
mean per micro-batch and sums over micro-batches, which makes the bonus depend on the micro-batch count.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from luffy_trainer.algorithm import policy_loss
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch (to be summed over the mini-batch) and its additive metric parts."""
    zero = logprobs.sum() * 0.0
    loss = zero
    metrics: dict[str, torch.Tensor] = {}
    if totals.pg_tokens:
        aggregation = algorithm.aggregation
        divisor: int | None = norm_length
        if aggregation == "token-mean":
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
        )
        if aggregation == "seq-mean-token-mean":
            share = int(batch.response_mask.any(dim=-1).sum()) / totals.pg_sequences
            pg = pg * share
            parts = {k: v * share if k.endswith("_loss") else v for k, v in parts.items()}
        loss = loss + pg
        metrics.update(parts)
    if totals.nll_tokens:
        nll = -(logprobs * batch.nll_mask).sum() / totals.nll_tokens
        metrics["nll_loss"] = nll.detach()
        loss = loss + (algorithm.sft_loss_coef if algorithm.mode == "rl_sft_loss" else 1.0) * nll
    if entropy is not None and totals.response_tokens:
        mean_entropy = (entropy * batch.token_mask).sum() / totals.response_tokens
        metrics["entropy"] = mean_entropy.detach()
        if algorithm.entropy_coeff and algorithm.mode != "sft":
            loss = loss - algorithm.entropy_coeff * mean_entropy
    metrics["loss"] = loss.detach()
    return loss, metrics
