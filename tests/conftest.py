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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1 that a test can stop and start again on the same port."""

    def __init__(self, root, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.process = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> MlflowServer:
        import subprocess
        import sys
        import time
        import urllib.request
        from pathlib import Path

        mlflow_cli = Path(sys.executable).with_name("mlflow")
        self.log = open(Path(self.root) / "server.log", "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                str(mlflow_cli),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination",
                f"{self.root}/artifacts",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # No background job runner (seven extra processes, unused by luffy): faster start and stop.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: see {self.root}/server.log")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server not healthy after {timeout_s}s")

    def stop(self) -> None:
        import os
        import signal
        import time

        if self.process is not None:
            # The server, its uvicorn worker and job runners share one process group: wait until all are gone,
            # so that the port is really closed when stop() returns.
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    os.killpg(self.process.pid, 0)
                    self.process.poll()
                    time.sleep(0.2)
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)
        self.process = None
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real tracking server for the session's integration tests."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()
