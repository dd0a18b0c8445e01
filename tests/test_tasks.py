"""The quickstart task: correct traces, disjoint held-out problems, no shortcut for the base model or a guesser."""

from __future__ import annotations

from collections import Counter

from luffy_trainer.demo.tasks import (
    BASE_NONZERO,
    MAX_SUM,
    TASK_NONZERO,
    VAL_PER_TOTAL,
    arithmetic_rows,
    constant_answer_accuracy,
    problems,
    solution_steps,
)
from luffy_trainer.rewards import math_verify_reward


def question(row: dict) -> str:
    return row["prompt"][0]["content"]


def operands(row: dict) -> list[int]:
    return [int(x) for x in question(row).removesuffix(" = ?").split(" + ")]


def test_problems_respect_the_digit_sum_and_nonzero_limits():
    for n in (2, 4, 5):
        nonzero = TASK_NONZERO if n > 2 else BASE_NONZERO
        found = problems(n, nonzero)
        assert found and all(len(p) == n and sum(p) <= MAX_SUM and sum(x > 0 for x in p) in nonzero for p in found)
    assert len(problems(2, BASE_NONZERO)) == 36  # pairs (a, b) of 1..9 with a + b <= 9
    assert all(sum(x > 0 for x in p) >= 3 for p in problems(5, TASK_NONZERO))


def test_solution_is_a_running_sum_of_the_nonzero_operands_graded_correct():
    trace = solution_steps([3, 0, 1, 4])
    assert trace == "<think>\n3 + 1 = 4\n4 + 4 = 8\n</think>\n\\boxed{8}"
    # The reward prepends "<think>\n" (the chat template opened it), so grade the trace without it.
    assert math_verify_reward(trace.removeprefix("<think>\n"), "8") == 1.0
    assert math_verify_reward(trace.removeprefix("<think>\n"), "9") == 0.0


def test_splits_are_disjoint_and_in_the_luffy_schema():
    rows = arithmetic_rows(n_base=50, n_train=300, seed=3)
    held_out = [r for r in rows["val"] if r["data_source"] == "unseen-5-terms"]
    assert held_out and not {question(r) for r in rows["train"]} & {question(r) for r in held_out}
    for row in rows["train"] + rows["val"] + rows["base"]:
        assert row["reward_model"]["ground_truth"] == str(sum(operands(row)))
        assert row["target"][0]["role"] == "assistant"
        assert row["target"][0]["content"].endswith(f"\\boxed{{{sum(operands(row))}}}")
    assert {sum(x > 0 for x in operands(r)) for r in rows["base"]} == {2}
    assert {len(operands(r)) for r in rows["train"]} == {5}


def test_no_operand_and_no_sum_of_two_answers_a_training_problem():
    """What the base model knows (copy a number, add two) never reaches a training or held-out total."""
    for n in (4, 5):
        for p in problems(n, TASK_NONZERO):
            assert sum(p) not in set(p) | {p[i] + p[j] for i in range(n) for j in range(i + 1, n)}


def test_held_out_sets_have_no_dominant_answer():
    rows = arithmetic_rows(n_base=0, n_train=10, seed=0)
    for source in ("unseen-5-terms", "4-terms"):
        held = [r for r in rows["val"] if r["data_source"] == source]
        counts = Counter(r["reward_model"]["ground_truth"] for r in held)
        assert max(counts.values()) <= VAL_PER_TOTAL
        assert constant_answer_accuracy(held) == max(counts.values()) / len(held) < 0.3
