"""What a user can fix ends `luffy train` and `luffy eval` with one line naming the file, column or URL, and a
non-zero exit: a missing data file, a missing column, no usable rows, an unreachable rollout or tracking server, an
unreadable model directory. Run through the real command line, in-process and (for the cases the issue reported)
as a process of its own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from luffy_trainer.cli import main as luffy
from servers import free_port

CLOSED_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there
ROWS = [
    {
        "data_source": "arith",
        "prompt": [{"role": "user", "content": f"What is {a} + 3?"}],
        "target": [{"role": "assistant", "content": f"<think>\n{a} + 3 = {a + 3}\n</think>\n\\boxed{{{a + 3}}}"}],
        "reward_model": {"ground_truth": str(a + 3)},
    }
    for a in range(4)
]
# A log record as `luffy` formats it (logging.basicConfig in cli.main), or a progress bar (transformers loading the
# weights); everything else on stderr is the error.
NOT_THE_ERROR = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ |\d+%\|")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No MLflow environment, and the working directory (where a default local store would go) is the test's."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "LUFFY_ROLLOUT_URLS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def rows(tmp_path) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def train_config(tmp_path: Path, model: str, rows: str, tracking_uri: str) -> str:
    config = {
        "model": {"path": model, "dtype": "float32", "gradientCheckpointing": False},
        "data": {"trainFiles": [rows], "maxPromptLength": 64, "maxResponseLength": 48},
        "algorithm": {"nOnPolicy": 2},
        "reward": {"numWorkers": 1},
        "rollout": {"backend": "hf"},
        "optimization": {"promptsPerStep": 2, "optimizerStepsPerBatch": 1, "totalSteps": 1},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
        "tracking": {"trackingUri": tracking_uri, "experimentName": "user-errors", "systemMetrics": False},
        "outputDir": str(tmp_path / "out"),
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def eval_config(tmp_path: Path, model: str, rows: str) -> str:
    config = {
        "model": {"path": model, "dtype": "float32"},
        "data": {"files": [rows]},
        "rollout": {"backend": "hf", "maxTokens": 8},
        "reward": {"numWorkers": 1},
        "outputDir": str(tmp_path / "eval"),
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def cases(tmp_path: Path, rows: str) -> dict[str, tuple[list[str], str]]:
    """case -> (--set overrides, what the error line must name), for either command (`data.files` is renamed for
    train)."""
    (tmp_path / "empty-model").mkdir()
    return {
        "missing data file": ([f"data.files=[{tmp_path / 'nowhere.parquet'}]"], f"{tmp_path / 'nowhere.parquet'}"),
        "missing column": (["data.luffyColumns.prompt=question"], f"column 'question' .* not found in {rows}"),
        "no usable rows": (
            ["data.maxPromptLength=4", "data.overlongPrompt=drop"],
            f"no usable rows in {rows}: of 4 read, 4 have a prompt over data.max_prompt_length = 4",
        ),
        "unreachable rollout server": (
            ["rollout.backend=vllm-server", f"rollout.serverUrls=[{CLOSED_URL}]", "rollout.unhealthyTimeoutS=1"],
            f"no rollout server became ready within 1 s \\({CLOSED_URL}: ",
        ),
        "unreachable tracking server": (
            [f"tracking.trackingUri={CLOSED_URL}", "tracking.connectTimeoutS=1"],
            f"cannot reach the MLflow tracking server at {CLOSED_URL}",
        ),
        "unreadable model directory": (
            [f"model.path={tmp_path / 'empty-model'}"],
            f"model.path {tmp_path}/empty-model",
        ),
    }


CASES = ["missing data file", "missing column", "no usable rows", "unreachable rollout server"]
CASES += ["unreachable tracking server", "unreadable model directory"]


def assert_one_line_error(command: str, code: int, stderr: str, pattern: str) -> None:
    assert code != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.strip() and not NOT_THE_ERROR.search(line)]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"luffy {command}: ") and re.search(pattern, errors[0]), errors[0]


@pytest.mark.parametrize("case", CASES)
def test_train_ends_a_user_error_in_one_line(case, tiny_model_dir, mlflow_server, rows, tmp_path, capsys):
    overrides, pattern = cases(tmp_path, rows)[case]
    overrides = [o.replace("data.files=", "data.trainFiles=") for o in overrides]
    config = train_config(tmp_path, tiny_model_dir, rows, mlflow_server.uri)
    code = luffy(["train", config, *(arg for o in overrides for arg in ("--set", o))])
    assert_one_line_error("train", code, capsys.readouterr().err, pattern)


@pytest.mark.parametrize("case", CASES)
def test_eval_ends_a_user_error_in_one_line(case, tiny_model_dir, rows, tmp_path, capsys):
    overrides, pattern = cases(tmp_path, rows)[case]
    code = luffy(
        ["eval", eval_config(tmp_path, tiny_model_dir, rows), *(arg for o in overrides for arg in ("--set", o))]
    )
    assert_one_line_error("eval", code, capsys.readouterr().err, pattern)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(("command", "case"), [("train", "missing data file"), ("eval", "no usable rows")])
def test_the_installed_command_prints_no_traceback(command, case, tiny_model_dir, mlflow_server, rows, tmp_path):
    """The two cases a new user met as 20-line tracebacks, run as `python -m luffy_trainer.cli` processes."""
    overrides, pattern = cases(tmp_path, rows)[case]
    if command == "train":
        config = train_config(tmp_path, tiny_model_dir, rows, mlflow_server.uri)
        overrides = [o.replace("data.files=", "data.trainFiles=") for o in overrides]
    else:
        config = eval_config(tmp_path, tiny_model_dir, rows)
    argv = [sys.executable, "-m", "luffy_trainer.cli", command, config, *(a for o in overrides for a in ("--set", o))]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert_one_line_error(command, done.returncode, done.stderr, pattern)
