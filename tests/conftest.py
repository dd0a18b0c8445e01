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

from dataclasses import dataclass
from typing import Any

import pytest
from servers import MlflowServer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Tiny Qwen2 model A (seed 0) with its tokenizer."""
    from luffy_trainer.demo.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-a"), seed=0))


@pytest.fixture(scope="session")
def tiny_model_b_dir(tmp_path_factory) -> str:
    """Tiny Qwen2 model B: same architecture and tokenizer as A, other weights (seed 1)."""
    from luffy_trainer.demo.tiny import make_tiny_model

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
    """Builds the config of a short training run of tiny model A (tests/tiny_training.py), as the mapping a LuffyRun
    or YAML file holds: `build(task_dir, **sections)`, checkpoints and outputs under the test's tmp_path."""
    from tiny_training import train_config

    def build(task_dir: Path, **sections: dict) -> dict:
        return train_config(tiny_model_dir, task_dir, tmp_path, **sections)

    return build


@dataclass
class ShortTrainingRun:
    """A finished short training: its result, config, working directory and tracking server."""

    result: Any  # luffy_trainer.train.TrainResult
    config: Any  # luffy_trainer.config.TrainConfig
    workdir: Path
    tracking_uri: str


@pytest.fixture(scope="session")
def short_training_run(tiny_model_dir, mlflow_uri, tmp_path_factory) -> ShortTrainingRun:
    """One short LUFFY training on the tiny model with real vLLM, validation, best-model tracking and the session's
    MLflow server: 3 steps, validated at steps 2 and 3. Shared by tests/test_train.py (what it logs and registers)
    and tests/test_docs.py (the documented metric list), so it runs once per session."""
    from luffy_trainer.config import parse_config
    from luffy_trainer.train import LuffyTrainer
    from tiny_training import train_config, write_task

    work = tmp_path_factory.mktemp("short-run")
    config = parse_config(
        train_config(
            tiny_model_dir,
            write_task(work / "task"),
            work,
            validation={"everySteps": 2},
            tracking={
                "trackingUri": mlflow_uri,
                "registeredModelName": "tiny-luffy",
                "registeredModelAlias": "candidate",
                "bestModelAlias": "best",
            },
        )
    )
    return ShortTrainingRun(LuffyTrainer(config, workdir=work).run(), config, work, mlflow_uri)
