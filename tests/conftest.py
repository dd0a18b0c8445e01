"""Shared test setup: offline Hugging Face, CPU vLLM settings, and tiny models built once per session."""

from __future__ import annotations

import os

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
