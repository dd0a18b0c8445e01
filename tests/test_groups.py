"""Group construction per algorithm mode, batch layout, and micro-batch invariance of the loss."""

from __future__ import annotations

import math

import pytest
import torch
from luffy_trainer.config import AlgorithmConfig
from luffy_trainer.groups import GroupInput, build_samples, collate, split_microbatches, split_minibatches
from luffy_trainer.loss import MiniBatchTotals, micro_batch_loss


def _group(k_correct: int, n_on: int = 7, trace_reward: float = 1.0, prompt=(1, 2, 3)) -> GroupInput:
    rewards = [1.0] * k_correct + [0.0] * (n_on - k_correct)
    return GroupInput(
        prompt_ids=prompt,
        rollouts=[(10 + i, 11 + i, 2) for i in range(n_on)],
        rollout_rewards=rewards,
        rollout_truncated=[False] * n_on,
        trace_ids=(50, 51, 52, 53, 2),
        trace_reward=trace_reward,
    )


def test_luffy_group_mixes_trace_into_advantage():
    samples = build_samples([_group(k_correct=2)], AlgorithmConfig(mode="luffy"))
    assert len(samples) == 8
    on, off = samples[:7], samples[7:]
    assert [s.off_policy for s in samples] == [False] * 7 + [True]
    # mean reward = (2 + 1) / 8; correct: 1 - 3/8 = (7 - k)/8 = 5/8, wrong: -3/8 = -(k + 1)/8
    assert [s.advantage for s in on] == pytest.approx([5 / 8] * 2 + [-3 / 8] * 5)
    assert off[0].advantage == pytest.approx(5 / 8)
    assert all(s.policy_gradient and not s.nll for s in samples)


def test_grpo_group_has_no_off_policy_samples():
    samples = build_samples([_group(k_correct=2)], AlgorithmConfig(mode="grpo", n_on_policy=7))
    assert len(samples) == 7 and not any(s.off_policy for s in samples)
    assert [s.advantage for s in samples] == pytest.approx([5 / 7] * 2 + [-2 / 7] * 5)


def test_sft_uses_only_traces_and_needs_no_rollouts():
    algo = AlgorithmConfig(mode="sft", n_on_policy=0)
    assert algo.uses_rollouts is False
    group = GroupInput((1, 2), [], [], [], (7, 8, 2), 1.0)
    samples = build_samples([group], algo)
    assert len(samples) == 1
    assert samples[0].off_policy and samples[0].nll and not samples[0].policy_gradient
    assert samples[0].advantage == 0.0


def test_rl_sft_loss_advantages_from_on_policy_only():
    samples = build_samples([_group(k_correct=2)], AlgorithmConfig(mode="rl_sft_loss"))
    on, off = samples[:7], samples[7:]
    assert [s.advantage for s in on] == pytest.approx([5 / 7] * 2 + [-2 / 7] * 5)  # mean 2/7, trace excluded
    assert off[0].nll and not off[0].policy_gradient and off[0].advantage == 0.0


def test_std_normalisation_in_groups():
    samples = build_samples(
        [_group(k_correct=1, n_on=3)], AlgorithmConfig(mode="grpo", n_on_policy=3, normalize_std=True)
    )
    # rewards [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3)
    std = (1 / 3) ** 0.5
    expected = [(2 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6)]
    assert [s.advantage for s in samples] == pytest.approx(expected)


def test_missing_trace_is_an_error_in_luffy_mode():
    group = GroupInput((1,), [(2,)], [1.0], [False], (), 0.0)
    with pytest.raises(ValueError, match="needs an off-policy trace"):
        build_samples([group], AlgorithmConfig(mode="luffy", n_on_policy=1))


def test_collate_layout():
    samples = build_samples(
        [_group(1, n_on=1, prompt=(1, 2)), _group(0, n_on=1, prompt=(5,))], AlgorithmConfig(mode="luffy", n_on_policy=1)
    )
    batch = collate(samples, pad_id=0)
    assert batch.response_width == 5
    assert batch.input_ids[0].tolist() == [1, 2, 10, 11, 2, 0, 0]  # prompt | rollout, right-padded
    assert batch.input_ids[1].tolist() == [1, 2, 50, 51, 52, 53, 2]  # prompt | trace
    assert batch.input_ids[2].tolist() == [0, 5, 10, 11, 2, 0, 0]  # left-padded prompt
    assert batch.attention_mask[2].tolist() == [0, 1, 1, 1, 1, 0, 0]
    assert batch.off_policy_mask[1].tolist() == [True] * 5
    assert batch.response_mask[0].tolist() == [True, True, True, False, False]


def test_minibatches_keep_groups_together_and_in_order():
    samples = build_samples([_group(1, prompt=(i,)) for i in range(4)], AlgorithmConfig())
    minis = split_minibatches(samples, 2)
    assert [sorted({s.group for s in m}) for m in minis] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="at least as many prompts"):
        split_minibatches(samples, 5)


def test_microbatches_respect_token_budget():
    samples = build_samples([_group(1, prompt=(i,)) for i in range(2)], AlgorithmConfig())
    micro = split_microbatches(samples, token_budget=20)
    assert sum(len(m) for m in micro) == len(samples)
    for m in micro:
        width = max(len(s.prompt_ids) for s in m) + max(len(s.response_ids) for s in m)
        assert len(m) == 1 or len(m) * width <= 20


@pytest.mark.parametrize("aggregation", ["token-sum", "token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("mode", ["luffy", "rl_sft_loss"])
def test_loss_and_gradient_do_not_depend_on_micro_batching(aggregation, mode):
    """A parameter per token stands in for the model: gradients must match for one vs many micro-batches."""
    groups = [_group(k, prompt=tuple(range(1 + k))) for k in (0, 3, 6)]
    algo = AlgorithmConfig(mode=mode, aggregation=aggregation, entropy_coeff=0.01, clip_eps=0.2)
    samples = build_samples(groups, algo)
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(len(samples), 5, generator=generator, dtype=torch.float64)

    def run(micro_sizes):
        param = theta.clone().requires_grad_(True)
        pieces, start = [], 0
        for size in micro_sizes:
            pieces.append((samples[start : start + size], slice(start, start + size)))
            start += size
        batches = [collate(s, pad_id=0) for s, _ in pieces]
        totals = MiniBatchTotals.of(batches)
        total_loss = 0.0
        for batch, (_, rows) in zip(batches, pieces, strict=True):
            logp = -torch.nn.functional.softplus(param[rows])[:, : batch.response_width]
            entropy = torch.sigmoid(param[rows])[:, : batch.response_width]
            old = logp.detach() + 0.1
            loss, _ = micro_batch_loss(batch, logp, old, entropy, algo, norm_length=16, totals=totals)
            loss.backward()
            total_loss += loss.item()
        return total_loss, param.grad

    whole_loss, whole_grad = run([len(samples)])
    split_loss, split_grad = run([5, 7, 1, len(samples) - 13])
    assert split_loss == pytest.approx(whole_loss, rel=1e-10)
    torch.testing.assert_close(split_grad, whole_grad)
    assert whole_grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["sft", "rl_sft_loss", "luffy"])
def test_trace_probability_is_reported_in_every_mode_with_traces(mode):
    """The paper's off-policy probability curve: the mean of p over the trace's tokens, whatever term trains them."""
    algo = AlgorithmConfig(mode=mode, n_on_policy=0 if mode == "sft" else 7)
    group = _group(k_correct=2) if mode != "sft" else GroupInput((1, 2, 3), [], [], [], (50, 51, 52, 53, 2), 1.0)
    batch = collate(build_samples([group], algo), pad_id=0)
    logp = torch.full(batch.response_mask.shape, -0.5, dtype=torch.float64)
    logp[-1, :5] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64))  # the trace is last
    _, metrics = micro_batch_loss(
        batch, logp, logp.detach(), None, algo, norm_length=16, totals=MiniBatchTotals.of([batch])
    )
    assert metrics["off_policy_prob_mean"].item() == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5) / 5)
    assert metrics["off_policy_tokens"].item() == 5


def test_token_mean_divides_by_the_policy_gradient_tokens_of_the_mini_batch():
    """Group rewards [1, 0 | trace 1]: A = 1/3, -2/3, 1/3. Ratio 1 on-policy, f(1/2) = 5/6 on the trace's 5 tokens."""
    algo = AlgorithmConfig(mode="luffy", n_on_policy=2, aggregation="token-mean", entropy_coeff=0.0)
    batch = collate(build_samples([_group(k_correct=1, n_on=2)], algo), pad_id=0)
    logp = torch.full(batch.response_mask.shape, math.log(0.5), dtype=torch.float64)
    totals = MiniBatchTotals.of([batch, batch])  # this micro-batch is half of the mini-batch
    loss, _ = micro_batch_loss(batch, logp, logp.detach(), None, algo, norm_length=16, totals=totals)
    token_losses = [-1 / 3] * 3 + [2 / 3] * 3 + [-1 / 3 * 5 / 6] * 5
    assert loss.item() == pytest.approx(sum(token_losses) / (2 * len(token_losses)))


def test_sft_loss_is_the_token_mean_nll_of_the_traces_without_entropy_bonus():
    algo = AlgorithmConfig(mode="sft", n_on_policy=0, entropy_coeff=0.5)
    groups = [GroupInput((1, 2), [], [], [], (7, 8, 2), 1.0), GroupInput((3,), [], [], [], (9, 2), 1.0)]
    batch = collate(build_samples(groups, algo), pad_id=0)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.25, -3.0, -9.0]], dtype=torch.float64)  # the -9 is padding
    entropy = torch.ones_like(logp)
    loss, metrics = micro_batch_loss(
        batch, logp, logp.detach(), entropy, algo, norm_length=16, totals=MiniBatchTotals.of([batch])
    )
    assert loss.item() == pytest.approx((1.0 + 2.0 + 0.5 + 0.25 + 3.0) / 5)
    assert metrics["nll_loss"].item() == pytest.approx(loss.item()) and metrics["entropy"].item() == 1.0
