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


# --- importance correction of stale on-policy tokens ----------------------------------------------------------------
# rho_t = pi_old / mu = exp(old - behaviour); token weight min(rho_t, C); sequence weight min(prod_t rho_t, C).

CAP = 2.0


def _stale_batch():
    """`_batch()` plus behaviour log-probs: on-policy rho = e^0.3 (< C), e^1.2 (> C), e^-0.4; the trace has none."""
    logp, old, mask, off, adv = _batch()
    behaviour = [[-0.6, -2.1, -0.1, 0.0], [0.0, 0.0, 0.0, 0.0]]
    present = [[1, 1, 1, 0], [0, 0, 0, 0]]
    return logp, old, mask, off, adv, behaviour, present


def _weighted_policy_loss(level, clip=None, norm_length=8192, gamma=0.1):
    logp, old, mask, off, adv, behaviour, present = _stale_batch()
    lp, olp, a, m, o = _tensors(logp, old, mask, off, adv)
    loss, metrics = policy_loss(
        lp,
        olp,
        a,
        m,
        o,
        gamma=gamma,
        clip_eps=clip,
        norm_length=norm_length,
        behaviour_logprobs=torch.tensor(behaviour, dtype=torch.float64),
        behaviour_mask=torch.tensor(present),
        importance_level=level,
        importance_cap=CAP,
    )
    return lp, loss, metrics


def _rhos():
    _, old, _, _, _, behaviour, _ = _stale_batch()
    return [math.exp(old[0][t] - behaviour[0][t]) for t in range(3)]


@pytest.mark.parametrize("clip", [None, 0.2])
def test_token_level_weights_each_on_policy_term_and_leaves_the_trace(clip):
    logp, old, mask, off, adv, _, _ = _stale_batch()
    rhos = _rhos()
    assert rhos[0] < CAP < rhos[1] and rhos[2] < 1  # the cap is hit on token 1 only
    weights = [min(r, CAP) for r in rhos]
    per_token = _expected_token_losses(logp, old, mask, off, adv, 0.1, clip=clip)
    expected_on = [w * x for w, x in zip(weights, per_token[0][:3], strict=True)]  # -w * A * r (clipped as PPO)
    _, loss, metrics = _weighted_policy_loss("token", clip=clip)
    assert loss.item() == pytest.approx((sum(expected_on) + sum(per_token[1])) / 8192, rel=1e-12)
    assert metrics["on_policy_loss"].item() == pytest.approx(sum(expected_on) / 8192, rel=1e-12)
    assert metrics["off_policy_loss"].item() == pytest.approx(sum(per_token[1]) / 8192, rel=1e-12)  # f(p), unweighted
    assert metrics["importance_weight_mean"].item() == pytest.approx((rhos[0] + CAP + rhos[2]) / 3, rel=1e-12)
    assert metrics["importance_capped_fraction"].item() == pytest.approx(1 / 3)
    k3 = [r - 1 - math.log(r) for r in rhos]
    assert metrics["kl_behaviour_old"].item() == pytest.approx(sum(k3) / 3, rel=1e-12)


def test_token_level_gradient_is_the_weight_times_the_on_policy_gradient():
    """d(-w A r)/d logp = -w A r (r = e^(logp - old)); trace tokens keep -A gamma p / (p + gamma)^2, all over L."""
    logp, old, _, _, adv, _, _ = _stale_batch()
    lp, loss, _ = _weighted_policy_loss("token")
    loss.backward()
    for t, rho in enumerate(_rhos()):
        r = math.exp(logp[0][t] - old[0][t])
        assert lp.grad[0, t].item() == pytest.approx(-min(rho, CAP) * adv[0] * r / 8192, rel=1e-9)
    assert lp.grad[0, 3].item() == 0.0
    for t, x in enumerate(logp[1]):
        p = math.exp(x)
        assert lp.grad[1, t].item() == pytest.approx(-adv[1] * 0.1 * p / (p + 0.1) ** 2 / 8192, rel=1e-9)


def test_sequence_level_weight_is_the_capped_product_broadcast():
    logp, old, mask, off, adv, _, _ = _stale_batch()
    rhos = _rhos()
    product = rhos[0] * rhos[1] * rhos[2]  # e^1.1 ~ 3.0 > C: the cap is hit
    assert product > CAP
    per_token = _expected_token_losses(logp, old, mask, off, adv, 0.1)
    lp, loss, metrics = _weighted_policy_loss("sequence")
    assert loss.item() == pytest.approx((CAP * sum(per_token[0][:3]) + sum(per_token[1])) / 8192, rel=1e-12)
    assert metrics["importance_weight_mean"].item() == pytest.approx(CAP)
    assert metrics["importance_capped_fraction"].item() == pytest.approx(1.0)  # every token of a capped sequence
    loss.backward()
    for t in range(3):
        r = math.exp(logp[0][t] - old[0][t])
        assert lp.grad[0, t].item() == pytest.approx(-CAP * adv[0] * r / 8192, rel=1e-9)


def test_sequence_level_under_the_cap_and_far_over_it_without_overflow():
    """Row 0: prod rho = e^(0.2 - 0.5) < C, the weight itself. Row 1: log prod rho = 2000, the weight exactly C."""
    logp = [[-1.0, -1.0], [-1.0, -1.0]]
    old = [[-1.0, -1.0], [-1.0, -1.0]]
    behaviour = [[-1.2, -0.5], [-1001.0, -1001.0]]
    lp, olp, a, m, o = _tensors(logp, old, [[1, 1], [1, 1]], [[0, 0], [0, 0]], [1.0, -1.0])
    loss, metrics = policy_loss(
        lp,
        olp,
        a,
        m,
        o,
        norm_length=1,
        behaviour_logprobs=torch.tensor(behaviour, dtype=torch.float64),
        behaviour_mask=torch.ones(2, 2, dtype=torch.bool),
        importance_level="sequence",
        importance_cap=CAP,
    )
    w0 = math.exp(0.2 - 0.5)
    assert loss.item() == pytest.approx(-1.0 * w0 * 2 + 1.0 * CAP * 2, rel=1e-12)  # ratio r = 1 on every token
    assert metrics["importance_weight_mean"].item() == pytest.approx((2 * w0 + 2 * CAP) / 4, rel=1e-12)
    assert metrics["importance_capped_fraction"].item() == pytest.approx(0.5)
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    assert lp.grad.flatten().tolist() == pytest.approx([-w0, -w0, CAP, CAP], rel=1e-12)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_off_is_bit_identical_to_no_behaviour_logprobs_but_reports_the_mismatch(clip):
    logp, old, mask, off, adv, _, _ = _stale_batch()
    lp, olp, a, m, o = _tensors(logp, old, mask, off, adv)
    plain, plain_metrics = policy_loss(lp, olp, a, m, o, clip_eps=clip, norm_length=8192)
    plain.backward()
    lp_off, off_loss, off_metrics = _weighted_policy_loss("none", clip=clip)
    off_loss.backward()
    assert torch.equal(off_loss, plain) and torch.equal(lp_off.grad, lp.grad)
    assert all(torch.equal(off_metrics[k], v) for k, v in plain_metrics.items())
    rhos = _rhos()
    assert off_metrics["importance_weight_mean"].item() == pytest.approx(sum(min(r, CAP) for r in rhos) / 3)
    assert off_metrics["importance_capped_fraction"].item() == pytest.approx(1 / 3)
    assert "importance_weight_mean" not in plain_metrics


@pytest.mark.parametrize("aggregation", ["token-sum", "seq-mean-token-mean"])
def test_weights_do_not_change_the_normalisation(aggregation):
    """A row of weight-1 tokens (rho = 1) gives the unweighted loss: the divisors stay L (token-sum) or counts."""
    logp, old, mask, off, adv = _batch()
    lp, olp, a, m, o = _tensors(logp, old, mask, off, adv)
    plain, _ = policy_loss(lp, olp, a, m, o, aggregation=aggregation, norm_length=8192)
    weighted, metrics = policy_loss(
        lp,
        olp,
        a,
        m,
        o,
        aggregation=aggregation,
        norm_length=8192,
        behaviour_logprobs=olp.clone(),
        behaviour_mask=m.bool() & ~o.bool(),
        importance_level="token",
    )
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-15)
    assert metrics["importance_weight_mean"].item() == 1.0 and metrics["kl_behaviour_old"].item() == 0.0


def test_unknown_importance_level_is_refused():
    lp, olp, a, m, o = _tensors(*_batch())
    with pytest.raises(ValueError, match="unknown importance level 'tokens'"):
        policy_loss(lp, olp, a, m, o, behaviour_logprobs=olp, importance_level="tokens")
