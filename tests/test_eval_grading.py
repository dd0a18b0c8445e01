"""Evaluation grading and arithmetic: the multiple-choice grader, grader selection, avg@k / pass@k, and `evaluate`
end to end with known completions graded by a real reward pool."""

from __future__ import annotations

import itertools
import json
import re
from fractions import Fraction

import pytest
from luffy_trainer.config import DataConfig
from luffy_trainer.data import load_examples
from luffy_trainer.evaluation import EvalResult, choose_graders, evaluate, pass_at, score_problems
from luffy_trainer.rewards import (
    RewardPool,
    chosen_option,
    multiple_choice_boxed_reward,
    multiple_choice_reward,
    option_label,
    register_reward,
    select_reward,
)
from luffy_trainer.rollout.base import Completion, SamplingParams

# --- the multiple-choice grader --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "ground_truth", "expected"),
    [
        ("think</think>\n\\boxed{C}", "C", 1.0),
        ("think</think>\n\\boxed{(C)}", "C", 1.0),
        ("think</think>\n$\\boxed{\\text{C}}$", "C", 1.0),
        ("think</think>\n\\boxed{\\textbf{(C)}}", "(C)", 1.0),
        ("think</think>\n\\boxed{C. Planetary days will become shorter.}", "C", 1.0),
        ("think</think>\n\\boxed{C) 10^-4 eV}", "C", 1.0),
        ("think</think>\nThe answer is (C).", "C", 1.0),
        ("think</think>\nThe correct answer is C.", "C", 1.0),
        ("think</think>\nANSWER: C", "C", 1.0),  # GPQA's requested last line
        ("think</think>\n**Answer:** (C)", "C", 1.0),
        ("think</think>\nThe answer choice is C", "C", 1.0),
        ("think</think>\n\\boxed{2}", "2", 1.0),  # ARC-c questions with numbered options
        ("think</think>\nThe answer is 2)", "2", 1.0),
        # wrong or no choice
        ("think</think>\n\\boxed{B}", "C", 0.0),
        ("think</think>\nThe answer is (D).", "C", 0.0),
        ("no closing tag: \\boxed{C}", "C", 0.0),
        ("\\boxed{C}</think>\nI am not sure.", "C", 0.0),  # a choice before </think> does not count
        ("think</think>\n\\boxed{c}", "C", 0.0),  # labels are capital letters
        ("think</think>\n\\boxed{Cat}", "C", 0.0),
        ("think</think>\n\\boxed{C,D}", "C", 0.0),
        ("think</think>\n\\boxed{C.5}", "C", 0.0),
        ("think</think>\nThe answer is Clearly wrong", "C", 0.0),
        ("think</think>\n\\boxed{25}", "2", 0.0),
        ("think</think>\nthe answer is 2.5", "2", 0.0),
        # which choice counts: the last boxed label, else the last answer phrase
        ("think</think>\n\\boxed{A} no wait \\boxed{C}", "C", 1.0),
        ("think</think>\n\\boxed{C}, so the value is \\boxed{42}", "C", 1.0),
        ("think</think>\nThe answer is (A). Checking again, the answer is (C).", "C", 1.0),
        ("think</think>\n\\boxed{C}. Some would say the answer is (A).", "C", 1.0),
        ("think</think>\nThe answer is (C). Final: \\boxed{A}", "C", 0.0),
    ],
)
def test_multiple_choice_reward(response, ground_truth, expected):
    assert multiple_choice_reward(response, ground_truth) == expected


@pytest.mark.parametrize(
    ("response", "ground_truth", "expected"),
    [
        ("t</think>\\boxed{C}", "C", 1.0),
        ("t</think>\\boxed{(C)}", "C", 1.0),
        ("t</think>$\\boxed{\\text{C}}$", "C", 1.0),
        ("t</think>\\boxed {  J  }", "J", 1.0),  # MMLU-Pro: ten options, A-J
        ("t</think>\\boxed{3}", "3", 1.0),  # ARC-c: numbered options
        ("t</think>\\boxed{\\textbf{(3)}}", "3", 1.0),
        ("t</think>\\boxed{B} on reflection \\boxed{D}", "D", 1.0),
        # no box, no choice: GPQA's requested "ANSWER: X" line and answer phrases do not count
        ("t</think>\nANSWER: C", "C", 0.0),
        ("t</think>\nThe answer is (C).", "C", 0.0),
        ("t</think>\n**Answer:** C", "C", 0.0),
        # the released think split
        ("t</think>\\boxed{C}</think>\\boxed{A}", "C", 1.0),
        ("\\boxed{C}</think> on second thought </think> \\boxed{C}", "C", 0.0),
        ("no closing tag \\boxed{C}", "C", 0.0),
    ],
)
def test_multiple_choice_boxed_reward(response, ground_truth, expected):
    assert multiple_choice_boxed_reward(response, ground_truth) == expected


def test_multiple_choice_reward_rejects_an_answer_that_is_no_option_label():
    with pytest.raises(ValueError, match=r"ground truth '4\.5 eV' is not an option label"):
        multiple_choice_reward("</think> \\boxed{A}", "4.5 eV")


@pytest.mark.parametrize(
    ("ground_truth", "label"), [("C", "C"), (" (C) ", "C"), ("2", "2"), ("CD", None), ("10", None), ("c", None)]
)
def test_option_label(ground_truth, label):
    assert option_label(ground_truth) == label


def test_chosen_option_is_none_without_a_choice():
    assert chosen_option("The value is 42.") is None
    assert chosen_option("\\boxed{42}", digits=False) is None


@pytest.mark.parametrize(
    ("source", "ground_truth", "expected"),
    [
        ("gpqa", "A", "multiple_choice"),
        ("arc_c", "2", "multiple_choice"),  # known benchmark: digit labels too
        ("ARC-Challenge", "B", "multiple_choice"),
        ("mmlu_pro", "J", "multiple_choice"),
        ("GPQA-Diamond", "4.5 eV", "multiple_choice"),  # known benchmark: caught by choose_graders
        ("my_quiz", "(B)", "multiple_choice"),  # unknown benchmark, option-letter answer
        ("math", "2", "math_verify"),
        ("aime", "204", "math_verify"),
        ("math", "x", "math_verify"),
        ("math", "\\frac{3}{4}", "my_reward"),
    ],
)
def test_select_reward(source, ground_truth, expected):
    default = "my_reward" if ground_truth == "\\frac{3}{4}" else "math_verify"
    assert select_reward(source, ground_truth, default) == expected


# --- avg@k and pass@k ------------------------------------------------------------------------------------------------


def brute_force_pass_at(n: int, c: int, j: int) -> Fraction:
    """The fraction of all j-subsets of n samples (c of them correct) holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), j))
    return Fraction(sum(any(samples[i] for i in subset) for subset in subsets), len(subsets))


def test_pass_at_equals_enumeration_over_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for j in range(1, n + 1):
                assert pass_at(n, c, j) == pytest.approx(float(brute_force_pass_at(n, c, j)), abs=1e-12), (n, c, j)


def test_pass_at_rejects_impossible_counts():
    with pytest.raises(ValueError, match="correct samples"):
        pass_at(4, 5, 1)
    with pytest.raises(ValueError, match="1 <= j <= n"):
        pass_at(4, 2, 5)


def test_score_problems_on_a_hand_built_grade_matrix():
    correct = [
        [True, False, False, True],  # a: 2 of 4
        [False, False, False, False],  # a: 0 of 4
        [True, True, True, True],  # b: 4 of 4
        [False, True, False, False],  # a: 1 of 4
    ]
    scores = score_problems(correct, ["a", "a", "b", "a"], k=4, pass_at_j=[1, 2, 4])
    # a: avg@4 = (2/4 + 0 + 1/4) / 3; pass@4 = 2/3 problems solved at least once;
    # pass@2 per problem = 1 - C(4-c, 2)/C(4, 2): c=2 -> 1 - 1/6, c=0 -> 0, c=1 -> 1 - 3/6; pass@1 = avg@4.
    assert scores["a"] == pytest.approx(
        {"problems": 3, "avg@4": 0.25, "pass@1": 0.25, "pass@2": (5 / 6 + 0 + 1 / 2) / 3, "pass@4": 2 / 3}
    )
    assert scores["b"] == pytest.approx({"problems": 1, "avg@4": 1.0, "pass@1": 1.0, "pass@2": 1.0, "pass@4": 1.0})
    assert list(scores["a"]) == ["problems", "avg@4", "pass@1", "pass@2", "pass@4"]
    result = EvalResult(k=4, by_source=scores)
    assert result.markdown().splitlines()[0] == "| benchmark | problems | avg@4 | pass@1 | pass@2 | pass@4 |"
    # unweighted over benchmarks: (0.25 + 1) / 2, not the per-problem mean (0.5 + 0 + 1 + 0.25) / 4
    assert result.mean["avg@4"] == pytest.approx(0.625)
    assert result.mean["pass@4"] == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="expected 4 graded samples"):
        score_problems([[True]], ["a"], k=4)
    with pytest.raises(ValueError, match="1 <= j <= k"):
        score_problems(correct, ["a"] * 4, k=4, pass_at_j=[8])


def test_metric_names_are_accepted_by_mlflow_and_never_collide():
    by_source = {
        "math@500": {"problems": 2.0, "avg@4": 0.5, "pass@4": 1.0},
        "gpqa (diamond)": {"problems": 1.0, "avg@4": 0.0, "pass@4": 0.0},
    }
    metrics = EvalResult(k=4, by_source=by_source).metrics("eval")
    assert metrics == {
        "eval/math_500/problems": 2.0,
        "eval/math_500/avg_at_4": 0.5,
        "eval/math_500/pass_at_4": 1.0,
        "eval/gpqa _diamond_/problems": 1.0,
        "eval/gpqa _diamond_/avg_at_4": 0.0,
        "eval/gpqa _diamond_/pass_at_4": 0.0,
        "eval/mean/avg_at_4": 0.25,
        "eval/mean/pass_at_4": 0.5,
    }
    assert all(re.fullmatch(r"[/\w.\- ]+", name) for name in metrics)  # MLflow's rule for metric names
    clash = {"a@b": by_source["math@500"], "a_b": by_source["math@500"]}
    with pytest.raises(ValueError, match="would log as 'a_b', a name already taken"):
        EvalResult(k=4, by_source=clash).metrics()


# --- grading pools and evaluate() ------------------------------------------------------------------------------------


def test_pool_grades_each_sample_with_its_own_reward():
    responses = ["</think> \\boxed{4}", "</think> ANSWER: B", "</think> ANSWER: B"]
    truths = ["4", "B", "B"]
    with RewardPool("math_verify", num_workers=1, timeout_s=30.0) as pool:
        assert pool.reward_names == ["math_verify", "multiple_choice", "multiple_choice_boxed", "boxed_math"]
        # math_verify finds no answer in GPQA's "ANSWER: B" line; the choice grader does
        assert pool.score(responses, truths, ["math_verify", "multiple_choice", "math_verify"]) == [1.0, 1.0, 0.0]
        assert pool.score(responses, truths) == [1.0, 0.0, 0.0]  # default: the pool's own reward
        with pytest.raises(ValueError, match=r"reward\(s\) nope not in this pool"):
            pool.score(responses, truths, ["math_verify", "nope", "math_verify"])
        with pytest.raises(ValueError, match="3 responses but 2 reward names"):
            pool.score(responses, truths, ["math_verify"] * 2)


@register_reward("test_eval_always_right")
def always_right(response: str, ground_truth: str) -> float:
    return 1.0


class ScriptedEngine:
    """Answers each prompt with fixed texts, so that grading can be checked end to end without a trained model."""

    def __init__(self, tokenizer, answers: dict[tuple[int, ...], list[str]]):
        self.tokenizer = tokenizer
        self.answers = answers
        self.calls = []

    def generate(self, prompts, n, params, seed=None):
        self.calls.append((n, params, seed))
        out = []
        for prompt in prompts:
            texts = self.answers[tuple(prompt)]
            assert len(texts) == n
            completions = []
            for text in texts:
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                assert self.tokenizer.decode(ids) == text  # the engine hands back exactly the scripted text
                reason = "stop" if "</think>" in text else "length"
                completions.append(Completion(ids, [0.0] * len(ids), reason, weight_version=0))
            out.append(completions)
        return out


# (benchmark, question, ground truth, four responses, which of them are right)
SCRIPT = [
    (
        "math",
        "What is 40 + 2?",
        "42",
        ["a</think> \\boxed{42}", "a</think> \\boxed{41}", "no tag \\boxed{42}", "a</think> \\boxed{\\frac{84}{2}}"],
        [1, 0, 0, 1],
    ),
    ("math", "Simplify 6/8.", "\\frac{3}{4}", ["a</think> \\boxed{0.7}"] * 4, [0, 0, 0, 0]),
    (
        "gpqa",
        "Pick one.\n\nA) 1 eV\nB) 2 eV\nC) 3 eV\nD) 4 eV",
        "B",
        ["a</think> ANSWER: B", "a</think> \\boxed{(B)}", "a</think> \\boxed{C}", "a</think> The answer is (D)."],
        [1, 1, 0, 0],
    ),
    (
        "quiz",
        "Which letter comes first?\n\nA) a\nB) b",
        "(A)",
        ["a</think> \\boxed{\\text{A}}", "a</think> \\boxed{B}", "a</think> \\boxed{B}", "a</think> \\boxed{B}"],
        [1, 0, 0, 0],
    ),
    (
        "arc_c",
        "Which is heavier?\n\n1) a feather\n2) a brick",
        "2",
        ["a</think> \\boxed{2}", "a</think> \\boxed{3}", "a</think> answer: 2", "a</think> \\boxed{25}"],
        [1, 0, 1, 0],
    ),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def scripted_examples(tmp_path, tokenizer):
    path = tmp_path / "bench.jsonl"
    with path.open("w") as handle:
        for source, question, truth, _, _ in SCRIPT:
            prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
            handle.write(json.dumps({"data_source": source, "prompt": prompt, "reward_model": {"ground_truth": truth}}))
            handle.write("\n")
    return load_examples([str(path)], DataConfig(), tokenizer, require_traces=False).examples


def test_evaluate_grades_math_and_multiple_choice_with_a_real_pool(scripted_examples, tokenizer):
    examples = scripted_examples
    engine = ScriptedEngine(tokenizer, {tuple(ex.prompt_ids): row[3] for ex, row in zip(examples, SCRIPT, strict=True)})
    params = SamplingParams(max_tokens=64, temperature=0.6)
    with RewardPool("math_verify", num_workers=2, timeout_s=30.0) as pool:
        result = evaluate(engine, examples, tokenizer, pool, params, k=4, seed=3, pass_at_j=[2])
        with pytest.raises(ValueError, match="cannot grade with test_eval_always_right"):
            evaluate(engine, examples, tokenizer, pool, params, k=4, graders={"math": "test_eval_always_right"})
    assert engine.calls == [(4, params, 3)]

    assert [s["reward"] for s in result.samples] == [float(r) for row in SCRIPT for r in row[4]]
    assert result.graders == {
        "arc_c": ["multiple_choice"],
        "gpqa": ["multiple_choice"],
        "math": ["math_verify"],
        "quiz": ["multiple_choice"],
    }
    # pass@2 of one problem with c of 4 right: 1 - C(4-c, 2) / C(4, 2) = 5/6 (c=2), 1/2 (c=1), 0 (c=0)
    expected = {
        "arc_c": {"problems": 1, "avg@4": 0.5, "pass@2": 5 / 6, "pass@4": 1.0},
        "gpqa": {"problems": 1, "avg@4": 0.5, "pass@2": 5 / 6, "pass@4": 1.0},
        "math": {"problems": 2, "avg@4": 0.25, "pass@2": 5 / 12, "pass@4": 0.5},
        "quiz": {"problems": 1, "avg@4": 0.25, "pass@2": 0.5, "pass@4": 1.0},
    }
    for source, scores in expected.items():
        responses = [r for row in SCRIPT if row[0] == source for r in row[3]]
        lengths = [len(tokenizer.encode(r, add_special_tokens=False)) for r in responses]
        truncated = sum("</think>" not in r for r in responses) / len(responses)
        assert result.by_source[source] == pytest.approx(
            {**scores, "response_tokens": sum(lengths) / len(lengths), "truncated": truncated}
        )
    assert result.by_source["math"]["truncated"] == 1 / 8
    assert result.mean["avg@4"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)

    second_math = [s for s in result.samples if s["benchmark"] == "math" and s["index"] == 1]
    assert [s["sample"] for s in second_math] == [0, 1, 2, 3]
    assert second_math[0] == {
        "benchmark": "math",
        "index": 1,
        "sample": 0,
        "prompt": examples[1].prompt_text,
        "response": "a</think> \\boxed{0.7}",
        "ground_truth": "\\frac{3}{4}",
        "grader": "math_verify",
        "reward": 0.0,
        "finish_reason": "stop",
        "response_tokens": len(tokenizer.encode("a</think> \\boxed{0.7}", add_special_tokens=False)),
    }
    table = result.markdown()
    assert "| benchmark | problems | avg@4 | pass@2 | pass@4 | tokens | truncated % |" in table
    assert "| math | 2 | 25.0 | 41.7 | 50.0 |" in table
    assert "| **average (4)** |  | 37.5 |" in table


class NeverGenerates:
    def generate(self, *args, **kwargs):
        raise AssertionError("generation must not start")


def test_a_multiple_choice_answer_that_is_no_label_fails_before_generation(scripted_examples, tokenizer):
    examples = scripted_examples
    examples[2].ground_truth = "2 eV"  # gpqa is a multiple-choice benchmark: its answers must be option labels
    with pytest.raises(ValueError, match=r"benchmark 'gpqa' problem 0: ground truth '2 eV' .*gpqa=math_verify"):
        evaluate(NeverGenerates(), examples, tokenizer, _PoolStub(), SamplingParams(max_tokens=4), k=1)
    graders = choose_graders(examples, "math_verify", {"gpqa": "math_verify"})
    assert graders == ["math_verify", "math_verify", "math_verify", "multiple_choice", "multiple_choice"]


class _PoolStub:
    """Never reached: evaluate checks the answers before it generates or grades."""

    name = "math_verify"
    reward_names = ("math_verify", "multiple_choice")
