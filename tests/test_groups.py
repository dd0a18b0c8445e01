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


# --- behaviour log-probs: from the engine's completions to the importance weights ------------------------------------

BEHAVIOUR = [  # per group, per rollout (3 tokens each): the engine's log-probs
    [[-1.5, -0.2, -2.0], [-1.0, -1.1, -0.9]],
    [[-2.5, -0.5, -1.0], [-0.7, -1.3, -1.0]],
]
THETA = -1.0  # every token's log-prob under the trained policy (and pi_old: one optimizer step, ratio 1)


def _stale_groups(with_behaviour: bool = True) -> list[GroupInput]:
    groups = []
    for g, logprobs in enumerate(BEHAVIOUR):
        base = _group(k_correct=g, n_on=2, prompt=(1, 2, 3)[: g + 2])
        extra = {"rollout_logprobs": logprobs, "rollout_versions": [4 + g, 5]} if with_behaviour else {}
        groups.append(GroupInput(**{**base.__dict__, **extra}))
    return groups


def test_build_samples_copies_behaviour_logprobs_and_versions_onto_rollouts_only():
    samples = build_samples(_stale_groups(), AlgorithmConfig(mode="luffy", n_on_policy=2))
    on = [s for s in samples if not s.off_policy]
    assert [s.behaviour_logprobs for s in on] == [tuple(lp) for group in BEHAVIOUR for lp in group]
    assert [s.weight_version for s in on] == [4, 5, 5, 5]
    assert all(s.behaviour_logprobs is None and s.weight_version is None for s in samples if s.off_policy)
    plain = build_samples(_stale_groups(with_behaviour=False), AlgorithmConfig(mode="luffy", n_on_policy=2))
    assert all(s.behaviour_logprobs is None and s.weight_version is None for s in plain)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rollout_logprobs": [[-1.0, -1.0, -1.0]]}, "prompt 0: 2 rollouts but 1 log-prob lists"),
        ({"rollout_versions": [1, 2, 3]}, "prompt 0: 2 rollouts but 3 weight versions"),
        ({"rollout_logprobs": [[-1.0, -1.0, -1.0], [-1.0]]}, "prompt 0, rollout 1: 3 tokens but 1 log-probs"),
    ],
)
def test_behaviour_lengths_that_do_not_match_the_rollouts_are_refused(change, message):
    group = GroupInput(**{**_group(k_correct=1, n_on=2).__dict__, **change})
    with pytest.raises(ValueError, match=message):
        build_samples([group], AlgorithmConfig(mode="luffy", n_on_policy=2))


def test_collate_aligns_behaviour_logprobs_with_the_response_positions():
    samples = build_samples(_stale_groups()[:1], AlgorithmConfig(mode="luffy", n_on_policy=2))
    batch = collate(samples, pad_id=0)
    assert batch.response_width == 5  # the trace's 5 tokens; rollouts are right-padded like their token ids
    assert batch.behaviour_logprobs.dtype == torch.float32
    expected = torch.tensor([[-1.5, -0.2, -2.0, 0, 0], [-1.0, -1.1, -0.9, 0, 0], [0] * 5], dtype=torch.float32)
    assert torch.equal(batch.behaviour_logprobs, expected)
    assert batch.behaviour_mask.tolist() == [[True] * 3 + [False] * 2] * 2 + [[False] * 5]
    idle = batch.without_loss()
    assert not idle.behaviour_mask.any() and idle.behaviour_logprobs is batch.behaviour_logprobs
    assert collate(samples[-1:], pad_id=0).behaviour_logprobs is None  # the trace alone: nothing to weigh


def _closed_form_is_metrics(cap: float) -> dict[str, float]:
    rhos = [math.exp(THETA - b) for group in BEHAVIOUR for lp in group for b in lp]
    return {
        "importance_weight_mean": sum(min(r, cap) for r in rhos) / len(rhos),
        "importance_capped_fraction": sum(r > cap for r in rhos) / len(rhos),
        "kl_behaviour_old": sum(r - 1 - math.log(r) for r in rhos) / len(rhos),
    }


@pytest.mark.parametrize("level", ["token", "none"])
def test_importance_metrics_and_loss_combine_across_micro_batches(level):
    from luffy_trainer.distributed import World
    from luffy_trainer.policy import MetricAccumulator

    algo = AlgorithmConfig(mode="luffy", n_on_policy=2, entropy_coeff=0.0, importance_cap=2.0)
    samples = build_samples(_stale_groups(), algo)

    def run(micro_sizes):
        param = torch.full((len(samples), 5), THETA, dtype=torch.float64, requires_grad=True)
        batches, start, acc, total = [], 0, MetricAccumulator(), 0.0
        for size in micro_sizes:
            batches.append((collate(samples[start : start + size], pad_id=0), slice(start, start + size)))
            start += size
        totals = MiniBatchTotals.of([b for b, _ in batches])
        for batch, rows in batches:
            logp = param[rows][:, : batch.response_width]
            loss, metrics = micro_batch_loss(
                batch, logp, logp.detach(), None, algo, norm_length=16, totals=totals, importance_level=level
            )
            loss.backward()
            acc.add(metrics)
            total += loss.item()
        return total, param.grad, acc.result(World(), torch.device("cpu"))

    whole_loss, whole_grad, whole = run([len(samples)])
    split_loss, split_grad, split = run([2, 4])  # group 0's rollouts | its trace and all of group 1
    expected = _closed_form_is_metrics(2.0)
    for stats in (whole, split):
        for key, value in expected.items():
            assert stats[key] == pytest.approx(value, rel=1e-6), key  # behaviour log-probs travel as float32
    assert split_loss == pytest.approx(whole_loss, rel=1e-12)
    torch.testing.assert_close(split_grad, whole_grad)
    # The gradient of an on-policy token (ratio 1) is -w A / normLength; A = 1/3 or -2/3, etc. from the group rewards.
    on_rows = [i for i, s in enumerate(samples) if not s.off_policy]
    for row, lp in zip(on_rows, [lp for group in BEHAVIOUR for lp in group], strict=True):
        for t, b in enumerate(lp):
            w = min(math.exp(THETA - b), 2.0) if level == "token" else 1.0
            assert whole_grad[row, t].item() == pytest.approx(-w * samples[row].advantage / 16, rel=1e-6)


def test_off_leaves_micro_batch_loss_and_gradients_bit_identical():
    algo = AlgorithmConfig(mode="luffy", n_on_policy=2, clip_eps=0.2)
    results = []
    for with_behaviour in (True, False):
        batch = collate(build_samples(_stale_groups(with_behaviour), algo), pad_id=0)
        param = torch.linspace(-2.0, -0.1, batch.response_mask.numel()).reshape(batch.response_mask.shape)
        param.requires_grad_(True)
        entropy = torch.sigmoid(param)
        loss, metrics = micro_batch_loss(
            batch, param, param.detach() + 0.05, entropy, algo, 16, MiniBatchTotals.of([batch]), importance_level="none"
        )
        loss.backward()
        results.append((loss, param.grad, metrics))
    (loss_b, grad_b, metrics_b), (loss_p, grad_p, metrics_p) = results
    assert torch.equal(loss_b, loss_p) and torch.equal(grad_b, grad_p)
    assert all(torch.equal(metrics_b[k], v) for k, v in metrics_p.items())
    assert "importance_weight_mean" in metrics_b and "importance_weight_mean" not in metrics_p


@pytest.mark.parametrize(
    ("correction", "staleness", "level"),
    [("auto", 0, "none"), ("auto", 1, "token"), ("sequence", 0, "sequence"), ("none", 2, "none")],
)
def test_the_level_in_force_resolves_auto_against_the_staleness(correction, staleness, level):
    from luffy_trainer.config import TrainConfig

    config = TrainConfig(algorithm={"importanceCorrection": correction}, rollout={"maxStaleness": staleness})
    assert config.importance_level == level


DELTAS = [[0.3, -0.2, 1.0, 0.0], [-0.5, 0.9, 0.1, -1.2]]  # log rho per rollout token; 1.0 and 0.9 exceed log 2


def _updater_run(model_dir: str, level: str, steps: int, with_behaviour: bool):
    """One `PolicyUpdater.optimize` on the tiny model over 2 prompts x 2 rollouts whose behaviour log-probs are
    pi_old - delta (pi_old: the fresh model's own log-probs), so that rho = e^delta. Returns the stats and the
    updated parameters."""
    from luffy_trainer.config import TrainConfig
    from luffy_trainer.distributed import World
    from luffy_trainer.policy import PolicyUpdater, build_optimizer, build_policy

    config = TrainConfig(
        model={"path": model_dir, "dtype": "float32", "gradientCheckpointing": False},
        algorithm={"mode": "grpo", "nOnPolicy": 2, "importanceCorrection": level, "entropyCoeff": 0.0},
        optimization={"lr": 1e-3, "optimizerStepsPerBatch": steps},
    )
    world, device = World(), torch.device("cpu")
    tokenizer, policy = build_policy(config, world, device)
    rollouts = [[(20, 21, 22, 23), (30, 31, 32, 33)], [(40, 41, 42, 43), (50, 51, 52, 53)]]
    groups = [GroupInput((5 + g, 6, 7), r, [1.0, 0.0], [False, False], (), 0.0) for g, r in enumerate(rollouts)]
    plain = build_samples(groups, config.algorithm)
    if with_behaviour:
        with torch.no_grad():
            policy.eval()
            old = policy(collate(plain, tokenizer.pad_token_id), temperature=1.0, with_entropy=False)[0]
            policy.train()
        behaviour = [[[float(old[2 * g + i, t]) - DELTAS[i][t] for t in range(4)] for i in range(2)] for g in range(2)]
        groups = [GroupInput(**{**item.__dict__, "rollout_logprobs": behaviour[g]}) for g, item in enumerate(groups)]
    optimizer, scheduler = build_optimizer(policy, config)
    updater = PolicyUpdater(policy, optimizer, scheduler, config, tokenizer.pad_token_id, world, device)
    stats = updater.optimize(build_samples(groups, config.algorithm))
    return stats, [p.detach().clone() for p in policy.parameters()]


@pytest.mark.parametrize("steps", [1, 2])
def test_policy_updater_weighs_rollouts_against_its_own_old_logprobs(tiny_model_dir, steps):
    """pi_old is the current policy's detached log-prob with one optimizer step, the recomputation with two: either
    way the metrics are the closed form over rho = e^delta, and `token` moves the weights differently from `none`."""
    rhos = [math.exp(x) for row in DELTAS for x in row] * 2
    weight_mean = sum(min(r, 2.0) for r in rhos) / len(rhos)
    token, token_params = _updater_run(tiny_model_dir, "token", steps, with_behaviour=True)
    off, off_params = _updater_run(tiny_model_dir, "none", steps, with_behaviour=True)
    for stats in (token, off):  # with the correction off the metrics are still reported, min(rho, C) for the weight
        assert stats["importance_weight_mean"] == pytest.approx(weight_mean, rel=1e-5)
        assert stats["importance_capped_fraction"] == pytest.approx(2 / 8)
        assert stats["kl_behaviour_old"] == pytest.approx(sum(r - 1 - math.log(r) for r in rhos) / 16, rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(token_params, off_params, strict=True))


def test_policy_updater_with_the_correction_off_updates_bit_identically(tiny_model_dir):
    with_behaviour, params = _updater_run(tiny_model_dir, "none", 1, with_behaviour=True)
    without, plain_params = _updater_run(tiny_model_dir, "none", 1, with_behaviour=False)
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params, strict=True))
    assert {k: v for k, v in with_behaviour.items() if not k.startswith(("importance_", "kl_"))} == without
