"""The LUFFY math reward, the reward registry, and the time-bounded grading pool (real worker processes)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
from luffy_trainer.rewards import (
    RewardError,
    RewardPool,
    boxed_math_reward,
    get_reward,
    math_verify_reward,
    register_reward,
)


@register_reward("test_length_or_hang")
def length_or_hang(response: str, ground_truth: str) -> float:
    """Length of the response; loops forever on "hang", as a stuck grader would."""
    while response == "hang":
        time.sleep(0.05)
    return float(len(response))


@register_reward("test_raises")
def raises_on_boom(response: str, ground_truth: str) -> float:
    if response == "boom":
        raise ZeroDivisionError("grader bug")
    return 1.0


@register_reward("test_dies")
def dies_on_exit(response: str, ground_truth: str) -> float:
    if response == "exit":
        os._exit(3)
    return 1.0


@pytest.mark.parametrize(
    ("response", "ground_truth", "expected"),
    [
        ("Add them.\n</think>\nThe answer is \\boxed{4}.", "4", 1.0),
        ("Add them.\n</think>\nThe answer is \\boxed{5}.", "4", 0.0),
        ("half</think> \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("half</think> \\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("half</think> \\boxed{\\dfrac{2}{4}}", "\\frac12", 1.0),
        ("root</think> \\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("pair</think> \\boxed{(1, 2)}", "(1,2)", 1.0),
        ("no closing tag, answer \\boxed{4}", "4", 0.0),
        ("draft \\boxed{5}</think> final \\boxed{4}", "4", 1.0),  # text before </think> is ignored
        ("draft \\boxed{4}</think> final \\boxed{5}", "4", 0.0),
        ("<think>\\boxed{5}</think> \\boxed{4}", "4", 1.0),  # an opening tag plays no part
        # the released think split: only the text between the first and the second </think> is graded
        ("a</think>b</think>\\boxed{4}", "4", 0.0),
        ("a</think> \\boxed{4} </think> \\boxed{5}", "4", 1.0),
        ("a</think> \\boxed{5} </think> \\boxed{4} </think> \\boxed{4}", "4", 0.0),
        ("</think>\\frac{{{{", "4", 0.0),
        ("</think>\\boxed{4}", "\\frac{", 0.0),
        ("</think>\\boxed{4}", "", 0.0),
    ],
)
def test_math_verify_reward(response, ground_truth, expected):
    assert math_verify_reward(response, ground_truth) == expected


@pytest.mark.parametrize(
    ("response", "ground_truth", "expected"),
    [
        # no </think>: the whole response is graded (the training reward gives 0 here)
        ("The sum is \\boxed{4}.", "4", 1.0),
        ("I think \\boxed{3}, no: \\boxed{4}", "4", 1.0),  # the last box counts
        ("\\boxed{4} is wrong, it is \\boxed{5}", "4", 0.0),
        ("The sum is 4.", "4", 0.0),  # no box, no answer
        # with </think>: the released split, as for training
        ("draft \\boxed{4}</think> final \\boxed{5}", "4", 0.0),
        ("draft \\boxed{5}</think> final \\boxed{4} </think> \\boxed{5}", "4", 1.0),
        ("x</think> no box here </think> \\boxed{4}", "4", 0.0),
        # nested and spaced boxes, spellings of one value
        ("</think> \\boxed {\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0),
        ("</think> \\boxed{ \\dfrac{3}{4} }", "\\frac{3}{4}", 1.0),
        ("</think> \\boxed{\\text{(B)}}", "(B)", 1.0),
        ("</think> \\boxed{90^\\circ}", "90", 1.0),
        ("</think> \\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1.0),
        ("</think> \\boxed{x^{2}+1}", "x^2 + 1", 1.0),
        ("</think> \\boxed{x^{2}+2}", "x^2 + 1", 0.0),
        ("</think> \\boxed{4", "4", 0.0),  # an unclosed box is no answer
    ],
)
def test_boxed_math_reward(response, ground_truth, expected):
    assert boxed_math_reward(response, ground_truth) == expected


def test_math_verify_reward_outside_the_main_thread():
    """math_verify's SIGALRM timeouts fail off the main thread; the reward must still grade there."""
    out = []
    thread = threading.Thread(
        target=lambda: out.extend(
            [math_verify_reward("</think> \\boxed{\\frac{1}{2}}", "0.5"), math_verify_reward("</think> 3", "4")]
        )
    )
    thread.start()
    thread.join()
    assert out == [1.0, 0.0]


def test_registry():
    assert get_reward("math_verify") is math_verify_reward
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*registered rewards: .*math_verify"):
        get_reward("nope")
    assert register_reward("test_length_or_hang")(length_or_hang) is length_or_hang  # same function: fine
    with pytest.raises(ValueError, match=r"already registered by .*length_or_hang"):
        register_reward("test_length_or_hang")(raises_on_boom)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardPool("nope", num_workers=1, timeout_s=1.0)


def test_pool_grades_in_input_order():
    responses = [
        "</think> \\boxed{4}",
        "</think> \\boxed{5}",
        "no tags \\boxed{4}",
        "</think> \\boxed{0.5}",
        "</think> \\boxed{\\sqrt{8}}",
    ]
    truths = ["4", "4", "4", "\\frac{1}{2}", "2\\sqrt{2}"]
    with RewardPool("math_verify", num_workers=2, timeout_s=30.0) as pool:
        assert pool.score(responses, truths) == [1.0, 0.0, 0.0, 1.0, 1.0]
        assert pool.timeouts == []
        assert pool.score([], []) == []
        with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
            pool.score(["a", "b"], ["a"])


def test_pool_kills_a_stuck_worker_and_keeps_going(caplog):
    with (
        caplog.at_level(logging.WARNING, logger="luffy_trainer.rewards"),
        RewardPool("test_length_or_hang", num_workers=2, timeout_s=1.0) as pool,
    ):
        assert pool.score(["a", "hang", "abc", "hang", "de"], [""] * 5) == [1.0, 0.0, 3.0, 0.0, 2.0]
        assert pool.timeouts == [1, 3]
        assert pool.score(["xyz", "hang"], ["", ""]) == [3.0, 0.0]  # replaced workers grade again
        assert pool.timeouts == [1]
    records = [r for r in caplog.records if "exceeded" in r.getMessage()]
    # Two bounds that expire within one wait are logged in worker order, so only the first call's set is fixed.
    assert sorted(r.args[1] for r in records[:2]) == [1, 3]
    assert [r.args[1] for r in records[2:]] == [1]
    for record in records:  # each stuck worker was killed and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(record.args[3], 0)


def test_pool_bounds_a_pathological_math_verify_input():
    """A power tower keeps math_verify busy until its own 5 s guard; the pool gives up at its bound instead."""
    with RewardPool("math_verify", num_workers=1, timeout_s=3.0) as pool:
        scores = pool.score(["</think> \\boxed{7^{7^{10}}}", "</think> \\boxed{4}"], ["5", "4"])
        assert scores == [0.0, 1.0]
        assert pool.timeouts == [0]


def test_pool_reports_a_raising_reward_and_closes():
    pool = RewardPool("test_raises", num_workers=1, timeout_s=30.0)
    with pytest.raises(RewardError, match=r"(?s)'test_raises' raised on sample 1.*ZeroDivisionError: grader bug"):
        pool.score(["fine", "boom"], ["", ""])
    with pytest.raises(RewardError, match="closed"):
        pool.score(["fine"], [""])


def test_pool_reports_a_dead_worker():
    with (
        RewardPool("test_dies", num_workers=1, timeout_s=30.0) as pool,
        pytest.raises(RewardError, match="died with exit code 3 while grading sample 1"),
    ):
        pool.score(["fine", "exit"], ["", ""])


def test_pool_rejects_a_reward_it_cannot_send_to_workers():
    register_reward("test_lambda")(lambda response, ground_truth: 1.0)
    with pytest.raises(ValueError, match="module-level function"):
        RewardPool("test_lambda", num_workers=1, timeout_s=1.0)
