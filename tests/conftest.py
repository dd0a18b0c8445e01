"""Shared test setup: offline Hugging Face, CPU vLLM settings, tiny models built once per session, and the config of
a short training run on them."""

from __future__ import annotations

import os
from pathlib import Path

# Set before anything imports transformers or vllm: nothing may be downloaded, and vLLM runs in-process on CPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest
from servers import MlflowServer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Tiny Qwen2 model A (seed 0) with its tokenizer."""
    from luffy_trainer.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-a"), seed=0))


@pytest.fixture(scope="session")
def tiny_model_b_dir(tmp_path_factory) -> str:
    """Tiny Qwen2 model B: same architecture and tokenizer as A, other weights (seed 1)."""
    from luffy_trainer.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-b"), seed=1))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real tracking server for the session's integration tests."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_uri(mlflow_server) -> str:
    """The URI of the session's tracking server."""
    return mlflow_server.uri


@pytest.fixture
def tiny_run_config(tiny_model_dir, tmp_path):
    """Builds the config of a short training run of tiny model A, as the mapping a LuffyRun or YAML file holds.

    `build(task_dir, **sections)`: train and validate on the parquet files of `write_arithmetic_task(task_dir)`,
    checkpoints and outputs under the test's tmp_path; each keyword updates that section of the defaults.
    """

    def build(task_dir: Path, **sections: dict) -> dict:
        config = {
            "model": {"path": tiny_model_dir, "dtype": "float32", "gradientCheckpointing": False},
            "data": {
                "trainFiles": [str(task_dir / "train.parquet")],
                "valFiles": [str(task_dir / "val.parquet")],
                "maxPromptLength": 64,
                "maxResponseLength": 48,
            },
            "algorithm": {"nOnPolicy": 3},
            "reward": {"numWorkers": 1},
            "rollout": {"backend": "vllm", "maxModelLen": 128},
            "optimization": {"lr": 1e-3, "promptsPerStep": 4, "optimizerStepsPerBatch": 2, "totalSteps": 3},
            "validation": {"everySteps": 0, "samplesPerPrompt": 2},
            "checkpoint": {"dir": str(tmp_path / "ckpt"), "everySteps": 2, "keepLast": 2},
            "tracking": {"experimentName": "train-tests", "systemMetrics": False},
            "outputDir": str(tmp_path / "out"),
        }
        for section, values in sections.items():
            config[section].update(values)
        return config

    return build
