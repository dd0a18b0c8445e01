"""Local servers for integration tests: free ports and a real `mlflow server` process (importable from any test dir)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
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


def train_process(config_path: Path, env: dict) -> subprocess.Popen:
    """luffy train CONFIG in a process group of its own, so a test can signal it whole."""
    return subprocess.Popen(
        [sys.executable, "-m", "luffy_trainer.cli", "train", str(config_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    """Block until path exists; fail with the output tail if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}):\n{proc.stdout.read().decode()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s}s")
        time.sleep(0.2)


def trainer_env(**extra) -> dict:
    """This environment without MLFLOW_TRACKING_URI (the configs name their server), plus extra."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, **extra}
