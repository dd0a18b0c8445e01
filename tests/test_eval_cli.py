"""`luffy eval` end to end on the tiny model: real engines (HF and vLLM), real grading pools, a real MLflow server."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import yaml
from luffy_trainer.cli import main as luffy
from luffy_trainer.rewards import get_reward, register_reward

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "benchmarks"
SYSTEM_TEXT = "Reason step by step"  # the start of the system prompt in examples/benchmarks/luffy_format_sample.jsonl


@register_reward("test_even_length")
def even_length(response: str, ground_truth: str) -> float:
    """1.0 for a response of even length: right about half the time on any model, so avg@k and pass@k are
    exercised with mixed grades through the real command."""
    return float(len(response) % 2 == 0)


@pytest.fixture(autouse=True)
def no_mlflow_environment(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_scores(samples: list[dict], k: int, j: int) -> dict[str, dict[str, float]]:
    """avg@k, pass@j (averaged over every j-subset of each problem's samples) and pass@k, from the saved
    generations, with the rewards re-graded here."""
    grades: dict[str, dict[int, list[bool]]] = {}
    for s in samples:
        reward = get_reward(s["grader"])(s["response"], s["ground_truth"])
        assert reward == s["reward"]
        grades.setdefault(s["benchmark"], {}).setdefault(s["index"], []).append(reward > 0.5)
    out = {}
    for source, problems in grades.items():
        rows = list(problems.values())
        assert all(len(r) == k for r in rows)
        subsets = list(itertools.combinations(range(k), j))
        out[source] = {
            f"avg@{k}": sum(sum(r) / k for r in rows) / len(rows),
            f"pass@{j}": sum(sum(any(r[i] for i in c) for c in subsets) / len(subsets) for r in rows) / len(rows),
            f"pass@{k}": sum(any(r) for r in rows) / len(rows),
        }
    return out


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run_id_from(stdout: str) -> str:
    match = re.search(r"MLflow run: (\w+)", stdout)
    assert match, stdout
    return match.group(1)


def test_eval_on_hf_writes_results_and_logs_them_to_mlflow(tiny_model_dir, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "results"
    benchmark = str(EXAMPLES / "luffy_format_sample.jsonl")
    # examples/benchmarks/luffy_format_sample.jsonl: "math" (3 problems) and "arc_c" (2, multiple choice)
    config = write_config(
        tmp_path / "eval.yaml",
        {
            "model": {"path": tiny_model_dir, "dtype": "float32"},
            "data": {"files": [benchmark]},
            "rollout": {"backend": "hf", "temperature": 1.0, "maxTokens": 24},
            "samples": 4,
            "passAt": [2],
            "graders": {"math": "test_even_length"},
            "outputDir": str(out),
            "tracking": {"trackingUri": mlflow_server.uri, "experimentName": "eval-test", "runName": "tiny-eval"},
        },
    )
    argv = ["eval", config, "--set", "reward.numWorkers=2"]
    assert luffy(argv) == 0
    stdout = capsys.readouterr().out

    samples = read_jsonl(out / "generations.jsonl")
    assert len(samples) == (3 + 2) * 4
    assert {s["benchmark"]: s["grader"] for s in samples} == {"math": "test_even_length", "arc_c": "multiple_choice"}
    for s in samples:
        assert SYSTEM_TEXT not in s["prompt"]  # the system message is removed ...
        assert s["prompt"].startswith("<|im_start|>user\n") and s["prompt"].endswith("<|im_start|>assistant\n<think>\n")
        assert 1 <= s["response_tokens"] <= 24 and s["finish_reason"] in ("stop", "length")
    assert sorted({(s["benchmark"], s["index"], s["sample"]) for s in samples}) == sorted(
        [("math", i, j) for i in range(3) for j in range(4)] + [("arc_c", i, j) for i in range(2) for j in range(4)]
    )
    expected = expected_scores(samples, k=4, j=2)
    assert any(0 < v["avg@4"] < 1 for v in expected.values())  # mixed grades: the arithmetic is really exercised

    results = json.loads((out / "results.json").read_text())
    assert results["samples"] == {"math": 4, "arc_c": 4} and results["system_prompt"] == "removed"
    assert results["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 24, "seed": 47}
    assert list(results["benchmarks"]) == ["arc_c", "math"]
    for source, scores in expected.items():
        got = results["benchmarks"][source]
        assert {key: got[key] for key in scores} == pytest.approx(scores)
        assert got["problems"] == got["distinct_problems"] == {"math": 3, "arc_c": 2}[source]
    for key in ("avg@4", "pass@2", "pass@4"):  # unweighted mean over the two benchmarks
        assert results["average"][key] == pytest.approx((expected["math"][key] + expected["arc_c"][key]) / 2)

    table = (out / "results.md").read_text()
    math_row = f"| math | 3 | {100 * expected['math']['avg@4']:.1f} | {100 * expected['math']['pass@2']:.1f} |"
    assert math_row in table and math_row in stdout
    assert "| **average (2)** |" in table

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id_from(stdout))
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-eval"
    assert client.get_experiment(run.info.experiment_id).name == "eval-test"
    assert run.data.params["eval.samples"] == '{"arc_c": 4, "math": 4}'
    assert run.data.params["eval.model"] == tiny_model_dir
    for source, scores in expected.items():
        for key, value in scores.items():
            assert run.data.metrics[f"eval/{source}/{key.replace('@', '_at_')}"] == pytest.approx(value)
    assert run.data.metrics["eval/mean/avg_at_4"] == pytest.approx(results["average"]["avg@4"])
    (dataset,) = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.source_type) == ("luffy_format_sample.jsonl", "local")
    assert json.loads(dataset.dataset.source) == {"uri": benchmark}
    assert {t.key: t.value for t in dataset.tags} == {"mlflow.data.context": "evaluation"}
    assert run.data.tags["mlflow.source.name"] == "luffy eval" and run.data.tags["luffy.version"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval/step_0")}
    assert artifacts == {"eval/step_0/results.json", "eval/step_0/results.md", "eval/step_0/generations.jsonl"}
    logged = client.download_artifacts(run.info.run_id, "eval/step_0/results.json", str(tmp_path))
    assert json.loads(Path(logged).read_text()) == results


@pytest.mark.vllm
def test_eval_on_vllm_joins_an_existing_run_at_a_step(tiny_model_dir, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment("training-like")
    training = client.create_run(experiment).info.run_id
    client.log_param(training, "algorithm.mode", "luffy")
    client.set_terminated(training, "FINISHED")

    out = tmp_path / "results"
    sets = {  # no config file: every field from --set
        "model.path": tiny_model_dir,
        "model.dtype": "float32",
        "data.files": f"[{EXAMPLES / 'flat_sample.jsonl'}]",
        "data.format": "flat",
        "data.names": "[arith]",
        "data.limit": "2",
        "data.maxPromptLength": "64",
        "rollout.backend": "vllm",
        "rollout.maxTokens": "16",
        "samples": "2",
        "reward.numWorkers": "1",
        "outputDir": str(out),
        "tracking.trackingUri": mlflow_server.uri,
        "tracking.runId": training,
        "tracking.step": "7",
    }
    argv = ["eval", *(arg for key, value in sets.items() for arg in ("--set", f"{key}={value}"))]
    assert luffy(argv) == 0
    assert run_id_from(capsys.readouterr().out) == training

    samples = read_jsonl(out / "generations.jsonl")
    assert len(samples) == 2 * 2 and {s["benchmark"] for s in samples} == {"arith"}  # --limit 2 problems
    assert {s["grader"] for s in samples} == {"math_verify"}
    assert all(1 <= s["response_tokens"] <= 16 for s in samples)
    assert [s["prompt"] for s in samples[::2]] == [
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n<think>\n"
        for q in ("What is 9 * 8?", "What is 100 - 37?")
    ]
    expected = expected_scores(samples, k=2, j=1)["arith"]
    results = json.loads((out / "results.json").read_text())
    assert results["benchmarks"]["arith"]["avg@2"] == pytest.approx(expected["avg@2"])

    run = client.get_run(training)
    assert run.info.status == "FINISHED"  # the run keeps its status
    assert run.data.params["algorithm.mode"] == "luffy" and run.data.params["eval.backend"] == "vllm"
    assert "mlflow.source.name" not in run.data.tags  # the joined run keeps its own source tags
    assert [d.tags[0].value for d in run.inputs.dataset_inputs] == ["evaluation"]
    history = client.get_metric_history(training, "eval/arith/avg_at_2")
    assert [(m.step, m.value) for m in history] == [(7, pytest.approx(expected["avg@2"]))]
    assert "progress/step" not in run.data.metrics  # no training-step marker: a resumed training is not confused
    assert {a.path for a in client.list_artifacts(training, "eval/step_7")} == {
        "eval/step_7/results.json",
        "eval/step_7/results.md",
        "eval/step_7/generations.jsonl",
    }


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_eval_rejects_bad_input_with_a_clear_message(tiny_model_dir, mlflow_server, tmp_path, capsys):
    flat = str(EXAMPLES / "flat_sample.jsonl")
    luffy_rows = str(EXAMPLES / "luffy_format_sample.jsonl")
    gpqa_text_answer = write_jsonl(
        tmp_path / "gpqa.jsonl",
        [
            {
                "data_source": "gpqa",
                "prompt": [{"role": "user", "content": "Q"}],
                "reward_model": {"ground_truth": "4.5 eV"},
            }
        ],
    )
    config = {
        "model": {"path": tiny_model_dir},
        "data": {"files": [luffy_rows]},
        "rollout": {"backend": "hf"},
        "outputDir": str(tmp_path / "out"),
    }
    base = ["eval", write_config(tmp_path / "eval.yaml", config)]
    server = mlflow_server.uri
    cases = [
        (["--set", f"data.files=[{tmp_path / 'missing.parquet'}]"], r"data file .*missing\.parquet does not exist"),
        (["--set", "data.format=flat"], r"column 'question' \(data\.flat_columns\.question"),
        (["--set", f"data.files=[{flat}]"], r"column 'prompt' \(data\.luffy_columns\.prompt = 'prompt'\) not found"),
        (
            ["--set", f"data.files=[{flat}]", "--set", "data.format=flat", "--set", "data.flatColumns.answer=solution"],
            r"column 'solution'",
        ),
        (["--set", "data.names=[a, b]"], r"data: .*names has 2 entries for 1 files"),
        (["--set", "data.benchmark=x"], r"data\.benchmark: unknown field"),
        (["--set", "samples=2", "--set", "passAt=[4]"], "pass_at 4 exceeds every sample count"),
        (["--set", "samplesPerBenchmark.math=0"], r"samplesPerBenchmark\.math: Input should be greater than or equal"),
        (["--set", "samplesPerBenchmark.aime=32"], r"samples_per_benchmark\.aime: no benchmark 'aime'"),
        (["--set", "graders.math=nope"], "graders.math: unknown reward 'nope'"),
        (["--set", "reward.name=nope"], "reward.name: unknown reward 'nope'"),
        (["--set", "graders.gsm8k=math_verify"], r"graders\.gsm8k: no benchmark 'gsm8k'; benchmarks: arc_c, math"),
        (["--set", f"data.files=[{gpqa_text_answer}]"], r"'gpqa' problem 0: ground truth '4.5 eV' is not an option"),
        (["--set", "data.maxPromptLength=8"], "over data.max_prompt_length = 8"),
        (["--set", "tracking.runId=abc"], "tracking.run_id needs tracking.tracking_uri"),
        (
            ["--set", f"tracking.trackingUri={server}", "--set", "tracking.runId=0123abcd"],
            "MLflow at http://127.0.0.1:\\d+ refused to read run 0123abcd",
        ),
    ]
    for extra, message in cases:
        assert luffy(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("luffy eval: ") and re.search(message, err), (extra, err)
    assert not (tmp_path / "out").exists()  # nothing was generated
    assert luffy(["eval"]) == 2  # no config and no --set: the required sections are named
    assert re.search(r"model: Field required\n  data: Field required", capsys.readouterr().err)


def test_system_messages_are_dropped_and_repeated_problems_counted(tiny_model_dir):
    from luffy_trainer.data import Example
    from luffy_trainer.eval_cli import WithoutSystemMessages, distinct_problems
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    view = WithoutSystemMessages(tokenizer)
    user = {"role": "user", "content": "What is 2 + 2?"}
    conversation = [{"role": "system", "content": "Be brief."}, user]
    expected = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    assert "Be brief." not in expected
    assert view.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == expected
    assert view.apply_chat_template([conversation], add_generation_prompt=True, tokenize=False) == [expected]
    assert len(view) == len(tokenizer) and view.eos_token_id == tokenizer.eos_token_id

    def example(source: str, prompt: str, truth: str) -> Example:
        return Example(0, [1], truth, [], source, prompt)

    rows = [
        example("aime", "p1", "1"),
        example("aime", "p1", "1"),
        example("aime", "p2", "1"),
        example("math", "p1", "1"),
    ]
    assert distinct_problems(rows) == {"aime": 2, "math": 1}


def test_a_config_file_runs_per_benchmark_sample_counts(tiny_model_dir, tmp_path, capsys):
    """The paper's protocol shape on the sample file: distinct problems, 3 samples for one benchmark and 1 for the
    other, each benchmark's accuracy at its own k and their unweighted mean."""
    rows = read_jsonl(EXAMPLES / "luffy_format_sample.jsonl")
    repeated = write_jsonl(tmp_path / "repeated.jsonl", rows + rows[:2])  # two math rows twice, as LUFFY's file has
    config = {
        "model": {"path": tiny_model_dir, "dtype": "float32"},
        "data": {"files": [repeated], "distinct": True},
        "samples": 1,
        "samplesPerBenchmark": {"math": 3},
        "rollout": {"backend": "hf", "temperature": 1.0, "maxTokens": 16},
        "reward": {"name": "boxed_math"},
    }
    out = tmp_path / "out"
    assert luffy(["eval", write_config(tmp_path / "eval.yaml", config), "--set", f"outputDir={out}"]) == 0
    samples = read_jsonl(out / "generations.jsonl")
    per_problem = {}
    for s in samples:
        per_problem.setdefault((s["benchmark"], s["index"]), []).append(s["reward"] > 0.5)
        assert s["grader"] == {"math": "boxed_math", "arc_c": "multiple_choice"}[s["benchmark"]]
    assert sorted((b, i, len(v)) for (b, i), v in per_problem.items()) == [
        ("arc_c", 0, 1),
        ("arc_c", 1, 1),
        ("math", 0, 3),
        ("math", 1, 3),
        ("math", 2, 3),
    ]
    results = json.loads((out / "results.json").read_text())
    assert results["samples"] == {"arc_c": 1, "math": 3}
    accuracy = {
        source: sum(sum(v) / len(v) for (b, _), v in per_problem.items() if b == source) / n
        for source, n in (("arc_c", 2), ("math", 3))
    }
    for source, value in accuracy.items():
        got = results["benchmarks"][source]
        assert got["accuracy"] == pytest.approx(value) and got["samples"] == {"arc_c": 1, "math": 3}[source]
        assert got["problems"] == got["distinct_problems"]
    assert results["benchmarks"]["math"]["avg@3"] == pytest.approx(accuracy["math"])
    assert results["average"]["accuracy"] == pytest.approx((accuracy["arc_c"] + accuracy["math"]) / 2)
    assert "avg@3" not in results["average"]  # a score only some benchmarks have is not averaged
    assert "samples per problem: arc_c 1, math 3" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    ("recipe", "samples", "graders"),
    [
        ("eval-paper-math.yaml", {"aime": 32, "aime25": 32, "amc": 32}, {}),
        ("eval-paper-ood.yaml", {}, dict.fromkeys(["arc_c", "gpqa", "mmlu_pro"], "multiple_choice_boxed")),
    ],
)
def test_the_paper_recipes_hold_the_paper_protocol(recipe, samples, graders):
    from luffy_trainer.config import load_config
    from luffy_trainer.eval_cli import EvalConfig

    config = load_config(EXAMPLES.parent / recipe, ["model.path=m"], EvalConfig)
    assert (config.rollout.temperature, config.rollout.top_p, config.rollout.max_tokens) == (0.6, 1.0, 8192)
    assert (config.samples, config.samples_per_benchmark, config.graders) == (1, samples, graders)
    assert config.reward.name == ("boxed_math" if "math" in recipe else "math_verify")
    assert config.data.distinct == ("math" in recipe) and not config.data.keep_system_prompt
    assert all(path.startswith("/data/luffy/valid.") for path in config.data.files)
