"""The quickstart task: correct traces, disjoint held-out problems, the released LUFFY schema."""

from __future__ import annotations

from luffy_trainer.rewards import math_verify_reward
from luffy_trainer.tasks import MAX_SUM, arithmetic_rows, problems, solution_steps


def test_problems_respect_the_digit_and_sum_limits():
    for n in (2, 4, 5):
        found = problems(n)
        assert found and all(len(p) == n and min(p) >= 1 and sum(p) <= MAX_SUM for p in found)
    assert len(problems(2)) == 36  # pairs (a, b) of 1..9 with a + b <= 9


def test_solution_is_a_running_sum_graded_correct():
    trace = solution_steps([3, 1, 4])
    assert trace == "<think>\n3 + 1 = 4\n4 + 4 = 8\n</think>\n\\boxed{8}"
    # The reward prepends "<think>\n" (the chat template opened it), so grade the trace without it.
    assert math_verify_reward(trace.removeprefix("<think>\n"), "8") == 1.0
    assert math_verify_reward(trace.removeprefix("<think>\n"), "9") == 0.0


def test_splits_are_disjoint_and_in_the_luffy_schema():
    rows = arithmetic_rows(n_base=50, n_train=200, n_other=10, seed=3)
    question = lambda row: row["prompt"][0]["content"]  # noqa: E731
    train_questions = {question(r) for r in rows["train"]}
    held_out = [r for r in rows["val"] if r["data_source"] == "unseen-5-terms"]
    assert held_out and not train_questions & {question(r) for r in held_out}
    assert len([r for r in rows["val"] if r["data_source"] == "4-terms"]) == 10
    for row in rows["train"] + rows["val"] + rows["base"]:
        operands = [int(x) for x in question(row).removesuffix(" = ?").split(" + ")]
        assert row["reward_model"]["ground_truth"] == str(sum(operands))
        assert row["target"][0]["role"] == "assistant"
        assert row["target"][0]["content"].endswith(f"\\boxed{{{sum(operands)}}}")
    assert {len(question(r).split(" + ")) for r in rows["base"]} == {2}
    assert {len(question(r).split(" + ")) for r in rows["train"]} == {5}
