"""The LUFFY objective against hand-derived formulas (luffy-algorithm notes §1.3-1.4), never against itself.

Expected numbers are computed here with plain Python floats and the closed forms: advantages (7 - k)/8 and
-(k + 1)/8, token losses -A*r and -A*p/(p+gamma), and the gradient of an off-policy token -A*gamma*p/(p+gamma)^2/L.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from luffy_trainer.algorithm import aggregate_tokens, group_advantages, policy_loss

# --- advantages ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(8))
def test_worked_advantage_cases_of_a_luffy_group(k):
    """1 correct trace + 7 on-policy samples of which k are correct (notes §1.3)."""
    rewards = torch.tensor([[1.0] + [1.0] * k + [0.0] * (7 - k)])
    adv = group_advantages(rewards)[0].tolist()
    assert adv[0] == pytest.approx((7 - k) / 8)  # the trace
    for a in adv[1 : 1 + k]:
        assert a == pytest.approx((7 - k) / 8)  # correct on-policy
    for a in adv[1 + k :]:
        assert a == pytest.approx(-(k + 1) / 8)  # wrong on-policy


def test_all_correct_group_gives_zero_advantage_everywhere():
    adv = group_advantages(torch.ones(3, 8))
    assert torch.count_nonzero(adv) == 0


def test_std_normalisation_uses_unbiased_std_plus_eps():
    rows = [[1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0, 0.0]]
    adv = group_advantages(torch.tensor(rows), normalize_std=True, eps=1e-6)
    for row, got in zip(rows, adv.tolist(), strict=True):
        mean, std = statistics.fmean(row), statistics.stdev(row)  # stdev is the n-1 estimator
        assert got == pytest.approx([(r - mean) / (std + 1e-6) for r in row], rel=1e-6)


def test_std_normalisation_of_constant_group_is_zero_not_nan():
    adv = group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]), normalize_std=True)
    assert torch.all(adv == 0)


def test_group_of_one_sample():
    assert group_advantages(torch.tensor([[1.0], [0.0]]), normalize_std=True).tolist() == [[0.0], [0.0]]


def test_advantages_reject_flat_input():
    with pytest.raises(ValueError, match="groups, group_size"):
        group_advantages(torch.ones(8))


# --- policy loss: values ------------------------------------------------------------------------------------------


def _batch():
    """Two sequences of width 4: row 0 on-policy (3 valid tokens), row 1 an off-policy trace (4 valid tokens)."""
    logp = [[-0.2, -1.0, -0.5, -3.0], [-0.1, -2.3, -0.7, -4.0]]
    old = [[-0.3, -0.9, -0.5, -9.0], [-9.0, -9.0, -9.0, -9.0]]
    mask = [[1, 1, 1, 0], [1, 1, 1, 1]]
    off = [[0, 0, 0, 0], [1, 1, 1, 1]]
    adv = [0.75, 0.5]
    return logp, old, mask, off, adv


def _expected_token_losses(logp, old, mask, off, adv, gamma, clip=None):
    """Per-token losses from the closed forms, with Python floats."""
    out = []
    for i in range(len(logp)):
        row = []
        for t in range(len(logp[i])):
            if not mask[i][t]:
                row.append(None)
            elif off[i][t]:
                p = math.exp(logp[i][t])
                f = p / (p + gamma) if gamma is not None else p
                row.append(-adv[i] * f)
            else:
                r = math.exp(logp[i][t] - old[i][t])
                loss = -adv[i] * r
                if clip is not None:
                    loss = max(loss, -adv[i] * min(max(r, 1 - clip), 1 + clip))
                row.append(loss)
        out.append(row)
    return out


def _tensors(logp, old, mask, off, adv):
    return (
        torch.tensor(logp, dtype=torch.float64, requires_grad=True),
        torch.tensor(old, dtype=torch.float64),
        torch.tensor(adv, dtype=torch.float64),
        torch.tensor(mask),
        torch.tensor(off),
    )


@pytest.mark.parametrize("gamma", [0.1, 0.3, None])
def test_token_sum_loss_matches_closed_form(gamma):
    logp, old, mask, off, adv = _batch()
    lp, olp, a, m, o = _tensors(logp, old, mask, off, adv)
    loss, metrics = policy_loss(lp, olp, a, m, o, gamma=gamma, aggregation="token-sum", norm_length=8192)
    per_token = _expected_token_losses(logp, old, mask, off, adv, gamma)
    total = sum(x for row in per_token for x in row if x is not None)
    assert loss.item() == pytest.approx(total / 8192, rel=1e-12)
    on_total = sum(x for x in per_token[0] if x is not None)
    off_total = sum(per_token[1])
    assert metrics["on_policy_loss"].item() == pytest.approx(on_total / 8192, rel=1e-12)
    assert metrics["off_policy_loss"].item() == pytest.approx(off_total / 8192, rel=1e-12)
    assert metrics["off_policy_prob_mean"].item() == pytest.approx(statistics.fmean(math.exp(x) for x in logp[1]))


def test_token_sum_defaults_to_padded_width():
    logp, old, mask, off, adv = _batch()
    lp, olp, a, m, o = _tensors(logp, old, mask, off, adv)
    loss, _ = policy_loss(lp, olp, a, m, o)
    per_token = _expected_token_losses(logp, old, mask, off, adv, 0.1)
    assert loss.item() == pytest.approx(sum(x for row in per_token for x in row if x is not None) / 4)


def test_seq_mean_token_mean():
    logp, old, mask, off, adv = _batch()
    per_token = _expected_token_losses(logp, old, mask, off, adv, 0.1)
    valid = [[x for x in row if x is not None] for row in per_token]

    lp, olp, a, m, o = _tensors(logp, old, mask, off, adv)
    loss, metrics = policy_loss(lp, olp, a, m, o, aggregation="seq-mean-token-mean")
    assert loss.item() == pytest.approx((sum(valid[0]) / 3 + sum(valid[1]) / 4) / 2)
    assert (metrics["on_policy_loss"] + metrics["off_policy_loss"]).item() == pytest.approx(loss.item())


def test_seq_mean_ignores_fully_masked_rows():
    values = torch.tensor([[2.0, 4.0], [100.0, 100.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    assert aggregate_tokens(values, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)


def test_unknown_aggregation_is_rejected():
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_tokens(torch.ones(1, 2), torch.ones(1, 2), "sum")  # type: ignore[arg-type]


def test_ppo_clip_on_policy_values_and_clip_fraction():
    # A = 2 > 0. Ratio e^0.5 = 1.65 > 1.2: the clipped loss -2*1.2 is the larger one, so it is taken.
    # Ratio e^-0.5 = 0.61 < 0.8: the unclipped loss -2*0.61 is larger than -2*0.8, so it stays. Ratio 1: unclipped.
    logp = [[0.0, 0.0, 0.0]]
    old = [[-0.5, 0.5, 0.0]]
    mask, off, adv = [[1, 1, 1]], [[0, 0, 0]], [2.0]
    lp, olp, a, m, o = _tensors(logp, old, mask, off, adv)
    loss, metrics = policy_loss(lp, olp, a, m, o, clip_eps=0.2, norm_length=3)
    expected = _expected_token_losses(logp, old, mask, off, adv, 0.1, clip=0.2)[0]
    assert expected == pytest.approx([-2.0 * 1.2, -2.0 * math.exp(-0.5), -2.0])
    assert loss.item() == pytest.approx(sum(expected) / 3)
    # Only the first token takes the clipped branch (its clipped loss -2.4 is larger than -2*1.65).
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 3)


def test_off_policy_tokens_are_never_clipped():
    logp, old, mask, off, adv = _batch()
    lp, olp, a, m, o = _tensors(logp, old, mask, off, adv)
    _, with_clip = policy_loss(lp, olp, a, m, o, clip_eps=0.2)
    _, without = policy_loss(lp, olp, a, m, o)
    assert with_clip["off_policy_loss"].item() == pytest.approx(without["off_policy_loss"].item())


def test_off_policy_weight_clamps():
    logp = [[math.log(0.9), math.log(0.001)]]
    lp, olp, a, m, o = _tensors(logp, [[0.0, 0.0]], [[1, 1]], [[1, 1]], [1.0])
    loss, metrics = policy_loss(
        lp,
        olp,
        a,
        m,
        o,
        gamma=0.1,
        off_policy_max_clip=0.5,
        off_policy_min_clip=0.05,
        aggregation="token-sum",
        norm_length=1,
    )
    f_high, f_low = 0.9 / 1.0, 0.001 / 0.101  # 0.9 -> clamped to 0.5; 0.0099 -> clamped to 0.05
    assert f_high > 0.5 and f_low < 0.05
    assert loss.item() == pytest.approx(-(0.5 + 0.05))
    assert metrics["off_policy_shaped_mean"].item() == pytest.approx(0.275)


# --- policy loss: gradients ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_gradient_of_off_policy_token_is_shaped_weight(gamma):
    logp, old, mask, off, adv = _batch()
    lp, olp, a, m, o = _tensors(logp, old, mask, off, adv)
    loss, _ = policy_loss(lp, olp, a, m, o, gamma=gamma, norm_length=8192)
    loss.backward()
    for t, x in enumerate(logp[1]):
        p = math.exp(x)
        assert lp.grad[1, t].item() == pytest.approx(-adv[1] * gamma * p / (p + gamma) ** 2 / 8192, rel=1e-9)


def test_gradient_weight_peaks_at_gamma():
    """w(p) = gamma*p/(p+gamma)^2 is 1/4 at p = gamma and ~0.083 at p = 0.01 and p = 1 (notes §1.4)."""
    probs = [0.01, 0.1, 1.0]
    lp, olp, a, m, o = _tensors([[math.log(p) for p in probs]], [[0.0] * 3], [[1] * 3], [[1] * 3], [-1.0])
    loss, _ = policy_loss(lp, olp, a, m, o, gamma=0.1, norm_length=1)
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([0.01 * 0.1 / 0.11**2, 0.25, 0.1 / 1.1**2], rel=1e-9)
    assert lp.grad[0, 0].item() == pytest.approx(0.0826, abs=1e-4)


def test_gradient_without_shaping_is_probability():
    lp, olp, a, m, o = _tensors([[math.log(0.3)]], [[0.0]], [[1]], [[1]], [2.0])
    loss, _ = policy_loss(lp, olp, a, m, o, gamma=None, norm_length=1)
    loss.backward()
    assert lp.grad.item() == pytest.approx(-2.0 * 0.3)


def test_gradient_of_on_policy_token_at_ratio_one_is_minus_advantage():
    logp = [[-0.7, -1.2, -2.0]]
    lp, olp, a, m, o = _tensors(logp, logp, [[1, 1, 0]], [[0, 0, 0]], [0.6])
    loss, metrics = policy_loss(lp, olp, a, m, o, norm_length=10)
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([-0.06, -0.06, 0.0])
    assert metrics["on_policy_ratio_mean"].item() == pytest.approx(1.0)


def test_clipped_token_has_no_gradient():
    lp, olp, a, m, o = _tensors([[0.0, 0.0]], [[-0.5, 0.0]], [[1, 1]], [[0, 0]], [1.0])
    loss, _ = policy_loss(lp, olp, a, m, o, clip_eps=0.2, norm_length=1)
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([0.0, -1.0])


def test_masked_tokens_get_no_gradient_and_old_logprobs_unused_off_policy():
    logp, old, mask, off, adv = _batch()
    lp, olp, a, m, o = _tensors(logp, old, mask, off, adv)
    loss1, _ = policy_loss(lp, olp, a, m, o)
    loss1.backward()
    assert lp.grad[0, 3].item() == 0.0
    old2 = [row[:] for row in old]
    old2[1] = [0.0, 0.0, 0.0, 0.0]  # changing old log-probs of trace tokens must not matter
    lp2, olp2, *_ = _tensors(logp, old2, mask, off, adv)
    loss2, _ = policy_loss(lp2, olp2, a, m, o)
    assert loss2.item() == pytest.approx(loss1.item())


def test_advantage_shape_is_checked():
    lp, olp, a, m, o = _tensors(*_batch())
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(lp, olp, a.unsqueeze(-1), m, o)
