"""Group construction and batch collation for one rollout batch: pure functions, no model and no engine.

Each algorithm mode is a different choice of which samples form a prompt's group and which loss each sample feeds:

| mode          | samples per prompt                  | advantage group           | loss                          |
|---------------|-------------------------------------|---------------------------|-------------------------------|
| `luffy`       | n_on rollouts + n_off traces        | rollouts and traces       | shaped mixed-policy loss      |
| `grpo`        | n_on rollouts                       | rollouts                  | on-policy loss                |
| `sft`         | n_off traces                        | none                      | NLL of the traces             |
| `rl_sft_loss` | n_on rollouts + n_off traces        | rollouts only             | on-policy loss + NLL of trace |

The code asks `AlgorithmConfig`'s properties (`uses_rollouts`, `uses_traces`, `uses_traces_in_group`, `uses_nll`)
rather than the mode's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from luffy_trainer.algorithm import group_advantages
from luffy_trainer.config import AlgorithmConfig


@dataclass(frozen=True)
class Sample:
    """One response in a rollout batch and the role it plays in the loss."""

    group: int  # position of its prompt in the step's prompt list
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    off_policy: bool  # a trace from the dataset (behaviour policy taken as 1), not sampled from the policy
    reward: float
    advantage: float  # 0 for samples outside the policy-gradient term
    policy_gradient: bool  # contributes to the (mixed-)policy loss
    nll: bool  # contributes to the NLL (SFT) term
    truncated: bool = False
    behaviour_logprobs: tuple[float, ...] | None = None  # the engine's log-prob of each sampled token (rollouts only)
    weight_version: int | None = None  # the weights the engine sampled it with (rollouts only)


@dataclass(frozen=True)
class GroupInput:
    """What one prompt brought to the step: its rollouts and trace with their rewards."""

    prompt_ids: Sequence[int]
    rollouts: Sequence[Sequence[int]]
    rollout_rewards: Sequence[float]
    rollout_truncated: Sequence[bool]
    trace_ids: Sequence[int]
    trace_reward: float
    rollout_logprobs: Sequence[Sequence[float]] | None = None  # per rollout, the engine's log-prob of each token
    rollout_versions: Sequence[int] | None = None  # per rollout, the weight version that sampled it


def build_samples(groups: Sequence[GroupInput], algorithm: AlgorithmConfig) -> list[Sample]:
    """Turn each prompt's rollouts and trace into samples with advantages, according to the algorithm mode."""
    n_traces = algorithm.n_off_policy if algorithm.uses_traces else 0
    in_group_traces = n_traces if algorithm.uses_traces_in_group else 0
    samples: list[Sample] = []
    for g, item in enumerate(groups):
        rollouts = list(item.rollouts) if algorithm.uses_rollouts else []
        if len(rollouts) != len(item.rollout_rewards):
            raise ValueError(f"prompt {g}: {len(rollouts)} rollouts but {len(item.rollout_rewards)} rewards")
        for name, values in (("log-prob lists", item.rollout_logprobs), ("weight versions", item.rollout_versions)):
            if values is not None and len(values) != len(rollouts):
                raise ValueError(f"prompt {g}: {len(rollouts)} rollouts but {len(values)} {name}")
        if item.rollout_logprobs is not None:
            for i, (response, logprobs) in enumerate(zip(rollouts, item.rollout_logprobs, strict=True)):
                if len(logprobs) != len(response):
                    raise ValueError(f"prompt {g}, rollout {i}: {len(response)} tokens but {len(logprobs)} log-probs")
        if n_traces and not item.trace_ids:
            raise ValueError(f"prompt {g}: mode {algorithm.mode!r} needs an off-policy trace, but the example has none")
        group_rewards = list(item.rollout_rewards) + [item.trace_reward] * in_group_traces
        if not group_rewards:  # sft: no rollouts, and its traces are outside any group
            advantages = [0.0] * len(group_rewards)
        else:
            advantages = group_advantages(
                torch.tensor([group_rewards], dtype=torch.float64),
                normalize_std=algorithm.normalize_std,
                eps=algorithm.std_eps,
            )[0].tolist()
        prompt = tuple(item.prompt_ids)
        for i, response in enumerate(rollouts):
            samples.append(
                Sample(
                    g,
                    prompt,
                    tuple(response),
                    False,
                    float(item.rollout_rewards[i]),
                    advantages[i],
                    True,
                    False,
                    bool(item.rollout_truncated[i]),
                    None if item.rollout_logprobs is None else tuple(map(float, item.rollout_logprobs[i])),
                    None if item.rollout_versions is None else int(item.rollout_versions[i]),
                )
            )
        for j in range(n_traces):
            in_group = j < in_group_traces
            samples.append(
                Sample(
                    group=g,
                    prompt_ids=prompt,
                    response_ids=tuple(item.trace_ids),
                    off_policy=True,
                    reward=float(item.trace_reward),
                    advantage=advantages[len(rollouts) + j] if in_group else 0.0,
                    policy_gradient=in_group,
                    nll=algorithm.uses_nll,
                )
            )
    return samples


@dataclass
class TensorBatch:
    """Samples laid out as [prompt left-padded to P | response right-padded to R]."""

    input_ids: torch.Tensor  # [B, P+R]
    attention_mask: torch.Tensor  # [B, P+R]
    response_mask: torch.Tensor  # [B, R] tokens of the policy-gradient term
    off_policy_mask: torch.Tensor  # [B, R] trace tokens
    nll_mask: torch.Tensor  # [B, R] tokens of the NLL term
    token_mask: torch.Tensor  # [B, R] every real response token, whatever term it feeds (entropy)
    advantages: torch.Tensor  # [B]
    response_width: int
    # [B, R] float32: the engine's log-prob of each response token, aligned with token_logprobs' output (0 where
    # behaviour_mask is not set); None when no sample of the batch has them.
    behaviour_logprobs: torch.Tensor | None = None
    behaviour_mask: torch.Tensor | None = None  # [B, R] where behaviour_logprobs exist

    def without_loss(self) -> TensorBatch:
        """The same inputs contributing nothing: a rank with fewer micro-batches runs it to keep collectives in step."""
        none = torch.zeros_like(self.response_mask, dtype=torch.bool)
        return TensorBatch(
            self.input_ids,
            self.attention_mask,
            none,
            none,
            none,
            none,
            self.advantages,
            self.response_width,
            self.behaviour_logprobs,
            None if self.behaviour_mask is None else none,
        )


def collate(samples: Sequence[Sample], pad_id: int) -> TensorBatch:
    """Pad samples into one batch (prompts on the left, responses on the right)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    width_p = max(len(s.prompt_ids) for s in samples)
    width_r = max(max(len(s.response_ids) for s in samples), 1)
    b = len(samples)
    input_ids = torch.full((b, width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width_p + width_r), dtype=torch.long)
    response = torch.zeros((b, width_r), dtype=torch.bool)
    off = torch.zeros((b, width_r), dtype=torch.bool)
    nll = torch.zeros((b, width_r), dtype=torch.bool)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        input_ids[i, width_p - p : width_p] = torch.tensor(s.prompt_ids, dtype=torch.long)
        attention[i, width_p - p : width_p] = 1
        if r:
            input_ids[i, width_p : width_p + r] = torch.tensor(s.response_ids, dtype=torch.long)
            attention[i, width_p : width_p + r] = 1
        response[i, :r] = s.policy_gradient
        off[i, :r] = s.off_policy
        nll[i, :r] = s.nll
    advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    tokens = attention[:, width_p:].bool()
    behaviour, behaviour_mask = _behaviour_logprobs(samples, width_r)
    return TensorBatch(input_ids, attention, response, off, nll, tokens, advantages, width_r, behaviour, behaviour_mask)


def _behaviour_logprobs(samples: Sequence[Sample], width: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The samples' engine log-probs right-padded to the response width, and where they exist (None if nowhere)."""
    if all(s.behaviour_logprobs is None for s in samples):
        return None, None
    values = torch.zeros((len(samples), width), dtype=torch.float32)
    present = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        if s.behaviour_logprobs is None:
            continue
        n = len(s.response_ids)
        values[i, :n] = torch.tensor(s.behaviour_logprobs, dtype=torch.float32)
        present[i, :n] = True
    return values, present


def split_minibatches(samples: Sequence[Sample], num_minibatches: int) -> list[list[Sample]]:
    """Split by prompt groups, in order, into `num_minibatches` mini-batches (one optimizer step each)."""
    groups = sorted({s.group for s in samples})
    if num_minibatches > len(groups):
        raise ValueError(f"{num_minibatches} mini-batches need at least as many prompts, got {len(groups)}")
    per = -(-len(groups) // num_minibatches)
    chunks = [set(groups[i : i + per]) for i in range(0, len(groups), per)]
    return [[s for s in samples if s.group in chunk] for chunk in chunks]


def split_microbatches(samples: Sequence[Sample], token_budget: int) -> list[list[Sample]]:
    """Greedy micro-batches whose padded size (count x (longest prompt + longest response)) fits the budget.

    A single sample longer than the budget still gets a micro-batch of its own.
    """
    micro: list[list[Sample]] = []
    current: list[Sample] = []
    longest_p = longest_r = 0
    for s in samples:
        p, r = max(longest_p, len(s.prompt_ids)), max(longest_r, len(s.response_ids))
        if current and (len(current) + 1) * (p + r) > token_budget:
            micro.append(current)
            current, p, r = [], len(s.prompt_ids), len(s.response_ids)
        current.append(s)
        longest_p, longest_r = p, r
    if current:
        micro.append(current)
    return micro
